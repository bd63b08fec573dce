"""NTLGRPOTrainer on a tiny Qwen2 (TRL 1.16): metrics, values and updates against
independent computations from the model's full logits."""

import pytest
import torch
from trl_tiny import (
    char_tokenizer,
    crafted_batch,
    digit_count_reward,
    grads_of,
    ntl_through_compute_loss,
    params,
    sampled_digit_targets,
    tiny_dataset,
    tiny_qwen2,
    trainer_args,
    w1_from_full_logits,
    w1_with_targets,
)

trl = pytest.importorskip("trl")
pytest.importorskip("trl.trainer.grpo_trainer")
from ntl_trl import NTLConfig, NTLGRPOTrainer  # noqa: E402
from ntl_trl.trainer import NTL_ANSWERS_KEY, NTL_COUNT_KEY, NTL_TARGETS_KEY  # noqa: E402

TEMPERATURE = 0.7
ALL_SAMPLED = NTLConfig(ntl_weight=1.0, ntl_labels="all", correct_only=False)


def recording(cls):
    """``cls`` whose compute_loss records each micro-batch (and, optionally, a reference)."""

    class Recording(cls):
        def compute_loss(self, model, inputs, *args, **kwargs):
            self.batches.append({k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                 for k, v in inputs.items()})
            if self.with_reference:
                ref, n = w1_from_full_logits(model, inputs, self.processing_class, TEMPERATURE)
                self.reference.append((float(ref), n))
            return super().compute_loss(model, inputs, *args, **kwargs)

    return Recording


def make(cls, tmp_path, *, with_reference=False, **kw):
    tok = char_tokenizer()
    args_kw = {k: kw.pop(k) for k in list(kw) if k not in ("ntl_config", "callbacks")}
    args_kw.setdefault("temperature", TEMPERATURE)
    config = "RLOOConfig" if issubclass(cls, trl.RLOOTrainer) else "GRPOConfig"
    tr = recording(cls)(
        model=tiny_qwen2(tok), reward_funcs=digit_count_reward, processing_class=tok,
        train_dataset=tiny_dataset(), args=trainer_args(config, output_dir=str(tmp_path), **args_kw),
        **kw,
    )
    tr.batches, tr.reference, tr.with_reference = [], [], with_reference
    return tr


def test_three_steps_log_ntl_equal_to_full_logit_reference(tmp_path):
    tr = make(NTLGRPOTrainer, tmp_path, with_reference=True,
              ntl_config=NTLConfig(ntl_weight=0.3, ntl_labels="all", correct_only=False))
    tr.train()
    steps = [h for h in tr.state.log_history if "ntl/loss" in h]
    assert len(steps) == 3 and len(tr.reference) == 3
    for h, (ref, n) in zip(steps, tr.reference, strict=True):
        for key in ("ntl/loss", "ntl/digit_accuracy", "ntl/total_digits", "ntl/confidence"):
            assert key in h
        assert n > 0, "the tiny policy sampled no digit; the test needs some"
        assert h["ntl/total_digits"] == n
        assert h["ntl/loss"] == pytest.approx(ref, rel=1e-5, abs=1e-6)
        assert 0.0 <= h["ntl/digit_accuracy"] <= 1.0
        assert 0.1 <= h["ntl/confidence"] <= 1.0


def test_weight_zero_matches_plain_grpo_and_positive_weight_differs(tmp_path):
    runs = {}
    for name, cls, kw in [
        ("plain", trl.GRPOTrainer, {}),
        ("zero", NTLGRPOTrainer, {"ntl_config": NTLConfig(ntl_weight=0.0, ntl_labels="all",
                                                          correct_only=False)}),
        ("ntl", NTLGRPOTrainer, {"ntl_config": NTLConfig(ntl_weight=0.5, ntl_labels="all",
                                                         correct_only=False)}),
    ]:
        tr = make(cls, tmp_path / name, max_steps=2, **kw)
        tr.train()
        runs[name] = (params(tr.model), tr)
    plain, zero, with_ntl = runs["plain"][0], runs["zero"][0], runs["ntl"][0]
    for k in plain:
        assert torch.equal(plain[k], zero[k]), k
    assert any(not torch.allclose(plain[k], with_ntl[k]) for k in plain)
    # ntl_weight=0 still logs the metrics
    assert any("ntl/loss" in h for h in runs["zero"][1].state.log_history)


@pytest.mark.parametrize(("cls_name", "checkpointing"), [("GRPO", True), ("RLOO", False)])
def test_update_difference_is_weighted_ntl_gradient_with_grad_accumulation(
    tmp_path, cls_name, checkpointing
):
    """SGD, no clipping, 2 micro-batches accumulated: params(NTL) - params(plain) must be
    -lr * w * grad(sum of NTL over the window's digit targets / their count) at the initial
    weights (NTL from the full logits here).
    GRPO scales its loss for accumulation itself, RLOO leaves it to the HF Trainer: both
    paths of the mixin are covered (GRPO with gradient checkpointing, TRL's default)."""
    import ntl_trl

    plain_cls = getattr(trl, f"{cls_name}Trainer")
    ntl_cls = getattr(ntl_trl, f"NTL{cls_name}Trainer")
    lr, w = 0.5, 1.0
    common = dict(max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  learning_rate=lr, gradient_checkpointing=checkpointing)
    theta0 = tiny_qwen2(char_tokenizer())  # the same initial weights, never patched by TRL
    base = make(plain_cls, tmp_path / "plain", **common)  # (trainer init reseeds the RNG)
    for k, v in params(base.model).items():
        assert torch.equal(v, dict(theta0.named_parameters())[k])
    base.train()
    run = make(ntl_cls, tmp_path / "ntl", ntl_config=ALL_SAMPLED, **common)
    run.train()
    assert len(run.batches) == 2 and len(base.batches) == 2
    for a, b in zip(base.batches, run.batches, strict=True):
        assert torch.equal(a["completion_ids"], b["completion_ids"])  # same samples
    tok = run.processing_class
    sums = [w1_with_targets(theta0, mb, tok, TEMPERATURE, sampled_digit_targets(mb, tok),
                            requires_grad=True) for mb in run.batches]
    n_total = sum(n for _, n in sums)
    assert n_total > 0
    # the mean over every digit target of the accumulation window (not a mean of means)
    grad = grads_of(theta0, sum(s for s, _ in sums) / n_total)
    p_plain, p_ntl = params(base.model), params(run.model)
    for k in p_plain:
        expected = -lr * w * grad[k]
        torch.testing.assert_close(p_ntl[k] - p_plain[k], expected, rtol=1e-3, atol=2e-6, msg=k)
    assert max(g.abs().max() for g in grad.values()) > 1e-3
    logged = [h for h in run.state.log_history if "ntl/loss" in h]
    assert len(logged) == 1 and logged[0]["ntl/total_digits"] > 0


def _expected_w1(model, inputs, tok, targets, temperature=1.0):
    """targets: {(row, completion position): target digit}; mean W1 from the full logits."""
    total, n = w1_with_targets(model, inputs, tok, temperature, targets)
    return total / n


@pytest.mark.parametrize("labels", ["final_answer", "all"])
def test_targets_through_the_compute_path(tmp_path, labels):
    """final_answer: answer digits target the truth's digits by place value;
    all (correct_only): every digit of a correct completion targets itself, others none."""
    tok = char_tokenizer()
    tr = NTLGRPOTrainer(
        model=tiny_qwen2(tok), reward_funcs=digit_count_reward, processing_class=tok,
        train_dataset=tiny_dataset(), args=trainer_args(output_dir=str(tmp_path), temperature=1.0),
        ntl_config=NTLConfig(ntl_weight=1.0, ntl_labels=labels),
    )
    texts = ["ab 7 #### 12", "so #### 123"]
    inputs = crafted_batch(tok, texts)
    if labels == "final_answer":
        inputs[NTL_ANSWERS_KEY] = ["15", "15"]
        # row 0 "12" -> "15" (tens 1->1, units 2->5); row 1 "123" -> "015"
        targets = {(0, 10): 1, (0, 11): 5, (1, 8): 0, (1, 9): 1, (1, 10): 5}
    else:
        inputs[NTL_ANSWERS_KEY] = ["12", "12"]  # row 0 correct, row 1 ("123") wrong
        targets = {(0, 3): 7, (0, 10): 1, (0, 11): 2}
    for (b, t), _ in targets.items():
        assert texts[b][t].isdigit()
    loss, batch = ntl_through_compute_loss(tr, inputs)
    torch.testing.assert_close(loss, _expected_w1(tr.model, inputs, tok, targets),
                               rtol=1e-5, atol=1e-6)
    assert float(batch[NTL_COUNT_KEY]) == len(targets)
    assert tr._metrics["train"]["ntl/total_digits"] == [float(len(targets))]
    assert tr._metrics["train"]["ntl/answer_rate"] == [1.0]


def test_qwen_tokenizer_with_padded_model_vocab(tmp_path):
    """Qwen2.5's real tokenizer (151,665 entries) with a model vocab of 151,936 rows."""
    from ntl.tokenizers import qwen2_tokenizer

    tok = qwen2_tokenizer()
    torch.manual_seed(0)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    tr = NTLGRPOTrainer(
        model=model, reward_funcs=digit_count_reward, processing_class=tok,
        train_dataset=tiny_dataset(), args=trainer_args(output_dir=str(tmp_path), temperature=1.0),
        ntl_config=NTLConfig(ntl_weight=1.0, ntl_labels="final_answer"),
    )
    assert tr._ntl_vocab.token_ids == tuple(range(15, 25))
    inputs = crafted_batch(tok, ["The answer is #### 1,234"], prompt="Q: 1000+234?")
    assert inputs["completion_ids"][0, :10].tolist() == [785, 4226, 374, 26274, 220, 16, 11, 17,
                                                         18, 19]
    inputs[NTL_ANSWERS_KEY] = ["1239"]
    loss, _ = ntl_through_compute_loss(tr, inputs)
    # digits 1 2 3 4 at completion positions 5, 7, 8, 9 target 1 2 3 9
    expected = _expected_w1(tr.model, inputs, tok, {(0, 5): 1, (0, 7): 2, (0, 8): 3, (0, 9): 9})
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_final_answer_ground_truths_travel_with_their_completions(tmp_path):
    tr = make(NTLGRPOTrainer, tmp_path, max_steps=1, steps_per_generation=2,
              per_device_train_batch_size=4, gradient_accumulation_steps=2,
              ntl_config=NTLConfig(ntl_weight=0.1, ntl_labels="final_answer"))
    tr.train()
    ds = tiny_dataset()
    truth = dict(zip(ds["prompt"], ds["ground_truth"], strict=True))
    tok = tr.processing_class
    assert len(tr.batches) == 2
    from ntl.targets import build_digit_targets

    for mb in tr.batches:
        prompts = tok.batch_decode(mb["prompt_ids"], skip_special_tokens=True)
        assert [truth[p] for p in prompts] == list(mb[NTL_ANSWERS_KEY])
        # the targets built once for the generation batch stay with their own rows
        own = build_digit_targets(mb["completion_ids"], [truth[p] for p in prompts], tok,
                                  response_mask=mb["completion_mask"])
        assert torch.equal(mb[NTL_TARGETS_KEY], own)
    assert any("ntl/total_digits" in h for h in tr.state.log_history)


def test_missing_answer_column_is_an_error(tmp_path):
    tr = make(NTLGRPOTrainer, tmp_path, max_steps=1,
              ntl_config=NTLConfig(ntl_labels="final_answer", answer_column="solution"))
    with pytest.raises(KeyError, match="solution"):
        tr.train()


def test_digits_inside_tool_results_get_no_target(tmp_path):
    """tool_mask = 0 marks tool-result tokens: their digits neither count nor take part."""
    tok = char_tokenizer()
    tr = NTLGRPOTrainer(
        model=tiny_qwen2(tok), reward_funcs=digit_count_reward, processing_class=tok,
        train_dataset=tiny_dataset(), args=trainer_args(output_dir=str(tmp_path), temperature=1.0),
        ntl_config=NTLConfig(ntl_weight=1.0, ntl_labels="all", correct_only=False),
    )
    texts = ["ab 17 x 42"]  # "17" stands for a tool result, "42" is the model's
    inputs = crafted_batch(tok, texts)
    tool_mask = torch.ones_like(inputs["completion_ids"])
    tool_mask[0, 3:5] = 0
    inputs["tool_mask"] = tool_mask
    loss, batch = ntl_through_compute_loss(tr, inputs)
    assert float(batch[NTL_COUNT_KEY]) == 2
    torch.testing.assert_close(loss, _expected_w1(tr.model, inputs, tok, {(0, 8): 4, (0, 9): 2}),
                               rtol=1e-5, atol=1e-6)
