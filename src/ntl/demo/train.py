"""The demo's model, supervised training loop (one arm) and batched greedy decoding."""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

import ntl

from .task import Problem, build_batch, encode

log: logging.Logger = logging.getLogger("ntl")

__all__ = ["Arm", "ModelConfig", "TrainConfig", "build_model", "digit_distribution", "greedy_answers",
           "train_arm"]


def _cache_arg() -> str:
    from transformers import Qwen2ForCausalLM

    params = inspect.signature(Qwen2ForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass(frozen=True)
class Arm:
    """One supervised arm: the loss ``CE + ntl_weight * NTL(method)``."""

    name: str
    ntl_weight: float
    method: str


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 150
    grad_clip: float = 1.0
    backend: str = "auto"
    #: the fraction of training examples given one wrong answer digit
    #: (:func:`ntl.demo.task.corrupt_answer_digits`; 0: clean demonstrations)
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")

    def to_dict(self) -> dict[str, Any]:
        """The fields; ``label_noise`` only when it is not 0, so that the hashes of clean
        runs (the job and model caches, ``reference.json``) are those of before it existed."""
        d = asdict(self)
        if not d["label_noise"]:
            del d["label_noise"]
        return d


def build_model(tok: Any, cfg: ModelConfig, max_len: int, device: torch.device) -> Any:
    """A tiny Qwen2 causal LM for ``tok``'s vocabulary (random init from the current torch
    RNG state), tied embeddings, no dropout."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(32, max_len),
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        attention_dropout=0.0,
        # eager attention is faster than SDPA for these tiny sequences on CPU (a keyword that
        # transformers' configs accept but do not declare)
        attn_implementation="eager" if device.type == "cpu" else "sdpa",  # pyright: ignore[reportCallIssue]
    )
    # transformers' decorator on PreTrainedModel.to hides its self type from the checker
    return Qwen2ForCausalLM(config).to(device)  # pyright: ignore[reportArgumentType]


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))


def train_arm(
    model: Any,
    arm: Arm,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    vocab: ntl.NumberVocab,
    cfg: TrainConfig,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place for ``cfg.steps`` steps with ``arm``'s loss.

    ``batches``: a sequence of ``(input_ids, labels)`` or a function ``step -> batch``.
    The loss of a batch is ``ntl.cross_entropy_with_ntl(logits[:, :-1], labels[:, 1:],
    vocab, ntl_weight=arm.ntl_weight, method=arm.method, return_parts=True)`` (the causal
    shift: the logits at position t predict the token at t+1). AdamW, linear warmup and
    cosine decay (:func:`lr_factor`), gradient clipping.

    Returns the per-step history (``loss``, ``ce``, ``ntl``), the first step's parts, the
    mean of the last 20 steps, and the wall and CPU seconds. ``progress(n)`` is called
    with the number of steps done since its last call.
    """
    get = batches if callable(batches) else batches.__getitem__
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98),
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup))
    model.train()
    hist: dict[str, list[float]] = {"loss": [], "ce": [], "ntl": []}
    parts_buf: list[torch.Tensor] = []
    t0, c0 = time.perf_counter(), time.process_time()
    done = 0
    for step in range(cfg.steps):
        ids, labels = get(step)
        ids = ids.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(input_ids=ids).logits
        loss, ce, ntl_part = ntl.cross_entropy_with_ntl(
            logits[:, :-1], labels[:, 1:], vocab,
            ntl_weight=arm.ntl_weight, method=arm.method, return_parts=True, backend=cfg.backend,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        parts_buf.append(torch.stack([loss.detach().float(), ce.float(), ntl_part.float()]))
        if len(parts_buf) >= 25 or step == cfg.steps - 1 or step == 0:
            vals = torch.stack(parts_buf).cpu().tolist()  # one host sync per 25 steps
            parts_buf.clear()
            for lo, c, n in vals:
                if not math.isfinite(lo):
                    raise FloatingPointError(f"arm {arm.name}: non-finite loss {lo} by step {step}")
                hist["loss"].append(lo)
                hist["ce"].append(c)
                hist["ntl"].append(n)
            if progress is not None:
                progress(step + 1 - done)
                done = step + 1
    return {
        "history": hist,
        "first_step": {"loss": hist["loss"][0], "ce": hist["ce"][0], "ntl": hist["ntl"][0]},
        "final_window": {k: float(sum(v[-20:]) / len(v[-20:])) for k, v in hist.items()},
        "train_seconds": time.perf_counter() - t0,
        "train_cpu_seconds": time.process_time() - c0,
    }


@torch.no_grad()
def greedy_answers(model: Any, problems: Sequence[Problem], tok: Any, width: int,
                   max_new_tokens: int, device: torch.device, batch_size: int = 500) -> list[str]:
    """Greedy-decode the completion of each problem, batched, with the KV cache.

    All prompts have the same length (zero-padded operands), so a batch needs no
    padding. Decoding stops at ``<eos>`` or after ``max_new_tokens`` tokens; the
    completion text is everything generated before ``<eos>`` (other specials appear as
    text, which makes such a completion unparsable).
    """
    cache_arg = _cache_arg()
    vocab = tok.get_vocab()
    was_training = model.training
    model.eval()
    out: list[str] = []
    for s in range(0, len(problems), batch_size):
        chunk = problems[s : s + batch_size]
        prompts = torch.tensor([[tok.bos_token_id, *encode(vocab, p.prompt(width))] for p in chunk],
                               dtype=torch.long, device=device)
        res = model(input_ids=prompts, use_cache=True)
        nxt = res.logits[:, -1].argmax(-1)
        gen = [nxt]
        for _ in range(max_new_tokens - 1):
            # transformers >= 5.2x names the KV cache ``cache``; older versions ``past_key_values``
            kw = {cache_arg: getattr(res, cache_arg)}
            res = model(input_ids=nxt[:, None], use_cache=True, **kw)
            nxt = res.logits[:, -1].argmax(-1)
            gen.append(nxt)
        rows = torch.stack(gen, 1).cpu().tolist()
        for row in rows:
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            out.append(tok.decode(row))
    model.train(was_training)
    return out


@torch.no_grad()
def digit_distribution(model: Any, problems: Sequence[Problem], tok: Any, width: int, seq_len: int,
                       device: torch.device, batch_size: int = 500) -> dict[str, list[Any]]:
    """The predicted digit distribution at the digit positions of the answers, teacher-forced.

    Each problem's full sequence (``<bos>`` prompt ``####`` answer ``<eos>``,
    :func:`ntl.demo.task.build_batch`) goes through the model once; at every position ``t``
    whose next token (the target) is a digit, ``q = softmax(logits[t, digit columns])`` over
    the ten digit tokens ``'0'..'9'`` (renormalised over them: the other columns are left
    out) and its entropy ``H = -Σ_k q_k ln q_k`` in nats (0: one digit certain; ln 10 =
    2.303: uniform). Returns per such position: ``entropy``, ``target_prob`` (``q`` of the
    target digit) and ``problem`` (the index into ``problems``).
    """
    vocab = tok.get_vocab()
    digit_ids = torch.tensor([vocab[d] for d in "0123456789"], device=device)
    was_training = model.training
    model.eval()
    out: dict[str, list[Any]] = {"entropy": [], "target_prob": [], "problem": []}
    for s in range(0, len(problems), batch_size):
        ids, labels = build_batch(problems[s : s + batch_size], tok, width, seq_len)
        ids, labels = ids.to(device), labels.to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        tgt = labels[:, 1:]
        is_digit = (tgt[..., None] == digit_ids).any(-1)
        rows, cols = is_digit.nonzero(as_tuple=True)
        logq = torch.log_softmax(logits[rows, cols][:, digit_ids], -1)
        q = logq.exp()
        h = -(q * logq).sum(-1)
        y = (tgt[rows, cols][:, None] == digit_ids).float().argmax(-1)
        out["entropy"] += h.cpu().tolist()
        out["target_prob"] += q.gather(-1, y[:, None])[:, 0].cpu().tolist()
        out["problem"] += (rows + s).cpu().tolist()
    model.train(was_training)
    return out
