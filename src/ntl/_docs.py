"""The text of the parameters that several public entry points share, written once.

A docstring names a shared parameter by a line that holds only ``{name}`` inside its
``Args:`` section; :func:`shared_docs` replaces that line with ``name: <text>`` at import
time (indented like the line, continuation lines four spaces deeper), so ``help()`` and
``inspect.getdoc`` show the full text. Anything after the closing brace on that line is
appended to the text (a local addition). Unknown names raise ``KeyError`` at import, so a
typo cannot ship. Only whole-line placeholders are touched: other braces in a docstring
(``{id: value}``) stay as they are.
"""

from __future__ import annotations

import re
import textwrap
from typing import TypeVar

__all__ = ["PARAMS", "fill", "shared_docs"]

T = TypeVar("T")

PARAMS: dict[str, str] = {
    "logits": """``[..., V]`` float logits (fp32/bf16/fp16), aligned with ``labels`` (shift the
        labels for causal LMs: :func:`ntl.shift_labels`).""",
    "labels": "``[...]`` integer token ids; only number-token labels take part in NTL.",
    "vocab_or_tokenizer": """the number tokens: a Hugging Face tokenizer, a
        :class:`ntl.NumberVocab` / :class:`ntl.DigitVocab`, a list of the ten digit ids, or an
        ``{id: value}`` dict.""",
    "vocab_size": """the model's (padded) vocabulary size ``V`` (``None``: the vocab's own, the
        tokenizer's length, or ``max(id) + 1`` for an id list or dict).""",
    "ignore_index": "label value that never takes part (``F.cross_entropy``'s).",
    "reduction": """``"mean"`` (weighted mean over taking-part positions), ``"sum"`` or
        ``"none"`` (shaped like ``labels``).""",
    "method": """a registered name (``"wasserstein"`` alias ``"w1"``, ``"mse"``, ``"mae"``,
        ``"huber"``, ``"del"``, ``"dist2"``) or an :mod:`ntl.methods` object carrying its
        parameters (``ntl.methods.Huber(delta=2.0)``, ``ntl.methods.W1(squash_factor=3.0)``,
        ``ntl.methods.DIST2(tau=0.5)``); DEL's place weights come from ``labels`` (the last
        axis is the sequence; :class:`ntl.methods.DEL`).""",
    "squash_factor": """``ntloss.NTLoss(squash_factor=...)``'s squashed W1 distances (a number
        ``> 1``, W1 only, the same as ``method=W1(squash_factor=...)``; both at once must
        agree); with ``reweigh`` the ceiling is ``D = 1.01 squash_factor``.""",
    "huber_delta": """the Huber threshold with ``method="huber"`` (``None``: 1.0; the same as
        ``method=Huber(delta=...)``).""",
    "weights": """optional ``[...]`` non-negative per-position weights of the NTL term: bool,
        integer (e.g. an attention mask) or float; the mean is
        ``sum_i w_i L_i / max(sum_i w_i, eps)`` over number positions.""",
    "ntl_weight": "weight ``w`` of the NTL term (``CE + w NTL``).",
    "target_dist": """optional soft targets ``labels.shape + (K,)`` (rows summing to 1, in the
        vocab's value order; e.g. :func:`ntl.gaussian_targets`), W1 only, not with
        ``squash_factor``.""",
    "reweigh": """``ntloss``'s full-vocabulary reweighting ``L' = m L + D (1 - m)`` (``m`` the
        full-softmax number-token mass, ``D = 1.01 max_loss``); off, as in the paper.""",
    "backend": """``"auto"`` (Triton on CUDA, else PyTorch), ``"torch"`` or ``"triton"``.""",
    "temperature": """``T > 0`` dividing the logits, as samplers and RL log-probs do.""",
    "bias": "optional ``[V]`` LM-head bias.",
    "hidden": "``[..., H]`` last hidden states (the LM head's input).",
    "lm_head_weight": "``[V, H]`` LM-head weight (``model.lm_head.weight``).",
    "grad_scale": """the incoming gradient backward will get (``(loss * s).backward()``, a
        GradScaler's scale): a non-zero number or a 0-d float tensor on the input's device
        (``None``: 1). It is folded into the stored gradient; the returned loss is not
        scaled (:func:`ntl.cross_entropy_with_ntl`).""",
    "float_level": """a single ``'.'`` label between two number tokens joins them into one
        number (``12.34`` -> ``1234``; ``False``: ``12`` and ``34``).""",
    "decimal_point_id": """the ``'.'`` token id (default: the tokenizer's ``'.'``; pass it
        with a ``NumberVocab``).""",
    "max_number_length": """counted in digits (characters), not tokens: a token's place is
        clamped so that its leading digit sits at most at place ``max_number_length - 1``
        (``p_t <= max(max_number_length - w_t, 0)`` for a token of ``w_t`` digits; with
        digits, ``ntloss``'s clamp); at most 38 (fp32).""",
    "vocab_start": "the global id of this shard's first column.",
    "group": """the tensor-parallel process group (``None``: the default group when
        ``torch.distributed`` is initialised, else a single rank).""",
    "digit_logits": "``[..., K]`` number-token logits (the vocab's number columns, in its order).",
    "targets": """``[...]`` token ids of the targets (number-token ids take part; others and
        ``ignore_index`` do not).""",
    "vocab": "the number vocab (a tokenizer, ``NumberVocab``, digit ids or ``{id: value}``).",
    # RL loss aggregation (ntl.rl.normalization)
    "mask": "``[B, T]`` bool (or 0/1) mask, True where a token takes part.",
    "mode": """one of :data:`ntl.rl.normalization.LOSS_AGG_MODES` (verl's ``loss_agg_mode``:
        ``"token-mean"``, ``"token-sum"``, ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"``,
        ``"seq-mean-token-sum-norm"``).""",
    "num_tokens": """``N``, the participating tokens of the whole batch (a number or a 0-dim
        tensor; default: counted on ``mask``).""",
    "num_sequences": """``S``, the participating sequences of the whole batch (default:
        counted on ``mask``).""",
    "horizon": """``H`` of ``seq-mean-token-sum-norm`` (``> 0``; default ``T``, verl's when
        ``loss_scale_factor`` is unset); ignored by the other modes.""",
    # RL rewards (ntl.rl.rewards)
    "digit_probs": """the policy's digit probabilities over the covered digits: a mapping
        (``target_prob``, ``max_prob``, and ``correct`` or ``pred_digit`` + ``target_digit``,
        optional ``mask``) or a :class:`ntl.rl.metrics.DigitProbs` (:mod:`ntl.rl.rewards`);
        ``None``: the text fallback.""",
    "data_source": "verl's data source name (accepted, unused).",
    "solution_str": "the decoded response.",
    "ground_truth": """the reference: a number string, an ``int``/``float``, or a solution with
        its final answer after ``####`` or in ``\\boxed{}``.""",
    "extra_info": "verl's extra info (accepted, unused).",
    "flexible": """fall back to the response's last number when it has no ``####`` or
        ``\\boxed{}`` answer (:func:`ntl.rl.answers.extract_answer`).""",
    "kwargs": "other keyword arguments (from verl's ``reward_kwargs``): ignored.",
}

_WIDTH = 88  # text columns of a continuation line (4 + 8 + 88 = 100 in the source view)
_PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)\{(?P<name>\w+)\}(?P<extra>.*)$", re.MULTILINE)


def fill(doc: str, params: dict[str, str] | None = None) -> str:
    """``doc`` with each whole-line ``{name}`` replaced by ``name: PARAMS[name]``."""
    table = PARAMS if params is None else params

    def one(m: re.Match[str]) -> str:
        indent, name, extra = m["indent"], m["name"], m["extra"]
        if name not in table:
            raise KeyError(f"ntl._docs: no shared text for parameter {name!r}")
        lines = [line.strip() for line in table[name].strip().splitlines()]
        lines[-1:] = textwrap.wrap(lines[-1] + extra, _WIDTH)  # a local addition, rewrapped
        cont = "".join(f"\n{indent}    {line}" for line in lines[1:])
        return f"{indent}{name}: {lines[0]}{cont}"

    return _PLACEHOLDER.sub(one, doc)


def shared_docs(obj: T) -> T:
    """Decorator: fill the shared placeholders of ``obj``'s docstring; returns ``obj``."""
    doc = getattr(obj, "__doc__", None)
    if doc:  # None under python -OO
        obj.__doc__ = fill(doc)
    return obj
