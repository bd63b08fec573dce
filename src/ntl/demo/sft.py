"""The supervised stage: CE vs CE+NTL-MSE vs CE+NTL-W1, one job per (seed, arm).

Every arm of a seed starts from the same weights (``torch.manual_seed(seed)`` before the
model is built), trains on the same batches in the same order (problems from a numpy
generator seeded with ``seed``, the held-out problems excluded) and is evaluated on the
same held-out problems with greedy decoding. The arms differ only in the loss, all
computed by :func:`ntl.cross_entropy_with_ntl`. The CE model of each seed is saved under
``<out>/models/`` with a hash of its configuration, so that the RL stage can start from
it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

import ntl

from .config import EVAL_SEED, NOISE_SEED, OP_NAMES, Settings, config_hash
from .task import (
    Problem,
    answer_metrics,
    build_batch,
    corrupt_answer_digits,
    demo_tokenizer,
    make_problems,
)
from .train import Arm, build_model, digit_distribution, greedy_answers, train_arm

__all__ = ["ce_model_paths", "evaluate", "job_cache_path", "load_ce_model", "sft_job"]


def evaluate(model: Any, problems: list[Problem], tok: Any, s: Settings,
             device: torch.device) -> tuple[dict[str, Any], list[str]]:
    """Greedy completions of ``problems``; metrics for ``all`` and each operation: the answer
    metrics of :func:`ntl.demo.task.answer_metrics` plus ``digit_entropy`` (mean entropy in
    nats of the predicted digit distribution over the answers' digit positions,
    teacher-forced: :func:`ntl.demo.train.digit_distribution`), ``digit_target_prob`` (mean
    probability of the target digit there) and ``digit_positions`` (how many)."""
    texts = greedy_answers(model, problems, tok, s.width, s.max_new_tokens, device)
    dist = digit_distribution(model, problems, tok, s.width, s.seq_len, device)
    truths = [p.answer for p in problems]
    groups = {"all": list(range(len(problems)))}
    for name in s.ops if len(s.ops) > 1 else ():
        idx = [i for i, p in enumerate(problems) if p.op == OP_NAMES[name]]
        if idx:
            groups[name] = idx
    metrics = {}
    for g, idx in groups.items():
        metrics[g] = answer_metrics([texts[i] for i in idx], [truths[i] for i in idx])
        keep = set(idx)
        pos = [k for k, i in enumerate(dist["problem"]) if i in keep]
        metrics[g]["digit_entropy"] = sum(dist["entropy"][k] for k in pos) / len(pos) if pos else None
        metrics[g]["digit_target_prob"] = (sum(dist["target_prob"][k] for k in pos) / len(pos)
                                           if pos else None)
        metrics[g]["digit_positions"] = len(pos)
    return metrics, texts


def eval_problems(s: Settings) -> list[Problem]:
    """The held-out problems (the same for every seed and both stages)."""
    return make_problems(s.eval_size, s.digits, EVAL_SEED)


def ce_model_paths(out: str, s: Settings, seed: int) -> tuple[str, str]:
    """``(weights.pt, info.json)`` of seed ``seed``'s CE model, named by the config hash."""
    h = config_hash({**s.sft_dict(), "seed": seed, "versions": _versions()})
    base = os.path.join(out, "models", f"CE-seed{seed}-{h}")
    return base + ".pt", base + ".json"


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "ntl": ntl.__version__}


def _code_fingerprint() -> str:
    """SHA-256 of the code a job's result depends on besides ``ntl``'s losses: the task and
    training modules and the evaluation."""
    import inspect

    from . import task, train

    src = inspect.getsource(task) + inspect.getsource(train) + inspect.getsource(evaluate)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def _loss_fingerprint(arm: Arm, backend: str) -> str:
    """SHA-256 of ``arm``'s loss and its gradient on a fixed random batch (the demo's
    vocabulary, float32, CPU): a change in the loss's numerics changes it."""
    tok = demo_tokenizer()
    vocab = ntl.DigitVocab.from_tokenizer(tok)
    g = torch.Generator().manual_seed(12345)
    logits = (3.0 * torch.randn(2, 7, len(tok), generator=g)).requires_grad_(True)
    digits = torch.tensor([tok.get_vocab()[d] for d in "0123456789"])
    labels = digits[torch.randint(0, 10, (2, 7), generator=g)]
    labels[0, :2] = -100
    labels[1, 5] = tok.eos_token_id
    loss, ce, part = ntl.cross_entropy_with_ntl(logits, labels, vocab, ntl_weight=arm.ntl_weight,
                                                method=arm.method, return_parts=True,
                                                backend="torch" if backend == "auto" else backend)
    loss.backward()
    assert logits.grad is not None
    h = hashlib.sha256()
    for t in (loss.detach(), ce.detach(), part.detach(), logits.grad):
        h.update(t.double().numpy().tobytes())
    return h.hexdigest()[:16]


def job_cache_path(out: str, s: Settings, seed: int, arm: Arm) -> str | None:
    """``<out>/jobs/<arm>-seed<seed>-<hash>.json``: where a supervised job's result is kept
    for reuse (``None`` on a GPU: no reuse there). The hash covers the supervised settings,
    the seed, the arm, the torch / transformers / ntl versions, the demo's task, training and
    evaluation code, and the arm's loss and gradient on a fixed batch (so a change in the
    numerics of ``ntl``'s loss retrains)."""
    if torch.device(s.device).type != "cpu":
        return None
    h = config_hash({**s.sft_dict(), "seed": seed, "versions": _versions(),
                     "arm": {"name": arm.name, "ntl_weight": arm.ntl_weight, "method": arm.method},
                     "code": _code_fingerprint(), "loss": _loss_fingerprint(arm, s.train.backend)})
    safe = "".join(c if c.isalnum() or c in "+-_.=" else "_" for c in arm.name)
    return os.path.join(out, "jobs", f"{safe}-seed{seed}-{h}.json")


def load_ce_model(out: str, s: Settings, seed: int, device: torch.device) -> tuple[Any, dict[str, Any]] | None:
    """The cached CE model of ``seed`` and its info (metrics), or ``None`` if there is none
    for this exact configuration."""
    pt, js = ce_model_paths(out, s, seed)
    if not (os.path.exists(pt) and os.path.exists(js)):
        return None
    with open(js) as f:
        info = json.load(f)
    tok = demo_tokenizer()
    model = build_model(tok, s.model, s.seq_len, device)
    model.load_state_dict(torch.load(pt, map_location=device, weights_only=True))
    return model, info


def sft_job(payload: dict[str, Any], progress: Callable[[int], None]) -> dict[str, Any]:
    """Train one arm for one seed and evaluate it (a :func:`ntl.demo.runner.run_jobs` job).

    ``payload``: ``settings``, ``seed``, ``arm`` and ``out`` (the CE arm's model is saved
    there when ``save`` is true); with ``cache`` (a path), the result is written there as
    JSON when the job ends.
    """
    s: Settings = payload["settings"]
    seed: int = payload["seed"]
    arm: Arm = payload["arm"]
    device = torch.device(s.device)
    t0, c0 = time.perf_counter(), time.process_time()
    tok = demo_tokenizer()
    vocab = ntl.DigitVocab.from_tokenizer(tok)
    held = eval_problems(s)
    B, steps = s.train.batch_size, s.train.steps
    train = make_problems(steps * B, s.digits, seed, exclude=set(held))

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = build_batch(train[step * B : (step + 1) * B], tok, s.width, s.seq_len)
        if s.train.label_noise:  # one generator per (seed, step): batch(step) is a pure function
            g = torch.Generator().manual_seed(NOISE_SEED + 100_003 * seed + step)
            ids, labels = corrupt_answer_digits(ids, labels, tok, s.train.label_noise, g)
        return ids, labels

    torch.manual_seed(seed)
    model = build_model(tok, s.model, s.seq_len, device)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    tr = train_arm(model, arm, batch, vocab, s.train, device, progress=progress)
    t_eval = time.perf_counter()
    metrics, texts = evaluate(model, held, tok, s, device)
    res = {
        "seed": seed, "arm": arm.name,
        "loss": {"ntl_weight": arm.ntl_weight, "method": arm.method},
        "train": tr, "metrics": metrics, "parameters": n_params,
        "samples": [{"prompt": p.prompt(s.width), "truth": p.answer, "output": t}
                    for p, t in zip(held[:12], texts[:12], strict=True)],
        "eval_seconds": time.perf_counter() - t_eval,
    }
    if payload.get("save"):
        pt, js = ce_model_paths(payload["out"], s, seed)
        os.makedirs(os.path.dirname(pt), exist_ok=True)
        torch.save(model.state_dict(), pt)
        with open(js, "w") as f:
            json.dump({"seed": seed, "config": s.sft_dict(), "versions": _versions(),
                       "metrics": metrics}, f, indent=1)
    res["seconds"] = time.perf_counter() - t0
    res["cpu_seconds"] = time.process_time() - c0
    if payload.get("cache"):  # kept as soon as the job ends: an interrupted run loses only running jobs
        os.makedirs(os.path.dirname(payload["cache"]), exist_ok=True)
        tmp = payload["cache"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f)
        os.replace(tmp, payload["cache"])
    return res


# ----------------------------------------------------------------------------- the stage
def run_sft(s: Settings, out: str, *, jobs: int = 0, progress: bool = True, plot: bool = True,
            echo: bool = False, reuse: bool = True) -> dict[str, Any]:
    """Run every seed and arm of the supervised stage; write ``<out>/results.json`` (and
    ``results.png``); return the results. ``echo`` prints the report.

    With ``reuse``, a (seed, arm) job whose result is in ``<out>/jobs/`` under the same hash
    (:func:`job_cache_path`) is not trained again (the CE arm's only with its saved model);
    every trained job's result is kept there as soon as it ends. A run thus adds arms or seeds
    to a previous (or interrupted) one without retraining the others; the results record which
    jobs were reused."""
    from .common import finish_timing, load_reference, machine_info, start_timing
    from .report import (
        compare_to_reference,
        format_paired,
        format_table,
        paired_table,
        plot_sft,
        summarize,
        verdicts,
    )
    from .runner import default_jobs, run_jobs

    arms = s.arms()
    names = [a.name for a in arms]
    payloads = [{"settings": s, "seed": seed, "arm": arm, "out": out, "save": arm.name == "CE"}
                for seed in s.seeds for arm in arms]
    os.makedirs(out, exist_ok=True)
    timing = start_timing()
    cached: dict[int, dict[str, Any]] = {}
    paths = [job_cache_path(out, s, p["seed"], p["arm"]) for p in payloads]
    for i, (p, path) in enumerate(zip(payloads, paths, strict=True)):
        if reuse and path and os.path.exists(path) and (
                not p["save"] or all(os.path.exists(f) for f in ce_model_paths(out, s, p["seed"]))):
            with open(path) as f:
                cached[i] = json.load(f)
    todo = [i for i in range(len(payloads)) if i not in cached]
    for i in todo:
        payloads[i]["cache"] = paths[i]
    n_jobs = jobs or default_jobs(max(1, len(todo)), len(arms))
    fresh = run_jobs(sft_job, [payloads[i] for i in todo], jobs=n_jobs,
                     labels=[f"seed {payloads[i]['seed']} {payloads[i]['arm'].name}" for i in todo],
                     totals=[s.train.steps] * len(todo), progress=progress) if todo else []
    for i, r in zip(todo, fresh, strict=True):
        cached[i] = r
    res = [cached[i] for i in range(len(payloads))]
    timing = finish_timing(timing, fresh, n_jobs)
    timing["reused_jobs"] = [f"seed {payloads[i]['seed']} {payloads[i]['arm'].name}"
                             for i in range(len(payloads)) if i not in todo]
    timing["reused_jobs_seconds"] = [res[i]["seconds"] for i in range(len(payloads)) if i not in todo]
    runs = []
    for seed in s.seeds:
        runs.append({"seed": seed, "arms": {r["arm"]: r for r in res if r["seed"] == seed}})
    groups = s.groups
    summary = summarize(runs, names, groups)
    paired = paired_table(runs, names, groups, "CE")
    ref = load_reference("sft", s)
    results: dict[str, Any] = {
        "stage": "supervised",
        "config": {**s.to_dict(), "arms": [{"name": a.name, "ntl_weight": a.ntl_weight,
                                            "method": a.method} for a in arms],
                   "parameters": res[0]["parameters"], "jobs": n_jobs,
                   "optimizer": "AdamW(0.9, 0.98)", "schedule": "linear warmup, cosine to 0.1 x lr"},
        **machine_info(s),
        "first_step": {a: runs[0]["arms"][a]["train"]["first_step"] for a in names},
        "summary": summary,
        "paired_vs_CE": paired,
        "verdicts": verdicts(paired, "CE") if len(s.seeds) > 1 else [],
        "reference": ref and {k: ref[k] for k in ("command", "machine", "date", "seeds")},
        "against_reference": compare_to_reference(summary, ref, names),
        "table": format_table(summary, names, groups, len(s.seeds)),
        "paired_table": format_paired(paired, "CE", groups),
        "runs": runs,
        "timing": timing,
    }
    png = plot_sft(runs, names, groups, paired, os.path.join(out, "results.png")) if plot else None
    results["plot"] = os.path.basename(png) if png else None
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if echo:
        _print_sft(results, out)
    return results


def _print_sft(res: dict[str, Any], out: str) -> None:
    from .common import print_footer

    c = res["config"]
    print(f"\nntl demo, supervised stage: {c['parameters']:,}-parameter Qwen2 LM, "
          f"{c['train']['steps']} steps x {c['train']['batch_size']} problems per arm, "
          f"{c['task']['eval_size']} held-out problems, operand digits {c['task']['max_digits']}, "
          f"seeds {c['seeds']}, device {c['device']}")
    print("first-step losses (same init, same batch; the CE parts agree):")
    for name, fs in res["first_step"].items():
        print(f"  {name:<16} total {fs['loss']:.4f} = CE {fs['ce']:.4f} + w * NTL {fs['ntl']:.4f}")
    print()
    print(res["table"])
    print_footer(res, "CE", out, "results.json")
