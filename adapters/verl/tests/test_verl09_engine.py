"""verl 0.9 NTL engine + loss against independent references (tiny Qwen2 on CPU, no Ray)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import verl_version

v = verl_version()
if v is None or v.release[:2] < (0, 9):
    pytest.skip("needs verl >= 0.9 (scripts/test_verl.sh runs this in its venv)", allow_module_level=True)

import harness as H  # noqa: E402
from harness import bonus_ref, expected_targets, ref_agg, ref_ntl, ref_ntl_digits  # noqa: E402

MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def batch(qwen_tok):
    return H.encode(qwen_tok)


def run_update(model, tok, monkeypatch, batch, *, ntl=None, rmpad=True, temperature=1.0, micro=2,
               dynamic=False, targets=None, stock=False, backward=True):
    """One verl forward_backward_batch of the update; returns (sum of micro-batch losses, out)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    cfg = H.actor_config(stock=stock, **(ntl or {}))
    eng = H.make_engine(model, tok, monkeypatch=monkeypatch, config=cfg, stock=stock)
    td = H.assign_update_meta(H.v1_batch(batch, with_targets=targets), rmpad=rmpad,
                              temperature=temperature, micro=micro)
    if dynamic:
        tu.assign_non_tensor(td, use_dynamic_bsz=True, max_token_len_per_gpu=40)
    model.zero_grad(set_to_none=True)
    out = eng.forward_backward_batch(td, functools.partial(ppo_loss, config=cfg), forward_only=not backward)
    return sum(out["loss"]), out


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("labels", ["final_answer", "all"])
def test_ntl_term_equals_shifted_reference(qwen_tok, batch, dist_group, monkeypatch, labels):
    model = H.tiny_model()
    tg = expected_targets(qwen_tok, batch, labels)
    w = 0.5
    l0, _ = run_update(model, qwen_tok, monkeypatch, batch, ntl={"ntl_weight": 0.0, "ntl_labels": labels})
    lw, out = run_update(model, qwen_tok, monkeypatch, batch, ntl={"ntl_weight": w, "ntl_labels": labels})
    ref = ref_ntl(model, batch, tg)
    unshifted = ref_ntl(model, batch, tg, shift=False)
    assert (lw - l0) / w == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert abs(unshifted - ref) > 1e-3 * max(1.0, ref)  # the shift matters
    assert abs((lw - l0) / w - unshifted) > 1e-3 * max(1.0, ref)
    m = out["metrics"]  # verl aggregates each over the micro-batches (SUM / MEAN as declared)
    n_digits = sum(int((t >= 0).sum()) for t in tg)
    assert m["ntl/total_digits"].aggregate() == n_digits
    assert m["ntl/loss"].aggregate() == pytest.approx(ref, rel=1e-4)  # the digit mean, not a mean of means
    for key, want in H.ref_digit_means(model, batch, tg).items():
        assert m[key].aggregate() == pytest.approx(want, rel=1e-4, abs=1e-6), key


def test_wasserstein_and_temperature(qwen_tok, batch, dist_group, monkeypatch):
    model = H.tiny_model(seed=1)
    tg = expected_targets(qwen_tok, batch, "final_answer")
    T = 0.6
    kw = {"ntl_method": "wasserstein"}
    l0, _ = run_update(model, qwen_tok, monkeypatch, batch, ntl={**kw, "ntl_weight": 0.0}, temperature=T)
    l1, _ = run_update(model, qwen_tok, monkeypatch, batch, ntl={**kw, "ntl_weight": 1.0}, temperature=T)
    ref_t = ref_ntl(model, batch, tg, method="wasserstein", temperature=T)
    ref_1 = ref_ntl(model, batch, tg, method="wasserstein", temperature=1.0)
    assert l1 - l0 == pytest.approx(ref_t, rel=1e-4)
    assert abs(ref_t - ref_1) > 1e-3


def test_padded_and_remove_padding_paths_agree(qwen_tok, batch, dist_group, monkeypatch):
    model = H.tiny_model(seed=2)
    kw = {"ntl_weight": 1.0}
    la, _ = run_update(model, qwen_tok, monkeypatch, batch, ntl=kw, rmpad=True, temperature=0.8)
    ga = grads(model)
    lb, _ = run_update(model, qwen_tok, monkeypatch, batch, ntl=kw, rmpad=False, temperature=0.8)
    gb = grads(model)
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6)


def test_weight_zero_is_exactly_stock_ppo_loss(qwen_tok, batch, dist_group, monkeypatch):
    model = H.tiny_model(seed=3)
    ls, _ = run_update(model, qwen_tok, monkeypatch, batch, stock=True)
    gs = grads(model)
    l0, out = run_update(model, qwen_tok, monkeypatch, batch, ntl={"ntl_weight": 0.0})
    g0 = grads(model)
    assert ls == l0
    assert gs.keys() == g0.keys()
    for n in gs:
        assert torch.equal(gs[n], g0[n]), n
    assert "ntl/loss" in out["metrics"]  # metrics still reported


def test_weight_changes_gradients_and_a_step_lowers_ntl(qwen_tok, batch, dist_group, monkeypatch):
    model = H.tiny_model(seed=4)
    tg = expected_targets(qwen_tok, batch, "final_answer")
    run_update(model, qwen_tok, monkeypatch, batch, ntl={"ntl_weight": 0.0})
    g0 = grads(model)
    before = ref_ntl(model, batch, tg)
    run_update(model, qwen_tok, monkeypatch, batch, ntl={"ntl_weight": 1.0})
    g1 = grads(model)
    digit_rows = g1["lm_head.weight"][H.DIGIT_IDS] - g0["lm_head.weight"][H.DIGIT_IDS]
    assert digit_rows.abs().max() > 1e-4
    other = g1["lm_head.weight"][1000:1010] - g0["lm_head.weight"][1000:1010]
    assert other.abs().max() < 1e-7  # NTL touches only the digit rows of the head
    assert (g1["model.layers.0.mlp.up_proj.weight"] - g0["model.layers.0.mlp.up_proj.weight"]).abs().max() > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.step()
    after = ref_ntl(model, batch, tg)
    assert after < before - 1e-3


def test_targets_from_old_log_prob_pass_survive_splits_and_dynamic_bsz(qwen_tok, batch, dist_group, monkeypatch):
    """The old-log-prob pass returns ntl_targets (per-sample field, as verl's TQ stores it);
    an update fed those targets, with static or dynamic micro-batches, gives the same loss."""
    from verl.utils import tensordict_utils as tu

    model = H.tiny_model(seed=5)
    cfg = H.actor_config(ntl_weight=1.0, ntl_labels="final_answer")
    eng = H.make_engine(model, qwen_tok, monkeypatch=monkeypatch, config=cfg)
    td = H.assign_update_meta(H.v1_batch(batch, stage="old_log_prob"), micro=2)
    tu.assign_non_tensor(td, calculate_entropy=True, compute_loss=False)
    out = eng.forward_backward_batch(td, None, forward_only=True)
    tg = out["model_output"]["ntl_targets"]
    assert tg.is_nested
    for got, want in zip(tg.unbind(), expected_targets(qwen_tok, batch, "final_answer"), strict=True):
        assert torch.equal(got, want)
    assert "ntl_digit_logits" not in out["model_output"]  # nothing big goes back to the trainer
    ref = ref_ntl(model, batch, expected_targets(qwen_tok, batch, "final_answer"))
    l0, _ = run_update(model, qwen_tok, monkeypatch, batch, ntl={"ntl_weight": 0.0}, targets=tg)
    for micro, dynamic in ((1, False), (4, False), (2, True)):
        l1, _ = run_update(model, qwen_tok, monkeypatch, batch, ntl={"ntl_weight": 1.0}, targets=tg,
                           micro=micro, dynamic=dynamic)
        l0m, _ = run_update(model, qwen_tok, monkeypatch, batch, ntl={"ntl_weight": 0.0}, targets=tg,
                            micro=micro, dynamic=dynamic)
        assert l1 - l0m == pytest.approx(ref, rel=1e-4), (micro, dynamic)
    assert l0 == pytest.approx(l0m, rel=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_bonus_reaches_token_level_scores_and_advantage(qwen_tok, batch, dist_group, monkeypatch, dynamic):
    from ntl_verl.batch import pad_responses
    from verl.trainer.ppo.core_algos import compute_gae_advantage_return
    from verl.utils import tensordict_utils as tu

    model = H.tiny_model(seed=6)
    T = 0.7
    cfg = H.actor_config(ntl_weight=0.1, extract_digit_info=True, ntl_bonus_type="final_answer",
                         ntl_bonus_weight=0.5)
    eng = H.make_engine(model, qwen_tok, monkeypatch=monkeypatch, config=cfg)
    td = H.assign_update_meta(H.v1_batch(batch, stage="old_log_prob"), micro=2, temperature=T)
    tu.assign_non_tensor(td, calculate_entropy=True, compute_loss=False)
    if dynamic:  # micro-batches regrouped by token count, outputs restored to batch order
        tu.assign_non_tensor(td, use_dynamic_bsz=True, max_token_len_per_gpu=40)
    rm_before = pad_responses(td["rm_scores"], None, 0.0).clone()
    out = eng.forward_backward_batch(td, None, forward_only=True)
    rm_after = out["model_output"]["rm_scores"]
    assert rm_after.is_nested
    rm_after = pad_responses(rm_after, rm_before.shape[1], 0.0)
    want = bonus_ref(model, batch, expected_targets(qwen_tok, batch, "final_answer"), temperature=T)
    mask = pad_responses(td["response_mask"], rm_before.shape[1], 0).float()
    lens = mask.sum(1).long()
    for i, n in enumerate(lens.tolist()):
        assert rm_after[i, n - 1] - rm_before[i, n - 1] == pytest.approx(0.5 * want[i], rel=1e-4, abs=1e-6)
        assert torch.equal(rm_after[i, : n - 1], rm_before[i, : n - 1])
    assert any(x > 0.01 for x in want)
    assert out["model_output"]["ntl_bonus"].reshape(-1).tolist() == pytest.approx(want, rel=1e-4, abs=1e-6)
    # the trainer's advantage step reads rm_scores as token_level_scores (gamma = lam = 1)
    values = torch.zeros_like(mask)
    # (returns = unwhitened GAE advantages + values; the advantages are whitened from them)
    _, ret_b = compute_gae_advantage_return(rm_after, values, mask, gamma=1.0, lam=1.0)
    _, ret_0 = compute_gae_advantage_return(rm_before, values, mask, gamma=1.0, lam=1.0)
    for i in range(len(want)):
        assert ret_b[i, 0] - ret_0[i, 0] == pytest.approx(0.5 * want[i], rel=1e-4, abs=1e-6)


def test_all_bonus_only_for_correct_responses(qwen_tok, batch, dist_group, monkeypatch):
    from ntl_verl.batch import pad_responses
    from verl.utils import tensordict_utils as tu

    model = H.tiny_model(seed=7)
    cfg = H.actor_config(ntl_enabled=False, extract_digit_info=True, ntl_bonus_type="all", ntl_bonus_weight=1.0)
    eng = H.make_engine(model, qwen_tok, monkeypatch=monkeypatch, config=cfg)
    td = H.assign_update_meta(H.v1_batch(batch, stage="old_log_prob"))
    tu.assign_non_tensor(td, calculate_entropy=True, compute_loss=False)
    rm_before = pad_responses(td["rm_scores"], None, 0.0).clone()
    out = eng.forward_backward_batch(td, None, forward_only=True)
    assert "ntl_targets" not in out["model_output"]  # NTL loss off: no training targets
    diff = pad_responses(out["model_output"]["rm_scores"], rm_before.shape[1], 0.0) - rm_before
    want = bonus_ref(model, batch, expected_targets(qwen_tok, batch, "all"))
    got = diff.sum(1).tolist()
    assert got[1] == 0.0  # sample 1 answers 45 for 42: no bonus
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    # the update logs the bonus as ntl/reward (NTL loss off: the loss itself is verl's)
    from verl.workers.utils.losses import ppo_loss

    upd = H.assign_update_meta(H.v1_batch(batch))
    upd["ntl_bonus"] = out["model_output"]["ntl_bonus"]
    res = eng.forward_backward_batch(upd, functools.partial(ppo_loss, config=cfg), forward_only=False)
    logged = res["metrics"]["ntl/reward"]  # MEAN over the two equal-sized micro-batches
    assert logged.aggregate() == pytest.approx(sum(want) / len(want), rel=1e-4)
    assert "ntl/loss" not in res["metrics"]


def test_reference_model_engine_is_stock(qwen_tok, batch, dist_group, monkeypatch):
    """An engine config without NTL settings (the reference model) runs verl's code unchanged."""
    from verl.utils import tensordict_utils as tu

    model = H.tiny_model(seed=8)
    eng = H.make_engine(model, qwen_tok, None, monkeypatch)
    td = H.assign_update_meta(H.v1_batch(batch, stage="old_log_prob"))
    tu.assign_non_tensor(td, calculate_entropy=True, compute_loss=False)
    out = eng.forward_backward_batch(td, None, forward_only=True)
    assert set(out["model_output"]) == {"log_probs", "entropy"}


def test_fused_kernel_path_matches_logits_path(qwen_tok, batch, dist_group, monkeypatch):
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    model = H.tiny_model(seed=9)
    tg = expected_targets(qwen_tok, batch, "final_answer")
    ref = ref_ntl(model, batch, tg, temperature=0.9)
    # verl patches model.__class__.forward: give this model its own class so the patch stays here
    model.__class__ = type("FusedQwen2ForCausalLM", (type(model),), {})
    apply_monkey_patch(model, use_fused_kernels=True, fused_kernels_backend="torch")
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    losses = {}
    for w in (0.0, 1.0):
        cfg = H.actor_config(ntl_weight=w)
        eng = H.make_engine(model, qwen_tok, monkeypatch=monkeypatch, config=cfg)
        td = H.assign_update_meta(H.v1_batch(batch), temperature=0.9, fused=True)
        tu.assign_non_tensor(td, use_fused_kernels=True)
        out = eng.forward_backward_batch(td, functools.partial(ppo_loss, config=cfg), forward_only=False)
        losses[w] = sum(out["loss"])
    assert losses[1.0] - losses[0.0] == pytest.approx(ref, rel=1e-4)


def test_explicit_ntl_ppo_loss_is_not_wrapped_twice(qwen_tok, batch, dist_group, monkeypatch):
    """worker.set_loss_fn(partial(ntl_ppo_loss, config=cfg)) gives the same loss as the engine's
    automatic wrapping of verl's ppo_loss (the NTL term is added once)."""
    import types

    from ntl_verl.loss import ntl_ppo_loss

    model = H.tiny_model(seed=10)
    auto, _ = run_update(model, qwen_tok, monkeypatch, batch, ntl={"ntl_weight": 1.0})
    cfg = H.actor_config(ntl_weight=1.0)
    cfg.model_config = types.SimpleNamespace(tokenizer=qwen_tok, hf_config=model.config)
    eng = H.make_engine(model, qwen_tok, monkeypatch=monkeypatch, config=cfg)
    td = H.assign_update_meta(H.v1_batch(batch))
    out = eng.forward_backward_batch(td, functools.partial(ntl_ppo_loss, config=cfg), forward_only=False)
    assert sum(out["loss"]) == pytest.approx(auto, rel=1e-6)


def test_legacy_trainer_layout_builds_targets_in_the_update(qwen_tok, batch, dist_group, monkeypatch):
    """trainer.use_v1=false: the batch arrives padded (DataProto -> left_right_2_no_padding) with
    no ntl_targets; the update builds them from responses + reward_model and adds the same NTL."""
    from harness import padded_batch
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import left_right_2_no_padding

    model = H.tiny_model(seed=14)
    ref = ref_ntl(model, batch, expected_targets(qwen_tok, batch, "all"))
    losses = {}
    for w in (0.0, 1.0):
        cfg = H.actor_config(ntl_weight=w, ntl_labels="all")
        eng = H.make_engine(model, qwen_tok, monkeypatch=monkeypatch, config=cfg)
        td = left_right_2_no_padding(padded_batch(batch))
        H.assign_update_meta(td)
        tu.assign_non_tensor(td, temperature=1.0)
        out = eng.forward_backward_batch(td, functools.partial(ppo_loss, config=cfg), forward_only=False)
        losses[w] = sum(out["loss"])
        assert not td["ntl_targets"].is_nested and td["ntl_targets"].shape == td["responses"].shape
    assert losses[1.0] - losses[0.0] == pytest.approx(ref, rel=1e-4)


# --------------------------------------------------------------------------- loss_agg_mode
def micro_horizons(batch, micro):
    """verl's default seq-mean-token-sum-norm horizon of each static micro-batch: its longest response."""
    lens = [len(r) for r in batch.responses]
    return [max(lens[i:i + micro]) for i in range(0, len(lens), micro)]


@pytest.mark.parametrize("mode", MODES)
def test_ntl_is_aggregated_like_the_policy_loss(qwen_tok, batch, dist_group, monkeypatch, mode):
    """labels='all': sample 1 (wrong answer) has no digit targets, so S = 3 < B = 4 sequences.
    The NTL term equals verl's own agg_loss over the whole batch with the digit mask (its counts
    taken on the mask) and the hand formula, for any micro-batching; ntl/loss logs exactly it."""
    from verl.trainer.ppo.core_algos import agg_loss

    model = H.tiny_model(seed=20)
    tg = expected_targets(qwen_tok, batch, "all")
    per = ref_ntl_digits(model, batch, tg)
    assert sum(1 for r in per if r) == 3
    lsf = 7.0 if mode == "seq-mean-token-sum-norm" else None
    want = ref_agg(per, mode, horizon=lsf)
    # verl's agg_loss on [B, R] per-digit NTL with the digit mask, whole batch, no global counts
    R = max(len(r) for r in batch.responses)
    mat, dmask = torch.zeros(len(tg), R), torch.zeros(len(tg), R)
    for i, (t, vals) in enumerate(zip(tg, per, strict=True)):
        pos = (t >= 0).nonzero().flatten()
        mat[i, pos] = torch.tensor(vals)
        dmask[i, pos] = 1.0
    verl_value = float(agg_loss(mat, dmask, mode, loss_scale_factor=lsf))
    assert verl_value == pytest.approx(want, rel=1e-5)
    kw = {"ntl_labels": "all", "loss_agg_mode": mode, "loss_scale_factor": lsf, "ntl_weight": 0.5}
    for micro, dynamic in ((1, False), (4, False), (2, True)):
        total, out = run_update(model, qwen_tok, monkeypatch, batch, ntl=kw, micro=micro, dynamic=dynamic)
        policy = out["metrics"]["actor/pg_loss"].aggregate()  # entropy_coeff 0, no KL: loss = pg + w L_NTL
        assert (total - policy) / 0.5 == pytest.approx(want, rel=1e-4), (micro, dynamic)
        assert out["metrics"]["ntl/loss"].aggregate() == pytest.approx(want, rel=1e-4), (micro, dynamic)
    if mode == "token-mean":
        assert want == pytest.approx(ref_ntl(model, batch, tg), rel=1e-6)


def test_norm_mode_without_scale_factor_uses_verls_micro_batch_horizon(qwen_tok, batch, dist_group, monkeypatch):
    """loss_scale_factor unset: verl divides by the padded response length of each micro-batch; so
    does the NTL term (sum over micro-batches of sum_digits / (S * H_mb))."""
    model = H.tiny_model(seed=21)
    tg = expected_targets(qwen_tok, batch, "final_answer")
    per = ref_ntl_digits(model, batch, tg)
    S = sum(1 for r in per if r)
    kw = {"ntl_labels": "final_answer", "loss_agg_mode": "seq-mean-token-sum-norm"}
    for micro in (1, 4):
        horizons = micro_horizons(batch, micro)
        want = sum(sum(map(sum, per[j * micro:(j + 1) * micro])) / (S * h) for j, h in enumerate(horizons))
        l0, _ = run_update(model, qwen_tok, monkeypatch, batch, ntl={**kw, "ntl_weight": 0.0}, micro=micro)
        l1, _ = run_update(model, qwen_tok, monkeypatch, batch, ntl={**kw, "ntl_weight": 1.0}, micro=micro)
        assert l1 - l0 == pytest.approx(want, rel=1e-4), micro
    assert len(set(micro_horizons(batch, 1))) > 1  # the micro-batches really differ in width


# --------------------------------------------------------------------------- fail loudly
def test_stock_engine_with_the_ntl_config_fails_at_the_first_loss(qwen_tok, batch, dist_group, monkeypatch):
    """An NTLActorConfig actor whose engine is verl's own (VERL_ENGINE_* override, another plugin, a
    custom worker) would train plain PPO: the config's global_batch_info check stops it."""
    from verl.workers.utils.losses import ppo_loss

    model = H.tiny_model(seed=22)
    cfg = H.actor_config(ntl_weight=0.1)
    eng = H.make_engine(model, qwen_tok, monkeypatch=monkeypatch, config=cfg, stock=True)
    td = H.assign_update_meta(H.v1_batch(batch))
    with pytest.raises(RuntimeError, match="not ntl_verl's NTLFSDPEngineWithLMHead"):
        eng.forward_backward_batch(td, functools.partial(ppo_loss, config=cfg), forward_only=False)
    ok = H.make_engine(model, qwen_tok, monkeypatch=monkeypatch, config=cfg)  # the NTL engine: fine
    ok.forward_backward_batch(H.assign_update_meta(H.v1_batch(batch)), functools.partial(ppo_loss, config=cfg),
                              forward_only=False)
    import copy
    import pickle

    for clone in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):  # copies keep the check
        assert type(clone.global_batch_info).__name__ == "NTLEngineCheck"


def bonus_config(**kw):
    return H.actor_config(ntl_weight=0.1, extract_digit_info=True, ntl_bonus_type="final_answer", **kw)


def test_bonus_without_an_old_log_prob_pass_fails_at_the_first_update(qwen_tok, batch, dist_group, monkeypatch):
    from verl.workers.utils.losses import ppo_loss

    cfg = bonus_config()
    eng = H.make_engine(H.tiny_model(seed=23), qwen_tok, monkeypatch=monkeypatch, config=cfg)
    td = H.assign_update_meta(H.v1_batch(batch))  # bypass mode: no old-log-prob pass, no ntl_bonus
    with pytest.raises(RuntimeError, match=r"algorithm\.rollout_correction\.bypass_mode=true"):
        eng.forward_backward_batch(td, functools.partial(ppo_loss, config=cfg), forward_only=False)


def old_pass(batch, *, stage, entropy):
    from verl.utils import tensordict_utils as tu

    td = H.assign_update_meta(H.v1_batch(batch, stage=stage))
    tu.assign_non_tensor(td, calculate_entropy=entropy, compute_loss=False)
    return td


def test_old_log_prob_pass_signals_must_agree_with_the_bonus_on(qwen_tok, batch, dist_group, monkeypatch):
    eng = H.make_engine(H.tiny_model(seed=24), qwen_tok, monkeypatch=monkeypatch, config=bonus_config())
    for stage, entropy in (("old_log_prob", False), ("update", True)):
        with pytest.raises(RuntimeError, match="cannot tell whether this forward-only actor pass"):
            eng.forward_backward_batch(old_pass(batch, stage=stage, entropy=entropy), None, forward_only=True)


def test_reference_pass_through_the_actor_adds_no_bonus(qwen_tok, batch, dist_group, monkeypatch):
    """ref_in_actor (LoRA): the reference pass runs on the actor's engine after the old-log-prob
    pass (batch has old_log_probs, calculate_entropy=False): stock outputs, rm_scores untouched."""
    eng = H.make_engine(H.tiny_model(seed=25), qwen_tok, monkeypatch=monkeypatch, config=bonus_config())
    out = eng.forward_backward_batch(old_pass(batch, stage="update", entropy=False), None, forward_only=True)
    assert set(out["model_output"]) == {"log_probs"}


def test_a_second_old_log_prob_pass_would_add_the_bonus_twice(qwen_tok, batch, dist_group, monkeypatch):
    eng = H.make_engine(H.tiny_model(seed=26), qwen_tok, monkeypatch=monkeypatch, config=bonus_config())
    td = old_pass(batch, stage="old_log_prob", entropy=True)
    out = eng.forward_backward_batch(td, None, forward_only=True)
    again = old_pass(batch, stage="old_log_prob", entropy=True)
    again["ntl_bonus"] = out["model_output"]["ntl_bonus"]
    with pytest.raises(RuntimeError, match="would add the bonus twice"):
        eng.forward_backward_batch(again, None, forward_only=True)
