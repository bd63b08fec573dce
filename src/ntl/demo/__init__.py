"""``ntl demo``: a reproducible CE-vs-NTL experiment that runs on a laptop CPU.

Trains a tiny Qwen2-style causal LM (about 1M parameters, built from a config,
nothing downloaded) with a character-level tokenizer on synthetic arithmetic
(``"123+456="`` -> ``"579"``, ``"12*34="`` -> ``"408"``), in three arms that
differ only in the loss, each computed by :func:`ntl.cross_entropy_with_ntl`:

* ``CE``:          ``CE``            (``ntl_weight=0``)
* ``CE+NTL-MSE``:  ``CE + 0.3 NTL-MSE``
* ``CE+NTL-W1``:   ``CE + 0.3 NTL-W1``

Same initial weights, same batches in the same order, same seeds. Each arm is
evaluated on the same held-out problems with greedy decoding (exact match, MAE,
digit accuracy, unparsable fraction). Writes ``<out>/results.json`` and
``<out>/results.png``. See ``docs/demo.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import os
import platform
import sys
import time
from typing import Any

import torch

import ntl

from .report import aggregate, format_table, paired_deltas, plot_results
from .task import (
    CharTokenizer,
    Problem,
    answer_metrics,
    build_batch,
    make_problems,
    max_answer_len,
)
from .train import Arm, ModelConfig, TrainConfig, build_model, greedy_answers, train_arm

__all__ = ["main", "run_demo"]

log = logging.getLogger("ntl")

OP_NAMES = {"add": "+", "mul": "*"}
EVAL_SEED = 1_000_003  # the held-out set is the same for every training seed

DEFAULTS = {"steps": 300, "batch_size": 128, "eval_size": 1000, "hidden": 128, "layers": 4}
QUICK = {"steps": 40, "batch_size": 64, "eval_size": 200, "hidden": 128, "layers": 4}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ntl demo",
        description="Train a tiny LM on arithmetic with CE, CE+NTL-MSE and CE+NTL-W1 "
                    "(identical data, init and seeds) and compare held-out answers.",
    )
    p.add_argument("--out", default="ntl-demo", help="output folder (default: ntl-demo)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds; several give mean ± std (default: 0)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke-test size ({QUICK['steps']} steps, batch {QUICK['batch_size']}, "
                        f"{QUICK['eval_size']} eval problems): < 1 minute on 2 CPU cores")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per arm (default {DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"problems per step (default {DEFAULTS['batch_size']})")
    p.add_argument("--eval-size", type=int, default=None,
                   help=f"held-out problems (default {DEFAULTS['eval_size']})")
    p.add_argument("--add-digits", type=int, default=3,
                   help="max digits of each addition operand (default 3)")
    p.add_argument("--mul-digits", type=int, default=2,
                   help="max digits of each multiplication operand (default 2)")
    p.add_argument("--ops", nargs="+", choices=sorted(OP_NAMES), default=["add", "mul"],
                   help="operations (default: add mul)")
    p.add_argument("--ntl-weight", type=float, default=0.3, help="NTL weight of the NTL arms (0.3)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (2e-3)")
    p.add_argument("--hidden", type=int, default=None, help="model width (default 128)")
    p.add_argument("--layers", type=int, default=None, help="model depth (default 4)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: robust on busy/shared machines and "
                        "independent of the core count; 0 leaves torch's default)")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto",
                   help="ntl backend (default auto: Triton kernels on CUDA, PyTorch on CPU)")
    p.add_argument("--no-plot", action="store_true", help="do not write results.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _arms(weight: float) -> list[Arm]:
    return [Arm("CE", 0.0, "wasserstein"), Arm("CE+NTL-MSE", weight, "mse"),
            Arm("CE+NTL-W1", weight, "wasserstein")]


def _progress(total: int, desc: str, disable: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=disable, dynamic_ncols=True)


def _evaluate(model: Any, problems: list[Problem], tok: CharTokenizer, digits: dict[str, int],
              device: torch.device) -> tuple[dict[str, Any], list[str]]:
    width = max(digits.values())
    texts = greedy_answers(model, problems, tok, width, max_answer_len(digits) + 1, device)
    truths = [p.answer for p in problems]
    metrics = {"all": answer_metrics(texts, truths)}
    for name, sym in OP_NAMES.items():
        idx = [i for i, p in enumerate(problems) if p.op == sym]
        if idx:
            metrics[name] = answer_metrics([texts[i] for i in idx], [truths[i] for i in idx])
    return metrics, texts


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run every seed and arm; return the results dict (also written to ``args.out``)."""
    size = QUICK if args.quick else DEFAULTS
    steps = args.steps if args.steps is not None else size["steps"]
    batch = args.batch_size if args.batch_size is not None else size["batch_size"]
    eval_size = args.eval_size if args.eval_size is not None else size["eval_size"]
    mcfg = ModelConfig(hidden_size=args.hidden or size["hidden"],
                       num_layers=args.layers or size["layers"],
                       intermediate_size=4 * (args.hidden or size["hidden"]))
    for name, v in (("--steps", steps), ("--batch-size", batch), ("--eval-size", eval_size),
                    ("--add-digits", args.add_digits), ("--mul-digits", args.mul_digits),
                    ("--hidden", mcfg.hidden_size),
                    ("--layers", mcfg.num_layers)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if mcfg.hidden_size % mcfg.num_heads:
        raise ValueError(f"--hidden must be a multiple of {mcfg.num_heads}, got {mcfg.hidden_size}")
    if args.ntl_weight <= 0:
        raise ValueError(f"--ntl-weight must be > 0, got {args.ntl_weight}")
    tcfg = TrainConfig(steps=steps, batch_size=batch, lr=args.lr, warmup=max(1, steps // 10),
                       backend=args.backend)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r} is not a torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
    all_digits = {"+": args.add_digits, "*": args.mul_digits}
    digits = {OP_NAMES[o]: all_digits[OP_NAMES[o]] for o in OP_NAMES if o in args.ops}
    width = max(digits.values())
    groups = ["all", *(o for o in OP_NAMES if o in args.ops)] if len(digits) > 1 else ["all"]
    arms = _arms(args.ntl_weight)

    tok = CharTokenizer()
    vocab = ntl.DigitVocab.from_tokenizer(tok)
    seq_len = 1 + 2 * width + 2 + max_answer_len(digits) + 1
    eval_problems = make_problems(eval_size, digits, EVAL_SEED)
    held_out = set(eval_problems)

    t_start, cpu_start = time.perf_counter(), time.process_time()
    runs = []
    for seed in args.seeds:
        t_seed = time.perf_counter()
        train_problems = make_problems(steps * batch, digits, seed, exclude=held_out)
        batches = [build_batch(train_problems[i : i + batch], tok, width, seq_len)
                   for i in range(0, steps * batch, batch)]
        torch.manual_seed(seed)
        init_model = build_model(tok, mcfg, seq_len, device)
        n_params = sum(p.numel() for p in init_model.parameters())  # tied weights counted once
        init_state = copy.deepcopy(init_model.state_dict())
        del init_model
        run: dict[str, Any] = {"seed": seed, "arms": {}}
        for arm in arms:
            torch.manual_seed(seed)
            model = build_model(tok, mcfg, seq_len, device)
            model.load_state_dict(init_state)
            bar = _progress(steps, f"seed {seed} {arm.name}", args.no_progress)
            try:
                tr = train_arm(model, arm, batches, vocab, tcfg, device, progress=bar)
            finally:
                bar.close()
            t_eval = time.perf_counter()
            metrics, texts = _evaluate(model, eval_problems, tok, digits, device)
            eval_s = time.perf_counter() - t_eval
            run["arms"][arm.name] = {
                "loss": {"ntl_weight": arm.ntl_weight, "method": arm.method},
                "train": tr,
                "metrics": metrics,
                "eval_seconds": eval_s,
                "samples": [{"prompt": p.prompt(width), "truth": p.answer, "output": t}
                            for p, t in zip(eval_problems[:12], texts[:12], strict=False)],
            }
            m = metrics["all"]
            log.info("seed %d %s: exact %.3f, MAE %s, digit acc %.3f, unparsable %.3f (%.0f s)",
                     seed, arm.name, m["exact_match"], m["mae"], m["digit_accuracy"],
                     m["unparsable"], tr["train_seconds"] + eval_s)
        run["seconds"] = time.perf_counter() - t_seed
        runs.append(run)

    agg = aggregate(runs, [a.name for a in arms], groups)
    table = format_table(agg, [a.name for a in arms], groups, len(args.seeds))
    total_s = time.perf_counter() - t_start
    cpu_s = time.process_time() - cpu_start
    results: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "quick": bool(args.quick), "seeds": list(args.seeds), "device": str(device),
            "backend": args.backend,
            "threads": torch.get_num_threads(), "steps": steps, "batch_size": batch,
            "eval_size": eval_size, "eval_seed": EVAL_SEED,
            "ops": list(args.ops), "max_digits": {n: all_digits[o] for n, o in OP_NAMES.items()
                                                  if o in digits}, "seq_len": seq_len, "lr": args.lr,
            "warmup": tcfg.warmup, "weight_decay": tcfg.weight_decay, "grad_clip": tcfg.grad_clip,
            "schedule": "linear warmup, cosine to 0.1 x lr", "optimizer": "AdamW(0.9, 0.98)",
            "model": {"type": "Qwen2ForCausalLM", "hidden_size": mcfg.hidden_size,
                      "num_layers": mcfg.num_layers, "num_heads": mcfg.num_heads,
                      "intermediate_size": mcfg.intermediate_size, "vocab_size": len(tok),
                      "parameters": n_params, "tied_embeddings": True},
            "arms": [{"name": a.name, "ntl_weight": a.ntl_weight, "method": a.method}
                     for a in arms],
            "task": "'<bos>' + A + op + B + '=' -> answer in natural digit order + '<eos>'; "
                    "operands zero-padded to the widest operand; loss on answer tokens and "
                    "<eos> only",
        },
        "versions": {
            "ntl": ntl.__version__, "torch": torch.__version__,
            "transformers": _version("transformers"), "python": platform.python_version(),
        },
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(),
                    "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "first_step": {a.name: runs[0]["arms"][a.name]["train"]["first_step"] for a in arms},
        "summary": agg,
        "paired_vs_CE": paired_deltas(runs, [a.name for a in arms], groups),
        "table": table,
        "runs": runs,
        "timing": {"total_seconds": total_s, "cpu_seconds": cpu_s,
                   "per_seed_seconds": [r["seconds"] for r in runs]},
    }
    os.makedirs(args.out, exist_ok=True)
    png = None
    if not args.no_plot:
        png = plot_results(runs, agg, [a.name for a in arms], os.path.join(args.out, "results.png"))
    results["plot"] = os.path.basename(png) if png else None
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ntl demo``; returns the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not log.handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    old_threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        res = run_demo(args)
    except ValueError as e:
        print(f"ntl demo: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(old_threads)
    c = res["config"]
    print(f"\nntl demo: {c['model']['parameters']:,}-parameter Qwen2 LM, {c['steps']} steps x "
          f"{c['batch_size']} problems, {c['eval_size']} held-out problems, max operand digits "
          f"{c['max_digits']}, seeds {c['seeds']}, device {c['device']}")
    print("first-step losses (same init, same batch; CE parts must agree):")
    for name, fs in res["first_step"].items():
        print(f"  {name:<11} total {fs['loss']:.4f} = CE {fs['ce']:.4f} + w * NTL {fs['ntl']:.4f}")
    print()
    print(res["table"])
    for g in res["summary"]["CE"]:
        base = res["summary"]["CE"][g]["mae"]["mean"]
        parts = []
        for arm, d in res["paired_vs_CE"].items():
            dm = d[g]["mae"]["mean"]
            if dm is not None and base:
                parts.append(f"{arm} {dm:+.1f} ({100 * dm / base:+.0f}%)")
        if parts:
            print(f"MAE vs CE, '{g}' problems (paired by seed): " + ", ".join(parts))
    print(f"\n{res['timing']['total_seconds']:.0f} s wall ({res['timing']['cpu_seconds']:.0f} s CPU); wrote {os.path.join(args.out, 'results.json')}"
          + (f" and {os.path.join(args.out, res['plot'])}" if res["plot"] else ""))
    return 0
