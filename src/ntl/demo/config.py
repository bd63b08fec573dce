"""The demo's settings (one frozen dataclass built from the command line) and their hashes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .task import max_answer_len, prompt_width
from .train import Arm, ModelConfig, TrainConfig

__all__ = ["DEFAULTS", "EVAL_SEED", "OP_NAMES", "QUICK", "RL_SEED_OFFSET", "RLConfig", "Settings",
           "config_hash"]

OP_NAMES = {"add": "+", "mul": "*"}
EVAL_SEED = 1_000_003  # the held-out set is the same for every training seed
RL_SEED_OFFSET = 500_000  # RL prompts of seed s come from generator seed s + this offset

# Full size: the supervised stage's CE baseline passes 50 % exact match (docs/demo.md).
DEFAULTS = {"steps": 1500, "batch_size": 128, "eval_size": 1000, "hidden": 128, "layers": 2,
            "rl_steps": 200, "rl_prompts": 8, "num_generations": 8}
QUICK = {"steps": 150, "batch_size": 64, "eval_size": 200, "hidden": 64, "layers": 2,
         "rl_steps": 12, "rl_prompts": 4, "num_generations": 4}


@dataclass(frozen=True)
class RLConfig:
    """GRPO settings of the RL stage (``ntl demo --rl``)."""

    steps: int = 200
    prompts_per_step: int = 8
    num_generations: int = 8
    lr: float = 2e-5
    temperature: float = 1.0
    ntl_weight: float = 0.1
    bonus_weight: float = 0.1

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
        w = self.ntl_weight
        return [Arm("CE", 0.0, "wasserstein"), Arm("CE+NTL-MSE", w, "mse"),
                Arm("CE+NTL-W1", w, "wasserstein")]

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
