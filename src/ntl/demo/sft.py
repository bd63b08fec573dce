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

import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

import ntl

from .config import EVAL_SEED, OP_NAMES, Settings, config_hash
from .task import Problem, answer_metrics, build_batch, demo_tokenizer, make_problems
from .train import Arm, build_model, greedy_answers, train_arm

__all__ = ["ce_model_paths", "evaluate", "load_ce_model", "sft_job"]


def evaluate(model: Any, problems: list[Problem], tok: Any, s: Settings,
             device: torch.device) -> tuple[dict[str, Any], list[str]]:
    """Greedy completions of ``problems``; metrics for ``all`` and each operation."""
    texts = greedy_answers(model, problems, tok, s.width, s.max_new_tokens, device)
    truths = [p.answer for p in problems]
    metrics = {"all": answer_metrics(texts, truths)}
    for name in s.ops if len(s.ops) > 1 else ():
        idx = [i for i, p in enumerate(problems) if p.op == OP_NAMES[name]]
        if idx:
            metrics[name] = answer_metrics([texts[i] for i in idx], [truths[i] for i in idx])
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
    there when ``save`` is true).
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
        return build_batch(train[step * B : (step + 1) * B], tok, s.width, s.seq_len)

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
    return res


# ----------------------------------------------------------------------------- the stage
def run_sft(s: Settings, out: str, *, jobs: int = 0, progress: bool = True, plot: bool = True,
            echo: bool = False) -> dict[str, Any]:
    """Run every seed and arm of the supervised stage; write ``<out>/results.json`` (and
    ``results.png``); return the results. ``echo`` prints the report."""
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
    n_jobs = jobs or default_jobs(len(payloads), len(arms))
    os.makedirs(out, exist_ok=True)
    timing = start_timing()
    res = run_jobs(sft_job, payloads, jobs=n_jobs,
                   labels=[f"seed {p['seed']} {p['arm'].name}" for p in payloads],
                   totals=[s.train.steps] * len(payloads), progress=progress)
    timing = finish_timing(timing, res, n_jobs)
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
        print(f"  {name:<11} total {fs['loss']:.4f} = CE {fs['ce']:.4f} + w * NTL {fs['ntl']:.4f}")
    print()
    print(res["table"])
    print_footer(res, "CE", out, "results.json")
