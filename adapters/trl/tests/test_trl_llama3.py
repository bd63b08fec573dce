"""The TRL adapter with Llama-3's real tokenizer (numbers in tokens of up to three digits):
every route uses the model's whole number vocabulary (K = 1,110 number tokens '0'..'999').

A tiny Llama (hidden 16, one layer) with Llama-3's 128,256-row head. Expected values are
computed here from the model's full logits: the causal shift by hand, a softmax over the
1,110 number-token columns listed by hand (every width-1..3 digit string) and
``W1 = sum_k q_k |v_k - y|`` (GRPO, callback), or :func:`ntl.ntl_loss` with the NumberVocab
on the shifted logits (SFT). Targets are written out by hand from the issue's rule: a
final-answer token covering places ``[p, p + w)`` targets the truth's digits there,
zero-padded (``'123' '4'`` vs 1299 -> ``'129' '9'``; ``'999'`` vs 1299 -> ``'299'``;
``'42'`` vs 7 -> ``'07'``).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl_tiny import (
    char_tokenizer,
    constant_reward,
    params,
    script_generate,
    tiny_qwen2,
    trainer_args,
)

import ntl
from ntl.tokenizers import QWEN2_5_VOCAB_SIZE, llama3_tokenizer, qwen2_tokenizer

trl = pytest.importorskip("trl")
pytest.importorskip("trl.trainer.grpo_trainer")
from ntl_trl import (  # noqa: E402
    NTLCallback,
    NTLConfig,
    NTLGRPOTrainer,
    NTLRLOOTrainer,
    NTLSFTConfig,
    NTLSFTTrainer,
    NTLTrainer,
)
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

V = 128_256  # Llama-3's vocabulary
NO_NUMBERS = r"no target.*no token whose text is an ASCII digit string"
T, LR = 0.7, 0.5
#: Llama-3's number tokens by hand: every digit string of width 1, 2 and 3 is one token.
NUMBER_TEXTS = [str(i) for i in range(10)] + [f"{i:02d}" for i in range(100)] + [f"{i:03d}" for i in range(1000)]

# Completions the tiny policy "writes" (scripted generate) and the ground truths.
SCRIPT = {"12+30=": ["so #### 1234", "x 3 #### 999"], "9-4=": ["#### 42", "none"]}
TRUTH = {"12+30=": "1299", "9-4=": "7"}
# final_answer: {completion: {position: (token text, target text)}} (positions in Llama-3 tokens)
FINAL_ANSWER = {
    "so #### 1234": {3: ("123", "129"), 4: ("4", "9")},  # 'so' 'Ġ####' 'Ġ' '123' '4'
    "x 3 #### 999": {5: ("999", "299")},  # 'x' 'Ġ' '3' 'Ġ####' 'Ġ' '999': the '3' gets none
    "#### 42": {2: ("42", "07")},  # '####' 'Ġ' '42'
    "none": {},
}
# all labels (the callback): every number token targets itself
ALL = {
    "so #### 1234": {3: ("123", "123"), 4: ("4", "4")},
    "x 3 #### 999": {2: ("3", "3"), 5: ("999", "999")},
    "#### 42": {2: ("42", "42")},
    "none": {},
}


def llama_tok():
    """A copy of Llama-3's tokenizer (the shared one stays untouched) with a pad token."""
    tok = copy.deepcopy(llama3_tokenizer())
    tok.pad_token = "<|reserved_special_token_0|>"
    return tok


def tiny_llama(tok, seed: int = 0, hidden: int = 16, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        tie_word_embeddings=tied, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    ))


def number_ids(tok) -> list[int]:
    ids = tok.convert_tokens_to_ids(NUMBER_TEXTS)
    assert None not in ids and len(set(ids)) == 1110
    return ids


def assert_llama3_number_vocab(vocab, tok):
    assert isinstance(vocab, ntl.NumberVocab) and not isinstance(vocab, ntl.DigitVocab)
    assert vocab.K == 1110 and vocab.vocab_size == V
    assert sorted(vocab.token_ids) == sorted(number_ids(tok))
    assert vocab.texts is not None and set(vocab.texts) == set(NUMBER_TEXTS)


class Rec(NTLGRPOTrainer):
    """Keeps every micro-batch compute_loss sees."""

    batches: list

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.batches.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
        return super().compute_loss(model, inputs, *args, **kwargs)


class RecGRPO(trl.GRPOTrainer):
    batches: list

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.batches.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
        return super().compute_loss(model, inputs, *args, **kwargs)


def grpo(tmp_path, cls, tok, model, **kw):
    ds = Dataset.from_dict({"prompt": list(SCRIPT), "ground_truth": [TRUTH[p] for p in SCRIPT]})
    script_generate(model, tok, SCRIPT)
    extra = {k: kw.pop(k) for k in list(kw) if k in ("ntl_config", "callbacks", "ntl_vocab")}
    tr = cls(model=model, reward_funcs=constant_reward, processing_class=tok, train_dataset=ds,
             args=trainer_args(output_dir=str(tmp_path), temperature=T, learning_rate=LR,
                               num_generations=2, max_steps=1, **kw), **extra)
    tr.batches = []
    return tr


def hand_targets(mb, tok, table) -> dict[tuple[int, int], int]:
    """{(row, completion position): target value} of a recorded micro-batch from ``table``,
    checking that each listed position holds the listed token."""
    out = {}
    for b, text in enumerate(tok.batch_decode(mb["completion_ids"], skip_special_tokens=True)):
        for t, (src, tgt) in table[text].items():
            assert tok.convert_ids_to_tokens(int(mb["completion_ids"][b, t])) == src, (text, t)
            out[(b, t)] = int(tgt)
    return out


def w1_sum(model, mb, tok, targets, temperature):
    """sum over ``targets`` of ``sum_k q_k |v_k - y|``, q = softmax over the 1,110 number
    columns of the full logits at position P + t - 1, divided by the temperature."""
    ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)
    am = torch.cat([mb["prompt_mask"], mb["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=am).logits.float()
    P = mb["prompt_ids"].shape[1]
    cols = torch.tensor(number_ids(tok))
    vals = torch.tensor([float(int(s)) for s in NUMBER_TEXTS])
    terms = []
    for (b, t), y in targets.items():
        q = torch.softmax(logits[b, P + t - 1, cols] / temperature, -1)
        terms.append((q * (vals - y).abs()).sum())
    return torch.stack(terms).sum(), len(terms)


def reference_update(tok, theta0, mb, targets, weight):
    """``-LR * weight * grad(mean W1)`` at the parameters ``theta0``, from the full logits."""
    ref = tiny_llama(tok)
    missing, unexpected = ref.load_state_dict(theta0, strict=False)  # parameters only
    assert not unexpected and not set(missing) & set(dict(ref.named_parameters()))
    total, n = w1_sum(ref, mb, tok, targets, T)
    ref.zero_grad()
    (weight * total / n).backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in ref.named_parameters()}
    return total.detach() / n, {k: -LR * g for k, g in grads.items()}


def check_update(tr, theta0, mb, tok, table, weight):
    targets = hand_targets(mb, tok, table)
    mean, expected = reference_update(tok, theta0, mb, targets, weight)
    after = params(tr.model)
    for k in theta0:
        torch.testing.assert_close(after[k] - theta0[k], expected[k], rtol=1e-3, atol=2e-6, msg=k)
    # the NTL gradient reaches the LM-head rows of multi-digit tokens ('123', the target
    # '129', ...), and only number-token rows
    delta = (after["lm_head.weight"] - theta0["lm_head.weight"]).abs().sum(-1)
    for text in ("123", "129", "999", "42", "07"):
        assert float(delta[tok.convert_tokens_to_ids(text)]) > 1e-5, text
    others = torch.ones(V, dtype=torch.bool)
    others[number_ids(tok)] = False
    assert float(delta[others].max()) == 0.0
    return targets, mean


# -- (a) GRPO ----------------------------------------------------------------------------
def test_grpo_final_answer_targets_every_number_token(tmp_path):
    """NTLGRPOTrainer, final_answer: the logged count, the targets (multi-digit tokens
    aligned by place value), the logged NTL and the update all follow the hand reference."""
    tok, w = llama_tok(), 1.0
    tr = grpo(tmp_path, Rec, tok, tiny_llama(tok), per_device_train_batch_size=4,
              ntl_config=NTLConfig(ntl_weight=w, ntl_labels="final_answer"))
    assert_llama3_number_vocab(tr._ntl_vocab, tok)
    theta0 = params(tr.model)
    tr.train()
    (mb,) = tr.batches
    targets, mean = check_update(tr, theta0, mb, tok, FINAL_ANSWER, w)
    assert len(targets) == 4
    want = torch.full_like(mb["ntl_targets"], -100)
    for b, t in targets:
        want[b, t] = tok.convert_tokens_to_ids(FINAL_ANSWER[tok.decode(
            mb["completion_ids"][b], skip_special_tokens=True)][t][1])
    assert torch.equal(mb["ntl_targets"], want)  # '129', '9', '299', '07' and nothing else
    log = next(h for h in tr.state.log_history if "ntl/loss" in h)
    assert log["ntl/total_digits"] == 4
    assert log["ntl/loss"] == pytest.approx(float(mean), rel=1e-5)
    assert log["ntl/loss"] > 1.0  # values 0..999: far from the silent zero
    assert log["ntl/answer_rate"] == pytest.approx(0.75)


# -- (c) the callback and RLOO resolve the model's whole number vocabulary ----------------
def test_callback_scores_every_sampled_number_token(tmp_path):
    """NTLCallback on a plain GRPOTrainer with Llama-3: all labels over the 1,110 number
    tokens; logged count and NTL and the update equal the hand reference."""
    tok, w = llama_tok(), 1.0
    cb = NTLCallback(ntl_weight=w)
    tr = grpo(tmp_path, RecGRPO, tok, tiny_llama(tok), per_device_train_batch_size=4, callbacks=[cb])
    theta0 = params(tr.model)
    tr.train()
    assert cb._vocab is not None
    assert_llama3_number_vocab(cb._vocab, tok)
    (mb,) = tr.batches
    targets, mean = check_update(tr, theta0, mb, tok, ALL, w)
    assert len(targets) == 5
    log = next(h for h in tr.state.log_history if "ntl/loss" in h)
    assert log["ntl/total_digits"] == 5
    assert log["ntl/loss"] == pytest.approx(float(mean), rel=1e-5)


def test_rloo_and_callback_resolve_llama3_numbers_and_qwen_digits(tmp_path):
    ltok = llama_tok()
    ds = Dataset.from_dict({"prompt": ["1+1="], "ground_truth": ["2"]})
    rloo = NTLRLOOTrainer(model=tiny_llama(ltok), reward_funcs=constant_reward, processing_class=ltok,
                          train_dataset=ds, args=trainer_args("RLOOConfig", output_dir=str(tmp_path / "r")))
    assert_llama3_number_vocab(rloo._ntl_vocab, ltok)
    qtok = qwen2_tokenizer()
    from sft_tiny import tiny_qwen

    rq = NTLRLOOTrainer(model=tiny_qwen(qtok), reward_funcs=constant_reward, processing_class=qtok,
                        train_dataset=ds, args=trainer_args("RLOOConfig", output_dir=str(tmp_path / "q")))
    digits = qtok.convert_tokens_to_ids(list("0123456789"))
    assert isinstance(rq._ntl_vocab, ntl.DigitVocab)
    assert list(rq._ntl_vocab.token_ids) == digits and rq._ntl_vocab.vocab_size == QWEN2_5_VOCAB_SIZE
    # the callback resolves the same at on_train_begin (and cleans up at on_train_end)
    resolved = {}
    for name, tok, model in (("llama", ltok, tiny_llama(ltok)), ("qwen", qtok, tiny_qwen(qtok))):
        plain = trl.GRPOTrainer(model=model, reward_funcs=constant_reward, processing_class=tok,
                                train_dataset=ds, args=trainer_args(output_dir=str(tmp_path / name)))
        cb = NTLCallback().attach(plain)
        cb.on_train_begin(plain.args, plain.state, plain.control, model=plain.model, processing_class=tok)
        resolved[name] = cb._vocab
        cb.on_train_end(plain.args, plain.state, plain.control)
    assert_llama3_number_vocab(resolved["llama"], ltok)
    assert isinstance(resolved["qwen"], ntl.DigitVocab) and list(resolved["qwen"].token_ids) == digits
    # the plain HF Trainer route (NTLTrainer) too
    ht = NTLTrainer(model=tiny_llama(ltok), processing_class=ltok,
                    args=TrainingArguments(output_dir=str(tmp_path / "h"), use_cpu=True, report_to=[]))
    assert_llama3_number_vocab(ht._ntl_vocab, ltok)


# -- (b) SFT -----------------------------------------------------------------------------
SFT_ROWS = {
    "prompt": ["What is 1200+34?\n", "What is 7*8?\n"],
    "completion": ["1200+34 = 1234\n#### 1234", "7*8 = 56\n#### 56"],
}


def test_sft_ntl_covers_every_number_token_and_equals_ntl_loss(tmp_path):
    """One NTLSFTTrainer step on completions with multi-digit numbers: the logged NTL is the
    mean of ntl.ntl_loss (NumberVocab, shifted full logits) over the supervised number tokens,
    the loss is CE + 0.3 x that, and the count is the number tokens of the completions."""
    from sft_tiny import record

    tok, w = llama_tok(), 0.3
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to=[], max_steps=1,
        per_device_train_batch_size=2, logging_steps=1, save_strategy="no", seed=0, optim="sgd",
        learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        disable_tqdm=True, dataset_num_proc=None,
    )
    tr = NTLSFTTrainer(model=tiny_llama(tok), args=args, train_dataset=Dataset.from_dict(SFT_ROWS),
                       processing_class=tok, ntl_config=NTLSFTConfig(w, "wasserstein"))
    assert_llama3_number_vocab(tr._ntl_vocab, tok)
    rec, snaps = record(tr)
    tr.train()
    (log,) = [h for h in tr.state.log_history if "loss" in h and "step" in h]
    (batch,) = rec.batches
    model = tiny_llama(tok)
    model.load_state_dict(snaps.states[0])
    model.config.use_cache = False
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels") and v is not None}
    with torch.no_grad():
        logits = model(**inputs).logits.float()[:, :-1]
    labels = batch["labels"][:, 1:]
    vocab = ntl.NumberVocab(number_ids(tok), [int(s) for s in NUMBER_TEXTS], V)  # by hand, no texts
    s = ntl.ntl_loss(logits, labels, vocab, method="wasserstein", reduction="sum", backend="torch")
    n = int(torch.isin(labels, torch.tensor(number_ids(tok))).sum())
    # the completions' number tokens: '120' '0' '34' '123' '4' '123' '4' and '7' '8' '56' '56'
    assert n == 11
    ce = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert float(s) > 0
    assert log["ntl/total_digits"] == n
    assert log["ntl/loss"] == pytest.approx(float(s) / n, rel=1e-4, abs=1e-5)
    assert log["loss"] == pytest.approx(float(ce) + w * float(s) / n, rel=1e-5, abs=1e-5)


# -- (d) refusals ----------------------------------------------------------------------------
def test_setups_where_ntl_could_see_no_target_are_refused(tmp_path):
    letters = char_tokenizer(chars="abcdefgh =?\n")  # no number token at all
    ds = Dataset.from_dict({"prompt": ["abc="], "ground_truth": ["d"]})

    def rl(tok, model, cls=NTLGRPOTrainer, sub="g", **kw):
        config = "RLOOConfig" if issubclass(cls, trl.RLOOTrainer) else "GRPOConfig"
        return cls(model=model, reward_funcs=constant_reward, processing_class=tok, train_dataset=ds,
                   args=trainer_args(config, output_dir=str(tmp_path / sub)), **kw)

    for labels in ("all", "final_answer"):
        with pytest.raises(ValueError, match=NO_NUMBERS):
            rl(letters, tiny_qwen2(letters), ntl_config=NTLConfig(ntl_labels=labels, correct_only=False))
    with pytest.raises(ValueError, match=NO_NUMBERS):
        rl(letters, tiny_qwen2(letters), cls=NTLRLOOTrainer, sub="r")
    plain = rl(letters, tiny_qwen2(letters), cls=trl.GRPOTrainer, sub="p")
    cb = NTLCallback().attach(plain)
    with pytest.raises(ValueError, match=NO_NUMBERS):
        cb.on_train_begin(plain.args, plain.state, plain.control, model=plain.model, processing_class=letters)
    cb.on_train_end(plain.args, plain.state, plain.control)
    with pytest.raises(ValueError, match=NO_NUMBERS):
        NTLSFTTrainer(model=tiny_qwen2(letters), processing_class=letters,
                      train_dataset=Dataset.from_dict({"prompt": ["ab"], "completion": ["cd"]}),
                      args=trl.SFTConfig(output_dir=str(tmp_path / "s"), use_cpu=True, report_to=[]))

    # a NumberVocab without token texts: fine for 'all' (the tokens target themselves, used as
    # is), refused for 'final_answer' (the width of '12' vs '1' is unknown)
    tok = char_tokenizer()
    model = tiny_qwen2(tok)
    digit = [tok.get_vocab()[d] for d in "0123456789"]
    no_texts = ntl.NumberVocab([*digit, 3], [*range(10), 12], model.config.vocab_size)
    tr = rl(tok, model, ntl_vocab=no_texts, ntl_config=NTLConfig(ntl_labels="all", correct_only=False))
    assert tr._ntl_vocab is no_texts
    with pytest.raises(ValueError, match=r"final_answer.*texts"):
        rl(tok, tiny_qwen2(tok), ntl_vocab=no_texts, ntl_config=NTLConfig(ntl_labels="final_answer"))
    # ... as is a vocab whose ids lie outside the LM head, or not a NumberVocab at all
    with pytest.raises(ValueError, match="LM head has only"):
        rl(tok, tiny_qwen2(tok), ntl_vocab=ntl.NumberVocab([100], [1], 200))
    with pytest.raises(TypeError, match="ntl_vocab"):
        rl(tok, tiny_qwen2(tok), ntl_vocab=tok)
