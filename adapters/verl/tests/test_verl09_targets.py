"""Digit targets are vectorised: no Python loop over tokens, no per-token host sync."""

from __future__ import annotations

import pytest
import torch
from conftest import verl_version

v = verl_version()
if v is None or v.release[:2] < (0, 9):
    pytest.skip("needs verl >= 0.9 (scripts/test_verl.sh runs this in its venv)", allow_module_level=True)

import harness as H  # noqa: E402


def big_batch(tok, B: int, R: int):
    """B responses of R tokens: filler text, then '#### <number>' at the end."""
    g = torch.Generator().manual_seed(0)
    filler = tok.encode(" and then we add some numbers like")
    resp = torch.zeros(B, R, dtype=torch.long)
    mask = torch.zeros(B, R, dtype=torch.long)
    truths = []
    for b in range(B):
        n = int(torch.randint(10, 99999, (1,), generator=g))
        tail = tok.encode(f" #### {n}")
        L = R - int(torch.randint(0, R // 4, (1,), generator=g))
        body = (filler * (R // len(filler) + 1))[: L - len(tail)]
        ids = torch.tensor(body + tail)
        resp[b, :L] = ids
        mask[b, :L] = 1
        truths.append(str(n + (b % 3)))  # a third correct
    return resp, mask, truths


class SyncCounter:
    """Counts host-syncing tensor -> Python conversions."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.n = 0
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, **k):
                self.n += 1
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("mode", ["final_answer", "all"])
def test_host_syncs_do_not_grow_with_tokens(qwen_tok, monkeypatch, mode):
    import types

    from ntl_verl.batch import digit_targets
    from ntl_verl.loss import vocab_for_model

    vocab = vocab_for_model(types.SimpleNamespace(tokenizer=qwen_tok, hf_config=types.SimpleNamespace(vocab_size=H.V)))
    counts = {}
    for R in (32, 512):
        resp, mask, truths = big_batch(qwen_tok, 8, R)
        with monkeypatch.context() as m:
            c = SyncCounter(m)
            t = digit_targets(resp, mask, truths, qwen_tok, vocab, mode)
            counts[R] = c.n
        assert t.shape == resp.shape
        assert int((t >= 0).sum()) > 0
    assert counts[512] == counts[32], counts  # 16x the tokens, same number of host syncs


def test_large_batch(qwen_tok):
    import types

    from ntl_verl.batch import digit_targets
    from ntl_verl.loss import vocab_for_model

    vocab = vocab_for_model(types.SimpleNamespace(tokenizer=qwen_tok, hf_config=types.SimpleNamespace(vocab_size=H.V)))
    resp, mask, truths = big_batch(qwen_tok, 256, 512)  # 131k tokens, as a PPO mini-batch of GSM8K
    t = digit_targets(resp, mask, truths, qwen_tok, vocab, "final_answer")
    # every response ends in '#### n': its final answer digits (and nothing else) are targeted
    n_digits = [len(x) for x in truths]
    got = (t >= 0).sum(1).tolist()
    assert all(1 <= g <= max(n, 5) for g, n in zip(got, n_digits, strict=True))
