"""Token rows for the RL target tests (tests/rl): right-padded batches and the targeted positions."""

from __future__ import annotations

import torch

IGN = -100


def pad_rows(tok, texts, *, end: list[int], pad_id: int, **encode_kw):
    """Right-padded ids ``[B, T]``, the mask and the lengths: each text's ids (``tok.encode(t,
    **encode_kw)``) followed by ``end``, inside the mask; ``pad_id`` fills the rest."""
    rows = [tok.encode(t, **encode_kw) + end for t in texts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask, [len(r) for r in rows]


def targeted(tok, ids_row, tgt_row):
    """[(position, token text, target text)] of the targeted positions of one row."""
    return [
        (t, tok.decode([int(i)]), tok.decode([int(g)]))
        for t, (i, g) in enumerate(zip(ids_row.tolist(), tgt_row.tolist(), strict=True))
        if g != IGN
    ]
