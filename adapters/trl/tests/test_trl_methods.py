"""DEL and DIST² in the TRL adapter: ``NTLConfig`` / ``NTLSFTConfig(ntl_method=...)`` with a
name or an ``ntl.methods`` object, on the GRPO mixin (``final_answer`` targets), the supervised
mixin (``NTLTrainer``) and the callback.

Every expected value comes from the model's full logits (the causal shift by hand) and a float64
formula written here: DEL ``pw (1/10) sum_k q_k BCE(sigmoid(z_k), [k = y])`` with place weights
``pw`` written by hand (integer place ``p``: ``2 (p + 1)``; ``d``-th decimal: ``1.02^-(d + 1)``),
DIST² ``KL(t || q)``, ``t = softmax(-(k - y)^2 / tau)``; and ``ntl.ntl_loss`` on the same logits.
With zero advantages the GRPO loss is ``ntl_weight * NTL`` alone, so its gradient is NTL's.
"""

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl_tiny import (
    char_tokenizer,
    constant_reward,
    crafted_batch,
    digit_ids,
    grads_of,
    ntl_through_compute_loss,
    tiny_qwen2,
    trainer_args,
)

import ntl
from ntl.methods import DEL, DIST2, MSE

trl = pytest.importorskip("trl")
pytest.importorskip("trl.trainer.grpo_trainer")
from ntl_trl import NTLCallback, NTLConfig, NTLGRPOTrainer, NTLSFTConfig  # noqa: E402
from ntl_trl.supervised import NTLTrainer  # noqa: E402
from ntl_trl.trainer import NTL_ANSWERS_KEY, NTL_TARGETS_KEY  # noqa: E402

T = 0.7

# Completions, truths and their final-answer targets {completion position: (digit, place weight)}
# (the char tokenizer: one token per character; '.' is the answer's decimal point).
TEXTS = ["x 3 #### 12.5", "so #### 142", "#### 0.75"]
TRUTHS = ["12.7", "42", "0.8"]
EXPECTED = [
    {9: (1, 4.0), 10: (2, 2.0), 12: (7, 1.02 ** -2)},  # 12.5 vs 12.7; the 3 is no answer digit
    {8: (0, 6.0), 9: (4, 4.0), 10: (2, 2.0)},  # hundreds has no counterpart in 42 -> 0
    {5: (0, 2.0), 7: (8, 1.02 ** -2), 8: (0, 1.02 ** -3)},
]


def del_f64(z, y, pw):
    """DEL of digit logits ``z [n, 10]`` (float64): ``pw (1/10) sum_k q_k BCE(sigmoid(z_k), [k = y])``."""
    z = z.double()
    q = torch.softmax(z, -1)
    onehot = F.one_hot(y, 10).double()
    b = F.softplus(z) - onehot * z  # -[k=y] log sigmoid(z_k) - [k!=y] log(1 - sigmoid(z_k))
    return pw.double() * (q * b).sum(-1) / 10


def dist2_f64(z, y, tau):
    k = torch.arange(10, dtype=torch.float64)
    logt = torch.log_softmax(-(k[None] - y[:, None].double()) ** 2 / tau, -1)
    return (logt.exp() * (logt - torch.log_softmax(z.double(), -1))).sum(-1)


def reference(model, inputs, tok, method, expected, temperature=T):
    """``(mean, terms)``: the float64 formula over the hand targets, from the full logits."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=am).logits
    P = inputs["prompt_ids"].shape[1]
    dig = digit_ids(tok)
    z, y, pw = [], [], []
    for b, tg in enumerate(expected):
        for t, (d, w) in tg.items():
            z.append(logits[b, P + t - 1, dig] / temperature)  # position t-1 predicts token t
            y.append(d)
            pw.append(w)
    z, y, pw = torch.stack(z), torch.tensor(y), torch.tensor(pw, dtype=torch.float64)
    if isinstance(method, DEL):
        terms = del_f64(z, y, pw if method.place_weights else torch.ones_like(pw))
    else:
        terms = dist2_f64(z, y, method.tau)
    return terms.mean(), terms


def grpo(tmp_path, method, weight=1.0, labels="final_answer"):
    tok = char_tokenizer()
    tr = NTLGRPOTrainer(model=tiny_qwen2(tok), reward_funcs=constant_reward, processing_class=tok,
                        train_dataset=Dataset.from_dict({"prompt": ["a"], "ground_truth": ["1"]}),
                        args=trainer_args(output_dir=str(tmp_path), temperature=T),
                        ntl_config=NTLConfig(ntl_weight=weight, ntl_method=method, ntl_labels=labels))
    return tr, tok


METHODS = [DEL(), DEL(place_weights=False), DIST2(), DIST2(tau=2.0)]


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_grpo_final_answer_loss_metric_and_gradient_equal_the_formula(tmp_path, method):
    w = 0.5
    tr, tok = grpo(tmp_path, method, weight=w)
    inputs = crafted_batch(tok, TEXTS)
    inputs[NTL_ANSWERS_KEY] = TRUTHS
    loss, batch = ntl_through_compute_loss(tr, inputs)
    ref, terms = reference(tr.model, inputs, tok, method, EXPECTED)
    assert len(terms) == 9
    torch.testing.assert_close(loss.double(), w * ref, rtol=1e-5, atol=1e-7)
    assert tr._metrics["train"]["ntl/loss"][-1] == pytest.approx(float(ref.detach()), rel=1e-5)
    assert tr._metrics["train"]["ntl/total_digits"][-1] == 9
    # the gradient reaches the policy: equal to the formula's, parameter by parameter
    got = grads_of(tr.model, loss)
    want = grads_of(tr.model, (w * reference(tr.model, inputs, tok, method, EXPECTED)[0]).float())
    assert any(g.abs().max() > 0 for g in got.values())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-7, msg=k)
    # with place weights the targets keep the answer's '.', so a core loss over them sees the
    # decimals; other methods get the targets as they were
    dot = tok.convert_tokens_to_ids(".")
    tg = batch[NTL_TARGETS_KEY]
    kept = dot if method.place_weighted else -100
    assert int(tg[0, 11]) == kept and int(tg[2, 6]) == kept and int(tg[0, 3]) == -100


@pytest.mark.parametrize("method", ["del", "dist2"])
def test_grpo_equals_ntl_loss_on_the_shifted_logits(tmp_path, method):
    """By name; the core's ntl_loss on the model's logits with the trainer's targets as labels
    (the tokenizer gives DEL its '.'), per position."""
    tr, tok = grpo(tmp_path, method)
    inputs = crafted_batch(tok, TEXTS)
    inputs[NTL_ANSWERS_KEY] = TRUTHS
    loss, batch = ntl_through_compute_loss(tr, inputs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    P, C = inputs["prompt_ids"].shape[1], inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logits = tr.model(input_ids=ids).logits[:, P - 1 : P + C - 1] / T
    core = ntl.ntl_loss(logits, batch[NTL_TARGETS_KEY], tok, method=method)
    torch.testing.assert_close(loss.detach(), core, rtol=1e-5, atol=1e-7)
    assert isinstance(tr._ntl_method, DEL if method == "del" else DIST2)
    if method == "del":
        assert tr._ntl_method.decimal_point() == tok.convert_tokens_to_ids(".")
    # and the formula: the place weights are the hand ones (decimals included)
    ref, _ = reference(tr.model, inputs, tok, tr._ntl_method, EXPECTED)
    torch.testing.assert_close(core.double(), ref.detach(), rtol=1e-5, atol=1e-7)


def test_grpo_del_place_weights_follow_the_answer_not_the_selected_rows(tmp_path):
    """The number-token rows are selected before the digit logits; DEL's place weights must
    come from the whole rows: with every answer digit in one run of selected rows, the
    weights would be those of one long number (and differ)."""
    tr, tok = grpo(tmp_path, "del")
    inputs = crafted_batch(tok, TEXTS)
    inputs[NTL_ANSWERS_KEY] = TRUTHS
    loss, _ = ntl_through_compute_loss(tr, inputs)
    ref, terms = reference(tr.model, inputs, tok, DEL(), EXPECTED)
    unweighted = reference(tr.model, inputs, tok, DEL(place_weights=False), EXPECTED)[1]
    pw = torch.tensor([w for tg in EXPECTED for _, w in tg.values()], dtype=torch.float64)
    torch.testing.assert_close(terms, pw * unweighted)
    one_run = 2.0 * torch.arange(9, 0, -1, dtype=torch.float64)  # places 8..0 of a 9-digit run
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert float((one_run * unweighted.detach()).mean()) != pytest.approx(float(loss.detach()), rel=0.05)


# -- the supervised mixin ------------------------------------------------------------------------
SFT_TEXTS = ["q 12.5 and 30 x", "r 0.75 b 8"]


def sft_batch(tok):
    rows = [[*tok(t).input_ids, tok.eos_token_id] for t in SFT_TEXTS]
    L = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (L - len(r)) for r in rows])
    labels = ids.masked_fill(ids == tok.pad_token_id, -100)
    labels[:, :2] = -100  # the "prompt"
    return {"input_ids": ids, "attention_mask": (ids != tok.pad_token_id).long(), "labels": labels}


# {text: {position of the label: (digit, place weight)}}: 12.5 -> 4, 2, 1.02^-2; 30 -> 4, 2; ...
SFT_EXPECTED = [
    {2: (1, 4.0), 3: (2, 2.0), 5: (5, 1.02 ** -2), 11: (3, 4.0), 12: (0, 2.0)},
    {2: (0, 2.0), 4: (7, 1.02 ** -2), 5: (5, 1.02 ** -3), 9: (8, 2.0)},
]


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_sft_loss_metric_and_gradient_equal_the_formula(tmp_path, method):
    from transformers import TrainingArguments

    tok = char_tokenizer()
    w = 0.3
    tr = NTLTrainer(model=tiny_qwen2(tok), processing_class=tok,
                    args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                    ntl_config=NTLSFTConfig(w, method))
    tr.model.train()
    batch = sft_batch(tok)
    loss = tr.compute_loss(tr.model, dict(batch))
    logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    dig = digit_ids(tok)
    z, y, pw = [], [], []
    for b, tg in enumerate(SFT_EXPECTED):
        for t, (d, pwt) in tg.items():
            assert int(batch["labels"][b, t]) == dig[d]
            z.append(logits[b, t - 1, dig])
            y.append(d)
            pw.append(pwt)
    z, y, pw = torch.stack(z), torch.tensor(y), torch.tensor(pw, dtype=torch.float64)
    if isinstance(method, DEL):
        terms = del_f64(z, y, pw if method.place_weights else torch.ones_like(pw))
    else:
        terms = dist2_f64(z, y, method.tau)
    ref = terms.mean()
    torch.testing.assert_close(loss.double(), ce.double() + w * ref, rtol=1e-5, atol=1e-6)
    core = ntl.ntl_loss(logits[:, :-1], batch["labels"][:, 1:], tok, method=method)
    torch.testing.assert_close(core.double(), ref, rtol=1e-5, atol=1e-7)
    sums = tr._ntl_sums["train"]
    assert float(sums[0]) == len(terms)
    assert float(sums[1] / sums[0]) == pytest.approx(float(ref.detach()), rel=1e-5)
    got = grads_of(tr.model, loss)
    want = grads_of(tr.model, (ce.double() + w * ref).float())
    assert any(g.abs().max() > 0 for g in got.values())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


# -- the callback ------------------------------------------------------------------------------
def test_callback_takes_a_method_object_and_binds_the_decimal_point(tmp_path):
    tok = char_tokenizer()
    cb = NTLCallback(0.1, DIST2(tau=2.0))
    assert cb.ntl_method == DIST2(tau=2.0)
    cb2 = NTLCallback(0.1, "del")
    tr = trl.GRPOTrainer(model=tiny_qwen2(tok), reward_funcs=constant_reward, processing_class=tok,
                         train_dataset=Dataset.from_dict({"prompt": ["a"]}),
                         args=trainer_args(output_dir=str(tmp_path), temperature=T), callbacks=[cb2])
    cb2.attach(tr)
    cb2.on_train_begin(tr.args, tr.state, tr.control, model=tr.model, processing_class=tok)
    try:
        assert cb2._method == DEL(decimal_point_id=tok.convert_tokens_to_ids("."))
    finally:
        cb2.on_train_end(tr.args, tr.state, tr.control, model=tr.model)


# -- refusals -------------------------------------------------------------------------------------
def test_config_takes_names_and_objects_and_refuses_bad_ones():
    assert NTLConfig(ntl_method="del").ntl_method == "del"
    assert NTLSFTConfig(ntl_method="dist2").ntl_method == "dist2"
    assert NTLConfig(ntl_method=DIST2(tau=2.0)).ntl_method == DIST2(tau=2.0)
    assert NTLSFTConfig(ntl_method=DEL(place_weights=False)).ntl_method == DEL(place_weights=False)
    with pytest.raises(ValueError, match="must be one of"):
        NTLConfig(ntl_method="dell")
    with pytest.raises(ValueError, match="must be one of"):
        NTLSFTConfig(ntl_method="DEL")
    with pytest.raises(ValueError, match="tau must be a positive finite number"):
        NTLConfig(ntl_method=DIST2(tau=0.0))
    with pytest.raises(TypeError, match="place_weights must be a bool"):
        NTLSFTConfig(ntl_method=DEL(place_weights="yes"))  # type: ignore[arg-type]


def test_del_place_weights_refused_at_construction_without_token_widths(tmp_path):
    """A multi-digit vocab without its tokens' texts cannot place DEL's digits: refused when the
    trainer is built, not at the first step; DEL(place_weights=False) and DIST2 run with it."""
    tok = char_tokenizer()
    ids = digit_ids(tok)
    vocab = ntl.NumberVocab([*ids, tok.convert_tokens_to_ids("a")], [*range(10), 10],
                            vocab_size=len(tok))  # no texts: widths unknown
    kw = dict(reward_funcs=constant_reward, processing_class=tok,
              train_dataset=Dataset.from_dict({"prompt": ["a"]}),
              args=trainer_args(output_dir=str(tmp_path), temperature=T))
    with pytest.raises(ValueError, match="place weights need each number token's digit width"):
        NTLGRPOTrainer(model=tiny_qwen2(tok), ntl_vocab=vocab, **kw,
                       ntl_config=NTLConfig(ntl_method="del", ntl_labels="all", correct_only=False))
    for ok in (DEL(place_weights=False), DIST2(), MSE()):
        tr = NTLGRPOTrainer(model=tiny_qwen2(tok), ntl_vocab=vocab, **kw,
                            ntl_config=NTLConfig(ntl_method=ok, ntl_labels="all", correct_only=False))
        assert tr._ntl_method == ok
