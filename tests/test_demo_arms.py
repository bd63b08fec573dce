"""Tests of ``ntl demo``'s arms, digit entropy, minimum detectable difference and job reuse
(issue 28, items 3 and 4): ``--arms`` parsing, the entropy of the predicted digit
distribution against a hand computation, the MDD and the t quantile against tabulated
values, the RL starting model's settings, and reusing (seed, arm) results."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from ntl.demo import _parser, main, parse_settings
from ntl.demo.common import strip_volatile
from ntl.demo.config import DEFAULTS, QUICK, Settings, arm_label, parse_arms
from ntl.demo.sft import ce_model_paths, evaluate
from ntl.demo.stats import mdd, t_critical, t_interval, t_quantile, verdict
from ntl.demo.task import Problem, build_batch, demo_tokenizer
from ntl.demo.train import Arm, TrainConfig, digit_distribution
from ntl.methods import REGISTRY

TINY = ["--steps", "3", "--batch-size", "8", "--eval-size", "24", "--hidden", "32",
        "--layers", "1", "--no-plot", "--no-progress", "--jobs", "1"]


# ---------------------------------------------------------------------------
# --arms
# ---------------------------------------------------------------------------


def test_default_arms_are_the_three_of_before():
    s = Settings()
    assert s.arms() == [Arm("CE", 0.0, "wasserstein"), Arm("CE+NTL-MSE", 0.3, "mse"),
                        Arm("CE+NTL-W1", 0.3, "wasserstein")]
    assert parse_settings(_parser().parse_args([])).arms() == s.arms()


def test_arms_by_registered_name_with_default_and_explicit_weights():
    arms = parse_arms(["mse", "ce", "w1", "mae=0.05", "huber"], ntl_weight=0.2)
    assert [a.name for a in arms] == ["CE", "CE+NTL-MSE", "CE+NTL-W1", "CE+NTL-MAE(w=0.05)",
                                      "CE+NTL-Huber"]  # CE first, the rest in the given order
    assert [a.method for a in arms[1:]] == ["mse", "wasserstein", "mae", "huber"]
    assert [a.ntl_weight for a in arms] == [0.0, 0.2, 0.2, 0.05, 0.2]
    assert arm_label("wasserstein") == arm_label("w1") == "CE+NTL-W1"
    # every registered method is an arm (del and dist2 too), at --ntl-weight by default
    assert {"del", "dist2"} <= set(REGISTRY)
    for name in REGISTRY:
        (ce, arm) = parse_arms(["ce", name], ntl_weight=0.25)
        assert ce.name == "CE" and arm.method == name and arm.ntl_weight == 0.25
    assert [a.name for a in parse_arms(["ce", "del", "dist2", "del=0.01"])] == [
        "CE", "CE+DEL", "CE+DIST2", "CE+DEL(w=0.01)"]


@pytest.mark.parametrize(("arms", "msg"), [
    (["ce", "nope"], "unknown arm 'nope'"),
    (["ce", "w1=abc"], "not a number"),
    (["ce", "w1=-1"], "> 0"),
    (["ce", "w1=0"], "> 0"),
    (["ce", "w1=inf"], "finite"),
    (["ce=0.3", "w1"], "takes no weight"),
    (["ce", "w1", "wasserstein"], "given twice"),
    (["mse", "w1"], "must include 'ce'"),
])
def test_bad_arms_are_a_clear_error(arms, msg):
    with pytest.raises(ValueError, match=msg):
        parse_arms(arms)


def test_unknown_arm_exits_2_naming_the_choices(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path), "--arms", "ce", "mse", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown arm 'bogus'" in err and "wasserstein" in err and "mse" in err
    assert not (tmp_path / "results.json").exists()
    assert main([*TINY, "--out", str(tmp_path), "--rl", "--arms", "ce"]) == 2
    assert "--arms" in capsys.readouterr().err


def test_arms_run_and_reuse_finished_jobs(tmp_path, capsys, monkeypatch):
    """``--arms ce mae``: the arms the user named, with their losses; a second run in the same
    folder reuses every (seed, arm) result and writes the same metrics; adding an arm trains
    only that one; ``--no-reuse`` trains all."""
    out = tmp_path / "d"
    assert main([*TINY, "--out", str(out), "--arms", "ce", "mae=0.2"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert [a["name"] for a in first["config"]["arms"]] == ["CE", "CE+NTL-MAE(w=0.2)"]
    fs = first["first_step"]["CE+NTL-MAE(w=0.2)"]
    assert fs["loss"] == pytest.approx(fs["ce"] + 0.2 * fs["ntl"], rel=1e-5)
    assert first["timing"]["reused_jobs"] == []
    capsys.readouterr()

    import ntl.demo.sft as sft

    calls = []
    real = sft.sft_job

    def counting(payload, progress):
        calls.append(payload["arm"].name)
        return real(payload, progress)

    monkeypatch.setattr(sft, "sft_job", counting)
    assert main([*TINY, "--out", str(out), "--arms", "ce", "mae=0.2"]) == 0
    assert calls == [] and "reused from" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert strip_volatile(again["runs"]) == strip_volatile(first["runs"])
    assert again["timing"]["reused_jobs"] == ["seed 0 CE", "seed 0 CE+NTL-MAE(w=0.2)"]

    assert main([*TINY, "--out", str(out), "--arms", "ce", "mae=0.2", "w1"]) == 0
    assert calls == ["CE+NTL-W1"]
    assert main([*TINY, "--out", str(out), "--arms", "ce", "mae=0.2", "--no-reuse"]) == 0
    assert calls == ["CE+NTL-W1", "CE", "CE+NTL-MAE(w=0.2)"]
    # another weight is another job
    assert main([*TINY, "--out", str(out), "--arms", "ce", "mae=0.3"]) == 0
    assert calls[-1] == "CE+NTL-MAE(w=0.3)" and len(calls) == 4


# ---------------------------------------------------------------------------
# digit entropy
# ---------------------------------------------------------------------------


class _FixedLogits(torch.nn.Module):
    """A stand-in model: the logits of every position are ``table[target token]`` of the
    *next* token in the batch, so that we know the distribution at each digit position."""

    def __init__(self, vocab_size, per_target):
        super().__init__()
        self.V = vocab_size
        self.per_target = per_target  # next token id -> logits [V]
        self.seen = None

    def forward(self, input_ids):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.V)
        for b in range(B):
            for t in range(T - 1):
                nxt = int(input_ids[b, t + 1])
                if nxt in self.per_target:
                    logits[b, t] = self.per_target[nxt]
        self.seen = input_ids
        return SimpleNamespace(logits=logits)


def _hand_entropy(zs):
    m = max(zs)
    e = [math.exp(z - m) for z in zs]
    q = [x / sum(e) for x in e]
    return -sum(p * math.log(p) for p in q if p > 0), q


def test_digit_entropy_by_hand():
    tok = demo_tokenizer()
    v = tok.get_vocab()
    V = len(tok)
    digit = [v[d] for d in "0123456789"]
    g = torch.Generator().manual_seed(0)
    per_target = {}
    for k, tid in enumerate(digit):
        z = torch.full((V,), 40.0)  # non-digit columns: huge, must be left out
        z[digit] = torch.randn(10, generator=g) * (k + 1) * 0.5
        per_target[tid] = z
    # '7': only two digits possible, equally -> ln 2; '9': uniform over the ten -> ln 10
    z7 = torch.full((V,), 40.0)
    z7[digit] = -1e4
    z7[digit[2]] = z7[digit[5]] = 1.0
    per_target[digit[7]] = z7
    z9 = torch.full((V,), 40.0)
    z9[digit] = 3.0
    per_target[digit[9]] = z9

    problems = [Problem(12, "+", 5), Problem(3, "*", 3), Problem(90, "+", 9)]  # 17, 9, 99
    width, seq_len = 2, 1 + 2 * 2 + 2 + 1 + 2 + 1
    model = _FixedLogits(V, per_target)
    d = digit_distribution(model, problems, tok, width, seq_len, torch.device("cpu"), batch_size=2)
    # answer digits in order: 1, 7 | 9 | 9, 9
    assert d["problem"] == [0, 0, 1, 2, 2]
    want_h, want_p = [], []
    for y in (1, 7, 9, 9, 9):
        h, q = _hand_entropy(per_target[digit[y]][digit].tolist())
        want_h.append(h)
        want_p.append(q[y])
    assert d["entropy"] == pytest.approx(want_h, rel=1e-5, abs=1e-6)
    assert d["entropy"][1] == pytest.approx(math.log(2), rel=1e-6)
    assert d["entropy"][2] == pytest.approx(math.log(10), rel=1e-6)
    assert d["target_prob"] == pytest.approx(want_p, rel=1e-5, abs=1e-7)
    assert d["target_prob"][1] == 0.0  # '7' has no mass in the two-digit distribution
    # the model saw the teacher-forced sequences of build_batch, nothing else
    ids, _ = build_batch(problems[2:], tok, width, seq_len)
    assert torch.equal(model.seen, ids)


def test_evaluate_reports_the_mean_digit_entropy_per_group(one_thread_local):
    tok = demo_tokenizer()
    s = Settings(digits={"+": (2, 2), "*": (2, 1)}, eval_size=8)
    from ntl.demo.train import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(tok, ModelConfig(32, 1, 4, 64), s.seq_len, torch.device("cpu"))
    problems = [Problem(12, "+", 5), Problem(3, "*", 3), Problem(90, "+", 9), Problem(11, "*", 2)]
    metrics, _ = evaluate(model, problems, tok, s, torch.device("cpu"))
    d = digit_distribution(model, problems, tok, s.width, s.seq_len, torch.device("cpu"))
    for g, idx in (("all", [0, 1, 2, 3]), ("add", [0, 2]), ("mul", [1, 3])):
        hs = [h for h, i in zip(d["entropy"], d["problem"], strict=True) if i in idx]
        assert metrics[g]["digit_positions"] == len(hs) == sum(len(str(problems[i].answer)) for i in idx)
        assert metrics[g]["digit_entropy"] == pytest.approx(sum(hs) / len(hs), rel=1e-9)
        assert 0.0 < metrics[g]["digit_entropy"] < math.log(10) + 1e-6


@pytest.fixture
def one_thread_local():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------
# t quantile and the minimum detectable difference
# ---------------------------------------------------------------------------


def test_t_quantile_matches_the_printed_table():
    # one-sided 0.80 and 0.975 quantiles of Student's t from a textbook table
    for df, t80, t975 in ((1, 1.376, 12.706), (2, 1.061, 4.303), (4, 0.941, 2.776),
                          (9, 0.883, 2.262), (29, 0.854, 2.045)):
        assert t_quantile(0.8, df) == pytest.approx(t80, abs=1e-3)
        assert t_quantile(0.975, df) == pytest.approx(t975, abs=1e-3)
        assert t_quantile(0.2, df) == pytest.approx(-t80, abs=1e-3)
    assert t_quantile(0.5, 3) == 0.0
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="p must"):
            t_quantile(bad, 4)


@pytest.mark.parametrize("p", [0.6, 0.8, 0.9, 0.975, 0.995])
def test_t_quantile_agrees_with_scipy(p):
    from scipy import stats

    for df in (1, 2, 3, 4, 7, 19, 60):
        assert t_quantile(p, df) == pytest.approx(float(stats.t.ppf(p, df)), rel=1e-9)


def test_mdd_by_hand():
    # n = 5: (t_{0.975,4} + t_{0.80,4}) sd / sqrt 5 = (2.7764451 + 0.9409646) / 2.2360680 sd
    assert mdd(1.0, 5) == pytest.approx((2.7764451 + 0.9409646) / math.sqrt(5), rel=1e-6)
    assert mdd(1.0, 5) == pytest.approx(1.662476, rel=1e-6)
    assert mdd(0.02, 3) == pytest.approx((4.3026527 + 1.0606602) * 0.02 / math.sqrt(3), rel=1e-6)
    assert mdd(1.0, 1) is None
    d = t_interval([0.05, 0.01, 0.08, 0.02, 0.04])
    assert d["mdd"] == pytest.approx(1.662476 * d["std"], rel=1e-6)
    # the MDD exceeds the interval's half-width (80 % power on top of the 95 % level)
    assert d["mdd"] > d["hi"] - d["mean"]
    assert d["mdd"] == pytest.approx((d["hi"] - d["mean"]) * (1 + 0.9409646 / t_critical(4)),
                                     rel=1e-6)
    assert t_interval([0.3])["mdd"] is None
    assert "MDD 0.040" in verdict("B", "A", "exact", d | {"mdd": 0.04}, higher_is_better=True)


def test_entropy_verdict_says_higher_or_lower_without_judging():
    down = t_interval([-0.2, -0.3, -0.25])
    line = verdict("CE+NTL-W1", "CE", "digit H (nats)", down, higher_is_better=None)
    assert ": lower (" in line and "better" not in line and "worse" not in line
    flat = t_interval([-0.2, 0.3, 0.0])
    assert "no detectable difference" in verdict("X", "CE", "digit H", flat, higher_is_better=None)


# ---------------------------------------------------------------------------
# the RL stage's starting model
# ---------------------------------------------------------------------------


def test_rl_starts_from_a_noisy_teachers_model_cached_apart():
    s = parse_settings(_parser().parse_args(["--rl"]))
    assert s.rl.sft_steps == DEFAULTS["rl_sft_steps"] <= s.train.steps == DEFAULTS["steps"]
    s0 = s.rl_start()
    assert s0.train.steps == s.rl.sft_steps and s0.train.warmup == s.rl.sft_steps // 10
    assert (s0.train.lr, s0.train.batch_size, s0.model, s0.digits) == (
        s.train.lr, s.train.batch_size, s.model, s.digits)
    assert ce_model_paths("o", s0, 0) != ce_model_paths("o", s, 0)
    q = parse_settings(_parser().parse_args(["--rl", "--quick"]))
    assert q.rl.sft_steps == QUICK["rl_sft_steps"]
    t = parse_settings(_parser().parse_args(["--rl", "--rl-sft-steps", "77", "--rl-del-weight", "0.05"]))
    assert t.rl_start().train.steps == 77 and t.rl_start().train.warmup == 7
    assert t.rl.del_weight == 0.05
    # the starting model learns from noisy demonstrations; the supervised stage's do not,
    # and a clean TrainConfig hashes as before label_noise existed (caches stay valid)
    assert s.rl.sft_noise == 0.3 and s0.train.label_noise == 0.3 and s.train.label_noise == 0.0
    assert "label_noise" not in s.train.to_dict() and s0.train.to_dict()["label_noise"] == 0.3
    clean = parse_settings(_parser().parse_args(["--rl", "--rl-sft-noise", "0"]))
    assert clean.rl_start().train.label_noise == 0.0
    assert ce_model_paths("o", clean.rl_start(), 0) != ce_model_paths("o", s0, 0)
    with pytest.raises(ValueError, match="label_noise"):
        TrainConfig(label_noise=1.0)
    for bad in (["--rl-sft-steps", "0"], ["--rl-del-weight", "0"], ["--rl-sft-noise", "1"],
                ["--rl-sft-noise", "-0.1"]):
        with pytest.raises(ValueError, match=bad[0]):
            parse_settings(_parser().parse_args(["--rl", *bad]))


def test_label_noise_changes_what_the_starting_model_learns_from(tmp_path):
    """sft_job trains on corrupted demonstrations exactly when ``train.label_noise > 0``:
    the first step's loss (the same initial weights) differs from the clean run's, and
    the same noise twice gives the same loss history."""
    from dataclasses import replace

    from ntl.demo.sft import sft_job

    s = parse_settings(_parser().parse_args([*TINY, "--steps", "4"]))
    ce = Arm("CE", 0.0, "wasserstein")

    def losses(noise: float) -> list[float]:
        t = replace(s, train=replace(s.train, label_noise=noise))
        r = sft_job({"settings": t, "seed": 0, "arm": ce, "out": str(tmp_path)}, lambda k: None)
        return r["train"]["history"]["loss"]

    clean, noisy = losses(0.0), losses(0.9)
    assert noisy[0] != pytest.approx(clean[0], rel=1e-4)
    assert losses(0.9) == noisy


def test_committed_reference_matches_the_default_settings():
    """A default ``ntl demo`` and ``ntl demo --rl`` find their committed 5-seed reference
    (``reference.json``: same task, model, training and GRPO settings), so they print where
    each arm falls against it; a changed default without a re-based reference fails here."""
    from ntl.demo.common import load_reference

    for stage, argv in (("sft", []), ("rl", ["--rl"])):
        ref = load_reference(stage, parse_settings(_parser().parse_args(argv)))
        assert ref is not None, f"reference.json has no {stage} reference for the default settings"
        assert ref["seeds"] == [0, 1, 2, 3, 4]


def test_rl_arms_include_del_when_registered():
    from ntl.demo.rl import rl_arms

    s = Settings()
    arms = {a.name: a for a in rl_arms(s)}
    assert {"GRPO", "GRPO+NTL", "GRPO+bonus"} <= set(arms)
    assert arms["GRPO+NTL"].method == "wasserstein" and arms["GRPO+NTL"].ntl_weight == s.rl.ntl_weight
    assert arms["GRPO"].ntl_weight == 0.0 and arms["GRPO+bonus"].bonus
    if "del" in REGISTRY:
        assert arms["GRPO+DEL"].method == "del" and arms["GRPO+DEL"].ntl_weight == s.rl.del_weight
    else:
        assert "GRPO+DEL" not in arms


def test_reference_command_names_the_arms():
    from ntl.demo.common import _arms_option

    def cfg(specs):
        return {"ntl_weight": 0.3, "arms": [{"name": a.name, "ntl_weight": a.ntl_weight,
                                             "method": a.method} for a in parse_arms(specs)]}

    assert _arms_option(cfg(["ce", "mse", "w1"])) == ""
    assert _arms_option(cfg(["ce", "mse", "w1", "huber"])) == " --arms ce mse w1 huber"
    assert _arms_option(cfg(["w1=0.1", "ce"])) == " --arms ce w1=0.1"
    for specs in (["ce", "mae", "w1=0.1"], ["ce", "huber=2"]):  # the command gives the arms back
        opt = _arms_option(cfg(specs)).split()[1:]
        assert parse_arms(opt) == parse_arms(specs)
    assert _arms_option({"arms": [{"name": "GRPO", "ntl_weight": 0.0, "bonus": False}]}) == ""
