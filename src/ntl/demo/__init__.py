"""``ntl demo``: CE vs NTL on a tiny LM that learns arithmetic on a CPU, then NTL in GRPO.

**Supervised stage** (``ntl demo``): a tiny Qwen2-style causal LM (built from a config,
nothing downloaded) with a character-level tokenizer learns ``"123+456="`` ->
``"####579"`` and ``"123*4="`` -> ``"####492"``, in three arms that differ only in the
loss, each computed by :func:`ntl.cross_entropy_with_ntl`:

* ``CE``:          ``CE``            (``ntl_weight=0``)
* ``CE+NTL-MSE``:  ``CE + 0.3 NTL-MSE``
* ``CE+NTL-W1``:   ``CE + 0.3 NTL-W1``

``--arms ce mse w1 del dist2`` picks other arms: ``ce`` and any method registered in
:mod:`ntl.methods` (``CE + w · method``, ``w`` = ``--ntl-weight`` or ``name=w``). Same initial
weights, same batches in the same order, per seed. Each arm is evaluated on
the same held-out problems with greedy decoding (exact match, MAE, digit accuracy,
unparsable fraction) and the mean entropy of its predicted digit distribution at the
answers' digit positions; with several ``--seeds`` the paired differences vs CE get 95 %
t-intervals, the minimum detectable difference and a plain-words verdict. Writes ``<out>/results.json`` and ``results.png``.

**RL stage** (``ntl demo --rl``): from each seed's CE model trained for ``--rl-sft-steps``
(1500) supervised steps on noisy demonstrations (``--rl-sft-noise`` 0.3 of them with one
wrong answer digit), GRPO through ``ntl_trl.NTLGRPOTrainer`` (TRL) with a correctness
reward, in arms that differ only in NTL: ``GRPO``, ``GRPO+NTL`` (final-answer NTL-W1 vs the
ground truth, weight 0.1), ``GRPO+DEL`` (the same with DEL) and ``GRPO+bonus`` (the
digit-aware ``final_answer`` reward bonus of :mod:`ntl.rewards`).
Writes ``<out>/rl_results.json`` and ``rl_results.png``. See ``docs/demo.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

__all__ = ["main", "parse_settings"]

log: logging.Logger = logging.getLogger("ntl")


def _parser() -> argparse.ArgumentParser:
    from .config import DEFAULTS, QUICK

    p = argparse.ArgumentParser(
        prog="ntl demo",
        description="Train a tiny LM on arithmetic with CE, CE+NTL-MSE and CE+NTL-W1 (identical "
                    "data, init and seeds) and compare held-out answers; with --rl, GRPO from the "
                    "CE model with and without NTL (TRL).",
    )
    p.add_argument("--out", default="ntl-demo", help="output folder (default: ntl-demo)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds; several give paired differences with 95%% t-intervals "
                        "(default: 0; the README's summary uses 0 1 2 3 4)")
    p.add_argument("--rl", action="store_true",
                   help="run the RL stage (GRPO via ntl_trl.NTLGRPOTrainer; needs the 'demo' extra) "
                        "instead of the supervised stage")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke-test size ({QUICK['steps']} supervised steps, {QUICK['rl_steps']} "
                        "GRPO steps, a smaller model): < 1 minute per stage")
    p.add_argument("--jobs", type=int, default=0,
                   help="worker processes, one torch thread each (default 0: at least the 3 arms "
                        "of a seed side by side, at least the core count); results do not depend on it")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"supervised steps per arm (default {DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"problems per supervised step (default {DEFAULTS['batch_size']})")
    p.add_argument("--eval-size", type=int, default=None,
                   help=f"held-out problems (default {DEFAULTS['eval_size']})")
    p.add_argument("--ops", nargs="+", choices=["add", "mul"], default=["add", "mul"],
                   help="operations (default: add mul)")
    p.add_argument("--add-digits", type=int, nargs=2, default=[3, 3], metavar=("A", "B"),
                   help="max digits of the two addition operands (default 3 3)")
    p.add_argument("--mul-digits", type=int, nargs=2, default=[3, 1], metavar=("A", "B"),
                   help="max digits of the two multiplication operands (default 3 1)")
    p.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                   help="supervised arms (default: ce mse w1): 'ce' (plain cross-entropy, the "
                        "baseline; required) and any method registered in ntl.methods (mse, mae, "
                        "huber, w1, del, dist2, ...), each CE + weight * that loss through "
                        "ntl.cross_entropy_with_ntl; 'name=weight' sets the weight (default "
                        "--ntl-weight; the DEL paper's weight is del=0.01)")
    p.add_argument("--ntl-weight", type=float, default=0.3,
                   help="default weight of the supervised method arms (0.3)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (3e-3)")
    p.add_argument("--hidden", type=int, default=None, help=f"model width (default {DEFAULTS['hidden']})")
    p.add_argument("--layers", type=int, default=None, help=f"model depth (default {DEFAULTS['layers']})")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto",
                   help="ntl backend (default auto: Triton kernels on CUDA, PyTorch on CPU)")
    g = p.add_argument_group("RL stage (--rl)")
    g.add_argument("--rl-steps", type=int, default=None,
                   help=f"GRPO steps per arm (default {DEFAULTS['rl_steps']})")
    g.add_argument("--rl-prompts", type=int, default=None,
                   help=f"prompts per GRPO step (default {DEFAULTS['rl_prompts']})")
    g.add_argument("--num-generations", type=int, default=None,
                   help=f"completions per prompt (default {DEFAULTS['num_generations']})")
    g.add_argument("--rl-sft-steps", type=int, default=None,
                   help="supervised steps of the CE model GRPO starts from (default "
                        f"{DEFAULTS['rl_sft_steps']}; trained on noisy demonstrations, see "
                        "--rl-sft-noise; cached by its configuration hash, so with noise 0 "
                        "and 1500 steps it is the supervised stage's CE model)")
    g.add_argument("--rl-sft-noise", type=float, default=0.3,
                   help="fraction of the starting model's supervised examples with one wrong "
                        "answer digit (default 0.3: an imperfect teacher, whose wrong digits "
                        "the reward can remove; 0: clean demonstrations)")
    g.add_argument("--rl-lr", type=float, default=1e-4, help="GRPO learning rate (1e-4)")
    g.add_argument("--rl-ntl-weight", type=float, default=0.1, help="NTL weight of GRPO+NTL (0.1)")
    g.add_argument("--rl-del-weight", type=float, default=0.1,
                   help="DEL weight of GRPO+DEL (0.1; the arm runs when ntl.methods has 'del')")
    g.add_argument("--bonus-weight", type=float, default=0.1,
                   help="weight of the digit-aware reward bonus of GRPO+bonus (0.1)")
    p.add_argument("--no-reuse", action="store_true",
                   help="train every supervised (seed, arm) job even when <out>/jobs/ holds its "
                        "result from an earlier run with the same settings, code and loss numerics")
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_settings(args: argparse.Namespace) -> Any:
    """:class:`ntl.demo.config.Settings` from parsed arguments (``ValueError`` naming the
    argument when a value is out of range)."""
    import torch

    from .config import DEFAULT_ARMS, DEFAULTS, OP_NAMES, QUICK, RLConfig, Settings, parse_arms
    from .train import ModelConfig, TrainConfig

    size = QUICK if args.quick else DEFAULTS

    def pick(v: Any, key: str) -> Any:
        return v if v is not None else size[key]

    steps, batch = pick(args.steps, "steps"), pick(args.batch_size, "batch_size")
    hidden, layers = pick(args.hidden, "hidden"), pick(args.layers, "layers")
    rl_steps, rl_prompts = pick(args.rl_steps, "rl_steps"), pick(args.rl_prompts, "rl_prompts")
    num_gen = pick(args.num_generations, "num_generations")
    rl_sft_steps = pick(args.rl_sft_steps, "rl_sft_steps")
    eval_size = pick(args.eval_size, "eval_size")
    checks = [("--steps", steps, 1), ("--batch-size", batch, 1), ("--eval-size", eval_size, 1),
              ("--hidden", hidden, 4), ("--layers", layers, 1), ("--rl-steps", rl_steps, 1),
              ("--rl-prompts", rl_prompts, 1), ("--num-generations", num_gen, 2),
              ("--rl-sft-steps", rl_sft_steps, 1)]
    checks += [(f"--{o}-digits", d, 1) for o in ("add", "mul") for d in getattr(args, f"{o}_digits")]
    for name, v, lo in checks:
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if hidden % 4:
        raise ValueError(f"--hidden must be a multiple of 4 (the number of heads), got {hidden}")
    for name, v in (("--ntl-weight", args.ntl_weight), ("--rl-ntl-weight", args.rl_ntl_weight),
                    ("--rl-del-weight", args.rl_del_weight),
                    ("--bonus-weight", args.bonus_weight), ("--lr", args.lr), ("--rl-lr", args.rl_lr)):
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    if not 0.0 <= args.rl_sft_noise < 1.0:
        raise ValueError(f"--rl-sft-noise must be in [0, 1), got {args.rl_sft_noise}")
    if getattr(args, "rl", False) and args.backend != "auto":
        raise ValueError(f"--backend {args.backend} does not apply to --rl: ntl_trl's NTL term picks its "
                         "backend itself (Triton on CUDA, PyTorch on CPU); drop --backend")
    if getattr(args, "rl", False) and args.arms is not None:
        raise ValueError("--arms chooses the supervised arms and does not apply to --rl (its arms "
                         "are GRPO, GRPO+NTL, GRPO+DEL and GRPO+bonus)")
    arm_list = parse_arms(args.arms if args.arms is not None else DEFAULT_ARMS, args.ntl_weight)
    if args.jobs < 0:
        raise ValueError(f"--jobs must be >= 0, got {args.jobs}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct, got {args.seeds}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r} is not a torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
    ops = tuple(dict.fromkeys(args.ops))
    all_digits = {"+": tuple(args.add_digits), "*": tuple(args.mul_digits)}
    return Settings(
        seeds=tuple(args.seeds), quick=bool(args.quick), device=str(device), backend=args.backend,
        ops=ops, digits={OP_NAMES[o]: all_digits[OP_NAMES[o]] for o in ops},
        eval_size=eval_size, ntl_weight=args.ntl_weight,
        model=ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=4,
                          intermediate_size=4 * hidden),
        train=TrainConfig(steps=steps, batch_size=batch, lr=args.lr, warmup=max(1, steps // 10),
                          backend=args.backend),
        arm_list=arm_list,
        rl=RLConfig(steps=rl_steps, prompts_per_step=rl_prompts, num_generations=num_gen,
                    lr=args.rl_lr, ntl_weight=args.rl_ntl_weight, bonus_weight=args.bonus_weight,
                    sft_steps=rl_sft_steps, del_weight=args.rl_del_weight,
                    sft_noise=args.rl_sft_noise),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ntl demo``; returns the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not log.handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = parse_settings(args)
        if args.rl:
            from .rl import run_rl

            run_rl(settings, args.out, jobs=args.jobs, progress=not args.no_progress,
                   plot=not args.no_plot, echo=True)
        else:
            from .sft import run_sft

            run_sft(settings, args.out, jobs=args.jobs, progress=not args.no_progress,
                    plot=not args.no_plot, echo=True, reuse=not args.no_reuse)
    except ValueError as e:
        print(f"ntl demo: error: {e}", file=sys.stderr)
        return 2
    return 0
