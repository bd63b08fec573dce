"""The demo's settings (one frozen dataclass built from the command line) and their hashes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .task import max_answer_len, prompt_width
from .train import Arm, ModelConfig, TrainConfig

__all__ = ["DEFAULTS", "DEFAULT_ARMS", "EVAL_SEED", "NOISE_SEED", "OP_NAMES", "QUICK",
           "RL_SEED_OFFSET", "RLConfig", "Settings", "arm_label", "config_hash", "parse_arms"]

OP_NAMES = {"add": "+", "mul": "*"}
EVAL_SEED = 1_000_003  # the held-out set is the same for every training seed
RL_SEED_OFFSET = 500_000  # RL prompts of seed s come from generator seed s + this offset
NOISE_SEED = 700_001  # the label noise of seed s, step t: generator seed NOISE_SEED + 100_003 s + t

# Full size: the supervised stage's CE baseline passes 50 % exact match (docs/demo.md); the
# RL stage starts from a CE model trained as long on noisy demonstrations (rl.sft_noise of
# them with one wrong answer digit), whose sampled answers are often wrong where its greedy
# ones are right: room for a reward to move it (docs/demo.md, "The RL stage").
DEFAULTS = {"steps": 1500, "batch_size": 128, "eval_size": 1000, "hidden": 128, "layers": 2,
            "rl_steps": 150, "rl_prompts": 16, "num_generations": 8, "rl_sft_steps": 1500}
QUICK = {"steps": 150, "batch_size": 64, "eval_size": 200, "hidden": 64, "layers": 2,
         "rl_steps": 12, "rl_prompts": 4, "num_generations": 4, "rl_sft_steps": 150}


DEFAULT_ARMS = ("ce", "mse", "w1")
_LABELS = {"mse": "NTL-MSE", "mae": "NTL-MAE", "huber": "NTL-Huber", "wasserstein": "NTL-W1",
           "del": "DEL", "dist2": "DIST2"}


def arm_label(method: str) -> str:
    """``CE+<label>`` of a registered method (``"w1"`` -> ``"CE+NTL-W1"``, ``"del"`` ->
    ``"CE+DEL"``; an unlisted method ``m`` -> ``"CE+M"``)."""
    from ntl.methods import canonical_name

    name = canonical_name(method)
    return "CE+" + _LABELS.get(name, name.upper())


def parse_arms(specs: list[str] | tuple[str, ...], ntl_weight: float = 0.3) -> tuple[Arm, ...]:
    """The supervised arms from ``--arms`` names: ``ce`` (plain CE) or any method registered
    in :mod:`ntl.methods` (name or alias), each ``CE + weight · method``, CE first (it must be
    among them: the paired differences are against it); ``name=weight``
    overrides the weight (the label then carries it: ``CE+NTL-W1(w=0.1)``). The default
    weight is ``ntl_weight`` for every method (DEL included: on this task its gradient per
    unit weight matches NTL-W1's, docs/demo.md). ``ValueError`` for an unknown
    name, a bad weight, a weight on ``ce`` or a repeated arm."""
    from ntl.methods import REGISTRY, canonical_name

    if not specs:
        raise ValueError("--arms needs at least one arm")
    arms: list[Arm] = []
    for spec in specs:
        name, sep, w_txt = spec.partition("=")
        name = name.strip().lower()
        if name == "ce":
            if sep:
                raise ValueError(f"--arms: 'ce' is plain cross-entropy and takes no weight, got {spec!r}")
            arms.append(Arm("CE", 0.0, "wasserstein"))
            continue
        try:
            method = canonical_name(name)
        except ValueError:
            raise ValueError(f"--arms: unknown arm {name!r}; choose 'ce' or a method registered in "
                             f"ntl.methods: {', '.join(REGISTRY)} (aliases accepted, e.g. 'w1'); "
                             "'name=weight' sets a weight") from None
        label = arm_label(method)
        if sep:
            try:
                w = float(w_txt)
            except ValueError:
                raise ValueError(f"--arms: the weight in {spec!r} is not a number") from None
            label += f"(w={w:g})"
        else:
            w = ntl_weight
        if not (w > 0 and w < float("inf")):
            raise ValueError(f"--arms: the weight of {spec!r} must be a finite number > 0, got {w}")
        arms.append(Arm(label, w, method))
    labels = [a.name for a in arms]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"--arms: arm(s) {dup} given twice")
    if "CE" not in labels:
        raise ValueError(f"--arms must include 'ce', the baseline of the paired differences; got {list(specs)}")
    return (arms[labels.index("CE")], *(a for a in arms if a.name != "CE"))  # CE first


@dataclass(frozen=True)
class RLConfig:
    """GRPO settings of the RL stage (``ntl demo --rl``); ``sft_steps``: the supervised
    steps of the CE model GRPO starts from (the other supervised settings are the stage's);
    ``sft_noise``: the fraction of that model's training examples with one wrong answer
    digit (an imperfect teacher, :func:`ntl.demo.task.corrupt_answer_digits`: the model
    learns the right answer as its mode but samples wrong digits, which a reward can fix);
    ``reward``: ``"correctness"`` (:func:`ntl.rewards.correctness_reward`, lenient) or
    ``"exact"`` (:func:`ntl.demo.rl.make_exact_reward`: the answer read as the evaluation
    reads it); ``digit_credit``: the weight of a second, partial-credit reward (0: none)."""

    steps: int = 150
    prompts_per_step: int = 16
    num_generations: int = 8
    lr: float = 1e-4
    temperature: float = 1.0
    ntl_weight: float = 0.1
    bonus_weight: float = 0.1
    sft_steps: int = 1500
    del_weight: float = 0.1
    sft_noise: float = 0.3
    digit_credit: float = 0.0
    reward: str = "correctness"

    def __post_init__(self) -> None:
        if self.reward not in ("correctness", "exact"):
            raise ValueError(f"rl.reward must be 'correctness' or 'exact', got {self.reward!r}")
        if not 0.0 <= self.sft_noise < 1.0:
            raise ValueError(f"rl.sft_noise must be in [0, 1), got {self.sft_noise}")
        if not self.digit_credit >= 0:
            raise ValueError(f"rl.digit_credit must be >= 0, got {self.digit_credit}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Settings:
    """Everything a demo run depends on (besides the software versions)."""

    seeds: tuple[int, ...] = (0,)
    quick: bool = False
    device: str = "cpu"
    backend: str = "auto"
    ops: tuple[str, ...] = ("add", "mul")
    digits: dict[str, tuple[int, int]] = field(default_factory=lambda: {"+": (3, 3), "*": (3, 1)})
    eval_size: int = 1000
    ntl_weight: float = 0.3
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    #: the supervised arms; ``None``: the default three (CE, CE+NTL-MSE, CE+NTL-W1 at
    #: ``ntl_weight``)
    arm_list: tuple[Arm, ...] | None = None

    @property
    def width(self) -> int:
        return prompt_width(self.digits)

    @property
    def max_new_tokens(self) -> int:
        """``####``, the longest answer, ``<eos>``."""
        return 1 + max_answer_len(self.digits) + 1

    @property
    def seq_len(self) -> int:
        """``<bos>`` + prompt (``2 width + 2``) + completion + ``<eos>``."""
        return 1 + 2 * self.width + 2 + self.max_new_tokens

    @property
    def groups(self) -> list[str]:
        """Metric groups: ``all`` and, with several operations, each operation."""
        return ["all", *self.ops] if len(self.ops) > 1 else ["all"]

    def arms(self) -> list[Arm]:
        if self.arm_list is not None:
            return list(self.arm_list)
        return list(parse_arms(DEFAULT_ARMS, self.ntl_weight))

    def rl_start(self) -> Settings:
        """These settings with ``rl.sft_steps`` supervised steps (warm-up a tenth of them)
        on demonstrations with label noise ``rl.sft_noise``: what the RL stage's starting CE
        model is trained with (and cached under)."""
        from dataclasses import replace

        steps = self.rl.sft_steps
        return replace(self, train=replace(self.train, steps=steps, warmup=max(1, steps // 10),
                                           label_noise=self.rl.sft_noise))

    def task_dict(self) -> dict[str, Any]:
        return {"ops": list(self.ops),
                "max_digits": {n: list(self.digits[o]) for n, o in OP_NAMES.items() if o in self.digits},
                "eval_size": self.eval_size, "eval_seed": EVAL_SEED, "seq_len": self.seq_len,
                "format": "'<bos>' A op B '=' '####' answer '<eos>'; operands zero-padded to the "
                          "widest operand; answer in natural digit order; loss on '####', the "
                          "answer and '<eos>'"}

    def sft_dict(self) -> dict[str, Any]:
        """What the supervised models depend on (hashed for the CE model cache)."""
        return {"task": self.task_dict(), "model": self.model.to_dict(), "train": self.train.to_dict(),
                "device": self.device, "backend": self.backend}

    def to_dict(self) -> dict[str, Any]:
        return {"seeds": list(self.seeds), "quick": self.quick, "ntl_weight": self.ntl_weight,
                **self.sft_dict(),
                "rl": self.rl.to_dict()}


def config_hash(obj: Any) -> str:
    """SHA-256 (hex, 16 characters) of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
