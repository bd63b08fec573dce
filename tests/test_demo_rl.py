"""Tests of ``ntl demo --rl`` (issue 14): GRPO from the supervised CE model through
``ntl_trl.NTLGRPOTrainer`` on real TRL, the CE model cache, the digit-aware bonus reward
against a hand computation, and ``--quick --rl`` twice with identical metrics.

Needs TRL 1.16 (the ``demo`` extra): run it in the TRL venv, e.g.
``~/.cache/ntl-trl-venvs/trl116/bin/python -m pytest tests/test_demo_rl.py``.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("trl")

from ntl.demo import main
from ntl.demo.common import strip_volatile
from ntl.demo.rl import (
    answer_probability,
    make_bonus_reward,
    make_digit_credit_reward,
    make_exact_reward,
)
from ntl.demo.task import Problem, demo_tokenizer, encode, parse_answer
from ntl.demo.train import ModelConfig, build_model

TINY_RL = ["--rl", "--rl-sft-steps", "30", "--batch-size", "16", "--eval-size", "24", "--hidden", "32",
           "--layers", "1", "--rl-steps", "3", "--rl-prompts", "2", "--num-generations", "4",
           "--no-plot", "--no-progress", "--jobs", "1"]


def test_bonus_reward_by_hand():
    """``ntl_bonus`` against a computation from the full logits: softmax over the ten digit
    columns at the positions that predict each final-answer digit, targets aligned by place
    value, 0.4 accuracy + 0.3 confidence + 0.3 target probability, times the weight."""
    tok = demo_tokenizer()
    v = tok.get_vocab()
    torch.manual_seed(0)
    model = build_model(tok, ModelConfig(32, 1, 4, 64), 16, torch.device("cpu"))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4.0)
    prompts = ["012+005=", "012+005=", "003*007="]
    completions = ["####17", "####1", "####23"]  # right; one digit short; wrong
    truths = ["17", "17", "21"]
    comp_ids = [[*encode(v, c), tok.eos_token_id] for c in completions]

    class _Acc:
        @staticmethod
        def unwrap_model(m):
            return m

    class _Trainer:
        accelerator = _Acc()
        model: Any

    _Trainer.model = model
    fn, holder = make_bonus_reward(tok, weight=0.1, temperature=1.0)
    holder["trainer"] = _Trainer()
    got = fn(prompts=prompts, completions=completions, completion_ids=comp_ids, ground_truth=truths)

    digits = [v[d] for d in "0123456789"]
    want = []
    for p, c, t in zip(prompts, comp_ids, truths, strict=True):
        ids = [tok.bos_token_id, *encode(v, p), *c]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        P = 1 + len(p)
        ans = [i for i, tid in enumerate(c) if tid in digits]  # completion positions of the digits
        written = "".join(tok.decode([c[i]]) for i in ans)
        # place value: units with units; a written digit with no truth counterpart targets 0
        tgt = [int(x) for x in t.rjust(len(written), "0")[-len(written):]]
        acc = conf = tp = 0.0
        for i, y in zip(ans, tgt, strict=True):
            q = torch.softmax(logits[P + i - 1, digits], -1)  # position P+i-1 predicts token i
            acc += float(int(q.argmax()) == y)
            conf += float(q.max())
            tp += float(q[y])
        n = len(ans)
        want.append(0.1 * (0.4 * acc / n + 0.3 * conf / n + 0.3 * tp / n))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert all(0.0 < g <= 0.1 for g in got)


class _Bigram(torch.nn.Module):
    """A model whose next-token logits depend only on the current token: ``table[id]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])


def test_answer_probability_by_hand_on_a_bigram_model():
    """The probability of ``####`` answer ``<eos>`` at temperature T, against the product of
    hand-taken softmax entries of a bigram table (prompt tokens play no role but the last)."""
    tok = demo_tokenizer()
    v = tok.get_vocab()
    g = torch.Generator().manual_seed(3)
    table = 2.0 * torch.randn(len(v), len(v), generator=g)
    model = _Bigram(table)
    probs = [Problem(12, "+", 5), Problem(3, "*", 7), Problem(0, "+", 0)]
    for T in (1.0, 0.5):
        got = answer_probability(model, probs, tok, 3, 15, torch.device("cpu"), temperature=T)
        for p, q in zip(probs, got, strict=True):
            prev = v["="]
            want = 1.0
            for t in [*encode(v, p.completion), tok.eos_token_id]:
                want *= math.exp(table[prev, t].item() / T) / sum(
                    math.exp(x / T) for x in table[prev].tolist())
                prev = t
            assert q == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        answer_probability(model, probs, tok, 3, 15, torch.device("cpu"), temperature=0.0)


def test_answer_probability_is_the_expected_sampled_exact_match():
    """On a real (tiny) Qwen2 model: (1) against autoregressive prefix-by-prefix forwards, one
    problem at a time (no batching, no teacher-forced shift); (2) the mean over problems
    against the exact match of answers sampled from the model at T = 1 (plain multinomial
    sampling, 4,000 draws, parsed like the evaluation), within 4 binomial sigmas."""
    tok = demo_tokenizer()
    v = tok.get_vocab()
    torch.manual_seed(0)
    model = build_model(tok, ModelConfig(32, 1, 4, 64), 15, torch.device("cpu"))
    probs = [Problem(12, "+", 5), Problem(3, "*", 7)]
    # make the right answers likely: a few steps of teacher-forced CE on these two problems
    from ntl.demo.task import build_batch

    ids, labels = build_batch(probs, tok, 3, 15)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    got = answer_probability(model, probs, tok, 3, 15, torch.device("cpu"))
    for p, q in zip(probs, got, strict=True):
        seq = [tok.bos_token_id, *encode(v, p.prompt(3))]
        want = 1.0
        with torch.no_grad():
            for t in [*encode(v, p.completion), tok.eos_token_id]:
                want *= torch.softmax(model(input_ids=torch.tensor([seq])).logits[0, -1], -1)[t].item()
                seq.append(t)
        assert q == pytest.approx(want, rel=1e-4)
    assert 0.2 < sum(got) / 2 < 0.9  # the sampling check below has something to measure
    g = torch.Generator().manual_seed(1)
    n, hits = 2000, 0
    with torch.no_grad():
        for p in probs:
            seq = torch.tensor([[tok.bos_token_id, *encode(v, p.prompt(3))]] * n)
            for _ in range(6):
                nxt = torch.multinomial(torch.softmax(model(input_ids=seq).logits[:, -1], -1), 1,
                                        generator=g)
                seq = torch.cat([seq, nxt], 1)
            for row in seq[:, 1 + len(p.prompt(3)) :].tolist():
                row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
                hits += parse_answer(tok.decode(row)) == p.answer
    freq, mean = hits / (2 * n), sum(got) / 2
    assert abs(freq - mean) < 4 * math.sqrt(mean * (1 - mean) / (2 * n)) + 0.01


def test_exact_reward_reads_completions_as_the_evaluation_does():
    """``make_exact_reward``: 1 only for ``####`` + the right digits (leading zeros allowed, as
    ``parse_answer`` reads them) before ``<eos>``; junk after or before the number, a special
    token inside it or a missing digit scores 0 (the lenient ``correctness_reward`` of
    ``ntl.rewards``, on TRL's special-token-free text, scores some of these 1)."""
    from ntl.rewards import correctness_reward

    tok = demo_tokenizer()
    v = tok.get_vocab()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    cases = [  # (completion ids, exact reward by hand)
        ([*encode(v, "####579"), eos], 1.0),
        ([*encode(v, "####0579"), eos], 1.0),
        ([*encode(v, "####579")], 1.0),  # cut at max length: the text is the same
        ([*encode(v, "####579="), eos], 0.0),
        ([*encode(v, "####+579"), eos], 0.0),
        ([*encode(v, "####57"), pad, *encode(v, "9"), eos], 0.0),
        ([*encode(v, "####57"), eos], 0.0),
        ([*encode(v, "####579"), eos, *encode(v, "1")], 1.0),  # after <eos>: not read
    ]
    fn = make_exact_reward(tok)
    assert fn.__name__ == "correctness_reward"
    got = fn(completion_ids=[c for c, _ in cases], ground_truth=["579"] * len(cases))
    assert got == [w for _, w in cases]
    # the lenient reward on TRL's decoded text (skip_special_tokens) accepts some of the junk
    texts = tok.batch_decode([c[: c.index(eos)] if eos in c else c for c, _ in cases],
                             skip_special_tokens=True)
    lenient = correctness_reward(texts, ground_truth=["579"] * len(cases))
    assert lenient[3] == lenient[4] == lenient[5] == 1.0


def test_digit_credit_reward_by_hand():
    fn = make_digit_credit_reward(0.5)
    got = fn(completions=["####579", "####589", "####57", "579", "####0579"],
             ground_truth=["579"] * 5)
    assert got == pytest.approx([0.5, 0.5 * 2 / 3, 0.0, 0.0, 0.5 * 3 / 4])
    from ntl.demo.config import RLConfig

    with pytest.raises(ValueError, match=r"rl\.reward"):
        RLConfig(reward="lenient")
    with pytest.raises(ValueError, match="digit_credit"):
        RLConfig(digit_credit=-0.1)


def test_tiny_rl_stage_reuses_the_ce_model_and_applies_ntl(tmp_path, capsys):
    out = tmp_path / "rl"
    assert main([*TINY_RL, "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "trained now" in first
    res = json.loads((out / "rl_results.json").read_text())
    assert res["stage"] == "rl" and res["versions"]["trl"].startswith("1.16")
    run = res["runs"][0]
    from ntl.methods import REGISTRY

    want = {"GRPO", "GRPO+NTL", "GRPO+bonus"} | ({"GRPO+DEL"} if "del" in REGISTRY else set())
    assert set(run["arms"]) == want
    for name, arm in run["arms"].items():
        h = arm["history"]
        assert h["step"] == [1, 2, 3], name
        assert all(x is not None and 0.0 <= x <= 1.0 for x in h["rewards/correctness_reward/mean"])
        assert arm["metrics"]["all"]["n"] == 24
    # NTL is on (weight 0.1) in GRPO+NTL only, logged for all arms; the bonus only in GRPO+bonus
    arms = {a["name"]: a for a in res["config"]["arms"]}
    assert {n: (a["ntl_weight"], a["method"]) for n, a in arms.items() if n != "GRPO+DEL"} == {
        "GRPO": (0.0, "wasserstein"), "GRPO+NTL": (0.1, "wasserstein"),
        "GRPO+bonus": (0.0, "wasserstein")}
    assert res["config"]["rl"]["sft_steps"] == 30 and res["config"]["rl_start_train"]["steps"] == 30
    if "del" in REGISTRY:  # DEL in the policy loss: its own term, logged as ntl/loss
        assert (arms["GRPO+DEL"]["ntl_weight"], arms["GRPO+DEL"]["method"]) == (0.1, "del")
        assert res["ntl_log"]["GRPO+DEL"]["ntl/loss"] > 0.0
        assert res["ntl_log"]["GRPO+DEL"]["ntl/loss"] != res["ntl_log"]["GRPO+NTL"]["ntl/loss"]
    ntl_h = run["arms"]["GRPO+NTL"]["history"]
    assert any(x for x in ntl_h["ntl/total_digits"]) and any(x for x in ntl_h["ntl/loss"])
    assert res["ntl_log"]["GRPO+NTL"]["ntl/loss"] > 0.0
    assert all(x is None for x in run["arms"]["GRPO"]["history"]["rewards/ntl_bonus/mean"])
    bonus = run["arms"]["GRPO+bonus"]["history"]["rewards/ntl_bonus/mean"]
    assert all(x is not None and 0.0 <= x <= 0.1 for x in bonus)
    # the "before" metrics are the supervised CE model's, the same for every arm
    before = run["before"]["all"]
    for m in ("exact_match", "sampled_exact_match", "mae", "digit_accuracy"):
        ch = res["change"]["GRPO+NTL"]["all"][m]["mean"]
        assert ch == pytest.approx(run["arms"]["GRPO+NTL"]["metrics"]["all"][m] - before[m])
    # the sampled exact match: the same before value from every arm's job, a probability after
    assert 0.0 <= before["sampled_exact_match"] <= 1.0
    assert {a["sampled_before"]["all"] for a in run["arms"].values()} == {before["sampled_exact_match"]}
    for arm in run["arms"].values():
        assert 0.0 <= arm["metrics"]["all"]["sampled_exact_match"] <= 1.0
    assert "sampled exact" in res["table"] and "Δ sampled exact" in res["paired_table"]
    assert "sampled exact (T=1)" in first
    # a second run in the same folder reuses the CE model (same configuration hash) ...
    assert main([*TINY_RL, "--out", str(out)]) == 0
    assert "reused for seeds [0]" in capsys.readouterr().out
    again = json.loads((out / "rl_results.json").read_text())
    assert strip_volatile(again["runs"]) == strip_volatile(res["runs"])
    # ... but not after a change of the starting model's supervised steps
    assert main([*TINY_RL, "--rl-sft-steps", "31", "--out", str(out)]) == 0
    assert "trained now" in capsys.readouterr().out


def test_rl_plot_is_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    args = [a for a in TINY_RL if a != "--no-plot"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "rl_results.json").read_text())
    assert res["plot"] == "rl_results.png" and (tmp_path / "rl_results.png").stat().st_size > 10_000


@pytest.mark.slow
def test_quick_rl_twice_writes_identical_metrics(tmp_path):
    """The CI check of issue 14 for the RL stage: `ntl demo --rl --quick` twice, separate
    folders (so the CE model is trained twice too), same metrics."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--rl", "--quick", "--no-progress", "--no-plot", "--out", str(a)]) == 0
    assert main(["--rl", "--quick", "--no-progress", "--no-plot", "--out", str(b)]) == 0
    ra = json.loads((a / "rl_results.json").read_text())
    rb = json.loads((b / "rl_results.json").read_text())
    assert ra["config"]["quick"] is True
    assert strip_volatile(ra) == strip_volatile(rb)
    assert math.isfinite(ra["ntl_log"]["GRPO+NTL"]["ntl/loss"])
    assert ra["ntl_log"]["GRPO+NTL"]["ntl/loss"] > 0.0
