"""Ulysses sequence parallelism on CPU through verl's real worker and FSDP2 engine.

Like ``test_verl09_dist`` (DP), with ``actor_rollout_ref.actor.ulysses_sequence_parallel_size=2``
on two gloo ranks (one data-parallel rank: both see the whole mini-batch of 8 responses, each
rank holds half of every packed micro-batch's tokens) against SP=1 on one rank. verl's Ulysses
code runs unchanged: the packed input is padded and sliced per rank
(``ulysses_pad_and_slice_inputs``), the attention gathers the sequence and scatters the heads
(``_ulysses_flash_attention_forward``, all-to-all over gloo), the log-probs and NTL's digit
logits come back through ``gather_outputs_and_unpad``. Only the flash-attn kernel under verl's
patch is replaced by a CPU varlen attention (``cpu_dist.install_cpu_varlen_attention``), which
SP=1 uses too. Compared, for ``loss_agg_mode`` token-mean and seq-mean-token-mean:

* every ``ntl/*`` metric of SP=2 equals SP=1, and ``ntl/loss`` = ``L_NTL`` of the mode computed by
  hand from full logits (``test_verl09_dist.reference``: ``(sum_k q_k k - y)^2`` per digit target,
  ``q = softmax(z_digits / T)``), ``ntl/total_digits`` = the 17 digit targets;
* the NTL share of the gradient, ``(g(ntl_weight=W) - g(ntl_weight=0)) / W``, on the LM head's
  digit and ordinary rows and every other parameter: SP=2 = SP=1 = autograd of the reference;
* ``pad_to_length=True`` (verl 0.9.1 supports it with SP: the static pad is appended to the packed
  sequence before the SP pad, ``FSDPEngineWithLMHead._get_packed_pad_size``) gives the metrics
  and gradients of the run without it, with SP=1 and SP=2.

DP=2 x SP=2 (world 4, verl's ``(dp, sp)`` device mesh: ranks 0-1 hold data-parallel rank 0's
four responses, ranks 2-3 the other four) runs the same plan and must give what SP=1 gives.
"""

from __future__ import annotations

import pytest
import torch
from conftest import verl_version

v = verl_version()
if v is None or v.release[:2] < (0, 9):
    pytest.skip("needs verl >= 0.9 (scripts/test_verl.sh runs this in its venv)", allow_module_level=True)

# seconds for the 7 rank processes (worlds 1, 2 and 4 at once; ~1-2 min on 2 idle cores): ~3x that
# with both cores busy
TIMEOUT = 600
pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT + 120)]

import cpu_dist  # noqa: E402
from test_verl09_dist import agg, reference  # noqa: E402 (the DP test's independent reference)

W = 0.5
MODES = ("token-mean", "seq-mean-token-mean")
KEY = "actor_rollout_ref.actor."
NTL = [cpu_dist.NTL_TARGET, f"+{KEY}ntl_weight=0.0"]
PLAN = [
    (NTL, [("w0", {}), *((m, {"ntl_weight": W, "loss_agg_mode": m}) for m in MODES)]),
    ([*NTL, f"{KEY}pad_to_length=True", f"{KEY}fsdp_config.pad_to_length_bucket=64"],
     [("pad/w0", {}), ("pad/token-mean", {"ntl_weight": W, "loss_agg_mode": "token-mean"})]),
]
NTL_METRICS = ("ntl/loss", "ntl/total_digits", "ntl/digit_accuracy", "ntl/confidence", "ntl/target_prob")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return cpu_dist.model_dir(str(tmp_path_factory.mktemp("tiny_qwen2")))


#: world size -> Ulysses SP size: SP=1, SP=2, DP=2 x SP=2
WORLDS = {1: 1, 2: 2, 4: 2}


@pytest.fixture(scope="module")
def runs(model_path, tmp_path_factory):
    """{1: SP=1 on one rank, 2: SP=2 on two ranks, 4: DP=2 x SP=2 on four} (started at once)."""
    dirs = {w: str(tmp_path_factory.mktemp(f"world{w}")) for w in WORLDS}
    procs = {w: cpu_dist.start("dist_scenarios:sp_updates", w, dirs[w], model_path, PLAN, sp, timeout=TIMEOUT)
             for w, sp in sorted(WORLDS.items(), reverse=True)}
    try:
        return {w: cpu_dist.join(procs[w], w, dirs[w]) for w in WORLDS}
    finally:
        for p in procs.values():
            p.kill()


@pytest.fixture(scope="module")
def ref(model_path, qwen_tok):
    model, per, probs = reference(model_path, qwen_tok)
    value = agg(per, "token-mean")
    value.backward()  # pyright: ignore[reportAttributeAccessIssue] (a tensor: per holds tensors)
    from dist_scenarios import HEAD_ROWS

    grads = {n: (p.grad[HEAD_ROWS] if n.endswith("lm_head.weight") else p.grad).clone()
             for n, p in model.named_parameters() if p.grad is not None and "embed_tokens" not in n}
    return {"per": [[float(x) for x in r] for r in per], "grads": grads, "n": len(probs)}


def metric(res, name):
    (value,) = res["metrics"][name]
    return float(value)


def ntl_grads(res, name="token-mean", zero="w0"):
    return {n: (res[name]["grads"][n] - res[zero]["grads"][n]) / W for n in res[zero]["grads"]}


def test_verl_built_the_sequence_parallel_engine(runs):
    for w, sp in WORLDS.items():
        for name in ("w0", *MODES, "pad/w0", "pad/token-mean"):
            res = runs[w][name]
            assert res["engine"] == "NTLFSDPEngineWithLMHead"
            assert res["setup"]["sp"] == sp and res["setup"]["dp"] == w // sp, (w, res["setup"])
            assert res["setup"]["attn"] == "cpu_varlen"
            assert res["setup"]["pad_to_length"] == name.startswith("pad/")
            assert res["grads"], name


@pytest.mark.parametrize("world", [2, 4], ids=["sp2", "dp2xsp2"])
@pytest.mark.parametrize("mode", MODES)
def test_ntl_metrics_equal_sp1_and_the_reference(runs, ref, mode, world):
    want = agg(ref["per"], mode)
    for w in (1, world):
        assert metric(runs[w][mode], "ntl/loss") == pytest.approx(want, rel=1e-4), w
        assert metric(runs[w][mode], "ntl/total_digits") == ref["n"] == 17
    for key in NTL_METRICS:
        assert metric(runs[world][mode], key) == pytest.approx(metric(runs[1][mode], key), rel=1e-5, abs=1e-7), key
    assert metric(runs[world][mode], "loss") == pytest.approx(metric(runs[1][mode], "loss"), rel=1e-4)


@pytest.mark.parametrize("world", [2, 4], ids=["sp2", "dp2xsp2"])
def test_ntl_gradient_equals_sp1_and_the_reference(runs, ref, world):
    """The NTL share of the gradient (token-mean): the LM head's 10 digit rows and 10 ordinary
    rows, and every other parameter but the embedding."""
    g1, g2 = ntl_grads(runs[1]), ntl_grads(runs[world])
    head = g1["lm_head.weight"]
    assert head[:10].abs().max() > 1e-3  # the digit rows move ...
    assert head[10:].abs().max() < 1e-6  # ... ordinary rows do not
    for n in g1:
        scale = max(1e-6, float(ref["grads"][n].abs().max()))
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-5 * scale, msg=f"world {world} vs SP1: {n}")
        torch.testing.assert_close(g1[n], ref["grads"][n], rtol=2e-3, atol=1e-4 * scale, msg=f"vs ref: {n}")


@pytest.mark.parametrize("world", list(WORLDS))
def test_pad_to_length_changes_nothing(runs, world):
    plain, pad = runs[world]["token-mean"], runs[world]["pad/token-mean"]
    for key in (*NTL_METRICS, "loss", "actor/pg_loss"):
        assert metric(pad, key) == pytest.approx(metric(plain, key), rel=1e-5, abs=1e-7), key
    g, gp = ntl_grads(runs[world]), ntl_grads(runs[world], "pad/token-mean", "pad/w0")
    for n in g:
        scale = max(1e-6, float(g[n].abs().max()))
        torch.testing.assert_close(gp[n], g[n], rtol=1e-4, atol=1e-5 * scale, msg=n)
