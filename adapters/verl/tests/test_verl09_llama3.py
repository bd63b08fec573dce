"""verl 0.9 adapter with Llama-3's real tokenizer (numbers in tokens of up to three digits).

NTL runs over the model's whole number vocabulary (all 1,110 number tokens of Llama-3, the ten
digits of Qwen2.5), targets are place-aligned per number token, ``ntl/total_digits`` counts number
tokens, and a tokenizer with which NTL would see no target is refused at setup. References: the
hand table ``harness.LLAMA_SAMPLES`` and float64 formulas over full logits.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import pytest
import torch
from conftest import verl_version

v = verl_version()
if v is None or v.release[:2] < (0, 9):
    pytest.skip("needs verl >= 0.9 (scripts/test_verl.sh runs this in its venv)", allow_module_level=True)

import harness as H  # noqa: E402


@pytest.fixture(scope="module")
def llama_tok():
    from ntl.tokenizers import llama3_tokenizer

    return llama3_tokenizer()


@pytest.fixture(scope="module")
def batch(llama_tok):
    return H.encode_llama(llama_tok)


def model_config(tok, V):
    return types.SimpleNamespace(tokenizer=tok, hf_config=types.SimpleNamespace(vocab_size=V))


def padded_responses(b: H.Batch) -> tuple[torch.Tensor, torch.Tensor]:
    R = max(len(r) for r in b.responses)
    resp = torch.zeros(len(b.responses), R, dtype=torch.long)
    mask = torch.zeros_like(resp, dtype=torch.bool)
    for i, r in enumerate(b.responses):
        resp[i, : len(r)] = r
        mask[i, : len(r)] = True
    return resp, mask


def n_targets(targets) -> int:
    return sum(int((t >= 0).sum()) for t in targets)


def run_update(model, tok, monkeypatch, b, *, ntl, temperature=1.0, micro=2, targets=None):
    """One verl forward_backward_batch of the update through the NTL engine; (loss, out)."""
    from verl.workers.utils.losses import ppo_loss

    cfg = H.actor_config(ppo_mini_batch_size=len(b.prompts), **ntl)
    eng = H.make_engine(model, tok, monkeypatch=monkeypatch, config=cfg)
    td = H.assign_update_meta(H.v1_batch(b, with_targets=targets), temperature=temperature, micro=micro)
    model.zero_grad(set_to_none=True)
    out = eng.forward_backward_batch(td, functools.partial(ppo_loss, config=cfg), forward_only=False)
    return sum(out["loss"]), out


# --------------------------------------------------------------------------- (a) targets, batch path
def test_the_model_vocab_is_every_llama3_number_token(llama_tok):
    from ntl_verl.loss import vocab_for_model

    import ntl

    vocab = vocab_for_model(model_config(llama_tok, H.LLAMA_V))
    table = H.number_table(llama_tok)
    assert not isinstance(vocab, ntl.DigitVocab)
    assert vocab.K == len(table) == 1110
    assert dict(zip(vocab.token_ids, vocab.values, strict=True)) == table
    assert vocab.vocab_size == H.LLAMA_V
    assert vocab.id_of_text("123") == llama_tok.convert_tokens_to_ids("123")


@pytest.mark.parametrize("mode", ["final_answer", "all"])
def test_targets_through_the_batch_path(llama_tok, batch, mode):
    """ntl_verl.batch.digit_targets with the model's vocab: 1234 = '123' '4' gets '123', '4'
    (final_answer), every number token of a correct response counts (all)."""
    from ntl_verl.batch import digit_targets
    from ntl_verl.loss import vocab_for_model

    vocab = vocab_for_model(model_config(llama_tok, H.LLAMA_V))
    resp, mask = padded_responses(batch)
    t = digit_targets(resp, mask, batch.ground_truths, llama_tok, vocab, mode)
    want = H.llama_expected_targets(llama_tok, mode)
    for i, w in enumerate(want):
        assert torch.equal(t[i, : len(w)], w), (i, t[i].tolist(), w.tolist())
        assert bool((t[i, len(w):] == -100).all())
    got = llama_tok.convert_ids_to_tokens(t[0, t[0] >= 0].tolist())  # the answer 1234 = '123' '4'
    if mode == "final_answer":
        assert got == ["123", "4"]
        assert int((t >= 0).sum()) == n_targets(want) == 12  # 2 + 1 + 2 + 2 + 1 + 1 + 2 + 1 number tokens
    else:
        assert got == ["100", "0", "234", "123", "4"]
        assert int((t >= 0).sum()) == n_targets(want)
        assert n_targets(want) == 8  # the correct responses 0, 3 and 7: 5 + 2 + 1


# --------------------------------------------------------------------------- (b) the engine
@pytest.mark.parametrize("labels", ["final_answer", "all"])
def test_engine_ntl_over_number_tokens(llama_tok, batch, dist_group, monkeypatch, labels):
    """The real engine path (remove-padding, causal shift, micro-batches) with Llama-3: the NTL
    term equals the float64 mean over the hand-counted number-token targets of
    ``(sum_k q_k v_k - y)^2`` over all K = 1,110 number tokens; ntl/total_digits = that count."""
    model = H.tiny_llama(seed=0)
    tg = H.llama_expected_targets(llama_tok, labels)
    terms = H.ref_number_terms(model, batch, tg, H.number_table(llama_tok), temperature=0.9)
    flat = [x for row in terms for x in row]
    ref = sum(x["loss"] for x in flat) / len(flat)
    w = 0.01
    kw = {"ntl_labels": labels}
    l0, _ = run_update(model, llama_tok, monkeypatch, batch, ntl={**kw, "ntl_weight": 0.0}, temperature=0.9)
    lw, out = run_update(model, llama_tok, monkeypatch, batch, ntl={**kw, "ntl_weight": w}, temperature=0.9)
    assert ref > 1.0  # values up to 999: far from the digit-only scale
    assert (lw - l0) / w == pytest.approx(ref, rel=1e-4)
    m = out["metrics"]
    assert m["ntl/total_digits"].aggregate() == n_targets(tg) == len(flat)
    assert m["ntl/loss"].aggregate() == pytest.approx(ref, rel=1e-4)
    for key, name in (("ntl/digit_accuracy", "correct"), ("ntl/confidence", "conf"), ("ntl/target_prob", "tp")):
        want = sum(x[name] for x in flat) / len(flat)
        assert m[key].aggregate() == pytest.approx(want, rel=1e-4, abs=1e-7), key


def test_ntl_gradient_reaches_multi_digit_rows(llama_tok, batch, dist_group, monkeypatch):
    """The NTL part of the gradient (w=1 minus w=0) on the LM head equals autograd of the plain
    float formula: nonzero on the row of '123' (a multi-digit target), zero off the number rows."""
    model: Any = H.tiny_llama(seed=1)
    tg = H.llama_expected_targets(llama_tok, "final_answer")
    table = H.number_table(llama_tok)
    w = 0.01
    run_update(model, llama_tok, monkeypatch, batch, ntl={"ntl_weight": 0.0})
    g0 = model.lm_head.weight.grad.clone()
    run_update(model, llama_tok, monkeypatch, batch, ntl={"ntl_weight": w})
    g_ntl: torch.Tensor = model.lm_head.weight.grad - g0
    # reference: autograd of w * mean_targets (q . v - y)^2 from a plain padded forward
    model.zero_grad(set_to_none=True)
    input_ids, attn, pos, P, _ = H.padded(batch)
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits.float()
    ids = torch.tensor(sorted(table))
    vals = torch.tensor([table[i] for i in ids.tolist()])
    total, n = torch.zeros(()), 0
    for i, t in enumerate(tg):
        for j in (t >= 0).nonzero().flatten().tolist():
            q = torch.softmax(logits[i, P + j - 1, ids], -1)
            total = total + (q @ vals - table[int(t[j])]) ** 2
            n += 1
    (w * total / n).backward()
    g_ref: torch.Tensor = model.lm_head.weight.grad
    row = llama_tok.convert_tokens_to_ids("123")
    assert float(g_ref[row].abs().max()) > 1e-3
    torch.testing.assert_close(g_ntl[row], g_ref[row], rtol=2e-3, atol=1e-5 * float(g_ref[row].abs().max()))
    torch.testing.assert_close(g_ntl[ids], g_ref[ids], rtol=2e-3, atol=1e-5 * float(g_ref[ids].abs().max()))
    other = torch.ones(H.LLAMA_V, dtype=torch.bool)
    other[ids] = False
    assert float(g_ntl[other].abs().max()) <= 1e-6 * float(g_ref[ids].abs().max())


def test_old_log_prob_pass_targets_and_bonus_over_number_tokens(llama_tok, batch, dist_group, monkeypatch):
    """The old-log-prob pass returns the place-aligned targets and a bonus
    ``0.4 acc + 0.3 conf + 0.3 p(target)`` over the K = 1,110 number tokens."""
    from verl.utils import tensordict_utils as tu

    model = H.tiny_llama(seed=2)
    T = 0.7
    cfg = H.actor_config(ppo_mini_batch_size=len(batch.prompts), ntl_weight=0.1, extract_digit_info=True,
                         ntl_bonus_type="final_answer", ntl_bonus_weight=0.5)
    eng = H.make_engine(model, llama_tok, monkeypatch=monkeypatch, config=cfg)
    td = H.assign_update_meta(H.v1_batch(batch, stage="old_log_prob"), micro=2, temperature=T)
    tu.assign_non_tensor(td, calculate_entropy=True, compute_loss=False)
    out = eng.forward_backward_batch(td, None, forward_only=True)
    want_t = H.llama_expected_targets(llama_tok, "final_answer")
    for got, want in zip(out["model_output"]["ntl_targets"].unbind(), want_t, strict=True):
        assert torch.equal(got, want)
    terms = H.ref_number_terms(model, batch, want_t, H.number_table(llama_tok), temperature=T)
    bonus = [sum(0.4 * x["correct"] + 0.3 * x["conf"] + 0.3 * x["tp"] for x in row) / len(row) for row in terms]
    assert out["model_output"]["ntl_bonus"].reshape(-1).tolist() == pytest.approx(bonus, rel=1e-4, abs=1e-7)


# --------------------------------------------------------------------------- (c) Qwen unchanged
def test_qwen_keeps_its_digit_vocab(qwen_tok, dist_group, monkeypatch):
    from ntl_verl.batch import digit_targets
    from ntl_verl.loss import vocab_for_model

    import ntl

    vocab = vocab_for_model(model_config(qwen_tok, H.V))
    assert isinstance(vocab, ntl.DigitVocab)
    assert vocab.token_ids == tuple(H.DIGIT_IDS) and vocab.K == 10
    b = H.encode(qwen_tok)
    resp, mask = padded_responses(b)
    for mode in ("final_answer", "all"):
        t = digit_targets(resp, mask, b.ground_truths, qwen_tok, vocab, mode)
        for i, w in enumerate(H.expected_targets(qwen_tok, b, mode)):
            assert torch.equal(t[i, : len(w)], w)
    eng = H.make_engine(H.tiny_model(), qwen_tok, monkeypatch=monkeypatch, config=H.actor_config(ntl_weight=0.1))
    assert isinstance(eng.ntl_vocab, ntl.DigitVocab) and eng.ntl_vocab == vocab


# --------------------------------------------------------------------------- (d) refusals
def word_tokenizer(words: list[str]):
    """A real fast tokenizer (WordLevel, whitespace pre-tokenizer) over ``words`` + '[UNK]'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


def engine_init(tok, V, **ntl):
    """Run NTLEngineMixin.__init__ (what verl's worker runs when it builds the actor's engine) on a
    stand-in base engine that only stores its configs."""
    from ntl_verl.engine import NTLEngineMixin

    class BaseEngine:
        def __init__(self, model_config, engine_config, optimizer_config=None, checkpoint_config=None):
            self.model_config = model_config
            self.engine_config = engine_config

    class Engine(NTLEngineMixin, BaseEngine):
        pass

    cfg = H.actor_config(**ntl)
    return Engine(model_config(tok, V), cfg.engine)


def test_setup_refuses_a_tokenizer_without_number_tokens():
    from ntl_verl.loss import vocab_for_model

    tok = word_tokenizer(["The", "answer", "is", "####", "one", "two"])
    with pytest.raises(ValueError, match=r"NTL cannot run with this model.*no token whose text is an ASCII digit"):
        vocab_for_model(model_config(tok, 100))
    for kw in ({"ntl_weight": 0.1}, {"ntl_enabled": False, "extract_digit_info": True, "ntl_bonus_type": "all"}):
        with pytest.raises(ValueError, match=r"number tokens"):
            engine_init(tok, 100, **kw)
    engine_init(tok, 100, ntl_enabled=False)  # NTL off: nothing to refuse


def test_setup_refuses_a_tokenizer_that_writes_answers_outside_its_number_tokens():
    """Digits '0'..'9' exist as tokens, but '1234' is written as one unknown word: the probe
    answer gets no target, so NTL would see nothing; refused at engine init, for both modes."""
    tok = word_tokenizer(["The", "answer", "is", "####", *"0123456789"])
    assert len(tok.encode(" The answer is #### 1234", add_special_tokens=False)) == 5
    for labels in ("final_answer", "all"):
        with pytest.raises(ValueError, match=rf"NTL would see \(almost\) no target.*'{labels}' targets"):
            engine_init(tok, 100, ntl_labels=labels)


def test_setup_refuses_a_model_vocab_smaller_than_the_number_tokens(llama_tok):
    from ntl_verl.loss import vocab_for_model

    with pytest.raises(ValueError, match=r"vocab_size=1000 is too small"):
        vocab_for_model(model_config(llama_tok, 1000))
    with pytest.raises(ValueError, match=r"load_tokenizer"):
        vocab_for_model(model_config(None, H.LLAMA_V))


def test_engine_init_accepts_llama3_and_qwen(llama_tok, qwen_tok):
    import ntl

    for labels in ("final_answer", "all"):
        eng = engine_init(llama_tok, H.LLAMA_V, ntl_labels=labels, extract_digit_info=True, ntl_bonus_type="all")
        assert eng.ntl_vocab.K == 1110 and eng.ntl_vocab.is_multi_digit
    assert isinstance(engine_init(qwen_tok, H.V).ntl_vocab, ntl.DigitVocab)
