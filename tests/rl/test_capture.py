"""ntl.rl.capture: the hidden-state capture both adapters use (TRL's ``HiddenNTLCapture``, verl's
fused-kernel hook).

* The backbone hook + ``digit_logits_from_head`` give the digit columns of the model's own
  logits divided by the temperature for a soft-capped (Gemma 2), a divided (Granite) and a
  multiplied (Cohere) logit map, and equal a plain-PyTorch twin with the constants written here.
* ``causal_slice``: the states that score the targets, and its two refusals.
* ``number_rows_of_param`` / ``digit_logits_from_head`` on an FSDP2-style sharded head
  (``Shard(0)``, uneven split over 2 gloo ranks) and a replicated one: the rows are ``W[ids]``
  and the gradient is the rank average of each rank's, against hand-derived values.

The adapters' own end-to-end checks of the same property: adapters/trl/tests/test_trl_logit_map.py
(the capture inside the model's forward) and adapters/verl/tests/test_verl09_logit_map.py (verl's
fused and non-fused paths, remove-padding and padded).
"""

from __future__ import annotations

import json
import sys
import textwrap
from typing import Any

import pytest
import ranks
import torch

import ntl
from ntl.rl.capture import causal_slice, digit_logits_from_head, hook_backbone, number_rows_of_param
from ntl.rl.logit_transform import LogitTransform

T = 0.7
V = 40
DIGITS = list(range(20, 30))  # token ids of '0'..'9'
# family: (config fields, the map f(z) = c tanh(s z / c) / T written out by hand)
FAMILIES = {
    "gemma2": ({"final_logit_softcapping": 3.0}, lambda z: 3.0 * torch.tanh(z / 3.0) / T),
    "granite": ({"logits_scaling": 4.0}, lambda z: z / 4.0 / T),
    "cohere": ({"logit_scale": 0.25}, lambda z: 0.25 * z / T),
}


def mapped_model(family: str) -> Any:
    """A tiny Hugging Face causal LM of ``family`` whose logit map bends its digit logits."""
    import transformers

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=None, eos_token_id=1)
    fields = FAMILIES[family][0]
    if family == "gemma2":
        cfg = transformers.Gemma2Config(**common, **fields, head_dim=16, attn_logit_softcapping=None,
                                        sliding_window=64)
        cls = transformers.Gemma2ForCausalLM
    elif family == "granite":
        cfg = transformers.GraniteConfig(**common, **fields)
        cls = transformers.GraniteForCausalLM
    else:
        cfg = transformers.CohereConfig(**common, **fields)
        cls = transformers.CohereForCausalLM
    torch.manual_seed(0)
    m = cls(cfg).float()
    with torch.no_grad():  # digit logits well beyond the soft-cap, so that the cap bends them
        m.get_output_embeddings().weight.mul_(40.0)
    return m


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hooked_digit_logits_are_the_digit_columns_of_the_models_own_logits(family):
    model = mapped_model(family)
    vocab = ntl.DigitVocab(DIGITS, V)
    transform = LogitTransform.for_config(model.config, temperature=T)
    head = model.get_output_embeddings()
    seen: list[torch.Tensor] = []
    handle = hook_backbone(model.get_decoder(),
                           lambda h: seen.append(digit_logits_from_head(h, head, vocab, transform)))
    ids = torch.randint(2, V, (3, 9), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids)
    handle.remove()
    assert len(seen) == 1 and seen[0].dtype == torch.float32 and seen[0].shape == (3, 9, 10)
    want = out.logits.detach().float()[..., DIGITS] / T  # the model applies its own map
    torch.testing.assert_close(seen[0].detach(), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the plain-PyTorch twin, constants written by hand
        h = model.get_decoder()(input_ids=ids).last_hidden_state
        z = h @ head.weight[DIGITS].T
        twin = FAMILIES[family][1](z)
    torch.testing.assert_close(seen[0].detach(), twin, rtol=1e-5, atol=1e-5)
    assert float((z / T - want).abs().max()) > 0.5  # the map matters at the digit columns
    # the gradient reaches the K number rows of the head and no other row
    model(input_ids=ids)  # the hook is gone: nothing more is captured
    assert len(seen) == 1
    seen[0].square().sum().backward()
    g = head.weight.grad
    assert g is not None and g[DIGITS].abs().amax() > 0
    others = [i for i in range(V) if i not in DIGITS]
    assert float(g[others].abs().max()) == 0.0


def test_causal_slice_and_its_refusals():
    h = torch.arange(2 * 9 * 3, dtype=torch.float32).reshape(2, 9, 3)
    assert torch.equal(causal_slice(h, 1, 7), h[:, 1:8])
    assert torch.equal(causal_slice(h, 0, 8, seq_len=9), h[:, :8])
    with pytest.raises(RuntimeError, match="do not match 7 targets from position 5"):
        causal_slice(h, 5, 7)
    with pytest.raises(RuntimeError, match="added or removed positions"):
        causal_slice(h, 0, 8, seq_len=8)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        hook_backbone(h, lambda _: None)  # pyright: ignore[reportArgumentType]


def test_number_rows_of_a_plain_param_and_autocast():
    W = torch.randn(V, 5, requires_grad=True)
    rows = number_rows_of_param(W, torch.tensor(DIGITS[::-1]), torch.device("cpu"))
    assert torch.equal(rows, W[DIGITS[::-1]])
    head = torch.nn.Linear(5, V)
    x = torch.randn(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the small matmul stays fp32
        z = digit_logits_from_head(x, head, ntl.DigitVocab(DIGITS, V), LogitTransform())
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, x @ head.weight[DIGITS].T + head.bias[DIGITS])


WORKER = """
import torch
import torch.distributed as dist
from ranks import run_rank, write_json

def main():
    dist.init_process_group("gloo")
    r, n = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import ntl
    from ntl.rl.capture import digit_logits_from_head, number_rows_of_param
    from ntl.rl.logit_transform import LogitTransform

    mesh = init_device_mesh("cpu", (n,))
    W, b, ids, x = torch.load({inputs!r})
    out = {{}}
    for name, placement in (("shard0", Shard(0)), ("replicate", Replicate())):
        p = torch.nn.Parameter(distribute_tensor(W.clone(), mesh, [placement]))
        rows = number_rows_of_param(p, torch.tensor(ids), torch.device("cpu"))
        ((r + 1) * rows.square().sum()).backward()  # rank r's loss
        out[name] = {{"rows": rows.detach().tolist(), "grad": p.grad.full_tensor().tolist(),
                      "local": list(p.to_local().shape)}}
    head = torch.nn.Linear(W.shape[1], W.shape[0], dtype=W.dtype)
    head.weight = torch.nn.Parameter(distribute_tensor(W.clone(), mesh, [Shard(0)]))
    head.bias = torch.nn.Parameter(distribute_tensor(b.clone(), mesh, [Shard(0)]))
    f = LogitTransform(scale=0.5, softcap=2.0, temperature={T})
    z = digit_logits_from_head(x, head, ntl.DigitVocab(ids, W.shape[0]), f)
    out["z"] = z.tolist()
    if r == 0:
        write_json({path!r}, out)

run_rank(main)
"""


def test_number_rows_of_a_sharded_head_over_two_ranks(tmp_path):
    """Rank ``r``'s loss ``(r + 1) * sum(W[ids]^2)``: the rows are ``W[ids]`` on every rank and
    the gradient is the rank average ``2 * mean_r(r + 1) * W[ids] = 3 W[ids]`` at the number rows,
    0 elsewhere, for a ``Shard(0)`` weight split 8 + 7 rows (the K-row all-reduce) and a
    replicated one (``full_tensor``); the sharded head's digit logits are ``f(x W[ids]^T + b[ids])``."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    torch.manual_seed(0)
    Vs, H = 15, 4  # torch.chunk over 2 ranks: rows 0-7 and 8-14
    W, b = torch.randn(Vs, H, dtype=torch.float64), torch.randn(Vs, dtype=torch.float64)
    ids = [14, 0, 7, 8, 3, 9, 10, 11, 12, 13]  # digit d is token ids[d]: both shards, the boundary
    x = torch.randn(3, H, dtype=torch.float64)
    inputs, path = str(tmp_path / "inputs.pt"), str(tmp_path / "out.json")
    torch.save((W, b, ids, x), inputs)
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(WORKER.format(inputs=inputs, path=path, T=T)))
    port = ranks.free_port()
    ranks.run("sharded-rows", [[sys.executable, str(worker)]] * 2, log_dir=tmp_path, timeout=240,
              rank_env=[ranks.dist_env(r, 2, port) for r in range(2)])
    with open(path) as fh:
        out = json.load(fh)
    want_grad = torch.zeros_like(W)
    want_grad[ids] = 3.0 * W[ids]
    for name in ("shard0", "replicate"):
        torch.testing.assert_close(torch.tensor(out[name]["rows"], dtype=torch.float64), W[ids])
        torch.testing.assert_close(torch.tensor(out[name]["grad"], dtype=torch.float64), want_grad)
    assert out["shard0"]["local"] == [8, H] and out["replicate"]["local"] == [Vs, H]
    s = 0.5 * (x @ W[ids].T + b[ids])
    twin = 2.0 * torch.tanh(s / 2.0) / T
    torch.testing.assert_close(torch.tensor(out["z"], dtype=torch.float64), twin, rtol=1e-5, atol=1e-5)
