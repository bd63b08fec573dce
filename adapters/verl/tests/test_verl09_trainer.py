"""One PPO step of verl 0.9's v1 trainer after the rollout, on CPU, through a real TransferQueue.

A rank process (gloo, verl's cpu platform from :mod:`cpu_dist`) starts Ray and TransferQueue's
SimpleStorage, puts 8 responses (4 prompts x rollout.n=2) into the store the way verl's agent loop
does, builds the actor with ``ActorRolloutRefWorker.init_model`` from verl's Hydra config, and runs
the trainer's own ``_compute_old_log_prob`` -> ``_compute_advantage`` (GRPO) -> ``_update_actor``.
Every batch the worker sees is fetched from the store by verl's ``tqbridge`` and every output is
written back to it: the digit targets and the bonus survive the store as nested per-sample tensors,
the trainer's advantage reads the bonus from ``rm_scores``, and the update logs the NTL metrics.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import verl_version

v = verl_version()
if v is None or v.release[:2] < (0, 9):
    pytest.skip("needs verl >= 0.9 (scripts/test_verl.sh runs this in its venv)", allow_module_level=True)

# seconds for the rank process (Ray + TransferQueue + one PPO step): ~3-4x its time with both cores
# busy (scripts/stress.sh)
TIMEOUT = 300
# separate rank processes (minutes on 2 cores): -m "not slow" skips them; the first test sets the
# module's fixtures up (the tiny model, the rank, the in-process reference: ~220 s of the 285 s
# it took with both cores overloaded are not the rank's), so its pytest limit is above the rank's
pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT + 240)]

import cpu_dist  # noqa: E402
from dist_scenarios import GROUP  # noqa: E402
from harness import VALUES  # noqa: E402

T = 0.9
BONUS_W = 0.5
NTL_W = 0.5
KEY = "+actor_rollout_ref.actor."
OVERRIDES = [
    cpu_dist.NTL_TARGET, f"{KEY}ntl_weight={NTL_W}", f"{KEY}ntl_labels=final_answer",
    f"{KEY}extract_digit_info=True", f"{KEY}ntl_bonus_type=final_answer", f"{KEY}ntl_bonus_weight={BONUS_W}",
    "algorithm.adv_estimator=grpo", f"actor_rollout_ref.rollout.n={GROUP}",
    f"actor_rollout_ref.rollout.temperature={T}",
    "actor_rollout_ref.rollout.calculate_log_probs=False",  # the store holds no rollout log-probs
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",  # x rollout.n = the 8 responses
    *cpu_dist.DYNAMIC_BSZ,
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return cpu_dist.model_dir(str(tmp_path_factory.mktemp("tiny_qwen2")))


@pytest.fixture(scope="module")
def step(model_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trainer_step"))
    return cpu_dist.run("dist_scenarios:trainer_step", 1, out, model_path, OVERRIDES, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def ref(model_path, qwen_tok):
    """Targets (ntl.targets), per-response bonus and per-digit NTL from full logits of the saved model."""
    from transformers import AutoModelForCausalLM

    from ntl.targets import build_digit_targets

    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa").float()
    targets, bonus, ntl_rows = [], [], []
    with torch.no_grad():
        for prompt, response, truth in cpu_dist.SAMPLES_8:
            p, r = qwen_tok.encode(prompt), qwen_tok.encode(response)
            t = build_digit_targets(torch.tensor([r]), [truth], qwen_tok, mode="final_answer")[0]
            logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
            acc = conf = tp = 0.0
            rows = []
            for j in torch.nonzero(t >= 0).flatten().tolist():
                q = torch.softmax(logits[len(p) + j - 1, 15:25] / T, dim=-1)
                k = int(t[j]) - 15
                acc, conf, tp = acc + float(int(q.argmax()) == k), conf + float(q.max()), tp + float(q[k])
                rows.append(float((q @ VALUES - k) ** 2))
            n = len(rows)
            bonus.append(0.0 if n == 0 else (0.4 * acc + 0.3 * conf + 0.3 * tp) / n)
            targets.append(t)
            ntl_rows.append(rows)
    return {"targets": targets, "bonus": bonus, "ntl": ntl_rows}


def test_targets_and_bonus_round_trip_through_the_store(step, ref):
    got = step["after_old"]
    assert all(step["nested"].values()), step["nested"]  # per-sample tensors in the store
    for i, (t, want) in enumerate(zip(got["ntl_targets"], ref["targets"], strict=True)):
        assert torch.equal(t.cpu(), want), i
    assert any(b > 0.01 for b in ref["bonus"]) and ref["bonus"][-1] == 0.0
    for i, (rm, rm0) in enumerate(zip(got["rm_scores"], step["stock"]["rm_scores"], strict=True)):
        assert rm[-1] - rm0[-1] == pytest.approx(BONUS_W * ref["bonus"][i], rel=1e-4, abs=1e-6), i
        assert torch.equal(rm[:-1], rm0[:-1])
    assert [float(b.reshape(-1)[0]) for b in got["ntl_bonus"]] == pytest.approx(ref["bonus"], rel=1e-4, abs=1e-6)
    assert all(len(o) == len(t) for o, t in zip(got["old_log_probs"], ref["targets"], strict=True))


def grpo(scores: list[float]) -> np.ndarray:
    """GRPO's outcome advantage by hand: (score - group mean) / (group std + 1e-6), groups of GROUP."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1, GROUP)
    return ((s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)


def test_the_trainers_advantage_sees_the_bonus(step, ref):
    stock = [float(rm.sum()) for rm in step["stock"]["rm_scores"]]
    with_bonus = [s + BONUS_W * b for s, b in zip(stock, ref["bonus"], strict=True)]
    got = np.array([float(a[0]) for a in step["advantages"]])
    for a in step["advantages"]:  # outcome advantage: the same at every token of a response
        assert torch.allclose(a, a[0].expand_as(a))
    np.testing.assert_allclose(got, grpo(with_bonus), rtol=1e-4, atol=1e-5)
    assert np.abs(got - grpo(stock)).max() > 1e-2  # without the bonus the advantages differ


def test_the_update_logs_the_optimised_ntl(step, ref):
    m = step["metrics"]
    rows = [x for r in ref["ntl"] for x in r]
    assert m["actor/ntl/total_digits"] == len(rows)
    assert m["actor/ntl/loss"] == pytest.approx(sum(rows) / len(rows), rel=1e-4)
    assert m["actor/ntl/reward"] == pytest.approx(sum(ref["bonus"]) / len(ref["bonus"]), rel=1e-4)
    assert "actor/pg_loss" in m and "actor/entropy" in m
