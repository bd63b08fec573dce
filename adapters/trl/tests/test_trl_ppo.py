"""NTLCallback on ``trl.experimental.ppo.PPOTrainer`` (TRL <= 1.12; run in the trl 1.12 venv).

PPO computes full logits and passes no labels; the callback finds the completion from the
prompt width of the last ``generate`` call. With SGD and one PPO micro-batch, the policy
update with the callback minus the update without it must be ``-lr * w * grad NTL`` at
the initial weights, NTL computed here from the full logits of the recorded batch.
"""

import pytest
import torch
from trl_tiny import DIGITS, char_tokenizer, grads_of, params, tiny_qwen2

pytest.importorskip("trl.experimental.ppo", reason="PPOTrainer exists in TRL <= 1.12 only")
from ntl_trl import NTLCallback
from transformers import Qwen2ForSequenceClassification
from trl.experimental.ppo import PPOConfig, PPOTrainer  # pyright: ignore[reportMissingImports]

PROMPTS = ["12+30=", "100-1="]  # same length: no left padding, the prompt width is 6
LR, W, T = 0.5, 1.0, 0.7


def _head_model(policy, seed):
    torch.manual_seed(seed)
    cfg = policy.config.__class__(**{**policy.config.to_dict(), "num_labels": 1})
    return Qwen2ForSequenceClassification(cfg)


def _run(tmp_path, callbacks):
    from datasets import Dataset

    tok = char_tokenizer()
    tok.padding_side = "left"
    policy, ref = tiny_qwen2(tok), tiny_qwen2(tok)
    rm, vm = _head_model(policy, 1), _head_model(policy, 2)
    ds = Dataset.from_dict({"input_ids": [tok(p).input_ids for p in PROMPTS]})
    args = PPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[],
        per_device_train_batch_size=2, gradient_accumulation_steps=1, num_mini_batches=1,
        total_episodes=2, response_length=16, num_ppo_epochs=1, num_sample_generations=0,
        local_rollout_forward_batch_size=2, seed=42, optim="sgd", learning_rate=LR,
        temperature=T, logging_steps=1, save_strategy="no", disable_tqdm=True,
    )
    tr = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                    value_model=vm, train_dataset=ds, callbacks=callbacks)
    seen = []

    def record(module, a, kw):  # the test's own record of the policy's training forward
        if torch.is_grad_enabled():
            seen.append({k: kw[k].clone() for k in ("input_ids", "attention_mask", "position_ids")})

    h = policy.register_forward_pre_hook(record, with_kwargs=True)
    tr.train()
    h.remove()
    return tr, policy, seen


def test_callback_on_ppo_changes_the_update_by_the_ntl_gradient(tmp_path):
    _, p_base, seen_base = _run(tmp_path / "plain", None)
    run, p_ntl, seen = _run(tmp_path / "ntl", [NTLCallback(ntl_weight=W)])
    assert len(seen) == len(seen_base) == 1
    batch = seen[0]
    # same samples (PPO shuffles the rows of its micro-batch with numpy; the losses are
    # means over all rows, so the order does not matter)
    def rows(x):
        return sorted(map(tuple, x.tolist()))

    assert rows(batch["input_ids"]) == rows(seen_base[0]["input_ids"])

    tok = char_tokenizer()
    theta0 = tiny_qwen2(tok)
    logits = theta0(**batch).logits.float()
    dig = [tok.convert_tokens_to_ids(d) for d in DIGITS]
    P = len(PROMPTS[0])
    ids, am = batch["input_ids"], batch["attention_mask"]
    terms = []
    for b in range(ids.shape[0]):
        for t in range(P, ids.shape[1]):
            if am[b, t] and int(ids[b, t]) in dig:
                q = torch.softmax(logits[b, t - 1, dig] / T, -1)
                y = dig.index(int(ids[b, t]))
                terms.append(sum(q[k] * abs(k - y) for k in range(10)))
    assert terms, "the tiny policy sampled no digit; the test needs some"
    grad = grads_of(theta0, torch.stack(terms).mean())

    after_base, after_ntl = params(p_base), params(p_ntl)
    for k in after_base:
        torch.testing.assert_close(after_ntl[k] - after_base[k], -LR * W * grad[k],
                                   rtol=1e-3, atol=2e-6, msg=k)
    assert any(not torch.allclose(after_ntl[k], after_base[k]) for k in after_base)
    logs = [h for h in run.state.log_history if "ntl/loss" in h]
    assert len(logs) == 1
    assert logs[0]["ntl/total_digits"] == len(terms)
    assert logs[0]["ntl/loss"] == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
