"""One rank of test_trl_fsdp.py: NTLGRPOTrainer's real training step on a tiny Qwen2 sharded
with FSDP2 (``fully_shard``, ``reshard_after_forward=True`` as accelerate sets it) over 2 gloo
ranks on CPU (accelerate's FSDP plugin needs GPUs). Each rank gets other completions with an
uneven number of digits; advantages are 0 (constant reward), so the gradient is NTL's alone.

The DDP-equivalent gradient is computed here independently, on an unsharded copy of the
initial weights: ``w * grad(sum of W1 over both ranks' digit targets / their count)``, from
full logits. Variants: ``tied`` (the head is the root module's embedding, all-gathered while
the forward runs) and ``untied_head_group`` (``lm_head`` sharded in its own group, still a
DTensor when NTL reads it). Rank 0 writes the max differences to ``argv[1]`` (JSON).

Run: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python fsdp_worker.py out.json``.
(``tests/support`` on ``PYTHONPATH``: ``ranks.run_rank`` ends the process).
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch
import torch.distributed as dist
from ranks import run_rank, write_json

T, W = 0.7, 1.0
SCRIPT = {"12+30=": ["so #### 42", "x 3 #### 142"], "9-4=": ["#### 7", "none"]}  # 6 and 1 digits
TRUTH = {"12+30=": "42", "9-4=": "5"}


def run(variant: str, rank: int, world: int) -> dict[str, object]:
    from datasets import Dataset
    from ntl_trl import NTLConfig, NTLGRPOTrainer
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from trl_tiny import (
        char_tokenizer,
        constant_reward,
        grads_of,
        sampled_digit_targets,
        script_generate,
        tiny_qwen2,
        trainer_args,
        w1_with_targets,
    )

    tied = variant == "tied"
    tok = char_tokenizer()
    model = tiny_qwen2(tok, tied=tied)
    script_generate(model, tok, SCRIPT)
    ds = Dataset.from_dict({"prompt": list(SCRIPT), "ground_truth": list(TRUTH.values())})
    out = tempfile.mkdtemp(prefix=f"ntl-fsdp-{variant}-{rank}-")
    tr = NTLGRPOTrainer(
        model=model, reward_funcs=constant_reward, processing_class=tok, train_dataset=ds,
        args=trainer_args(output_dir=out, per_device_train_batch_size=2, num_generations=2,
                          max_steps=1, temperature=T),
        ntl_config=NTLConfig(ntl_weight=W, ntl_labels="all", correct_only=False),
    )
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    if not tied:
        fully_shard(model.lm_head, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    seen = []
    model.model.register_forward_hook(lambda *a: seen.append(type(model.lm_head.weight).__name__))

    prompt = list(SCRIPT)[rank]
    rows = [{"prompt": prompt, "ground_truth": TRUTH[prompt]}] * 2
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1  # set by the HF training loop
    tr.training_step(model, rows, None)  # generation (scripted), NTL targets, forward, backward
    mb = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
          for k, v in tr._buffered_inputs[0].items()}
    grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach()  # pyright: ignore[reportAttributeAccessIssue] (DTensor)
             for k, p in model.named_parameters() if p.grad is not None}

    batches: list = [None] * world
    dist.all_gather_object(batches, mb)
    ref = tiny_qwen2(tok, tied=tied)  # the same initial weights, unsharded
    terms = [w1_with_targets(ref, b, tok, T, sampled_digit_targets(b, tok), requires_grad=True)
             for b in batches]
    n_total = sum(n for _, n in terms)
    expected = grads_of(ref, W * sum(s for s, _ in terms) / n_total)
    # what a rank would get if the head gradient were not averaged (the old full_tensor())
    digit_rows = [tok.convert_tokens_to_ids(d) for d in "0123456789"]
    head = "lm_head.weight" if not tied else "model.embed_tokens.weight"
    assert set(grads) == set(expected), sorted(set(grads) ^ set(expected))
    diff = max(float((grads[k] - expected[k]).abs().max()) for k in expected)
    return {
        "max_abs_diff": diff,
        "max_abs_grad": max(float(g.abs().max()) for g in expected.values()),
        "head_digit_rows_diff": float((grads[head][digit_rows] - expected[head][digit_rows]).abs().max()),
        "head_digit_rows_grad": float(expected[head][digit_rows].abs().max()),
        "digits_per_rank": [n for _, n in terms],
        "ntl_num_targets": float(mb.get("ntl_num_targets", -1)),
        "head_type_in_forward": seen[0] if seen else "none",
    }


def main(path: str) -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {v: run(v, rank, world) for v in ("tied", "untied_head_group")}
    if rank == 0:
        write_json(path, results)
    return 0  # run_rank: the final barrier, then os._exit


if __name__ == "__main__":
    run_rank(lambda: main(sys.argv[1]))
