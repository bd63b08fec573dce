"""One rank of test_trl_sft_ddp.py: NTLSFTTrainer's real ``train()`` for one optimizer step
under accelerate's data parallelism (DDP over 2 gloo ranks on CPU). The two rows have very
uneven digit counts and the sampler gives each rank one of them.

Expected, computed on rank 0 from an unsharded copy of the initial weights and the full
logits of *both* rows: ``theta_0 - lr * grad(CE_sum / tokens + w * NTL_sum / digits)``, sums
and counts over the whole window (both ranks), what one process with both rows would do.
Rank 0 writes the largest differences to ``argv[1]`` (JSON).

Run: ``RANK=r LOCAL_RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python sft_ddp_worker.py out.json``.
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

W, LR = 1.0, 0.5
ROWS = [("what is 12+30? ", "12+30=42 and 42+58=100 so #### 100"), ("say hi. ", "hi 7")]


def main(path: str) -> int:
    import trl
    from datasets import Dataset
    from ntl_trl import NTLSFTConfig, NTLSFTTrainer
    from trl_tiny import char_tokenizer, grads_of, tiny_qwen2

    import ntl

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    tok = char_tokenizer()
    ds = Dataset.from_dict({"prompt": [p for p, _ in ROWS], "completion": [c for _, c in ROWS]})
    args = trl.SFTConfig(
        output_dir=tempfile.mkdtemp(prefix=f"ntl-sft-ddp-{rank}-"), use_cpu=True, bf16=False,
        report_to=[], max_steps=1, per_device_train_batch_size=1, logging_steps=1,
        save_strategy="no", seed=0, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
        max_grad_norm=0.0, weight_decay=0.0, disable_tqdm=True, dataset_num_proc=None,
        gradient_checkpointing=False,
    )
    tr = NTLSFTTrainer(model=tiny_qwen2(tok), args=args, train_dataset=ds, processing_class=tok,
                       ntl_config=NTLSFTConfig(W))
    seen = []
    collate = tr.data_collator
    tr.data_collator = lambda ex: seen.append(collate(ex)) or seen[-1]
    tr.train()
    assert tr.accelerator.num_processes == world == 2, tr.accelerator.distributed_type
    local = seen[0]
    digits = [tok.convert_tokens_to_ids(d) for d in "0123456789"]
    n_local = int(torch.isin(local["labels"][:, 1:], torch.tensor(digits)).sum())
    batches: list = [None] * world
    dist.all_gather_object(batches, {k: v for k, v in local.items() if isinstance(v, torch.Tensor)})
    counts: list = [None] * world
    dist.all_gather_object(counts, n_local)
    out = {}
    if rank == 0:
        ref = tiny_qwen2(tok)  # the same initial weights, unsharded
        theta0 = {k: v.detach().clone() for k, v in ref.named_parameters()}
        ce = ntl_sum = 0.0
        tokens = n = 0
        for b in batches:
            logits = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            ce = ce + torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                reduction="sum")
            ntl_sum = ntl_sum + ntl.ntl_loss(logits, labels, tok, reduction="sum", backend="torch")
            tokens += int((labels != -100).sum())
            n += int(torch.isin(labels, torch.tensor(digits)).sum())
        g = grads_of(ref, ce / tokens + W * ntl_sum / n)
        got = {k: v.detach() for k, v in tr.accelerator.unwrap_model(tr.model).named_parameters()}
        out = {
            "digits_per_rank": counts,
            "max_abs_diff": max(float((got[k] - (theta0[k] - LR * g[k])).abs().max()) for k in g),
            "max_abs_update": max(float((got[k] - theta0[k]).abs().max()) for k in g),
            "logged_total_digits": next(h["ntl/total_digits"] for h in tr.state.log_history
                                        if "ntl/total_digits" in h),
        }
        write_json(path, out)
    return 0  # run_rank: the final barrier, then os._exit


if __name__ == "__main__":
    run_rank(lambda: main(sys.argv[1]))
