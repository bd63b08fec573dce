"""The RL stage: GRPO from a supervised CE model through ``ntl_trl.NTLGRPOTrainer`` (TRL).

Per seed, every arm starts from that seed's RL starting model: a CE model trained like the
supervised stage's, for ``rl.sft_steps`` steps, on noisy demonstrations (a fraction
``rl.sft_noise`` of the examples has one wrong answer digit,
:func:`ntl.demo.task.corrupt_answer_digits`): it learns the right answer as its mode but
samples wrong digits, which a correctness reward can remove (from a model trained on clean
demonstrations, even the exact policy gradient moves held-out accuracy by under 3 points in
200 steps: docs/demo.md). It is trained on the spot or loaded from ``<out>/models/`` when its
configuration hash matches. Every arm sees the same prompts
(problems from a generator seeded with ``seed + RL_SEED_OFFSET``, the held-out problems
excluded) and runs TRL's GRPO with the same ``GRPOConfig`` (same ``seed``, so the first
generation batch is the same in every arm). The arms differ only in NTL:

* ``GRPO``:       reward = correctness; ``NTLConfig(ntl_weight=0)`` (logs the ``ntl/*``
  metrics, the update is TRL's own);
* ``GRPO+NTL``:   reward = correctness; loss ``+ 0.1 NTL-W1`` over the completion's
  final-answer digits targeted at the ground truth (``ntl_labels="final_answer"``);
* ``GRPO+DEL``:   the same with DEL (``ntl_method="del"``, weight ``rl.del_weight``), when
  :mod:`ntl.methods` registers ``"del"``;
* ``GRPO+bonus``: reward = correctness ``+ 0.1 b``, ``b`` the ``final_answer`` bonus of
  :mod:`ntl.rewards` from the policy's digit probabilities at rollout time:
  ``b = 0.4 mean_i correct_i + 0.3 mean_i max_prob_i + 0.3 mean_i target_prob_i`` over
  the final-answer digits (:func:`ntl.rewards.ntl_bonus_from_digit_probs`); NTL weight 0.

Correctness is :func:`ntl.rewards.correctness_reward` (the number after ``####`` equals
the ground truth); with ``rl.digit_credit > 0`` a second reward adds that weight times the
answer's place-value digit accuracy (:func:`make_digit_credit_reward`; off by default).
Before and after, each model is evaluated on the held-out problems with greedy decoding, as
in the supervised stage, and by the expected exact match of one answer sampled at the GRPO
temperature (``sampled_exact_match``, :func:`answer_probability`): the quantity GRPO
optimises.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import OP_NAMES, RL_SEED_OFFSET, Settings
from .sft import ce_model_paths, eval_problems, evaluate, load_ce_model, sft_job
from .task import Problem, build_batch, demo_tokenizer, digit_accuracy, make_problems, parse_answer
from .train import Arm

__all__ = ["RLArm", "answer_probability", "make_bonus_reward", "make_digit_credit_reward",
           "make_exact_reward", "rl_arms", "rl_job", "run_rl", "sampled_metrics"]

#: What is kept of TRL's per-step logs (``trainer.state.log_history``).
HISTORY_KEYS = (
    "reward", "reward_std", "rewards/correctness_reward/mean", "rewards/ntl_bonus/mean",
    "rewards/digit_credit/mean",
    "frac_reward_zero_std", "loss", "grad_norm", "entropy", "completions/mean_length",
    "ntl/loss", "ntl/digit_accuracy", "ntl/total_digits", "ntl/confidence", "ntl/target_prob",
)


@dataclass(frozen=True)
class RLArm:
    """One RL arm: the weight and method of the term in the GRPO loss, and whether the
    digit bonus is rewarded."""

    name: str
    ntl_weight: float
    bonus: bool
    method: str = "wasserstein"


def rl_arms(s: Settings) -> list[RLArm]:
    """GRPO, GRPO+NTL (W1), GRPO+DEL (when ``"del"`` is a registered method) and GRPO+bonus."""
    from ntl.methods import REGISTRY

    arms = [RLArm("GRPO", 0.0, False), RLArm("GRPO+NTL", s.rl.ntl_weight, False)]
    if "del" in REGISTRY:
        arms.append(RLArm("GRPO+DEL", s.rl.del_weight, False, "del"))
    return [*arms, RLArm("GRPO+bonus", 0.0, True)]


def make_bonus_reward(tok: Any, weight: float, temperature: float) -> tuple[Callable[..., list[float]], dict[str, Any]]:
    """A TRL reward function ``ntl_bonus`` = ``weight * b`` (module docstring) and the dict
    into which the caller puts the trainer (``holder["trainer"]``) before training.

    It scores each completion with the policy as it is at rollout (one no-grad forward of
    prompt + completion), builds ``final_answer`` digit targets against the ground truth
    (:func:`ntl.targets.build_digit_targets`), takes the digit probabilities at those
    positions (:func:`ntl.metrics.digit_probs`, logits divided by ``temperature`` as in
    the rollout) and returns :func:`ntl.rewards.ntl_bonus_from_digit_probs` times ``weight``.
    """
    import ntl
    from ntl.metrics import digit_probs
    from ntl.rewards import ntl_bonus_from_digit_probs
    from ntl.targets import build_digit_targets

    vocab = ntl.DigitVocab.from_tokenizer(tok)
    holder: dict[str, Any] = {}

    def ntl_bonus(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                  ground_truth: list[str], **kwargs: Any) -> list[float]:
        trainer = holder["trainer"]
        model = trainer.accelerator.unwrap_model(trainer.model)
        device = next(model.parameters()).device
        p_ids = tok(list(prompts))["input_ids"]
        P = {len(p) for p in p_ids}
        if len(P) != 1:
            raise ValueError(f"ntl_bonus: the demo's prompts all have one length, got {sorted(P)}")
        P = P.pop()
        C = max(1, max(len(c) for c in completion_ids))
        B = len(completion_ids)
        comp = torch.full((B, C), tok.pad_token_id, dtype=torch.long)
        cmask = torch.zeros((B, C), dtype=torch.long)
        for i, c in enumerate(completion_ids):
            comp[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            cmask[i, : len(c)] = 1
        ids = torch.cat([torch.tensor(p_ids, dtype=torch.long), comp], 1).to(device)
        am = torch.cat([torch.ones((B, P), dtype=torch.long), cmask], 1).to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=am).logits[:, P - 1 : P + C - 1]
        targets = build_digit_targets(comp, [str(t) for t in ground_truth], tok,
                                      mode="final_answer", response_mask=cmask, vocab=vocab)
        dp = digit_probs(logits.float(), targets.to(device), vocab, temperature=temperature)
        return (weight * ntl_bonus_from_digit_probs(dp)).cpu().tolist()

    return ntl_bonus, holder


@torch.no_grad()
def answer_probability(model: Any, problems: list[Problem], tok: Any, width: int, seq_len: int,
                       device: torch.device, temperature: float = 1.0,
                       batch_size: int = 500) -> list[float]:
    """Per problem, the probability that the policy, sampling at ``temperature`` over the
    whole vocabulary (as TRL's generation does), writes exactly the canonical completion
    ``####`` answer ``<eos>``: ``prod_t softmax(logits_t / temperature)[token_t]`` over the
    completion's tokens, teacher-forced in one forward pass (:func:`ntl.demo.task.build_batch`).

    Its mean over held-out problems is the expected exact match of one sampled answer (the
    expected correctness reward, pass@1) with no sampling noise. Completions that parse to
    the same number another way (leading zeros, ``"####017"``) are not counted: a lower bound,
    and a tight one (docs/demo.md measures the gap by sampling)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    was_training = model.training
    model.eval()
    out: list[float] = []
    for s in range(0, len(problems), batch_size):
        ids, labels = build_batch(problems[s : s + batch_size], tok, width, seq_len)
        ids, labels = ids.to(device), labels.to(device)
        logits = model(input_ids=ids).logits[:, :-1].float() / temperature
        tgt = labels[:, 1:]
        mask = tgt != -100
        logp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp_min(0)[..., None])[..., 0]
        out += (logp * mask).sum(-1).exp().cpu().tolist()
    model.train(was_training)
    return out


def sampled_metrics(model: Any, problems: list[Problem], tok: Any, s: Settings,
                    device: torch.device) -> dict[str, float]:
    """``{group: expected exact match of a sampled answer}`` at the GRPO sampling
    temperature (mean :func:`answer_probability`), for ``all`` and each operation."""
    p = answer_probability(model, problems, tok, s.width, s.seq_len, device, s.rl.temperature)
    groups = {"all": list(range(len(problems)))}
    for name in s.ops if len(s.ops) > 1 else ():
        groups[name] = [i for i, q in enumerate(problems) if q.op == OP_NAMES[name]]
    return {g: sum(p[i] for i in idx) / len(idx) for g, idx in groups.items() if idx}


def make_exact_reward(tok: Any) -> Callable[..., list[float]]:
    """A TRL reward function (named ``correctness_reward``, so TRL logs it under
    ``rewards/correctness_reward/mean`` like the lenient one): 1.0 when the completion, read
    as the held-out evaluation reads a greedy one, is the right answer, else 0.0.

    The text is the decoded ``completion_ids`` up to the first ``<eos>`` with special tokens
    kept (``"####1<pad>7"`` stays unparsable), parsed by :func:`ntl.demo.task.parse_answer`
    (``####``, an optional ``-`` and digits, nothing else). :func:`ntl.rewards.correctness_reward`
    is more lenient: TRL decodes with ``skip_special_tokens=True`` and
    :func:`ntl.answers.extract_answer` takes ``"####579="`` or ``"####+579"`` as 579, answers
    the evaluation counts as wrong. (On this task the two gave identical runs: docs/demo.md.)"""
    eos = tok.eos_token_id

    def correctness_reward(completion_ids: list[list[int]], ground_truth: list[str],
                           **kwargs: Any) -> list[float]:
        out = []
        for ids, t in zip(completion_ids, ground_truth, strict=True):
            ids = list(ids)
            if eos in ids:
                ids = ids[: ids.index(eos)]
            pred = parse_answer(tok.decode(ids))
            out.append(float(pred is not None and pred == int(t)))
        return out

    return correctness_reward


def make_digit_credit_reward(weight: float) -> Callable[..., list[float]]:
    """A TRL reward function ``digit_credit`` = ``weight`` times the place-value digit accuracy
    of the completion against the ground truth (:func:`ntl.demo.task.digit_accuracy`: 0 for an
    unparsable completion, 1 for the right answer): partial credit for near misses."""
    from ntl.rewards import completion_text

    def digit_credit(completions: list[Any], ground_truth: list[str], **kwargs: Any) -> list[float]:
        return [weight * digit_accuracy(completion_text(c), int(t))
                for c, t in zip(completions, ground_truth, strict=True)]

    return digit_credit


def _progress_callback(progress: Callable[[int], None]) -> Any:
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            progress(1)

    return _Progress()


def rl_job(payload: dict[str, Any], progress: Callable[[int], None]) -> dict[str, Any]:
    """GRPO for one arm and one seed from the seed's RL starting model (``<out>/models/``,
    :meth:`Settings.rl_start`), then the held-out evaluation (a
    :func:`ntl.demo.runner.run_jobs` job)."""
    s: Settings = payload["settings"]
    seed: int = payload["seed"]
    arm: RLArm = payload["arm"]
    t0, c0 = time.perf_counter(), time.process_time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers
    from datasets import Dataset
    from ntl_trl import NTLConfig, NTLGRPOTrainer
    from trl import GRPOConfig

    from ntl.rewards import correctness_reward

    transformers.logging.set_verbosity_error()
    device = torch.device(s.device)
    loaded = load_ce_model(payload["out"], s.rl_start(), seed, device)
    if loaded is None:
        raise FileNotFoundError(f"no RL starting model ({s.rl.sft_steps} supervised steps) for "
                                f"seed {seed} under {payload['out']}/models")
    model, _ = loaded
    tok = demo_tokenizer()
    held = eval_problems(s)
    sampled_before = sampled_metrics(model, held, tok, s, device)
    rl = s.rl
    prompts = make_problems(rl.steps * rl.prompts_per_step, s.digits, seed + RL_SEED_OFFSET,
                            exclude=set(held))
    ds = Dataset.from_dict({"prompt": [p.prompt(s.width) for p in prompts],
                            "ground_truth": [str(p.answer) for p in prompts]})
    run_dir = os.path.join(payload["out"], "rl_runs", f"{arm.name}-seed{seed}")
    args = GRPOConfig(
        output_dir=run_dir, use_cpu=device.type == "cpu", bf16=False, report_to=[],
        max_steps=rl.steps, per_device_train_batch_size=rl.prompts_per_step * rl.num_generations,
        num_generations=rl.num_generations, max_completion_length=s.max_new_tokens,
        learning_rate=rl.lr, lr_scheduler_type="constant", temperature=rl.temperature, beta=0.0,
        logging_steps=1, save_strategy="no", seed=seed, disable_tqdm=True,
        gradient_checkpointing=False,
    )
    rewards: list[Any] = [make_exact_reward(tok) if rl.reward == "exact" else correctness_reward]
    holder = None
    if rl.digit_credit:
        rewards.append(make_digit_credit_reward(rl.digit_credit))
    if arm.bonus:
        bonus, holder = make_bonus_reward(tok, rl.bonus_weight, rl.temperature)
        rewards.append(bonus)
    ntl_log = logging.getLogger("ntl")
    level = ntl_log.level
    ntl_log.setLevel(logging.WARNING)  # the adapter's "NTL on ..." line, once per job, is noise here
    try:
        trainer = NTLGRPOTrainer(
            model=model, processing_class=tok, args=args, train_dataset=ds, reward_funcs=rewards,
            callbacks=[_progress_callback(progress)],
            ntl_config=NTLConfig(ntl_weight=arm.ntl_weight, ntl_method=arm.method,
                                 ntl_labels="final_answer", answer_column="ground_truth"),
        )
    finally:
        ntl_log.setLevel(level)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # with disable_tqdm it prints every log dict
    if holder is not None:
        holder["trainer"] = trainer
    trainer.train()
    hist: dict[str, list[Any]] = {"step": []}
    for k in HISTORY_KEYS:
        hist[k] = []
    for h in trainer.state.log_history:
        if "step" not in h or "train_runtime" in h:
            continue
        hist["step"].append(h["step"])
        for k in HISTORY_KEYS:
            v = h.get(k)
            hist[k].append(None if v is None or v != v else float(v))  # NaN -> None
    t_eval = time.perf_counter()
    model = trainer.accelerator.unwrap_model(trainer.model)
    metrics, texts = evaluate(model, held, tok, s, device)
    for g, v in sampled_metrics(model, held, tok, s, device).items():
        metrics[g]["sampled_exact_match"] = v
    return {
        "seed": seed, "arm": arm.name, "ntl_weight": arm.ntl_weight, "bonus": arm.bonus,
        "history": hist, "metrics": metrics, "sampled_before": sampled_before,
        "samples": [{"prompt": p.prompt(s.width), "truth": p.answer, "output": t}
                    for p, t in zip(held[:12], texts[:12], strict=True)],
        "eval_seconds": time.perf_counter() - t_eval,
        "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
    }


def _mean(xs: list[Any]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


# ----------------------------------------------------------------------------- the stage
def run_rl(s: Settings, out: str, *, jobs: int = 0, progress: bool = True, plot: bool = True,
           echo: bool = False) -> dict[str, Any]:
    """The RL stage for every seed; writes ``<out>/rl_results.json`` (and ``rl_results.png``)."""
    try:
        import ntl_trl  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        raise ValueError(f"ntl demo --rl needs TRL and ntl_trl (pip install -e '.[demo]'): {e}") from None
    from .common import finish_timing, load_reference, machine_info, start_timing
    from .report import (
        RL_COMPARED,
        RL_METRICS,
        compare_to_reference,
        format_paired,
        format_table,
        paired_table,
        plot_rl,
        summarize,
        verdicts,
    )
    from .runner import default_jobs, run_jobs
    from .stats import t_interval

    os.makedirs(out, exist_ok=True)
    timing = start_timing()
    # 1. the starting CE models: reuse what this configuration already trained, train the rest
    s0 = s.rl_start()
    before: dict[int, dict[str, Any]] = {}
    reused = []
    for seed in s.seeds:
        pt, js = ce_model_paths(out, s0, seed)
        if os.path.exists(pt) and os.path.exists(js):
            with open(js) as f:
                before[seed] = json.load(f)["metrics"]
            reused.append(seed)
    missing = [seed for seed in s.seeds if seed not in before]
    sft_res: list[dict[str, Any]] = []
    if missing:
        ce = Arm("CE", 0.0, "wasserstein")
        payloads = [{"settings": s0, "seed": seed, "arm": ce, "out": out, "save": True} for seed in missing]
        # up to 8 seeds side by side: a pool of 2 on 2 cores would leave one core idle while
        # the fifth seed trains alone (one thread per job, so the results are the same)
        sft_res = run_jobs(sft_job, payloads, jobs=jobs or default_jobs(len(payloads), min(len(payloads), 8)),
                           labels=[f"seed {seed} CE (supervised)" for seed in missing],
                           totals=[s0.train.steps] * len(missing), progress=progress)
        for r in sft_res:
            before[r["seed"]] = r["metrics"]
    # 2. GRPO, every (seed, arm)
    arms = rl_arms(s)
    names = [a.name for a in arms]
    payloads = [{"settings": s, "seed": seed, "arm": arm, "out": out} for seed in s.seeds for arm in arms]
    n_jobs = jobs or default_jobs(len(payloads), len(arms))
    res = run_jobs(rl_job, payloads, jobs=n_jobs,
                   labels=[f"seed {p['seed']} {p['arm'].name}" for p in payloads],
                   totals=[s.rl.steps] * len(payloads), progress=progress)
    timing = finish_timing(timing, sft_res + res, n_jobs)
    timing["ce_models_reused_for_seeds"] = reused
    for seed in s.seeds:  # the starting model's sampled exact match, computed by its first job
        first = next(r for r in res if r["seed"] == seed)
        before[seed] = {g: {**m, "sampled_exact_match": first["sampled_before"].get(g)}
                        for g, m in before[seed].items()}
    runs = [{"seed": seed, "before": before[seed],
             "arms": {r["arm"]: r for r in res if r["seed"] == seed}} for seed in s.seeds]
    groups = s.groups
    summary = summarize(runs, names, groups, metrics=RL_METRICS)
    summary_before = summarize(runs, ["SFT CE"], groups,
                               get=lambda r, a, g, m: r["before"][g].get(m), metrics=RL_METRICS)
    paired = paired_table(runs, names, groups, "GRPO", compared=RL_COMPARED)
    change = {a: {g: {m: t_interval([r["arms"][a]["metrics"][g][m] - r["before"][g][m]
                                     if r["arms"][a]["metrics"][g].get(m) is not None
                                     and r["before"][g].get(m) is not None else None for r in runs])
                      for m in RL_COMPARED}
                  for g in groups} for a in names}
    ntl_log = {a: {k: _mean([x for r in runs for x in r["arms"][a]["history"][k]])
                   for k in ("ntl/loss", "ntl/total_digits", "ntl/digit_accuracy",
                             "rewards/correctness_reward/mean", "rewards/ntl_bonus/mean")}
               for a in names}
    ref = load_reference("rl", s)
    results: dict[str, Any] = {
        "stage": "rl",
        "config": {**s.to_dict(), "arms": [a.__dict__ for a in arms], "jobs": n_jobs,
                   "rl_start_train": s0.train.to_dict(),
                   "trainer": "ntl_trl.NTLGRPOTrainer (TRL GRPOTrainer)",
                   "grpo": {"loss_type": "dapo (TRL default)", "scale_rewards": "group (TRL default)",
                            "beta": 0.0, "lr_scheduler": "constant"}},
        **machine_info(s),
        "summary_before": summary_before,
        "summary": summary,
        "change": change,
        "paired_vs_GRPO": paired,
        "ntl_log": ntl_log,
        "verdicts": verdicts(paired, "GRPO", compared=RL_COMPARED) if len(s.seeds) > 1 else [],
        "reference": ref and {k: ref[k] for k in ("command", "machine", "date", "seeds")},
        "against_reference": compare_to_reference(summary, ref, names, compared=RL_COMPARED),
        "table": format_table({"SFT CE": summary_before["SFT CE"], **summary}, ["SFT CE", *names],
                              groups, len(s.seeds), label="model", metrics=RL_METRICS),
        "paired_table": format_paired(paired, "GRPO", groups, compared=RL_COMPARED),
        "runs": runs,
        "timing": timing,
    }
    png = None
    if plot:
        png = plot_rl(runs, names, os.path.join(out, "rl_results.png"),
                      get_after=lambda r, a, g, m: r["arms"][a]["metrics"][g][m],
                      get_before=lambda r, g, m: r["before"][g][m])
    results["plot"] = os.path.basename(png) if png else None
    with open(os.path.join(out, "rl_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if echo:
        _print_rl(results, out)
    return results


def _print_rl(res: dict[str, Any], out: str) -> None:
    from .common import print_footer
    from .report import format_ci

    c = res["config"]
    rl = c["rl"]
    reused = res["timing"]["ce_models_reused_for_seeds"]
    print(f"\nntl demo --rl: GRPO via ntl_trl.NTLGRPOTrainer (TRL {res['versions']['trl']}) from a "
          f"CE model of each seed trained for {rl['sft_steps']} supervised steps "
          f"({'reused for seeds ' + str(reused) if reused else 'trained now'}); "
          f"{rl['steps']} steps x {rl['prompts_per_step']} prompts x {rl['num_generations']} completions, "
          f"lr {rl['lr']}, seeds {c['seeds']}")
    print(f"held-out metrics, before (the {rl['sft_steps']}-step SFT CE model) and after GRPO:")
    print(res["table"])
    n = len(c["seeds"])
    print("\nchange after - before GRPO, all problems (mean" + (
        f" [95% t-interval, {n} seeds] MDD = minimum detectable difference, 80% power):" if n > 1 else "):"))
    for a, by_g in res["change"].items():
        ch = by_g["all"]
        print(f"  {a:<11} exact (greedy) {format_ci(ch['exact_match'], 'exact_match', True)}, "
              f"sampled exact (T={rl['temperature']:g}) "
              f"{format_ci(ch['sampled_exact_match'], 'sampled_exact_match', True)}, "
              f"MAE {format_ci(ch['mae'], 'mae', True)}, "
              f"digit acc {format_ci(ch['digit_accuracy'], 'digit_accuracy', True)}, "
              f"digit H {format_ci(ch['digit_entropy'], 'digit_entropy', True)}")
    print("\nduring GRPO (means over steps and seeds):")
    for a, d in res["ntl_log"].items():
        arm = next(x for x in c["arms"] if x["name"] == a)
        bonus = d.get("rewards/ntl_bonus/mean")
        method = arm.get("method", "wasserstein")
        print(f"  {a:<11} ntl/loss ({method}) {d['ntl/loss'] or 0:.4f} over {d['ntl/total_digits'] or 0:.0f} "
              f"final-answer digits per step ({'in the loss, weight ' + str(arm['ntl_weight']) if arm['ntl_weight'] else 'logged only'}), "
              f"correctness reward {d['rewards/correctness_reward/mean'] or 0:.3f}"
              + (f", bonus reward {bonus:.4f}" if bonus is not None else ""))
    print_footer(res, "GRPO", out, "rl_results.json")
