"""verl 0.9 FSDP engine that captures digit logits in the log-prob forward pass.

:class:`NTLEngineMixin` on top of verl's ``FSDPEngineWithLMHead``:

* ``prepare_model_outputs`` adds ``model_output["ntl_digit_logits"]``: the ``K`` digit
  columns of the logits, divided by the sampling temperature exactly as verl divides
  the logits before its log-softmax, gathered/unpadded like ``log_probs`` (remove-padding
  path incl. Ulysses SP shards, padded path) and laid out like ``log_probs``: a jagged
  ``[B, prompt+response, K]`` tensor whose position ``p`` predicts token ``p + 1``. verl's
  ``no_padding_2_padding`` then turns it into ``[B, R, K]`` where row ``t`` scores
  response token ``t`` (the causal shift). With ``use_fused_kernels`` (no logits exist)
  a forward hook on the decoder computes them from the last hidden state and the LM
  head with the model's logit map, ``f(h @ W[ids].T + b[ids])`` (:mod:`ntl.rl.capture`, the
  capture the TRL adapter uses too). An untied head that FSDP2 keeps as its own unit is still
  sharded there: only its ``K`` number rows are gathered
  (:func:`ntl.rl.capture.number_rows_of_param`). verl 0.9.1's own fused log-prob path fails
  with such a head (verl #7520): ``initialize`` refuses that configuration with the reason
  (:data:`UNTIED_FUSED_REFUSAL`).
* ``forward_backward_batch`` (update): makes sure the batch carries ``ntl_targets``
  (built from ``responses`` + ``reward_model.ground_truth`` when the old-log-prob pass did
  not deliver them), all-reduces the mini-batch's digit targets, digit sequences and responses
  over data parallel (the counts of :mod:`ntl_verl.loss`), and wraps the loss function with
  :class:`ntl_verl.loss.NTLLossFn`. With the digit bonus on, a batch without ``ntl_bonus`` is an
  error (the old-log-prob pass never reached this engine: ``rollout_correction.bypass_mode``).
* ``forward_backward_batch`` (old-log-prob pass): returns ``ntl_targets`` and, with the bonus on,
  ``rm_scores`` (the bonus added at the last response token) and ``ntl_bonus`` as extra model
  output. verl 0.9's trainer writes every output field back to its TransferQueue, so the
  targets reach the update (surviving mini-batch splits and dynamic batch sizes as a
  per-sample field) and the bonus reaches ``_compute_advantage`` (which reads ``rm_scores``).
  The pass is recognised as verl's trainer marks it, ``calculate_entropy=True``, *and* by what it
  is for: the batch has no ``old_log_probs`` yet (the reference-policy pass, which the v1 trainer
  runs after it, already has them). With the bonus on, a forward-only pass that matches only one of
  the two signals, or an old-log-prob pass over a batch that already carries ``ntl_bonus``, is an
  error instead of a bonus added zero or two times.

The engine only acts for the actor whose config is :class:`ntl_verl.config.NTLActorConfig`
(it reads the settings from its engine config); the reference model and critic run stock.
:func:`register_ntl_engine` registers it under the ``(device, vendor)`` key verl's
``EngineRegistry.get_engine_cls`` will look up, ``VERL_ENGINE_DEVICE`` / ``VERL_ENGINE_VENDOR``
included, and checks that the lookup returns it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

import ntl
from ntl.rl.capture import digit_logits_from_head, hook_backbone
from ntl.rl.capture import is_dtensor as _is_dtensor
from ntl.rl.capture import number_rows_of_param as number_rows_of_param  # re-exported
from ntl.rl.logit_transform import LogitTransform
from ntl.rl.normalization import mask_counts

from ._compat import require_verl_09
from .batch import (
    CAPTURE_KEY,
    DIGIT_LOGITS_KEY,
    TARGETS_KEY,
    digit_bonus_scores,
    digit_targets,
    ground_truths_from,
    has_key,
    pad_responses,
    response_positions,
)
from .loss import (
    BONUS_KEY,
    NUM_DIGITS_KEY,
    NUM_RESPONSES_KEY,
    NUM_SEQUENCES_KEY,
    NTLLossFn,
    vocab_for_model,
)
from .settings import IGNORE_INDEX, NTLSettings

require_verl_09()

__all__ = ["NTLEngineMixin", "NTLFSDPEngineWithLMHead", "register_ntl_engine"]

logger = logging.getLogger("ntl")

_REGISTERED: list[tuple[str, str]] = []

UNTIED_FUSED_REFUSAL = (
    "actor_rollout_ref.model.use_fused_kernels=True with an untied LM head (tie_word_embeddings=False, "
    "e.g. Qwen2.5-7B and larger) on FSDP2: verl wraps the head as its own FSDP2 unit and its fused "
    "log-prob forward (verl/models/transformers/dense_common.py) reads the still-sharded "
    "lm_head.weight, which fails at the first forward ('aten.mm ... got mixed torch.Tensor and "
    "DTensor'; verl issue #7520). This is verl's own fused path, not NTL's (NTL reads the head's "
    "number rows from the shard). Set actor_rollout_ref.model.use_fused_kernels=False, or use a verl "
    "whose fused path handles an untied head (the head kept in the root FSDP2 unit when fused "
    "kernels are on, as verl PR #7427 does, or the weight gathered before the kernel)"
)


def _tu() -> Any:
    from verl.utils import tensordict_utils as tu

    return tu


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(module, "module", None)  # FSDP1 / DDP wrappers
    return inner if isinstance(inner, torch.nn.Module) else module


# The class this mixin goes on (object at run time). Dynamic for type checkers: verl's
# EngineRegistry.register types FSDPEngineWithLMHead as BaseEngine, without its methods.
_EngineBase: Any = object


class NTLEngineMixin(_EngineBase):
    """Mixin for verl's ``FSDPEngineWithLMHead`` (see the module docstring)."""

    # ------------------------------------------------------------------ settings
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ntl_bind()
        s = self.ntl_settings
        if s is not None and (s.ntl_enabled or s.bonus_enabled):
            _ = self.ntl_vocab  # refuses, at worker init, a model with which NTL would see no target

    def initialize(self, *args: Any, **kwargs: Any) -> Any:
        out = super().initialize(*args, **kwargs)
        s = self.ntl_settings
        if s is not None and (s.ntl_enabled or s.bonus_enabled):
            self._ntl_check_fused_head()
        return out

    def _ntl_check_fused_head(self) -> None:
        """Refuse, at worker init, fused kernels that cannot run with this model's LM head.

        verl 0.9.1 wraps an untied ``lm_head`` as its own FSDP2 unit; its fused forward
        (``verl/models/transformers/dense_common.py``) never calls that module but passes
        ``self.lm_head.weight`` -- still a sharded DTensor -- to its log-prob kernel, which fails at
        the first forward (``aten.mm ... got mixed torch.Tensor and DTensor``; verl #7520). NTL's
        own digit logits work there (:func:`ntl.rl.capture.number_rows_of_param`), verl's log-probs do not. The
        check runs verl's fused kernel (``FusedLinearForPPO``) once on a one-token zero hidden state
        with the head's weight as the forward will see it, and refuses when it fails exactly so;
        a verl that handles the sharded weight (or keeps the head in the root unit) passes.
        """
        if not getattr(self.model_config, "use_fused_kernels", False):
            return
        model: Any = _unwrap(self.module)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        from torch.distributed.fsdp import FSDPModule

        if not (isinstance(head, FSDPModule) and _is_dtensor(weight)):
            return  # the head is gathered with its parent unit inside the forward
        from verl.utils.experimental.torch_functional import FusedLinearForPPO

        sharded: Any = weight
        local = sharded.to_local()
        hidden: Any = torch.zeros(1, local.shape[-1], dtype=local.dtype, device=local.device)
        token: Any = torch.zeros(1, dtype=torch.long, device=local.device)
        try:
            with torch.no_grad():
                FusedLinearForPPO(impl_backend="torch").forward(hidden, sharded, token)
        except RuntimeError as e:
            if "mixed torch.Tensor and DTensor" not in str(e):
                logger.warning("ntl_verl: could not check verl's fused kernel with a sharded LM head: %s", e)
                return
            raise ValueError(UNTIED_FUSED_REFUSAL) from e

    @property
    def ntl_settings(self) -> NTLSettings | None:
        """The actor's NTL settings (None: this engine is not an NTL actor)."""
        cfg = getattr(self, "engine_config", None)
        s = getattr(cfg, "_ntl_settings", None)
        return s if s is not None and s.active else None

    def _ntl_bind(self) -> None:
        """Mark the engine config as served by this engine (checked by ``NTLActorConfig``'s
        post-build guard, :class:`ntl_verl.config.NTLEngineCheck`)."""
        cfg = getattr(self, "engine_config", None)
        if getattr(cfg, "_ntl_settings", None) is not None:
            object.__setattr__(cfg, "_ntl_engine_bound", type(self).__qualname__)

    @property
    def ntl_vocab(self) -> ntl.NumberVocab:
        """The model's whole number vocabulary (:func:`ntl_verl.loss.vocab_for_model`: ``K = 10``
        digits for Qwen2.5, ``K = 1,110`` number tokens for Llama-3); ``ValueError`` when NTL
        could see no target with the model's tokenizer (checked for this actor's target modes)."""
        v = getattr(self, "_ntl_vocab_cache", None)
        if v is None:
            v = vocab_for_model(self.model_config, self.ntl_settings)
            self._ntl_vocab_cache = v
        return v

    def _ntl_tokenizer(self) -> Any:
        return self.model_config.tokenizer

    # ------------------------------------------------------------------ batch level
    def forward_backward_batch(self, data: Any, loss_function: Any, forward_only: bool = False) -> Any:
        s = self.ntl_settings
        if s is None:
            return super().forward_backward_batch(data, loss_function, forward_only)
        self._ntl_bind()
        if forward_only:
            return self._ntl_forward_only(data, loss_function, s)
        if s.bonus_enabled and not has_key(data, BONUS_KEY):
            raise RuntimeError(
                f"actor_rollout_ref.actor.ntl_bonus_type={s.ntl_bonus_type!r}, but the update batch has "
                f"no '{BONUS_KEY}': no old-log-prob pass of this batch ran through the NTL engine, so the "
                "digit bonus never reached the rewards. verl skips that pass with "
                "algorithm.rollout_correction.bypass_mode=true, and trainer.use_v1=false drops its outputs; "
                "turn the bonus off (ntl_bonus_type=none) or use the v1 trainer without bypass mode"
            )
        if loss_function is None or not (s.ntl_enabled or has_key(data, BONUS_KEY)):
            return super().forward_backward_batch(data, loss_function, forward_only)
        if s.ntl_enabled and not has_key(data, TARGETS_KEY):
            data[TARGETS_KEY] = self._ntl_build_targets(data, s.ntl_labels)
        self._ntl_assign_counts(data, s)
        return super().forward_backward_batch(data, self._ntl_wrap(loss_function, s), forward_only)

    def _ntl_assign_counts(self, data: Any, s: NTLSettings) -> None:
        """``[digit targets, sequences with one, responses]`` of the global mini-batch (one
        all-reduce over data parallel), set on the batch for :class:`ntl_verl.loss.NTLLossFn`.
        Responses: samples with at least one response token (verl's batch-padding samples have none)."""
        tu = _tu()
        _, mask = self._ntl_responses(data)
        n_resp = mask.any(-1).sum().double().reshape(1)
        if s.ntl_enabled:
            targets = pad_responses(data[TARGETS_KEY], mask.shape[1], IGNORE_INDEX)
            digits = (self.ntl_vocab.digit_index(targets.to(mask.device)) >= 0) & mask
            counts = torch.cat([mask_counts(digits).double(), n_resp])
        else:
            counts = torch.cat([torch.zeros(2, dtype=torch.float64, device=n_resp.device), n_resp])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.to(self._ntl_device())
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM,
                                         group=self.get_data_parallel_group())
        n_digits, n_seqs, n_responses = (round(x) for x in counts.tolist())
        tu.assign_non_tensor(data, **{NUM_DIGITS_KEY: n_digits, NUM_SEQUENCES_KEY: n_seqs,
                                      NUM_RESPONSES_KEY: n_responses, CAPTURE_KEY: s.ntl_enabled})

    def _ntl_forward_only(self, data: Any, loss_function: Any, s: NTLSettings) -> Any:
        tu = _tu()
        entropy_flag = bool(tu.get_non_tensor_data(data=data, key="calculate_entropy", default=False))
        fresh = not has_key(data, "old_log_probs")  # this pass computes them
        if s.bonus_enabled:
            if entropy_flag != fresh:
                raise RuntimeError(
                    "NTL digit bonus: cannot tell whether this forward-only actor pass is verl's "
                    f"old-log-prob pass (calculate_entropy={entropy_flag}, batch "
                    f"{'without' if fresh else 'with'} old_log_probs; verl 0.9's trainer marks that "
                    "pass calculate_entropy=True on a batch without old_log_probs). Adding the bonus "
                    "here could apply it zero or two times: set actor_rollout_ref.actor.ntl_bonus_type=none "
                    "or report the verl version"
                )
            if fresh and has_key(data, BONUS_KEY):
                raise RuntimeError(
                    f"NTL digit bonus: the batch already carries '{BONUS_KEY}' (its rm_scores already "
                    "hold the bonus); a second old-log-prob pass over it would add the bonus twice"
                )
        old_log_prob_pass = entropy_flag and fresh
        want_targets = s.ntl_enabled and not has_key(data, TARGETS_KEY)
        if not old_log_prob_pass or not (want_targets or s.bonus_enabled):
            return super().forward_backward_batch(data, loss_function, True)
        if s.bonus_enabled:
            tu.assign_non_tensor(data, **{CAPTURE_KEY: True})
        out = super().forward_backward_batch(data, loss_function, True)
        extra = self._ntl_old_log_prob_outputs(data, out.get("model_output", {}), s)
        model_output = out.setdefault("model_output", {})
        model_output.pop(DIGIT_LOGITS_KEY, None)
        model_output.update(extra)
        return out

    def _ntl_wrap(self, loss_function: Any, s: NTLSettings) -> Any:
        """``loss_function`` + NTL (:class:`NTLLossFn`) unless it already includes NTL."""
        if getattr(loss_function, "ntl_included", False) or getattr(
            getattr(loss_function, "func", None), "ntl_included", False
        ):
            return loss_function
        return NTLLossFn(loss_function, s, self.ntl_vocab if s.ntl_enabled else None, self._ntl_tokenizer())

    def _ntl_device(self) -> Any:
        from verl.utils.device import get_device_id

        return get_device_id()

    def _ntl_responses(self, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``responses [B, R]`` and boolean ``response_mask [B, R]`` of a verl batch."""
        if not has_key(data, "responses") or not has_key(data, "response_mask"):
            raise ValueError("NTL needs 'responses' and 'response_mask' in the actor batch")
        resp, mask = data["responses"], data["response_mask"]
        R = int(mask.offsets().diff().max().item()) if mask.is_nested else mask.shape[1]
        return pad_responses(resp, R, 0).long(), pad_responses(mask, R, 0).bool()

    def _ntl_ground_truths(self, data: Any) -> list[Any]:
        rm = _tu().get(data, "reward_model", None)
        return ground_truths_from(rm, len(data))

    def _ntl_build_targets(self, data: Any, mode: str) -> torch.Tensor:
        resp, mask = self._ntl_responses(data)
        t = digit_targets(resp, mask, self._ntl_ground_truths(data), self._ntl_tokenizer(), self.ntl_vocab, mode)
        return self._ntl_like_response(t, data)

    @staticmethod
    def _ntl_like_response(t: torch.Tensor, data: Any) -> torch.Tensor:
        """Padded ``[B, R]`` -> the batch's response layout (nested if ``response_mask`` is)."""
        mask = data["response_mask"]
        if not mask.is_nested:
            return t
        lens = mask.offsets().diff().tolist()
        return torch.nested.as_nested_tensor([t[i, :n] for i, n in enumerate(lens)], layout=torch.jagged)

    def _ntl_old_log_prob_outputs(self, data: Any, model_output: dict, s: NTLSettings) -> dict[str, torch.Tensor]:
        """Targets (and bonus scores) computed after the old-log-prob forward pass."""
        out: dict[str, torch.Tensor] = {}
        resp, mask = self._ntl_responses(data)
        gts = self._ntl_ground_truths(data)
        tok, vocab = self._ntl_tokenizer(), self.ntl_vocab
        train_targets = None
        if s.ntl_enabled and not has_key(data, TARGETS_KEY):
            train_targets = digit_targets(resp, mask, gts, tok, vocab, s.ntl_labels)
            out[TARGETS_KEY] = self._ntl_like_response(train_targets, data)
        if s.bonus_enabled:
            from verl.workers.utils.padding import no_padding_2_padding

            if DIGIT_LOGITS_KEY not in model_output:
                raise RuntimeError("extract_digit_info is on but the forward pass returned no digit logits")
            if not has_key(data, "rm_scores"):
                raise RuntimeError(
                    "ntl_bonus_type is set but the batch has no 'rm_scores' to add the bonus to: the digit "
                    "bonus needs verl's v1 trainer (trainer.use_v1=true, the default in verl 0.9)"
                )
            z = no_padding_2_padding(model_output[DIGIT_LOGITS_KEY], data)
            z = pad_responses(z, mask.shape[1], 0.0)
            same = train_targets is not None and s.ntl_labels == s.ntl_bonus_type
            # verl puts a sequence's score on its last response token (tool / observation tokens
            # included); the bonus goes there too, not on the last policy token
            rmask = data["response_mask"]
            valid = response_positions(rmask, mask.shape[1]) if rmask.is_nested else None
            scores, bonus = digit_bonus_scores(
                z, resp, mask, gts, tok, vocab, s, targets=train_targets if same else None, valid_mask=valid
            )
            rm = data["rm_scores"]
            if not rm.is_nested:
                raise RuntimeError(
                    "the digit bonus needs verl's v1 trainer (trainer.use_v1=true): the legacy trainer "
                    "drops extra outputs of the old-log-prob pass"
                )
            rm_pad = pad_responses(rm, mask.shape[1], 0.0).float()
            out["rm_scores"] = self._ntl_like_response(rm_pad + scores.to(rm_pad.device), data)
            out[BONUS_KEY] = bonus.float().reshape(-1, 1)  # per response; logged as ntl/reward
        return out

    # ------------------------------------------------------------------ micro-batch level
    def _ntl_capture(self, micro_batch: Any) -> bool:
        if self.ntl_settings is None:
            return False
        return bool(_tu().get_non_tensor_data(data=micro_batch, key=CAPTURE_KEY, default=False))

    def forward_step(self, micro_batch: Any, loss_function: Any, forward_only: bool) -> Any:
        use_fused = _tu().get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False)
        if not (use_fused and self._ntl_capture(micro_batch)):
            return super().forward_step(micro_batch, loss_function, forward_only)
        handle = self._ntl_install_hidden_hook(micro_batch)
        try:
            return super().forward_step(micro_batch, loss_function, forward_only)
        finally:
            handle.remove()
            self._ntl_fused_digit_logits = None

    def _ntl_install_hidden_hook(self, micro_batch: Any) -> Any:
        """Fused kernels: compute digit logits from the decoder's last hidden state inside the
        forward (while FSDP has the LM head's weight gathered):
        ``f(h @ W[ids].T + b[ids])`` with ``f`` the model's logit map then ``/ T``
        (:meth:`ntl.rl.logit_transform.LogitTransform.for_config`: logit scale, final-logit
        soft-cap), i.e. the digit columns of the model's own logits divided by the temperature,
        as the non-fused path reads them. A config with a logit map ``ntl`` does not know is
        refused (``ValueError``) before the forward.

        ``W`` is read inside the forward: gathered with its parent FSDP2 unit (a tied head, or an
        untied one kept in the root unit), or -- an untied head wrapped as its own unit, never
        called by the fused path -- a sharded DTensor, of which only the ``K`` number rows are
        gathered (:func:`ntl.rl.capture.number_rows_of_param`: ``K x H`` values on the wire, not
        ``V x H``; gradient averaged over the ranks like FSDP2's reduce-scatter). The hook and
        the digit logits are :mod:`ntl.rl.capture`'s, shared with the TRL adapter."""
        model: Any = _unwrap(self.module)  # a Hugging Face model (get_decoder is not nn.Module's)
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if decoder is None or head is None:
            raise RuntimeError("NTL with use_fused_kernels needs a model with get_decoder() and an LM head")
        config = getattr(model, "config", None)
        if config is None:
            raise RuntimeError(
                "NTL with use_fused_kernels needs the model's config to read its logit map (logit scale, "
                "soft-cap); this model has none"
            )
        temperature = micro_batch["temperature"]
        if isinstance(temperature, torch.Tensor):
            raise NotImplementedError("NTL with use_fused_kernels needs a scalar temperature (as verl does)")
        transform = LogitTransform.for_config(config, temperature=float(temperature))
        vocab = self.ntl_vocab

        def on_hidden(hidden: torch.Tensor) -> None:
            # the head's W, b are read now: FSDP2 swaps the parameter objects (sharded <->
            # gathered) around a forward; a head still sharded here gives its K rows only
            self._ntl_fused_digit_logits = digit_logits_from_head(hidden, head, vocab, transform)

        return hook_backbone(decoder, on_hidden)

    def prepare_model_outputs(self, output: Any, output_args: dict, micro_batch: Any, logits_processor_func: Any) -> dict:
        model_output = super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        if self._ntl_capture(micro_batch):
            model_output[DIGIT_LOGITS_KEY] = self._ntl_digit_logits(output, output_args, micro_batch)
        return model_output

    def _ntl_digit_logits(self, output: Any, output_args: dict, micro_batch: Any) -> torch.Tensor:
        """Jagged ``[B, seq_b, K]`` digit logits aligned like verl's ``log_probs``."""
        from torch.distributed.tensor import DTensor
        from verl.workers.engine.fsdp.transformer_impl import _scale_logits_by_temperature

        tu = _tu()
        use_rmpad = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
        use_fused = tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False)
        input_ids = micro_batch["input_ids"]
        cu_seqlens = input_ids.offsets()
        unit_t = output_args.get("temperature_is_one", False)
        ids = self.ntl_vocab.ids(cu_seqlens.device)

        if use_fused:
            z = getattr(self, "_ntl_fused_digit_logits", None)
            if z is None:
                raise RuntimeError("NTL fused path: the decoder hook captured no hidden state")
            if use_rmpad:
                z = self._gather_and_unpad_packed(z.squeeze(0), output_args["pad_size"])
            else:
                lens = cu_seqlens.diff()
                keep = torch.arange(z.shape[1], device=z.device)[None, :] < lens.to(z.device)[:, None]
                z = z[keep]
            return torch.nested.nested_tensor_from_jagged(z, cu_seqlens.to(z.device))

        logits = output.logits
        if isinstance(logits, DTensor):
            logits = logits.full_tensor()
        if use_rmpad:
            z = logits.squeeze(0).index_select(-1, ids.to(logits.device))  # [nnz_local, K]
            t = output_args["temperature_rmpad"].unsqueeze(-1)
            z = _scale_logits_by_temperature(z, t, is_unit_temperature=unit_t).float()
            z = self._gather_and_unpad_packed(z, output_args["pad_size"])
        else:
            z = logits.index_select(-1, ids.to(logits.device))  # [B, L, K]
            t = output_args["temperature"].unsqueeze(-1).unsqueeze(-1)
            z = _scale_logits_by_temperature(z, t, is_unit_temperature=unit_t).float()
            lens = cu_seqlens.diff().to(z.device)
            keep = torch.arange(z.shape[1], device=z.device)[None, :] < lens[:, None]
            z = z[keep]  # [nnz, K], sequences concatenated in order
        return torch.nested.nested_tensor_from_jagged(z, cu_seqlens.to(z.device))


def _engine_class() -> type:
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    global NTLFSDPEngineWithLMHead
    if NTLFSDPEngineWithLMHead is None:

        class _NTLFSDPEngineWithLMHead(NTLEngineMixin, FSDPEngineWithLMHead):
            """verl's ``FSDPEngineWithLMHead`` with NTL digit capture and loss."""

        _NTLFSDPEngineWithLMHead.__name__ = "NTLFSDPEngineWithLMHead"
        _NTLFSDPEngineWithLMHead.__qualname__ = "NTLFSDPEngineWithLMHead"
        NTLFSDPEngineWithLMHead = _NTLFSDPEngineWithLMHead
    return NTLFSDPEngineWithLMHead


NTLFSDPEngineWithLMHead: Any = None


def engine_lookup_key() -> tuple[str, str]:
    """The ``(device, vendor)`` verl's ``EngineRegistry.get_engine_cls`` looks up in this process:
    the platform's, unless ``VERL_ENGINE_DEVICE`` / ``VERL_ENGINE_VENDOR`` override it."""
    from verl.utils.device import get_device_name, get_vendor

    return (os.getenv("VERL_ENGINE_DEVICE") or get_device_name(), os.getenv("VERL_ENGINE_VENDOR") or get_vendor())


def register_ntl_engine() -> type:
    """Register the NTL engine for ``language_model`` / fsdp, fsdp2 under the ``(device, vendor)``
    key ``EngineRegistry.get_engine_cls`` will look up in this process (:func:`engine_lookup_key`,
    so ``VERL_ENGINE_DEVICE`` / ``VERL_ENGINE_VENDOR`` are honoured); that key wins over the
    vendor-less default (verl's own engine). Then check that the lookup returns the NTL engine.
    Idempotent. Returns the engine class; raises ``RuntimeError`` when another engine holds the key.

    The engine behaves exactly like verl's for every engine config that carries no NTL
    settings (reference model, or an actor without ``NTLActorConfig``).
    """
    from verl.workers.engine.base import EngineRegistry

    cls = _engine_class()
    device, vendor = engine_lookup_key()
    if (device, vendor) not in _REGISTERED:
        table = EngineRegistry._engines.setdefault("language_model", {})
        for backend in ("fsdp", "fsdp2"):
            existing = table.get(backend, {}).get((device, vendor))
            if existing is not None and existing is not cls:
                raise RuntimeError(
                    f"another engine ({existing.__qualname__}) is registered for language_model/{backend} "
                    f"on ({device}, {vendor}); the NTL engine cannot take its place (VERL_ENGINE_DEVICE="
                    f"{os.getenv('VERL_ENGINE_DEVICE')!r}, VERL_ENGINE_VENDOR={os.getenv('VERL_ENGINE_VENDOR')!r})"
                )
        missing = [b for b in ("fsdp", "fsdp2") if table.get(b, {}).get((device, vendor)) is None]
        if missing:
            EngineRegistry.register(model_type="language_model", backend=missing, device=device, vendor=vendor)(cls)
        _REGISTERED.append((device, vendor))
        logger.info("ntl_verl: NTL engine registered for language_model on (%s, %s)", device, vendor)
    for backend in ("fsdp", "fsdp2"):
        found = EngineRegistry.get_engine_cls("language_model", backend)
        if found is not cls:
            raise RuntimeError(
                f"verl's EngineRegistry hands out {found.__qualname__} for language_model/{backend}, not the "
                f"NTL engine registered on ({device}, {vendor}): NTL would silently not apply. Check "
                f"VERL_ENGINE_DEVICE={os.getenv('VERL_ENGINE_DEVICE')!r} / "
                f"VERL_ENGINE_VENDOR={os.getenv('VERL_ENGINE_VENDOR')!r}"
            )
    return cls
