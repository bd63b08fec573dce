"""Batch helpers shared by the verl 0.9 engine and the legacy 0.7 actor.

Everything here works on right-padded response tensors ``[B, R]`` (response
position ``t`` = the ``t``-th generated token) and delegates the NTL math to
``ntl``: targets from :func:`ntl.rl.targets.build_digit_targets`, probabilities from
:func:`ntl.rl.metrics.digit_probs`, the bonus from
:func:`ntl.rl.rewards.ntl_bonus_from_digit_probs` (placed on the last token by
:func:`scatter_to_last_token`). No loop over tokens; the only
per-sample Python work is ``build_digit_targets``' decode + answer regex.

The vocabulary is always the model's whole number vocabulary
(:func:`ntl.vocab_for_tokenizer`: the ``K = 10`` :class:`ntl.DigitVocab` of a digit-level
tokenizer such as Qwen2.5's, all ``K = 1,110`` number tokens ``'0'..'999'`` of Llama-3), passed
explicitly to ``build_digit_targets``: a "digit target" here is a **number token** target (a
Llama-3 answer ``1234`` = ``'123' '4'`` has two). :func:`check_targets_reachable` refuses, at
setup, a tokenizer with which the targets of a plain ``#### 1234`` answer cannot be built.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

import ntl
from ntl.rl.metrics import digit_probs
from ntl.rl.rewards import ntl_bonus_from_digit_probs
from ntl.rl.targets import build_digit_targets

from .settings import IGNORE_INDEX, NTLSettings

__all__ = [
    "TARGETS_KEY",
    "check_targets_reachable",
    "digit_bonus_scores",
    "digit_targets",
    "ground_truths_from",
    "has_key",
    "pad_responses",
    "response_positions",
    "scatter_to_last_token",
]

logger = logging.getLogger("ntl")

#: Batch key of the digit targets ``[B, R]`` (token ids, -100 elsewhere) read by the actor update.
TARGETS_KEY = "ntl_targets"
#: Non-tensor key set on a verl batch to ask the engine for digit logits.
CAPTURE_KEY = "ntl_capture"
#: Model-output key of the captured digit logits (aligned like verl's ``log_probs``).
DIGIT_LOGITS_KEY = "ntl_digit_logits"


def scatter_to_last_token(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Place per-sample ``values[B]`` at each row's last real token of ``response_mask[B, T]``
    (fp32 ``[B, T]``, zeros elsewhere; an all-padding row gets nothing). verl's token-level
    scores carry the sequence reward at that position when the mask is verl's attention mask over
    the response (``valid_response_length - 1``). In a multi-turn trajectory that ends in
    tool/observation tokens verl's ``response_mask`` is 0 there, so pass the attention mask (the
    positions that exist), not ``response_mask``, to land where verl puts the score."""
    if response_mask.dim() != 2 or values.shape != response_mask.shape[:1]:
        raise ValueError(
            f"values must be [B] and response_mask [B, T]; got {tuple(values.shape)} and "
            f"{tuple(response_mask.shape)}"
        )
    m = response_mask != 0
    T = m.shape[1]
    pos = torch.arange(T, device=m.device).expand_as(m)
    last = torch.where(m, pos, torch.full_like(pos, -1)).amax(1)  # -1: empty row
    out = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
    has = last >= 0
    out.scatter_(1, last.clamp_min(0)[:, None], torch.where(has, values.float(), 0.0)[:, None])
    return out


def has_key(data: Any, key: str) -> bool:
    """``key in data`` for a TensorDict (whose ``in`` operator is not a key lookup)."""
    return key in data.keys()  # noqa: SIM118


def ground_truths_from(reward_model: Any, n: int) -> list[str]:
    """The ``n`` ground truths of a verl batch's ``reward_model`` column.

    Accepts a sequence (list, numpy object array, NonTensorStack.tolist()) of dicts
    holding ``"ground_truth"`` (verl's dataset format) or of plain answers.
    """
    if reward_model is None:
        raise ValueError(
            "the batch has no 'reward_model' column, so the NTL digit targets cannot be built; "
            "use verl's dataset format (reward_model.ground_truth) or put 'ntl_targets' in the batch"
        )
    items = list(reward_model.tolist() if hasattr(reward_model, "tolist") else reward_model)
    if len(items) != n:
        raise ValueError(f"reward_model has {len(items)} entries for a batch of {n}")
    out = []
    for i, item in enumerate(items):
        gt = item.get("ground_truth") if isinstance(item, Mapping) else item
        if gt is None:
            raise ValueError(f"reward_model[{i}] has no 'ground_truth': {item!r}")
        out.append(gt)
    return out


def pad_responses(x: torch.Tensor, width: int | None = None, pad: int | float = 0) -> torch.Tensor:
    """A nested (jagged) ``[B, r_b]`` or padded ``[B, R]`` response tensor as padded ``[B, width]``."""
    if x.is_nested:
        lens = x.offsets().diff()  # pyright: ignore[reportAttributeAccessIssue] (a nested tensor's)
        w = int(lens.max().item()) if width is None else width
        return torch.nested.to_padded_tensor(x, padding=pad, output_size=(x.size(0), w))
    if width is None or width == x.shape[1]:
        return x
    if width < x.shape[1]:
        return x[:, :width]
    fill = x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), pad)
    return torch.cat([x, fill], dim=1)


def response_mask_padded(response_mask: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Boolean ``[B, width]`` response mask from a nested or padded mask."""
    return pad_responses(response_mask, width, 0).bool()


def response_positions(
    response_mask: torch.Tensor, width: int | None = None, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean ``[B, width]``: the response positions that exist, i.e. verl's attention mask over
    the response: every token the rollout produced, the policy's (``response_mask = 1``) and, in a
    multi-turn / tool-calling trajectory, the tool-output / observation tokens the policy did not
    generate (``response_mask = 0``). verl puts a sequence's reward at the last of them
    (``valid_response_length - 1``: its reward managers and ``RewardManagerBase.assemble_rm_scores``
    with ``attention_mask[:, P:].sum(-1) - 1``; the agent loop's per-sample ``rm_scores[-1]``).

    * nested (jagged) ``response_mask`` (verl 0.9's v1 trainer): position ``t`` of row ``b``
      exists iff ``t < len_b``, the row's length;
    * padded ``[B, R]``: ``attention_mask [B, P + R]`` is required (its last ``R`` columns), since
      a padded ``response_mask`` cannot tell trailing masked tokens from padding.
    """
    if response_mask.is_nested:
        lens = response_mask.offsets().diff()  # pyright: ignore[reportAttributeAccessIssue] (nested)
        w = int(lens.max().item()) if width is None else width
        return torch.arange(w, device=lens.device)[None, :] < lens[:, None]
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be nested or [B, R], got shape {tuple(response_mask.shape)}")
    if attention_mask is None:
        raise ValueError(
            "a padded response_mask cannot tell trailing tool/observation tokens (mask 0) from padding: "
            "pass attention_mask [B, P + R] (verl's), whose last R columns mark the response positions"
        )
    R = response_mask.shape[1]
    if attention_mask.dim() != 2 or attention_mask.shape[0] != response_mask.shape[0] or attention_mask.shape[1] < R:
        raise ValueError(
            f"attention_mask must be [B, P + R] with B = {response_mask.shape[0]}, P + R >= {R}; "
            f"got {tuple(attention_mask.shape)}"
        )
    return pad_responses(attention_mask[:, -R:] != 0, width, False)


def digit_targets(
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    ground_truths: Sequence[Any],
    tokenizer: Any,
    vocab: ntl.NumberVocab,
    mode: str,
) -> torch.Tensor:
    """Number-token targets ``[B, R]`` (token ids of ``vocab``, ``-100`` elsewhere) for padded
    responses: ``ntl.rl.targets.build_digit_targets(..., mode=mode, vocab=vocab)``. ``final_answer``:
    each number token of the final answer covering the places ``[p, p + w)`` targets the ground
    truth's digits at those places (Llama-3, ``'123' '4'`` vs 1299 -> ``'129' '9'``); ``all``:
    every number token of a correct response targets itself."""
    t = build_digit_targets(
        responses.long(),
        list(ground_truths),
        tokenizer,
        mode=mode,
        response_mask=response_mask.bool(),
        ignore_index=IGNORE_INDEX,
        vocab=vocab,
    )
    return t.masked_fill(~response_mask.bool(), IGNORE_INDEX)


def digit_bonus_scores(
    digit_logits: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    ground_truths: Sequence[Any],
    tokenizer: Any,
    vocab: ntl.NumberVocab,
    settings: NTLSettings,
    targets: torch.Tensor | None = None,
    valid_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The digit-aware bonus as token-level scores ``[B, R]`` and per-sample ``[B]``.

    ``digit_logits [B, R, K]`` are the (temperature-scaled) logits of the ``K`` number tokens
    of ``vocab`` that predict response token ``t`` (from the old-log-prob pass); the bonus'
    accuracy, confidence and target probability are over those ``K`` tokens and the
    response's number-token targets. Targets use
    ``mode = settings.ntl_bonus_type``; ``bonus_b`` is
    :func:`ntl.rl.rewards.ntl_bonus_from_digit_probs` over them
    (``0.4 acc + 0.3 confidence + 0.3 p(target)``; ``all`` targets exist only for correct
    responses, so wrong ones get 0). The scores carry ``ntl_bonus_weight * bonus_b`` at
    each response's last token, where verl puts the sequence reward: the last ``True`` of
    ``valid_mask [B, R]`` (the response positions that exist, :func:`response_positions`;
    verl's ``valid_response_length - 1``). Without ``valid_mask`` it is the last token of
    ``response_mask``, which differs when a multi-turn trajectory ends in tool/observation
    tokens (``response_mask = 0``): pass ``valid_mask`` there. Digits in masked tokens are never
    targets either way (:func:`digit_targets`).
    """
    if valid_mask is not None and valid_mask.shape != response_mask.shape:
        raise ValueError(
            f"valid_mask must have response_mask's shape {tuple(response_mask.shape)}, got {tuple(valid_mask.shape)}"
        )
    if targets is None:
        targets = digit_targets(responses, response_mask, ground_truths, tokenizer, vocab, settings.ntl_bonus_type)
    dp = digit_probs(digit_logits.detach().float(), targets, vocab, ignore_index=IGNORE_INDEX)
    bonus = ntl_bonus_from_digit_probs(dp)
    where = response_mask if valid_mask is None else valid_mask
    scores = settings.ntl_bonus_weight * scatter_to_last_token(bonus, where)
    return scores, bonus


#: The probe of :func:`check_targets_reachable`: a response whose final answer is 1234, and its truth.
PROBE_RESPONSE = " The answer is #### 1234"
PROBE_TRUTH = "1234"
_PROBED: dict[tuple[int, ntl.NumberVocab, str], Any] = {}  # (id(tokenizer), vocab, mode) -> tokenizer


def check_targets_reachable(tokenizer: Any, vocab: ntl.NumberVocab, modes: Sequence[str]) -> None:
    """Refuse (``ValueError``, with the reason) a tokenizer with which NTL would see no target.

    For each target mode in ``modes`` the probe response :data:`PROBE_RESPONSE` (final answer
    ``1234``), encoded by ``tokenizer`` without special tokens, gets its targets against the
    ground truth ``1234`` through :func:`digit_targets`, exactly as a rollout would. Both modes
    must then target exactly the answer's number tokens, each with itself (the answer is
    correct), and the targeted tokens' texts must write ``1234`` (Qwen2.5: ``'1' '2' '3' '4'``,
    Llama-3: ``'123' '4'``). A tokenizer that writes the answer's digits in tokens outside
    ``vocab`` (e.g. ``'Ġ12'``), or whose decode loses them, fails here instead of training
    with (almost) no NTL target. Checked once per tokenizer, vocab and mode.
    """
    for mode in modes:
        key = (id(tokenizer), vocab, mode)
        if _PROBED.get(key) is tokenizer:
            continue
        _probe(tokenizer, vocab, mode)
        _PROBED[key] = tokenizer


def _probe(tokenizer: Any, vocab: ntl.NumberVocab, mode: str) -> None:
    name = type(tokenizer).__name__
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        raise TypeError(f"NTL needs a Hugging Face tokenizer with encode() to build its targets, got {name}")
    ids = [int(i) for i in encode(PROBE_RESPONSE, add_special_tokens=False)]
    resp = torch.tensor([ids], dtype=torch.long)
    pieces = (tokenizer.convert_ids_to_tokens(ids) if hasattr(tokenizer, "convert_ids_to_tokens") else ids)
    where = (f"the response {PROBE_RESPONSE!r} (tokens {pieces}) against the ground truth {PROBE_TRUTH}, "
             f"with {name} and its number vocabulary {vocab!r}")
    try:
        t = digit_targets(resp, torch.ones_like(resp, dtype=torch.bool), [PROBE_TRUTH], tokenizer, vocab, mode)
    except ValueError as e:
        raise ValueError(f"NTL cannot build its '{mode}' targets for {where}: {e}") from e
    pos = [j for j, k in enumerate(t[0].tolist()) if k != IGNORE_INDEX]
    texts = dict(zip(vocab.token_ids, vocab.texts or (), strict=False))
    number_pos = [j for j, i in enumerate(ids) if i in texts]
    written = "".join(texts.get(ids[j], "?") for j in pos)
    if not pos or pos != number_pos or written != PROBE_TRUTH or t[0, pos].tolist() != [ids[j] for j in pos]:
        raise ValueError(
            f"NTL would see (almost) no target with this tokenizer: its '{mode}' targets for {where} "
            f"cover {len(pos)} token(s) writing {written!r}, not the answer's number tokens writing "
            f"{PROBE_TRUTH!r}. The tokenizer writes numbers in tokens that are not plain ASCII digit "
            "strings, or its decode does not give the response's digits back; NTL needs number tokens "
            "whose text is the digits they write (Qwen2.5's '0'..'9', Llama-3's '0'..'999')"
        )
