"""Legacy verl 0.7.x DataParallelPPOActor mixin: the same behaviour tests, tiny Qwen2 on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import verl_version

v = verl_version()
if v is None or v.release[:2] != (0, 7):
    pytest.skip("needs verl 0.7.x (scripts/test_verl.sh runs this in its second venv)", allow_module_level=True)

import harness as H  # noqa: E402
from harness import VALUES, expected_targets, ref_ntl  # noqa: E402


@pytest.fixture(scope="module")
def batch(qwen_tok):
    return H.encode(qwen_tok)


@pytest.fixture(autouse=True)
def cpu_bert_padding(monkeypatch):
    """verl 0.7's remove-padding helpers dispatch to flash_attn.bert_padding (CUDA only); plain-torch
    stand-ins with the same semantics let the real verl code run on CPU."""
    import verl.utils.attention_utils as au

    def rearrange(x, pattern):
        if pattern.replace(" ", "") != "bs...->(bs)...":
            raise NotImplementedError(pattern)
        return x.reshape(-1, *x.shape[2:])

    def unpad_input(hidden, attention_mask):
        seqlens = attention_mask.sum(-1, dtype=torch.int32)
        indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
        cu = torch.nn.functional.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
        flat = hidden.reshape(-1, *hidden.shape[2:])
        return flat[indices], indices, cu, int(seqlens.max()), seqlens

    def pad_input(hidden_states, indices, batch, seqlen):
        out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
        out[indices] = hidden_states
        return out.view(batch, seqlen, *hidden_states.shape[1:])

    funcs = (lambda x, idx: x[idx], pad_input, rearrange, unpad_input)
    monkeypatch.setattr(au, "_get_attention_functions", lambda: funcs)


def legacy_config(ntl: dict | None = None, **extra):
    """verl 0.7's actor config as its worker builds it; ``ntl=None``: the stock FSDPActorConfig."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    target = "verl.workers.config.FSDPActorConfig" if ntl is None else "ntl_verl.legacy.NTLLegacyActorConfig"
    cfg = {
        "_target_": target, "strategy": "fsdp", "rollout_n": 1, "ppo_mini_batch_size": 4,
        "ppo_micro_batch_size_per_gpu": 2, "use_torch_compile": False, "grad_clip": 1e9, "ppo_epochs": 1,
        "fsdp_config": {"_target_": "verl.workers.config.FSDPEngineConfig", "dtype": "float32"},
        **(ntl or {}), **extra,
    }
    return omega_conf_to_dataclass(OmegaConf.create(cfg))


def make_actor(model, tok, monkeypatch, ntl=None, rmpad=True, lr=0.0):
    import verl.workers.actor.dp_actor as dp
    from ntl_verl.legacy import NTLDataParallelPPOActor

    monkeypatch.setattr(dp, "get_device_id", lambda: "cpu")
    cfg = legacy_config(ntl)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    actor = NTLDataParallelPPOActor(config=cfg, actor_module=model, actor_optimizer=opt)
    actor.use_remove_padding = rmpad
    actor.device_name = "cpu"
    actor.param_dtype = torch.float32
    actor.ntl_tokenizer = tok
    return actor


def data_proto(b: H.Batch, temperature=1.0, seed=0):
    import numpy as np
    from tensordict import TensorDict
    from verl.protocol import DataProto

    input_ids, attn, pos, P, R = H.padded(b)
    n = len(b.prompts)
    responses = input_ids[:, P:]
    rmask = attn[:, P:]
    g = torch.Generator().manual_seed(seed)
    batch = TensorDict({
        "prompts": input_ids[:, :P], "responses": responses, "input_ids": input_ids,
        "attention_mask": attn, "position_ids": pos, "response_mask": rmask,
        "old_log_probs": (-torch.rand(n, R, generator=g) - 0.5) * rmask,
        "advantages": torch.randn(n, R, generator=g) * rmask,
    }, batch_size=[n])
    rm = np.array([{"ground_truth": gt} for gt in b.ground_truths], dtype=object)
    return DataProto(batch=batch, non_tensor_batch={"reward_model": rm}, meta_info={"temperature": temperature})


def grads_of_ntl_only(actor, dp, temperature):
    """Gradients that the injected term alone sends (policy loss replaced by 0 * log_probs)."""
    from ntl_verl.legacy import SCALE_KEY

    d = dp.batch
    mb = {k: d[k] for k in d.keys()}  # noqa: SIM118 - TensorDict
    actor.actor_module.zero_grad(set_to_none=True)
    actor._ntl_stats = []
    out = actor._forward_micro_batch({**mb, SCALE_KEY: mb[SCALE_KEY]}, temperature=temperature)
    (out["log_probs"] * 0.0).sum().backward()
    return {n: p.grad.clone() for n, p in actor.actor_module.named_parameters() if p.grad is not None}


def prepare(actor, dp):
    """Run the mixin's target/scale preparation (what update_policy does first)."""
    from ntl_verl.batch import digit_targets, ground_truths_from
    from ntl_verl.legacy import SCALE_KEY

    mask = dp.batch["response_mask"].bool()
    gts = ground_truths_from(dp.non_tensor_batch["reward_model"], len(mask))
    t = digit_targets(dp.batch["responses"], mask, gts, actor.ntl_tokenizer, actor.ntl_vocab,
                      actor.config.ntl_labels)
    dp.batch["ntl_targets"] = t
    n = (t >= 0).sum().float()
    dp.batch[SCALE_KEY] = torch.full((len(t),), 1.0) / n
    return t


def ntl_ref_grads(model, b, targets, temperature, w):
    """Autograd gradients of w * mean NTL computed from plain full logits (independent)."""
    model.zero_grad(set_to_none=True)
    input_ids, attn, pos, P, _ = H.padded(b)
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits.float()
    total, n = 0.0, 0
    for i, t in enumerate(targets):
        for j in range(len(t)):
            if t[j] < 0:
                continue
            q = torch.softmax(logits[i, P + j - 1, H.DIGIT_IDS] / temperature, -1)
            total = total + (q @ VALUES - float(t[j] - 15)) ** 2
            n += 1
    (w * total / n).backward()
    return {nm: p.grad.clone() for nm, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("rmpad", [True, False])
def test_injected_gradient_equals_shifted_reference(qwen_tok, batch, dist_group, monkeypatch, rmpad):
    model = H.tiny_model(seed=11, attn="sdpa")
    T = 0.8
    actor = make_actor(model, qwen_tok, monkeypatch, ntl={"ntl_weight": 0.7}, rmpad=rmpad)
    dp = data_proto(batch, T)
    t = prepare(actor, dp)
    want_t = expected_targets(qwen_tok, batch, "final_answer")
    R = t.shape[1]
    for i, w in enumerate(want_t):
        assert torch.equal(t[i, : len(w)], w) and bool((t[i, len(w):] == -100).all())
    g = grads_of_ntl_only(actor, dp, T)
    gref = ntl_ref_grads(model, batch, want_t, T, 0.7)
    for n in gref:
        torch.testing.assert_close(g[n], gref[n], rtol=1e-3, atol=1e-6 * max(1.0, float(gref[n].abs().max())))
    stats = actor._ntl_stats[-1]
    assert stats["ntl/loss"] == pytest.approx(ref_ntl(model, batch, want_t, temperature=T), rel=1e-4)
    assert abs(stats["ntl/loss"] - ref_ntl(model, batch, want_t, temperature=T, shift=False)) > 1e-3
    assert max(len(r) for r in batch.responses) == R


def test_weight_zero_is_exactly_stock_update(qwen_tok, batch, dist_group, monkeypatch):
    m1, m2 = H.tiny_model(seed=12, attn="sdpa"), H.tiny_model(seed=12, attn="sdpa")
    stock = make_actor(m1, qwen_tok, monkeypatch, ntl=None, lr=0.1)
    zero = make_actor(m2, qwen_tok, monkeypatch, ntl={"ntl_weight": 0.0}, lr=0.1)
    ms = stock.update_policy(data_proto(batch))
    mz = zero.update_policy(data_proto(batch))
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n
    assert ms["actor/pg_loss"] == mz["actor/pg_loss"]
    assert "ntl/loss" in mz and "ntl/total_digits" in mz


@pytest.mark.parametrize("dynamic", [False, True])
def test_update_step_lowers_ntl(qwen_tok, batch, dist_group, monkeypatch, dynamic):
    """One update_policy step (static or dynamic micro-batches: the NTL columns follow verl's
    regrouping) lowers NTL, more than the same step without NTL."""
    model = H.tiny_model(seed=13, attn="sdpa")
    want_t = expected_targets(qwen_tok, batch, "final_answer")
    before = ref_ntl(model, batch, want_t)
    dyn = {"use_dynamic_bsz": True, "ppo_max_token_len_per_gpu": 40} if dynamic else {}
    m0 = H.tiny_model(seed=13, attn="sdpa")
    make_actor(m0, qwen_tok, monkeypatch, ntl={"ntl_weight": 0.0, **dyn}, lr=0.05).update_policy(data_proto(batch))
    actor = make_actor(model, qwen_tok, monkeypatch, ntl={"ntl_weight": 5.0, **dyn}, lr=0.05)
    assert actor.use_dynamic_bsz is dynamic
    metrics = actor.update_policy(data_proto(batch))
    # one mini-batch: one entry each, the digit-weighted mean over it (not a mean of micro-batch means)
    assert metrics["ntl/total_digits"] == [sum(int((t >= 0).sum()) for t in want_t)]
    assert metrics["ntl/loss"] == [pytest.approx(before, rel=1e-4)]
    for key, want in H.ref_digit_means(model0 := H.tiny_model(seed=13, attn="sdpa"), batch, want_t).items():
        assert metrics[key] == [pytest.approx(want, rel=1e-4, abs=1e-6)], key
    del model0
    after = ref_ntl(model, batch, want_t)
    assert after < before - 1e-3
    assert after < ref_ntl(m0, batch, want_t) - 1e-3  # lower than the same step without NTL


def test_minibatch_metrics_over_epochs_and_minibatches(qwen_tok, batch, dist_group, monkeypatch):
    """2 mini-batches x 2 epochs (lr 0: the model does not move): four entries, each its
    mini-batch's digit mean, whatever the micro-batching."""
    model = H.tiny_model(seed=15, attn="sdpa")
    want_t = expected_targets(qwen_tok, batch, "final_answer")
    halves = [H.Batch(batch.prompts[i:i + 2], batch.responses[i:i + 2], batch.ground_truths[i:i + 2])
              for i in (0, 2)]
    want = [ref_ntl(model, h, want_t[i:i + 2]) for h, i in zip(halves, (0, 2), strict=True)]
    assert abs(want[0] - want[1]) > 1e-3
    actor = make_actor(model, qwen_tok, monkeypatch, ntl={"ntl_weight": 1.0, "ppo_epochs": 2,
                                                          "ppo_mini_batch_size": 2, "ppo_micro_batch_size_per_gpu": 1})
    metrics = actor.update_policy(data_proto(batch))
    assert metrics["ntl/loss"] == [pytest.approx(x, rel=1e-4) for x in want * 2]


def test_bad_values_fail_naming_the_key():
    with pytest.raises(Exception, match=r"actor_rollout_ref\.actor\.ntl_method"):
        legacy_config({"ntl_method": "l2"})
    with pytest.raises(Exception, match=r"actor_rollout_ref\.actor\.loss_agg_mode='seq-mean-token-mean'"):
        legacy_config({"loss_agg_mode": "seq-mean-token-mean"})
    with pytest.raises(Exception, match=r"ntl_bonus_type"):
        legacy_config({"extract_digit_info": True, "ntl_bonus_type": "final_answer"})


def test_install_swaps_the_worker_actor_class():
    import verl.workers.actor as actor_pkg
    from ntl_verl.legacy import NTLDataParallelPPOActor

    assert actor_pkg.DataParallelPPOActor is NTLDataParallelPPOActor


# --------------------------------------------------------------------------- Llama-3 number tokens
def test_llama3_update_counts_and_scores_number_tokens(dist_group, monkeypatch):
    """Llama-3 (numbers in tokens of up to three digits): the legacy actor uses all 1,110 number
    tokens; one update_policy logs ntl/total_digits = the hand count of number-token targets and
    ntl/loss = the float64 mean of (sum_k q_k v_k - y)^2 over them."""
    from ntl.tokenizers import llama3_tokenizer

    tok = llama3_tokenizer()
    b = H.encode_llama(tok)
    model = H.tiny_llama(seed=16)
    want_t = H.llama_expected_targets(tok, "final_answer")
    terms = H.ref_number_terms(model, b, want_t, H.number_table(tok))
    flat = [x for row in terms for x in row]
    actor = make_actor(model, tok, monkeypatch, ntl={"ntl_weight": 0.0, "ppo_mini_batch_size": len(b.prompts)})
    assert actor.ntl_vocab.K == 1110 and actor.ntl_vocab.is_multi_digit
    metrics = actor.update_policy(data_proto(b))
    assert metrics["ntl/total_digits"] == [sum(int((t >= 0).sum()) for t in want_t)] == [12]
    assert metrics["ntl/loss"] == [pytest.approx(sum(x["loss"] for x in flat) / len(flat), rel=1e-4)]


def test_a_tokenizer_without_number_tokens_is_refused_when_the_actor_is_built(monkeypatch):
    from ntl_verl.legacy import NTLDataParallelPPOActor
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "The": 1, "answer": 2, "####": 3}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    bad = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    monkeypatch.setattr(NTLDataParallelPPOActor, "ntl_tokenizer", bad)
    with pytest.raises(ValueError, match=r"NTL cannot run with this model.*no token whose text is an ASCII digit"):
        make_actor(H.tiny_model(seed=17), bad, monkeypatch, ntl={"ntl_weight": 0.1})
    make_actor(H.tiny_model(seed=17), bad, monkeypatch, ntl=None)  # the stock actor (reference policy): fine
