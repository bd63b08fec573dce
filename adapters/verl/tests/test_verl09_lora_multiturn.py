"""Multi-turn / tool-calling responses and LoRA with verl 0.9's NTL engine.

**Multi-turn** (tiny Qwen2 on CPU, the engine without FSDP, as ``test_verl09_engine``): verl's
agent loop concatenates the policy's turns and the tool outputs into one response and marks the
tokens the policy did not generate with ``response_mask = 0``. The samples below have digits (even
a ``#### N`` answer) inside the tool output; by hand, with Qwen2.5's digit tokens ``'0'..'9'`` =
ids 15..24:

* ``final_answer`` targets are the digits of the *policy's* final answer (the truth's digits by
  place value), ``all`` targets every digit of the policy's turns of a response whose policy answer
  is right; a digit inside a tool output is never a target, and the answer is read from the
  policy's tokens only (sample 1: the policy answers 18, the tool says 17 = the truth: wrong, so
  no ``all`` targets). ``ntl/total_digits`` counts the policy's digits only, ``ntl/loss`` is the
  token-mean ``(sum_k q_k k - y)^2`` over them from full logits (``harness.ref_ntl_digits``).
* the digit bonus lands where verl puts the sequence score: the last response token that exists
  (``valid_response_length - 1``, verl's ``RewardManagerBase.assemble_rm_scores`` called on the
  padded layout), which for a trajectory ending in tool tokens is a ``response_mask = 0`` token.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import verl_version

v = verl_version()
if v is None or v.release[:2] < (0, 9):
    pytest.skip("needs verl >= 0.9 (scripts/test_verl.sh runs this in its venv)", allow_module_level=True)

import harness as H  # noqa: E402

DIGITS = range(15, 25)  # Qwen2.5's '0'..'9'

# (prompt, [(segment text, response_mask), ...], ground truth, policy digits targeted in
#  final_answer: {segment: truth digits}, all: segments whose digits are targets)
MT_SAMPLES = [
    ("Q: 12 * 12?",
     [(" I compute 12*12 with the tool.", 1), ("<tool_response>12*12 = 144; #### 999</tool_response>", 0),
      (" So #### 144", 1)],
     "144", {2: "144"}, [0, 2]),
    # ends in a tool output (masked), whose '#### 17' is the truth; the policy's answer 18 is wrong
    ("Q: 9 + 8?",
     [(" The answer is #### 18", 1), ("<tool_response>checked: #### 17</tool_response>", 0)],
     "17", {0: "17"}, []),
    ("Q: 7 + 8?", [(" 7 plus 8 is 15. #### 15", 1)], "15", {0: "15"}, [0]),
    ("Q: 6 * 7?", [(" Calling the tool.", 1), ("<tool_response>6*7 = 42</tool_response>", 0), (" #### 42", 1)],
     "42", {2: "42"}, [0, 2]),
]


def encode_mt(tok):
    """Prompts, responses (segments encoded one by one and concatenated, as the agent loop does),
    response masks and per-segment position ranges."""
    P, R, M, spans = [], [], [], []
    for prompt, segs, *_ in MT_SAMPLES:
        P.append(torch.tensor(tok.encode(prompt), dtype=torch.long))
        ids, mask, sp = [], [], []
        for text, m in segs:
            t = tok.encode(text)
            sp.append(range(len(ids), len(ids) + len(t)))
            ids += t
            mask += [m] * len(t)
        R.append(torch.tensor(ids, dtype=torch.long))
        M.append(torch.tensor(mask, dtype=torch.int64))
        spans.append(sp)
    assert max(int(t.max()) for t in P + R) < H.V
    return H.Batch(P, R, [s[2] for s in MT_SAMPLES]), M, spans


def hand_targets(tok, mode):
    """Targets by hand from the segment table: digit tokens (ids 15..24) of the listed policy
    segments; final_answer: the last len(truth digits) digits of the segment get the truth's digits
    (all truths here are as long as the policy's answers)."""
    b, _, spans = encode_mt(tok)
    out = []
    for (_, _, _, fa, al), r, sp in zip(MT_SAMPLES, b.responses, spans, strict=True):
        t = torch.full((len(r),), -100)
        if mode == "final_answer":
            for seg, digits in fa.items():
                pos = [j for j in sp[seg] if int(r[j]) in DIGITS][-len(digits):]
                for j, d in zip(pos, digits, strict=True):
                    t[j] = 15 + int(d)
        else:
            for seg in al:
                for j in sp[seg]:
                    if int(r[j]) in DIGITS:
                        t[j] = r[j]
        out.append(t)
    return out


def mt_batch(tok, *, stage="update"):
    """harness.v1_batch with the multi-turn response masks (``response_mask`` = ``loss_mask``)."""
    b, M, _ = encode_mt(tok)
    td = H.v1_batch(b, stage=stage)
    td["response_mask"] = H.nested(M)
    td["loss_mask"] = H.nested(M)
    return b, M, td


def test_the_samples_have_digits_in_tool_outputs(qwen_tok):
    b, M, spans = encode_mt(qwen_tok)
    for m, sp, (_, segs, *_) in zip(M, spans, MT_SAMPLES, strict=True):
        for s, (_, mask) in zip(sp, segs, strict=True):
            assert all(int(m[j]) == mask for j in s)
    tool_digits = [int(r[j]) for r, m in zip(b.responses, M, strict=True) for j in range(len(r))
                   if m[j] == 0 and int(r[j]) in DIGITS]
    assert len(tool_digits) == 16  # '12*12 = 144; #### 999', '#### 17', '6*7 = 42'
    assert int(M[1][-1]) == 0  # sample 1 ends in tool tokens


@pytest.mark.parametrize("labels", ["final_answer", "all"])
def test_tool_output_digits_are_never_targets(qwen_tok, dist_group, monkeypatch, labels):
    """Through the engine's update (targets built from the batch, as in verl's bypass mode):
    ntl/total_digits = the hand count of policy digits, ntl/loss = the reference over them."""
    from verl.workers.utils.losses import ppo_loss

    model = H.tiny_model(seed=31)
    want_t = hand_targets(qwen_tok, labels)
    n_want = sum(int((t >= 0).sum()) for t in want_t)
    assert n_want == (9 if labels == "final_answer" else 15)
    b, _, td = mt_batch(qwen_tok)
    H.assign_update_meta(td)
    cfg = H.actor_config(ntl_weight=0.5, ntl_labels=labels)
    eng = H.make_engine(model, qwen_tok, monkeypatch=monkeypatch, config=cfg)
    out = eng.forward_backward_batch(td, functools.partial(ppo_loss, config=cfg), forward_only=False)
    assert float(out["metrics"]["ntl/total_digits"].aggregate()) == n_want
    want = H.ref_agg(H.ref_ntl_digits(model, b, want_t), "token-mean")
    assert float(out["metrics"]["ntl/loss"].aggregate()) == pytest.approx(want, rel=1e-4)
    # the engine's own targets (the old-log-prob pass output) are the hand targets
    targets = eng._ntl_build_targets(td, labels)
    for got, t in zip(targets.unbind(), want_t, strict=True):
        assert torch.equal(got, t)


def verl_score_positions(b: H.Batch, M: list[torch.Tensor]) -> list[int]:
    """Where verl puts each sequence's score: ``RewardManagerBase.assemble_rm_scores`` (verl's
    reward loop) on the padded layout, attention mask 1 over every prompt and response token."""
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

    input_ids, attn, pos, P, _ = H.padded(b)
    data = DataProto.from_dict({"prompts": input_ids[:, :P], "responses": input_ids[:, P:],
                                "attention_mask": attn, "input_ids": input_ids, "position_ids": pos})
    scores = RewardManagerBase.assemble_rm_scores(data, [1.0] * len(b.responses))
    return [int(row.nonzero().item()) for row in scores]


def test_bonus_placement_helpers_match_verls_score_position(qwen_tok):
    from ntl_verl.batch import digit_bonus_scores, pad_responses, response_positions
    from ntl_verl.settings import NTLSettings

    import ntl

    b, M, td = mt_batch(qwen_tok, stage="old_log_prob")
    verl_pos = verl_score_positions(b, M)
    assert verl_pos == [len(r) - 1 for r in b.responses]
    last_policy = [int(m.nonzero().max()) for m in M]
    assert verl_pos[1] != last_policy[1]  # sample 1 ends in tool tokens: the positions differ
    R = max(len(r) for r in b.responses)
    valid = response_positions(td["response_mask"], R)
    _, attn, *_ = H.padded(b)
    assert torch.equal(valid, response_positions(pad_responses(td["response_mask"], R, 0), R, attn))
    resp = pad_responses(td["responses"], R, 0)
    mask = pad_responses(td["response_mask"], R, 0).bool()
    s = NTLSettings(ntl_weight=0.0, extract_digit_info=True, ntl_bonus_type="final_answer", ntl_bonus_weight=2.0)
    z = torch.randn(len(b.responses), R, 10, generator=torch.Generator().manual_seed(0))
    scores, bonus = digit_bonus_scores(z, resp, mask, b.ground_truths, qwen_tok, ntl.vocab_for_tokenizer(qwen_tok), s,
                                       valid_mask=valid)
    for i, p in enumerate(verl_pos):
        assert float(scores[i, p]) == pytest.approx(2.0 * float(bonus[i])) and float(bonus[i]) > 0
        assert int((scores[i] != 0).sum()) == 1
    old, _ = digit_bonus_scores(z, resp, mask, b.ground_truths, qwen_tok, ntl.vocab_for_tokenizer(qwen_tok), s)
    assert float(old[1, last_policy[1]]) != 0.0 and float(old[1, verl_pos[1]]) == 0.0  # without valid_mask
    with pytest.raises(ValueError, match="attention_mask"):
        response_positions(mask, R)
    with pytest.raises(ValueError, match="valid_mask"):
        digit_bonus_scores(z, resp, mask, b.ground_truths, qwen_tok, ntl.vocab_for_tokenizer(qwen_tok), s,
                           valid_mask=valid[:, :-1])


def test_engine_bonus_lands_where_verl_puts_the_score(qwen_tok, dist_group, monkeypatch):
    """The old-log-prob pass adds the bonus to ``rm_scores`` at verl's score position."""
    from ntl_verl.batch import pad_responses
    from verl.utils import tensordict_utils as tu

    model = H.tiny_model(seed=32)
    cfg = H.actor_config(ntl_weight=0.1, extract_digit_info=True, ntl_bonus_type="final_answer",
                         ntl_bonus_weight=0.5)
    eng = H.make_engine(model, qwen_tok, monkeypatch=monkeypatch, config=cfg)
    b, M, td = mt_batch(qwen_tok, stage="old_log_prob")
    H.assign_update_meta(td)
    tu.assign_non_tensor(td, calculate_entropy=True, compute_loss=False)
    R = max(len(r) for r in b.responses)
    before = pad_responses(td["rm_scores"], R, 0.0).clone()
    out = eng.forward_backward_batch(td, None, forward_only=True)
    diff = pad_responses(out["model_output"]["rm_scores"], R, 0.0) - before
    bonus = out["model_output"]["ntl_bonus"].reshape(-1)
    for i, p in enumerate(verl_score_positions(b, M)):
        assert float(bonus[i]) > 0
        assert float(diff[i, p]) == pytest.approx(0.5 * float(bonus[i]), rel=1e-5), i
        assert int((diff[i] != 0).sum()) == 1, i


# --------------------------------------------------------------------------- LoRA (verl's real worker)
# **LoRA** (slow: verl's ``ActorRolloutRefWorker`` + FSDP2 engine in a rank process, as
# ``test_verl09_dist``; ``actor_rollout_ref.model.lora_rank=4``, ``lora_alpha=16``,
# ``target_modules=[q_proj,v_proj]``, verl's config keys). The base weights are frozen, so the NTL
# gradient must reach the adapters: ``(g(ntl_weight=W) - g(ntl_weight=0)) / W`` on every
# ``lora_A`` / ``lora_B`` equals autograd of the token-mean NTL through a PEFT model rebuilt from
# the saved base and the adapter weights the rank used; ``ntl_weight=0`` equals verl's stock
# engine (same build without the NTL ``_target_``) bit for bit. The reference pass verl runs on the
# actor in LoRA mode (``no_lora_adapter=True``) returns ``log_probs`` only (no ``ntl_*`` output),
# equal to stock verl's and to the base model's log-probs, unlike the pass with the adapter on.
LORA_TIMEOUT = 600
LORA = ["actor_rollout_ref.model.lora_rank=4", "actor_rollout_ref.model.lora_alpha=16",
        "actor_rollout_ref.model.target_modules=[q_proj,v_proj]"]
LW = 0.5
LORA_PLAN = [
    ("stock", LORA, [("w0", {})]),
    ("ntl", [*LORA, "actor_rollout_ref.actor._target_=ntl_verl.config.NTLActorConfig",
             "+actor_rollout_ref.actor.ntl_weight=0.0"],
     [("w0", {}), ("ntl", {"ntl_weight": LW})]),
]


@pytest.fixture(scope="module")
def lora_model_path(tmp_path_factory):
    import cpu_dist

    return cpu_dist.model_dir(str(tmp_path_factory.mktemp("tiny_qwen2_lora")))


@pytest.fixture(scope="module")
def lora_runs(lora_model_path, tmp_path_factory):
    import cpu_dist

    out = str(tmp_path_factory.mktemp("lora"))
    return cpu_dist.run("dist_scenarios:lora_updates", 1, out, lora_model_path, LORA_PLAN, timeout=LORA_TIMEOUT)


def lora_reference(model_path, adapters, tok, T=0.9):
    """The PEFT model (verl's LoraConfig: r 4, alpha 16, q/v projections, no bias) with the rank's
    adapter weights; returns it, the token-mean NTL over the 8 samples' final_answer digit targets
    (autograd; float64 softmax over the 10 digit logits / T) and each sample's response log-probs
    with the adapter off (the base model)."""
    import cpu_dist
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from ntl.targets import build_digit_targets

    base = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa").float()
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=16,
                                            target_modules=["q_proj", "v_proj"], bias="none"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in adapters.items():
            params[name].copy_(value)
    rows, base_lp = [], []
    for prompt, response, truth in cpu_dist.SAMPLES_8:
        p, r = tok.encode(prompt), tok.encode(response)
        targets = build_digit_targets(torch.tensor([r]), [truth], tok, mode="final_answer")[0]
        ids = torch.tensor([p + r])
        logits = model(input_ids=ids).logits[0]
        for j in range(len(r)):
            if targets[j] >= 0:
                q = torch.softmax(logits[len(p) + j - 1, 15:25].double() / T, dim=-1)
                rows.append((q @ torch.arange(10, dtype=torch.float64) - float(targets[j] - 15)) ** 2)
        with torch.no_grad(), model.disable_adapter():
            lg = model(input_ids=ids).logits[0, len(p) - 1:-1].double() / T
        base_lp.append(torch.log_softmax(lg, -1).gather(1, torch.tensor(r)[:, None])[:, 0])
    return model, torch.stack(rows).mean(), base_lp


@pytest.mark.slow
@pytest.mark.timeout(LORA_TIMEOUT + 120)
def test_lora_ntl_gradient_reaches_the_adapters_and_the_reference_pass_is_stock(lora_runs, lora_model_path, qwen_tok):
    stock, ntl_run = lora_runs["stock"], lora_runs["ntl"]
    assert stock["engine"] == "FSDPEngineWithLMHead" and ntl_run["engine"] == "NTLFSDPEngineWithLMHead"
    # only the adapters train (2 layers x q, v x A, B)
    assert len(ntl_run["trainable"]) == 8 and all("lora_" in n for n in ntl_run["trainable"])
    assert set(ntl_run["ntl"]["grads"]) == set(ntl_run["trainable"])
    # ntl_weight=0 is stock verl, bit for bit
    for n, g in stock["w0"]["grads"].items():
        assert torch.equal(ntl_run["w0"]["grads"][n], g), n
    assert float(stock["w0"]["metrics"]["loss"][0]) == float(ntl_run["w0"]["metrics"]["loss"][0])
    # the NTL gradient on the adapters = autograd through the rebuilt PEFT model
    model, value, base_lp = lora_reference(lora_model_path, ntl_run["adapters"], qwen_tok)
    assert float(ntl_run["ntl"]["metrics"]["ntl/loss"][0]) == pytest.approx(float(value.detach()), rel=1e-4)
    value.backward()
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ref_grads) == set(ntl_run["trainable"])
    for n, want in ref_grads.items():
        got = (ntl_run["ntl"]["grads"][n] - ntl_run["w0"]["grads"][n]) / LW
        assert want.abs().max() > 1e-4, n  # the NTL term reaches every adapter matrix
        torch.testing.assert_close(got, want.float(), rtol=2e-3, atol=1e-4 * float(want.abs().max()), msg=n)
    # the reference pass (adapter off): verl's outputs only, = stock verl's = the base model's
    assert ntl_run["ref"]["keys"] == stock["ref"]["keys"] and not any(k.startswith("ntl") for k in ntl_run["ref"]["keys"])
    from verl.workers.utils.padding import response_from_nested

    def response_part(rows):  # the trainer's ref_log_prob: the response part of each row
        mask = H.nested([torch.ones(len(c), dtype=torch.int64) for c in base_lp])
        return response_from_nested(H.nested(rows), mask).unbind()

    assert [len(a) for a in ntl_run["ref"]["log_probs"]] != [len(c) for c in base_lp]  # whole sequences
    for a, b, c, on in zip(response_part(ntl_run["ref"]["log_probs"]), response_part(stock["ref"]["log_probs"]),
                           base_lp, response_part(ntl_run["actor"]["log_probs"]), strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.double(), c, rtol=1e-4, atol=1e-5)
        assert (on - a).abs().max() > 1e-4  # the adapter is live when on
