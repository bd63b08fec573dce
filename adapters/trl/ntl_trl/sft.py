"""NTL in TRL 1.16's ``SFTTrainer``: :class:`NTLSFTTrainer`.

``SFTTrainer.compute_loss`` runs one forward through its fused LM head (``fused_lm_head=True``:
per-token log-probabilities of the label tokens, computed in chunks, never the ``[N, V]``
logits; ``labels[:, 1:]`` scored by ``last_hidden_state[:, :-1]``, ``shift_labels`` unshifted)
and normalises the summed negative log-likelihood by ``num_items_in_batch``, the supervised
token count of the whole accumulation window over all processes. Its labels already carry the
completion-only and assistant-only masks (``-100`` elsewhere), built when the dataset is
prepared. :class:`ntl_trl.supervised.NTLSFTMixin` adds NTL from the backbone's hidden state
of that same forward, normalised by the window's number-token target count (see there); TRL's
``entropy`` / ``mean_token_accuracy`` metrics stay as they are and the ``ntl/*`` metrics are
added beside them. TRL itself refuses Liger's fused linear cross-entropy (it replaces the
forward) and an adapter on ``lm_head``; its ``compute_loss_func`` and label-smoothing paths
(a full-logits forward with gradient, then a no-gradient fused forward for the metrics) get
NTL from the first.
"""

from __future__ import annotations

from trl import SFTTrainer

from .supervised import NTLSFTMixin

__all__ = ["NTLSFTTrainer"]


class NTLSFTTrainer(NTLSFTMixin, SFTTrainer):
    """``trl.SFTTrainer`` with the Number Token Loss on the supervised number tokens; extra
    argument ``ntl_config=ntl_trl.NTLSFTConfig(...)`` (see :class:`ntl_trl.supervised.NTLSFTMixin`)."""
