"""Vocab-parallel NTL (``ntl.vocab_parallel_ntl_loss`` and ``..._from_hidden``) on 2 and 4 gloo
ranks against the unsharded loss: ``ntl.ntl_loss`` / ``ntl.ntl_loss_from_hidden`` on the full
logits / head, and an independent float64 formula of NTL with autograd for values and gradients.

One launch per world size (tests/parallel_rank.py runs every case on every rank); the test
functions below read its results. Vocabularies: Qwen's DigitVocab (ids 15..24, all on shard
0) and a NumberVocab whose ids straddle every shard boundary; methods mse / wasserstein;
reductions none / sum / mean; ignore_index and text rows, a row set with no number label,
weights, bf16, uneven shards (``vocab_size=``), tensor-parallel subgroups of 2 in a world of 4.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import ranks
import torch

import ntl

pytestmark = pytest.mark.timeout(300)

TESTS = Path(__file__).resolve().parent
SRC = str(Path(ntl.__file__).resolve().parents[1])  # the ntl this test imports, for the ranks
WORKER = str(TESTS / "parallel_rank.py")
V = 128
H = 16
SHAPE = (2, 6)
QWEN_IDS = list(range(15, 25))  # Qwen2's '0'..'9' (checked against the real tokenizer below)
# ids on both sides of every shard edge of 2 and 4 equal shards (31|32, 63|64, 95|96) and V-1
SPREAD_IDS = [0, 3, 9, 17, 30, 31, 32, 33, 47, 58, 63, 64, 70, 81, 95, 96, 100, 111, 120, 127]
SPREAD_VALUES = [5, 12, 0, 7, 99, 42, 3, 64, 1, 25, 9, 18, 77, 2, 50, 31, 4, 11, 6, 10]
UNEVEN = {2: [80, 48], 4: [40, 24, 36, 28]}


# --------------------------------------------------------------------------- references
def make_vocab(spec: dict[str, Any], size: int = V) -> ntl.NumberVocab:
    if spec["digit"]:
        return ntl.DigitVocab(spec["ids"], size)
    return ntl.NumberVocab(spec["ids"], spec["values"], size)


def formula64(z: torch.Tensor, labels: torch.Tensor, vocab: ntl.NumberVocab, method: str,
              reduction: str, weights: torch.Tensor | None, ignore_index: int = -100) -> torch.Tensor:
    """NTL in float64 from the number logits ``z [..., K]`` (value order), written out:
    ``q = softmax(z)``, MSE ``(sum_k q_k v_k - y)^2``, W1 (one-hot) ``sum_k q_k |v_k - y|``;
    positions whose label is a number token take part, times their weight; mean = weighted
    sum / sum of the weights of the taking-part positions (0 when none)."""
    ids = torch.tensor(vocab.token_ids)
    vals = torch.tensor(vocab.values, dtype=torch.float64)
    flat = labels.reshape(-1)
    match = flat[:, None] == ids[None]
    part = match.any(1) & (flat != ignore_index)
    y = vals[match.double().argmax(1)]
    q = torch.softmax(z.reshape(-1, vocab.K).double(), -1)
    per = ((q * vals).sum(-1) - y) ** 2 if method == "mse" else (q * (vals - y[:, None]).abs()).sum(-1)
    w = torch.ones_like(per) if weights is None else weights.reshape(-1).double()
    per = torch.where(part, per * w, torch.zeros_like(per))
    if reduction == "none":
        return per.view(labels.shape)
    if reduction == "sum":
        return per.sum()
    den = (w * part).sum()
    return per.sum() / den if bool(part.any()) else per.sum() * 0.0


def labels_for(vocab: dict[str, Any], g: torch.Generator, none: bool = False) -> torch.Tensor:
    """Number, text and ignore_index labels (``none``: text and ignore_index only)."""
    ids = vocab["ids"]
    text = [i for i in range(V) if i not in ids]
    out = []
    for n in range(SHAPE[0] * SHAPE[1]):
        r = int(torch.randint(0, 10, (1,), generator=g))
        if n % 6 == 5 or (r < 2):
            out.append(-100)
        elif none or r < 4:
            out.append(text[int(torch.randint(0, len(text), (1,), generator=g))])
        else:
            out.append(ids[int(torch.randint(0, len(ids), (1,), generator=g))])
    lab = torch.tensor(out).view(SHAPE)
    if not none:
        lab[0, 0] = ids[0]  # at least one number label; ids[-1] sits on the last shard
        lab[1, 0] = ids[-1]
    return lab


def build_cases(world: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1000 + world)
    vocabs = {"qwen": {"ids": QWEN_IDS, "values": list(range(10)), "digit": True},
              "spread": {"ids": SPREAD_IDS, "values": SPREAD_VALUES, "digit": False}}
    even = [V // world] * world
    starts_even = [r * V // world for r in range(world)]
    cases: list[dict[str, Any]] = []

    def add(name: str, kind: str, vocab: str, method: str, reduction: str, *,
            dtype: torch.dtype = torch.float32, widths: list[int] = even, explicit: bool = False,
            weights: bool = False, none: bool = False, tp: int | None = None, **extra: Any) -> None:
        lab = labels_for(vocabs[vocab], g, none)
        c: dict[str, Any] = {
            "name": name, "kind": kind, "vocab": vocabs[vocab], "V": V, "method": method,
            "reduction": reduction, "labels": lab, "widths": widths,
            "starts": [sum(widths[:r]) for r in range(len(widths))], "explicit_size": explicit,
            "logits": (torch.randn(*SHAPE, V, generator=g) * 2.5).to(dtype),
            "hidden": torch.randn(*SHAPE, H, generator=g).to(dtype),
            "weight": (torch.randn(V, H, generator=g) * 0.5).to(dtype),
            "bias": (torch.randn(V, generator=g) * 0.3).to(dtype),
            "temperature": 0.7,
            "upstream": (torch.randn(SHAPE, generator=g) if reduction == "none"
                         else torch.tensor(1.7)),
        }
        if weights:
            c["weights"] = torch.rand(SHAPE, generator=g) + 0.25
        if tp is not None:
            c["tp"] = tp
        c.update(extra)
        cases.append(c)

    for kind, vocab, method, reduction in itertools.product(
            ("logits", "hidden"), ("qwen", "spread"), ("mse", "wasserstein"), ("none", "sum", "mean")):
        add(f"{kind}-{vocab}-{method}-{reduction}", kind, vocab, method, reduction)
    for kind in ("logits", "hidden"):
        add(f"{kind}-spread-bf16", kind, "spread", "wasserstein", "mean", dtype=torch.bfloat16)
        add(f"{kind}-qwen-bf16", kind, "qwen", "mse", "sum", dtype=torch.bfloat16)
        add(f"{kind}-spread-weights", kind, "spread", "mse", "mean", weights=True)
        add(f"{kind}-spread-uneven", kind, "spread", "wasserstein", "none",
            widths=UNEVEN[world], explicit=True)
        for vocab in ("qwen", "spread"):
            for reduction in ("mean", "sum"):
                add(f"{kind}-{vocab}-no-number-{reduction}", kind, vocab, "wasserstein", reduction,
                    none=True)
        if world == 4:  # tensor-parallel subgroups {0, 1}, {2, 3} (DP 2 x TP 2)
            add(f"{kind}-spread-tp2", kind, "spread", "wasserstein", "mean", widths=[64, 64], tp=2)
            add(f"{kind}-qwen-tp2", kind, "qwen", "mse", "none", widths=[64, 64], tp=2)
    assert starts_even == cases[0]["starts"]
    # shards that do not tile [0, V): every rank must raise the same ValueError (no hang).
    # Overlap: rank 0 holds all of [0, V), rank r >= 1 holds [V - 8 (world - r), +8) again;
    # gap: rank 0 holds [0, 40) only, the same tail shards hold the rest of the ids >= 104
    tails = [V - 8 * (world - r) for r in range(1, world)]
    add("error-overlap", "logits", "spread", "wasserstein", "mean", widths=[V] + [8] * (world - 1),
        explicit=True, expect_error=True, starts=[0, *tails])
    add("error-gap", "logits", "spread", "wasserstein", "mean", widths=[40] + [8] * (world - 1),
        explicit=True, expect_error=True, starts=[0, *tails])
    return cases


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def launched(request, tmp_path_factory) -> dict[str, Any]:
    """Run every case on ``world`` gloo ranks once; the cases and each rank's results."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    world = request.param
    tmp = tmp_path_factory.mktemp(f"vocab_parallel_w{world}")
    cases = build_cases(world)
    torch.save(cases, tmp / "cases.pt")
    port = ranks.free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    seconds = ranks.run(f"vocab-parallel NTL, world {world}",
                        [[sys.executable, WORKER, str(tmp / "cases.pt"), str(tmp)]] * world,
                        log_dir=tmp, timeout=180, env=env, pythonpath=[SRC],
                        rank_env=[ranks.dist_env(r, world, port) for r in range(world)])
    per_rank = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world)]
    print(f"world {world}: {len(cases)} cases, ranks took {seconds:.1f} s")
    refs = {c["name"]: unsharded(c) for c in cases if not c.get("expect_error")}
    return {"world": world, "cases": {c["name"]: c for c in cases}, "ranks": per_rank, "refs": refs}


def unsharded(case: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(ntl core, float64 formula)``: each ``{"loss", and the gradients}`` of the full tensors."""
    vocab = make_vocab(case["vocab"])
    kw = dict(method=case["method"], reduction=case["reduction"], weights=case.get("weights"))
    up = case["upstream"]
    ids = torch.tensor(vocab.token_ids)
    if case["kind"] == "logits":
        x = case["logits"].clone().requires_grad_(True)
        core = ntl.ntl_loss(x, case["labels"], vocab, **kw)
        core.backward(up)
        x64 = case["logits"].double().requires_grad_(True)
        f = formula64(x64[..., ids], case["labels"], vocab, **kw)
        f.backward(up.double())
        return {"loss": core.detach(), "grad": x.grad}, {"loss": f.detach(), "grad": x64.grad}
    t = case["temperature"]
    h, w, b = (case[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias"))
    core = ntl.ntl_loss_from_hidden(h, w, case["labels"], vocab, bias=b, temperature=t, **kw)
    core.backward(up)
    h64, w64, b64 = (case[k].double().requires_grad_(True) for k in ("hidden", "weight", "bias"))
    f = formula64((h64 @ w64[ids].T + b64[ids]) / t, case["labels"], vocab, **kw)
    f.backward(up.double())
    return ({"loss": core.detach(), "dh": h.grad, "dW": w.grad, "db": b.grad},
            {"loss": f.detach(), "dh": h64.grad, "dW": w64.grad, "db": b64.grad})


def ok_cases(launched: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in launched["cases"].values() if not c.get("expect_error")]


def group_ranks(launched: dict[str, Any], case: dict[str, Any]) -> list[list[int]]:
    """The rank lists of the tensor-parallel groups a case ran in."""
    world = launched["world"]
    tp = case.get("tp", world)
    return [list(range(g * tp, (g + 1) * tp)) for g in range(world // tp)]


def close(case: dict[str, Any]) -> dict[str, float]:
    """Against the core from hidden states: fp32 matmuls over other row blocks, partial products
    summed over ranks (a few ulp), bf16 gradients rounded per rank."""
    return ({"rtol": 1e-2, "atol": 1e-2} if case["logits"].dtype == torch.bfloat16
            else {"rtol": 1e-4, "atol": 1e-4})


def tol(case: dict[str, Any]) -> dict[str, float]:
    """Against the float64 formula (fp32: MSE with values up to 99 has gradients ~1e2)."""
    return ({"rtol": 2e-2, "atol": 2e-2} if case["logits"].dtype == torch.bfloat16
            else {"rtol": 1e-4, "atol": 1e-4})


# --------------------------------------------------------------------------- multi-rank tests
def test_the_qwen_ids_are_qwens_digits(qwen_tok):
    assert ntl.DigitVocab.from_tokenizer(qwen_tok).token_ids == tuple(QWEN_IDS)
    assert all(15 <= i < V // 4 for i in QWEN_IDS)  # on shard 0 of 2 and of 4
    vs = set(SPREAD_IDS)
    for world in (2, 4):  # the spread vocab has number tokens on every shard, even and uneven
        for widths in ([V // world] * world, UNEVEN[world]):
            starts = [sum(widths[:r]) for r in range(world)]
            assert all(vs & set(range(s, s + w)) for s, w in zip(starts, widths, strict=True))


def test_every_rank_returns_the_unsharded_loss(launched):
    checked = 0
    for case in ok_cases(launched):
        core, f64 = launched["refs"][case["name"]]
        for r, res in enumerate(launched["ranks"]):
            got = res[case["name"]]
            assert got["loss_dtype"] == "torch.float32"
            assert got["loss"].shape == core["loss"].shape, case["name"]
            torch.testing.assert_close(got["loss"], core["loss"], rtol=1e-5, atol=1e-5,
                                       msg=lambda m, c=case, r=r: f"{c['name']} rank {r}: {m}")
            torch.testing.assert_close(got["loss"].double(), f64["loss"], **tol(case),
                                       msg=lambda m, c=case, r=r: f"{c['name']} rank {r}: {m}")
            checked += 1
        for members in group_ranks(launched, case):  # bitwise the same on every rank of a group
            first = launched["ranks"][members[0]][case["name"]]["loss"]
            assert all(torch.equal(launched["ranks"][m][case["name"]]["loss"], first)
                       for m in members), case["name"]
    assert checked == len(ok_cases(launched)) * launched["world"]
    # the cases without any number label: exactly 0 (and so are their gradients, below)
    for name in [n for n in launched["cases"] if "no-number" in n]:
        assert all(float(res[name]["loss"]) == 0.0 for res in launched["ranks"])


def test_each_logit_shard_gets_its_columns_of_the_unsharded_gradient(launched):
    names = []
    for case in ok_cases(launched):
        if case["kind"] != "logits":
            continue
        core, f64 = launched["refs"][case["name"]]
        assembled = {tuple(m): [] for m in group_ranks(launched, case)}
        for members in assembled:
            for r in members:
                got = launched["ranks"][r][case["name"]]
                s, w = got["start"], got["width"]
                assert got["grad"].shape == (*SHAPE, w) and got["grad_dtype"] == str(case["logits"].dtype)
                torch.testing.assert_close(got["grad"], core["grad"][..., s:s + w], rtol=1e-6, atol=1e-6,
                                           msg=lambda m, c=case, r=r: f"{c['name']} rank {r}: {m}")
                torch.testing.assert_close(got["grad"].double(), f64["grad"][..., s:s + w], **tol(case),
                                           msg=lambda m, c=case, r=r: f"{c['name']} rank {r}: {m}")
                assembled[members].append(got["grad"])
            # the shards tile the vocabulary: their concatenation is the whole unsharded gradient
            torch.testing.assert_close(torch.cat(assembled[members], -1), core["grad"], rtol=1e-6, atol=1e-6)
        names.append(case["name"])
        if "no-number" in case["name"]:
            assert not core["grad"].any() and not f64["grad"].any()
        elif case["vocab"]["digit"]:  # Qwen: every number column on shard 0, the others get zeros
            assert f64["grad"][..., QWEN_IDS].abs().sum() > 0
            for members in assembled:
                assert all(not launched["ranks"][r][case["name"]]["grad"].any() for r in members[1:])
    assert len(names) == len(ok_cases(launched)) // 2


def test_hidden_grads_sum_over_ranks_and_weight_grads_are_per_shard(launched):
    n = 0
    for case in ok_cases(launched):
        if case["kind"] != "hidden":
            continue
        core, f64 = launched["refs"][case["name"]]
        for members in group_ranks(launched, case):
            got = [launched["ranks"][r][case["name"]] for r in members]
            dh = torch.stack([g["dh"].float() for g in got]).sum(0)  # the caller's TP all-reduce
            torch.testing.assert_close(dh, core["dh"].float(), **close(case),
                                       msg=lambda m, c=case: f"{c['name']} dh: {m}")
            torch.testing.assert_close(dh.double(), f64["dh"], **tol(case),
                                       msg=lambda m, c=case: f"{c['name']} dh: {m}")
            for r, g in zip(members, got, strict=True):
                s, w = g["start"], g["width"]
                assert g["dW"].shape == (w, H) and g["db"].shape == (w,)
                for key in ("dW", "db"):
                    torch.testing.assert_close(g[key], core[key][s:s + w], **close(case),
                                               msg=lambda m, c=case, r=r, k=key: f"{c['name']} {k} rank {r}: {m}")
                    torch.testing.assert_close(g[key].double(), f64[key][s:s + w], **tol(case),
                                               msg=lambda m, c=case, r=r, k=key: f"{c['name']} {k} rank {r}: {m}")
            if "no-number" in case["name"]:
                assert all(not g["dh"].any() and not g["dW"].any() for g in got)
            elif case["vocab"]["digit"]:  # Qwen: only shard 0 holds number rows and contributes
                assert got[0]["dh"].abs().sum() > 0
                assert all(not g["dh"].any() and not g["dW"].any() for g in got[1:])
            else:  # the spread vocab: every shard holds number rows, each contributes a part
                assert all(g["dh"].abs().sum() > 0 for g in got)
        n += 1
    assert n == len(ok_cases(launched)) // 2


def test_one_small_all_reduce_in_forward_and_no_collective_in_backward(launched):
    for case in ok_cases(launched):
        K = len(case["vocab"]["ids"])
        N = SHAPE[0] * SHAPE[1]
        for r, res in enumerate(launched["ranks"]):
            got = res[case["name"]]
            assert got["forward_collectives"] == [("all_reduce", (N + 1) * K)], (case["name"], r)
            assert got["backward_collectives"] == [], (case["name"], r)
            assert (N + 1) * K < N * V // 4  # never the vocabulary: far below one shard of logits


def test_shards_that_do_not_tile_the_vocabulary_are_refused_on_every_rank(launched):
    world = launched["world"]
    for name, what in (("error-overlap", "several shards hold token ids"),
                       ("error-gap", "no shard holds token ids")):
        msgs = [res[name]["error"] for res in launched["ranks"]]
        assert all(what in m and "must tile [0, V)" in m for m in msgs), msgs
        assert len(set(msgs)) == 1  # the same message on every rank, after the one all_reduce
        assert all(res[name]["forward_collectives"] == [("all_reduce", 13 * len(SPREAD_IDS))]
                   for res in launched["ranks"])
    gap = launched["ranks"][0]["error-gap"]["error"]
    assert "no shard holds token ids [47, 58, 63, 64, 70, 81, 95, 96]" in gap
    overlap = launched["ranks"][0]["error-overlap"]["error"]
    assert f"several shards hold token ids {[111, 120, 127] if world == 4 else [120, 127]}" in overlap


# --------------------------------------------------------------------------- one process
@pytest.mark.parametrize("method", ["mse", "wasserstein"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_world_of_one_without_torch_distributed(method, reduction):
    """``group=None`` and no process group: a world of one, no collective, the unsharded loss."""
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())
    g = torch.Generator().manual_seed(7)
    spec = {"ids": SPREAD_IDS, "values": SPREAD_VALUES, "digit": False}
    vocab = make_vocab(spec)
    labels = labels_for(spec, g)
    weights = torch.rand(SHAPE, generator=g) + 0.5
    up = torch.randn(SHAPE, generator=g) if reduction == "none" else torch.tensor(0.6)
    kw: dict[str, Any] = dict(method=method, reduction=reduction, weights=weights)
    x = (torch.randn(*SHAPE, V, generator=g) * 2).requires_grad_(True)
    got = ntl.vocab_parallel_ntl_loss(x, labels, vocab, vocab_start=0, **kw)
    got.backward(up)
    x64 = x.detach().double().requires_grad_(True)
    want = formula64(x64[..., list(vocab.token_ids)], labels, vocab, **kw)
    want.backward(up.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, ntl.ntl_loss(x, labels, vocab, **kw), rtol=0, atol=0)
    # from hidden states: explicit vocab_size works the same in a world of one
    h = torch.randn(*SHAPE, H, generator=g).requires_grad_(True)
    w = torch.randn(V, H, generator=g).requires_grad_(True)
    got = ntl.vocab_parallel_ntl_loss_from_hidden(h, w, labels, vocab, vocab_start=0,
                                                  vocab_size=V, temperature=1.3, **kw)
    got.backward(up)
    h64, w64 = (t.detach().double().requires_grad_(True) for t in (h, w))
    want = formula64(h64 @ w64[list(vocab.token_ids)].T / 1.3, labels, vocab, **kw)
    want.backward(up.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)


def test_world_of_one_hand_computed_and_bf16():
    """Two digits, logits hand-picked: q = softmax([0, ln 3]) = (1/4, 3/4) over '3' and '7'."""
    import math

    vocab = ntl.NumberVocab([2, 5], [3.0, 7.0], 8)
    x = torch.full((1, 8), -50.0)
    x[0, 2], x[0, 5] = 0.0, math.log(3.0)
    y = torch.tensor([2])  # the label '3'
    # W1: 3/4 * |7 - 3| = 3; MSE: (3/4 + 21/4 - 3)^2 = 9
    assert ntl.vocab_parallel_ntl_loss(x, y, vocab, vocab_start=0).item() == pytest.approx(3.0, rel=1e-6)
    assert ntl.vocab_parallel_ntl_loss(x, y, vocab, vocab_start=0, method="mse").item() == \
        pytest.approx(9.0, rel=1e-6)
    xb = x.bfloat16().requires_grad_(True)
    loss = ntl.vocab_parallel_ntl_loss(xb, y, vocab, vocab_start=0)
    loss.backward()
    assert loss.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    # dW1/dx_7 = q7 (|7-3| - 3) = 3/4; dW1/dx_3 = -3/4; no gradient off the number columns
    assert xb.grad[0, 5].item() == pytest.approx(0.75, rel=1e-2)
    assert xb.grad[0, 2].item() == pytest.approx(-0.75, rel=1e-2)
    assert not xb.grad[0, [0, 1, 3, 4, 6, 7]].any()


def test_refusals():
    vocab = ntl.DigitVocab(QWEN_IDS, V)
    x = torch.randn(*SHAPE, V)
    y = torch.full(SHAPE, 16)
    f = ntl.vocab_parallel_ntl_loss
    with pytest.raises(ValueError, match="vocab_start must be >= 0"):
        f(x, y, vocab, vocab_start=-1)
    with pytest.raises(TypeError, match="vocab_start must be an int"):
        f(x, y, vocab, vocab_start=0.0)
    with pytest.raises(TypeError, match="vocab_start must be an int"):
        f(x, y, vocab, vocab_start=True)
    # equal shards (the default) in a world of one: the shard starts at 0
    with pytest.raises(ValueError, match=r"equal shards .* start at rank \* V_local = 0"):
        f(x, y, vocab, vocab_start=8)
    with pytest.raises(ValueError, match=r"ends beyond vocab_size=130"):
        f(x, y, vocab, vocab_start=8, vocab_size=130)
    with pytest.raises(ValueError, match=r"a world of one must hold the whole vocabulary \[0, 200\)"):
        f(x, y, vocab, vocab_start=0, vocab_size=200)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        f(x, y, vocab, vocab_start=0, vocab_size=0)
    # number ids beyond the sum of the shard widths
    with pytest.raises(ValueError, match=r"token id 24 but the shards hold only V=20 columns"):
        f(x[..., :20], y, vocab, vocab_start=0)
    with pytest.raises(ValueError, match=r"built for vocab_size=128 but the shards hold only V=64"):
        f(x[..., :64], y, vocab, vocab_start=0)
    with pytest.raises(ValueError, match=r"labels shape \(2, 5\) does not match logits_shard"):
        f(x, y[:, :5], vocab, vocab_start=0)
    with pytest.raises(TypeError, match="logits_shard must be a floating-point tensor"):
        f(x.long(), y, vocab, vocab_start=0)
    with pytest.raises(ValueError, match=r"torch\.distributed is not initialised"):
        f(x, y, vocab, vocab_start=0, group=object())
    with pytest.raises(ValueError, match="method must be one of"):
        f(x, y, vocab, vocab_start=0, method="mae2")
    # labels beyond the sum of the shard widths (strict checks)
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, V=128\).* \[131, 131\]"):
        f(x, y.masked_fill(y == 16, V + 3), vocab, vocab_start=0)
    g = ntl.vocab_parallel_ntl_loss_from_hidden
    h, w = torch.randn(*SHAPE, H), torch.randn(V, H)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        g(h, w, y, vocab, vocab_start=0, temperature=0.0)
    with pytest.raises(ValueError, match="does not match hidden size"):
        g(h, w[:, :4], y, vocab, vocab_start=0)
    with pytest.raises(ValueError, match=r"bias shape \(3,\) must be \[V=128\]"):
        g(h, w, y, vocab, vocab_start=0, bias_shard=torch.zeros(3))
    with pytest.raises(ValueError, match="vocab_start must be >= 0"):
        g(h, w, y, vocab, vocab_start=-4)
    with pytest.raises(ValueError, match=r"token id 24 but the shards hold only V=16"):
        g(h, w[:16], y, vocab, vocab_start=0)
