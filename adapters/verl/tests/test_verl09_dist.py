"""Data parallelism on CPU through verl's real worker and FSDP2 engine.

Two gloo ranks (rank processes of ``cpu_dist``, free 127.0.0.1 port) and one rank each run
``ActorRolloutRefWorker(role="actor").init_model()`` from verl's Hydra ``ppo_trainer`` config
(fsdp2, remove-padding, dynamic batch size) and ``update_actor`` on the same global mini-batch of
8 responses (DP=2: 4 per rank). One NTL worker serves every ``loss_agg_mode``: between updates
the test changes the actor config verl built (verl's ``ppo_loss`` and the NTL engine read it at
every loss call), so a mode costs an update, not a worker build. verl's own engine lookup builds the engine; verl's metrics
aggregation reports the metrics. Compared: DP=2 against DP=1, ``ntl_weight=0`` against verl's stock
engine class, and the NTL gradient against an independent autograd reference from full logits.
"""

from __future__ import annotations

import pytest
import torch
from conftest import verl_version

v = verl_version()
if v is None or v.release[:2] < (0, 9):
    pytest.skip("needs verl >= 0.9 (scripts/test_verl.sh runs this in its venv)", allow_module_level=True)

# seconds for the 3 rank processes (DP=2 and DP=1 at once): ~3x their time with both cores busy
# (scripts/stress.sh)
TIMEOUT = 600
# separate rank processes (minutes on 2 cores): -m "not slow" skips them; the first test sets the
# module's fixtures up (the ranks), so its pytest limit is a little above the ranks' own
pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT + 120)]

import cpu_dist  # noqa: E402
from dist_scenarios import HEAD_ROWS  # noqa: E402
from harness import VALUES  # noqa: E402

MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
W = 0.5
T = 0.9  # the rollout temperature the update is given
KEY = "+actor_rollout_ref.actor."


PLAN = [
    # verl's FSDPActorConfig and engine (must come before ntl_verl is imported)
    ([], [("stock", {})]),
    # the NTL actor from Hydra (ntl_weight 0, token-mean), then the same worker per mode with weight W
    ([cpu_dist.NTL_TARGET, f"{KEY}ntl_weight=0.0"], [
        ("w0", {}),
        *((mode, {"ntl_weight": W, "loss_agg_mode": mode,
                  "loss_scale_factor": 7 if mode == "seq-mean-token-sum-norm" else None}) for mode in MODES),
    ]),
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return cpu_dist.model_dir(str(tmp_path_factory.mktemp("tiny_qwen2")))


@pytest.fixture(scope="module")
def runs(model_path, tmp_path_factory):
    """{1: results with one rank, 2: with two ranks} (both started at once)."""
    dirs = {w: str(tmp_path_factory.mktemp(f"dp{w}")) for w in (1, 2)}
    procs = {w: cpu_dist.start("dist_scenarios:dp_updates", w, dirs[w], model_path, PLAN, timeout=TIMEOUT)
             for w in (2, 1)}
    try:
        return {w: cpu_dist.join(procs[w], w, dirs[w]) for w in (1, 2)}
    finally:  # one world failed: the other's ranks go too
        for p in procs.values():
            p.kill()


def metric(res, name):
    (value,) = res["metrics"][name]  # one mini-batch
    return float(value)


# --------------------------------------------------------------------------- references
def reference(model_path, tok):
    """Per sample, the per-digit NTL (with autograd) and (correct, max prob, target prob) of each
    digit target, from plain full-logit forwards of the saved model (temperature T, causal shift)."""
    from transformers import AutoModelForCausalLM

    from ntl.targets import build_digit_targets

    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa").float()
    per_sample, probs = [], []
    for prompt, response, truth in cpu_dist.SAMPLES_8:
        p, r = tok.encode(prompt), tok.encode(response)
        targets = build_digit_targets(torch.tensor([r]), [truth], tok, mode="final_answer")[0]
        logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
        rows = []
        for j in range(len(r)):
            if targets[j] < 0:
                continue
            q = torch.softmax(logits[len(p) + j - 1, 15:25] / T, dim=-1)
            k = int(targets[j] - 15)
            rows.append((q @ VALUES - float(k)) ** 2)
            probs.append((float(int(q.argmax()) == k), float(q.max()), float(q[k])))
        per_sample.append(rows)
    return model, per_sample, probs


def agg(per_sample, mode, horizon=7.0):
    rows = [r for r in per_sample if r]
    N, S = sum(len(r) for r in rows), len(rows)
    if mode == "token-mean":
        return sum(sum(r) for r in rows) / N
    if mode == "token-sum":
        return sum(sum(r) for r in rows)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / S
    total = sum(sum(r) for r in rows) / S
    return total / horizon if mode == "seq-mean-token-sum-norm" else total


@pytest.fixture(scope="module")
def ref(model_path, qwen_tok):
    model, per, probs = reference(model_path, qwen_tok)
    assert sum(1 for r in per if r) == 7  # the last sample has no final answer, so no targets
    value = agg(per, "token-mean")
    value.backward()  # pyright: ignore[reportAttributeAccessIssue] (a tensor: per holds tensors)
    grads = {n: (p.grad[HEAD_ROWS] if n.endswith("lm_head.weight") else p.grad).clone()
             for n, p in model.named_parameters() if p.grad is not None and "embed_tokens" not in n}
    means = [sum(x[i] for x in probs) / len(probs) for i in range(3)]
    return {"per": [[float(x) for x in r] for r in per], "grads": grads, "n": len(probs),
            "means": dict(zip(("ntl/digit_accuracy", "ntl/confidence", "ntl/target_prob"), means, strict=True))}


# --------------------------------------------------------------------------- tests
def test_engines_are_the_ones_verl_built(runs):
    for w in (1, 2):
        assert all(runs[w][name]["grads"] for name in ("stock", "w0", *MODES))
        assert runs[w]["stock"]["engine"] == "FSDPEngineWithLMHead"
        for name in ("w0", *MODES):
            assert runs[w][name]["engine"] == "NTLFSDPEngineWithLMHead", (w, name)


@pytest.mark.parametrize("world", [1, 2])
def test_weight_zero_is_bit_exact_verl_stock_engine(runs, world):
    stock, zero = runs[world]["stock"], runs[world]["w0"]
    assert metric(stock, "loss") == metric(zero, "loss")
    assert metric(stock, "actor/pg_loss") == metric(zero, "actor/pg_loss")
    assert stock["grads"].keys() == zero["grads"].keys()
    for n in stock["grads"]:
        assert torch.equal(stock["grads"][n], zero["grads"][n]), n
    assert "ntl/loss" in zero["metrics"] and "ntl/loss" not in stock["metrics"]


def ntl_grads(res):
    return {n: (res["token-mean"]["grads"][n] - res["w0"]["grads"][n]) / W for n in res["w0"]["grads"]}


def test_ntl_gradient_dp2_equals_dp1_and_the_reference(runs, ref):
    """The gradient NTL adds (token-mean; ntl_weight 0.5 minus 0) is the same with 1 and 2 ranks
    and equals autograd of the mean NTL over the 20 digit targets from full logits."""
    g1, g2 = ntl_grads(runs[1]), ntl_grads(runs[2])
    head = g1["lm_head.weight"]
    assert head[:10].abs().max() > 1e-3  # digit rows move ...
    assert head[10:].abs().max() < 1e-6  # ... ordinary rows do not
    for n in g1:
        scale = max(1e-6, float(ref["grads"][n].abs().max()))
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-5 * scale, msg=f"DP2 vs DP1: {n}")
        torch.testing.assert_close(g1[n], ref["grads"][n], rtol=2e-3, atol=1e-4 * scale, msg=f"vs ref: {n}")


@pytest.mark.parametrize("mode", MODES)
def test_every_loss_agg_mode_dp2_equals_dp1(runs, ref, mode):
    """ntl/loss (verl's metric aggregation over micro-batches and ranks) is L_NTL of the mode,
    computed by hand; loss and gradients (policy + NTL) agree between 1 and 2 ranks."""
    want = agg(ref["per"], mode)
    for w in (1, 2):
        assert metric(runs[w][mode], "ntl/loss") == pytest.approx(want, rel=1e-4), w
        assert metric(runs[w][mode], "ntl/total_digits") == ref["n"]
    assert metric(runs[2][mode], "loss") == pytest.approx(metric(runs[1][mode], "loss"), rel=1e-4)
    g1, g2 = runs[1][mode]["grads"], runs[2][mode]["grads"]
    for n in g1:
        scale = max(1e-6, float(g1[n].abs().max()))
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-5 * scale, msg=n)
    # the NTL share of the loss is what the mode says (policy loss: the w=0 run, same mode only
    # for token-mean; the others differ in verl's policy aggregation too)
    if mode == "token-mean":
        for w in (1, 2):
            extra = metric(runs[w][mode], "loss") - metric(runs[w]["w0"], "loss")
            assert extra == pytest.approx(W * want, rel=1e-4)


def test_digit_metrics_are_means_over_the_mini_batch(runs, ref):
    for w in (1, 2):
        for key, want in ref["means"].items():
            assert metric(runs[w]["token-mean"], key) == pytest.approx(want, rel=1e-4, abs=1e-6), (w, key)
