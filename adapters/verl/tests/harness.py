"""CPU test harness: a tiny Qwen2, GSM8K-like samples, verl-layout batches, an NTL engine without
FSDP (verl's platform layer says "cuda" on CPU, so the device id is stubbed), and the
independent references (hand-derived targets, NTL and bonus from full logits)."""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict

VALUES = torch.arange(10, dtype=torch.float32)
V = 32768  # > every token id of SAMPLES (Qwen2.5 itself has 151936); keeps CPU tests fast
DIGIT_IDS = list(range(15, 25))

# (prompt, response text, ground truth)
SAMPLES = [
    ("Q: 100 + 23?", " First 100 then 23. #### 123", "123"),
    ("Question: 7*6", " 7*6 = 42 so #### 45", "42"),
    ("Q: add 5 and 9", " 5+9 is 14. The answer #### 14", "14"),
    ("Q: 2?", " #### 2,001", "2001"),
]


def tiny_model(seed: int = 0, attn: str = "sdpa") -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    m = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():  # make digit logits non-trivial
        m.lm_head.weight.mul_(8.0)
    return m


@dataclass
class Batch:
    prompts: list[torch.Tensor]
    responses: list[torch.Tensor]
    ground_truths: list[str]


def encode(tok, samples=SAMPLES) -> Batch:
    P = [torch.tensor(tok.encode(p), dtype=torch.long) for p, _, _ in samples]
    R = [torch.tensor(tok.encode(r), dtype=torch.long) for _, r, _ in samples]
    assert max(int(t.max()) for t in P + R) < V
    return Batch(P, R, [g for _, _, g in samples])


def nested(ts):
    return torch.nested.as_nested_tensor(list(ts), layout=torch.jagged)


def v1_batch(b: Batch, *, seed: int = 0, with_targets: torch.Tensor | None = None,
             stage: str = "update") -> TensorDict:
    """The TensorDict a verl 0.9 (v1 trainer) actor receives: per-sample nested fields.

    ``stage="old_log_prob"``: the batch of the old-log-prob pass (no ``old_log_probs`` /
    ``advantages`` yet); ``"update"``: the update's batch."""
    g = torch.Generator().manual_seed(seed)
    n = len(b.prompts)
    seqs = [torch.cat([p, r]) for p, r in zip(b.prompts, b.responses, strict=True)]
    rmask = [torch.ones(len(r), dtype=torch.int64) for r in b.responses]
    fields = {
        "prompts": nested(b.prompts),
        "responses": nested(b.responses),
        "input_ids": nested(seqs),
        "position_ids": nested([torch.arange(len(s)) for s in seqs]),
        "response_mask": nested(rmask),
        "loss_mask": nested(rmask),
        "old_log_probs": nested([-torch.rand(len(r), generator=g) - 0.5 for r in b.responses]),
        "advantages": nested([torch.randn(len(r), generator=g) for r in b.responses]),
        "rm_scores": nested([torch.cat([torch.zeros(len(r) - 1), torch.ones(1)]) for r in b.responses]),
    }
    if stage == "old_log_prob":
        del fields["old_log_probs"], fields["advantages"]
    elif stage != "update":
        raise ValueError(stage)
    td = TensorDict(fields, batch_size=[n])
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(td, reward_model=[{"ground_truth": gt, "style": "rule"} for gt in b.ground_truths])
    if with_targets is not None:
        td["ntl_targets"] = with_targets
    return td


def padded(b: Batch):
    """Left-padded prompts + right-padded responses, the classic verl layout (for references)."""
    n = len(b.prompts)
    P = max(len(p) for p in b.prompts)
    R = max(len(r) for r in b.responses)
    input_ids = torch.zeros(n, P + R, dtype=torch.long)
    attn = torch.zeros(n, P + R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(b.prompts, b.responses, strict=True)):
        input_ids[i, P - len(p):P] = p
        input_ids[i, P:P + len(r)] = r
        attn[i, P - len(p):P + len(r)] = 1
    pos = (attn.cumsum(1) - 1).clamp_min(0)
    return input_ids, attn, pos, P, R


def make_engine(model, tok, settings=None, monkeypatch=None, *, config=None, stock=False):
    """An NTL engine (``stock=True``: verl's own ``FSDPEngineWithLMHead``) around ``model``, no FSDP,
    on CPU. ``config``: the actor config whose engine config the engine gets (as verl's worker passes
    ``actor_config.engine``); otherwise a stand-in engine config carrying ``settings``."""
    from ntl_verl.engine import _engine_class
    from verl.workers.engine.fsdp import transformer_impl as ti

    if monkeypatch is not None:
        monkeypatch.setattr(ti, "get_device_id", lambda: "cpu")
        monkeypatch.setattr(ti, "get_device_name", lambda: "cpu")
        import ntl_verl.engine as ne

        monkeypatch.setattr(ne.NTLEngineMixin, "_ntl_device", lambda self: "cpu")
    # a bare engine whose attributes are set below (Any: they are not BaseEngine's)
    cls: Any = ti.FSDPEngineWithLMHead if stock else _engine_class()
    eng = cls.__new__(cls)
    eng.module = model
    if config is not None:
        eng.engine_config = config.engine
    else:
        eng.engine_config = types.SimpleNamespace(
            use_no_sync_for_gradient_accumulation=True, entropy_checkpointing=False,
            entropy_from_logits_with_chunking=False,
        )
        if settings is not None:
            eng.engine_config._ntl_settings = settings
    eng.model_config = types.SimpleNamespace(tokenizer=tok, hf_config=model.config)
    eng.use_ulysses_sp = False
    eng.ulysses_sequence_parallel_size = 1
    eng.pad_to_length = False
    eng._autocast_dtype = torch.float32
    eng.scaler = None
    eng.get_data_parallel_group = lambda: None
    eng.get_data_parallel_size = lambda: 1
    import verl.utils.torch_functional as verl_F

    eng.compute_entropy_from_logits = verl_F.entropy_from_logits
    return eng


def actor_config(stock=False, **ntl):
    """An NTLActorConfig as verl builds it (hydra instantiate), with NTL keys ``ntl`` (``stock``:
    verl's own FSDPActorConfig; ``ntl`` may then hold verl keys only)."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    cfg = {
        "_target_": "verl.workers.config.FSDPActorConfig" if stock else "ntl_verl.config.NTLActorConfig",
        "strategy": "fsdp",
        "rollout_n": 1,
        "ppo_mini_batch_size": 4,
        "ppo_micro_batch_size_per_gpu": 2,
        "clip_ratio": 0.2,
        **ntl,
    }
    return omega_conf_to_dataclass(OmegaConf.create(cfg))


def assign_update_meta(td, *, rmpad=True, temperature=1.0, micro=2, fused=False):
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(
        td, use_remove_padding=rmpad, use_dynamic_bsz=False, micro_batch_size_per_gpu=micro,
        temperature=temperature, calculate_entropy=False, global_batch_size=len(td),
        use_fused_kernels=fused, compute_loss=True,
    )
    return td


# --------------------------------------------------------------------------- references
def expected_targets(tok, b: Batch, mode: str) -> list[torch.Tensor]:
    """Hand-derived targets for harness09.SAMPLES (token ids; -100 elsewhere)."""
    out = []
    for (_, text, truth), r in zip(SAMPLES, b.responses, strict=True):
        t = torch.full((len(r),), -100)
        ids = r.tolist()
        digit_pos = [i for i, x in enumerate(ids) if 15 <= x <= 24]
        ans = text.split("####")[1]
        n_ans = sum(c.isdigit() for c in ans)
        ans_pos = digit_pos[-n_ans:]
        if mode == "final_answer":
            truth_digits = [int(c) for c in truth]
            # place value: units with units (all truths here have as many digits as answers)
            assert len(truth_digits) == n_ans
            for p, d in zip(ans_pos, truth_digits, strict=True):
                t[p] = 15 + d
        else:
            correct = ans.replace(",", "").strip() == truth
            if correct:
                for p in digit_pos:
                    t[p] = ids[p]
        out.append(t)
    return out


def full_logits(model, b: Batch) -> list[torch.Tensor]:
    """Per-sample [len(prompt)+len(response), V] logits from plain padded forward passes."""
    input_ids, attn, pos, P, _ = padded(b)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits.float()
    out = []
    for i, (p, r) in enumerate(zip(b.prompts, b.responses, strict=True)):
        out.append(logits[i, P - len(p):P + len(r)])
    return out


def ref_ntl_digits(model, b, targets, *, method="mse", temperature=1.0, shift=True) -> list[list[float]]:
    """Per sample, the NTL of each digit target (in response order), from full logits.

    Response token t (sequence position p = len(prompt) + t) is scored by the logits at
    p - 1 (shift=True) or, deliberately wrong, at p (shift=False)."""
    out = []
    for lg, p, t in zip(full_logits(model, b), b.prompts, targets, strict=True):
        row = []
        for j in range(len(t)):
            if t[j] < 0:
                continue
            z = lg[len(p) + j - 1] if shift else lg[len(p) + j]
            q = torch.softmax(z[DIGIT_IDS] / temperature, dim=-1)
            y = float(t[j] - 15)
            if method == "mse":
                row.append(float((q @ VALUES - y) ** 2))
            else:
                row.append(float((q * (VALUES - y).abs()).sum()))
        out.append(row)
    return out


def ref_agg(per_sample: list[list[float]], mode: str, horizon: float | None = None) -> float:
    """verl's loss_agg_mode over the digit targets, by hand: N digits, S sequences with digits."""
    rows = [r for r in per_sample if r]
    N, S = sum(len(r) for r in rows), len(rows)
    if mode == "token-mean":
        return sum(map(sum, rows)) / N
    if mode == "token-sum":
        return sum(map(sum, rows))
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / S
    total = sum(map(sum, rows)) / S
    if mode == "seq-mean-token-sum-norm":
        assert horizon is not None, "seq-mean-token-sum-norm needs the horizon"
        return total / horizon
    return total


def ref_ntl(model, b, targets, *, method="mse", temperature=1.0, shift=True) -> float:
    """Mean NTL over all digit targets, computed from full logits (see ref_ntl_digits)."""
    return ref_agg(ref_ntl_digits(model, b, targets, method=method, temperature=temperature, shift=shift),
                   "token-mean")


def ref_digit_means(model, b, targets, temperature=1.0) -> dict[str, float]:
    """Digit accuracy, confidence and target probability averaged over all digit targets."""
    acc = conf = tp = 0.0
    n = 0
    for lg, p, t in zip(full_logits(model, b), b.prompts, targets, strict=True):
        for j in range(len(t)):
            if t[j] < 0:
                continue
            q = torch.softmax(lg[len(p) + j - 1][DIGIT_IDS] / temperature, dim=-1)
            k = int(t[j] - 15)
            acc += float(int(q.argmax()) == k)
            conf += float(q.max())
            tp += float(q[k])
            n += 1
    return {"ntl/digit_accuracy": acc / n, "ntl/confidence": conf / n, "ntl/target_prob": tp / n}


def bonus_ref(model, b, targets, temperature=1.0) -> list[float]:
    """0.4 accuracy + 0.3 confidence + 0.3 p(target) over each response's targeted digits."""
    out = []
    for lg, p, t in zip(full_logits(model, b), b.prompts, targets, strict=True):
        acc = conf = tp = 0.0
        n = 0
        for j in range(len(t)):
            if t[j] < 0:
                continue
            q = torch.softmax(lg[len(p) + j - 1][DIGIT_IDS] / temperature, dim=-1)
            k = int(t[j] - 15)
            acc += float(int(q.argmax()) == k)
            conf += float(q.max())
            tp += float(q[k])
            n += 1
        out.append(0.0 if n == 0 else (0.4 * acc + 0.3 * conf + 0.3 * tp) / n)
    return out




def padded_batch(b: Batch, seed: int = 0) -> TensorDict:
    """The TensorDict verl's legacy (v0) trainer builds from its padded DataProto."""
    from verl.utils import tensordict_utils as tu

    input_ids, attn, pos, P, R = padded(b)
    n = len(b.prompts)
    g = torch.Generator().manual_seed(seed)
    rmask = attn[:, P:]
    td = TensorDict({
        "prompts": input_ids[:, :P], "responses": input_ids[:, P:], "input_ids": input_ids,
        "attention_mask": attn, "position_ids": pos, "response_mask": rmask,
        "old_log_probs": (-torch.rand(n, R, generator=g) - 0.5) * rmask,
        "advantages": torch.randn(n, R, generator=g) * rmask,
    }, batch_size=[n])
    tu.assign_non_tensor(td, reward_model=[{"ground_truth": gt} for gt in b.ground_truths])
    return td


# --------------------------------------------------------------------------- Llama-3 (multi-digit number tokens)
LLAMA_V = 128256  # Llama-3's vocabulary (ids up to 128255)

# (prompt, response, ground truth, the response's tokens as Llama-3 writes them,
#  final_answer targets {position: token text}, all targets {position: token text}), by hand:
# final_answer aligns the truth's digits by place value with each answer token's places
# ('123' '4' vs 1299 -> '129' '9'; '42' vs 7 -> '07'); all targets every number token of a
# correct response with itself.
LLAMA_SAMPLES = [
    ("Q: 1000 + 234?", " 1000 plus 234 is #### 1234", "1234",
     ["Ġ", "100", "0", "Ġplus", "Ġ", "234", "Ġis", "Ġ####", "Ġ", "123", "4"],
     {9: "123", 10: "4"}, {1: "100", 2: "0", 5: "234", 9: "123", 10: "4"}),
    ("Q: 6*7?", " 6*7 = 42 so #### 45", "42",
     ["Ġ", "6", "*", "7", "Ġ=", "Ġ", "42", "Ġso", "Ġ####", "Ġ", "45"],
     {10: "42"}, {}),
    ("Q: 12399?", " #### 12345", "12399", ["Ġ####", "Ġ", "123", "45"], {2: "123", 3: "99"}, {}),
    ("Q: 2001?", " #### 2,001", "2001", ["Ġ####", "Ġ", "2", ",", "001"],
     {2: "2", 4: "001"}, {2: "2", 4: "001"}),
    ("Q: 7?", " so #### 42", "7", ["Ġso", "Ġ####", "Ġ", "42"], {3: "07"}, {}),
    ("Q: 1234?", " #### 999", "1234", ["Ġ####", "Ġ", "999"], {2: "234"}, {}),
    ("Q: 1299?", " #### 1234", "1299", ["Ġ####", "Ġ", "123", "4"], {2: "129", 3: "9"}, {}),
    ("Q: 0?", " The answer is #### 0", "0", ["ĠThe", "Ġanswer", "Ġis", "Ġ####", "Ġ", "0"], {5: "0"}, {5: "0"}),
]


def tiny_llama(seed: int = 0, attn: str = "sdpa") -> torch.nn.Module:
    """A tiny Llama-config model with Llama-3's vocabulary size (hidden size 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=LLAMA_V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # make the number-token logits non-trivial
        m.lm_head.weight.mul_(8.0)
    return m


def encode_llama(tok, samples=LLAMA_SAMPLES) -> Batch:
    """Llama-3 prompts and responses; checks each response's tokens against the hand table."""
    P = [torch.tensor(tok.encode(s[0], add_special_tokens=False), dtype=torch.long) for s in samples]
    R = []
    for s in samples:
        ids = tok.encode(s[1], add_special_tokens=False)
        assert tok.convert_ids_to_tokens(ids) == s[3], (s[1], tok.convert_ids_to_tokens(ids))
        R.append(torch.tensor(ids, dtype=torch.long))
    return Batch(P, R, [s[2] for s in samples])


def llama_expected_targets(tok, mode: str, samples=LLAMA_SAMPLES) -> list[torch.Tensor]:
    """The hand table's targets as token ids (``-100`` elsewhere), ids from the tokenizer itself."""
    out = []
    for s in samples:
        t = torch.full((len(s[3]),), -100)
        for pos, text in (s[4] if mode == "final_answer" else s[5]).items():
            t[pos] = tok.convert_tokens_to_ids(text)
        out.append(t)
    return out


def number_table(tok) -> dict[int, float]:
    """``{token id: int(text)}`` of every token whose text is an ASCII digit string, read from
    ``tok.get_vocab()`` (the reference's own view of the number tokens)."""
    return {i: float(int(t)) for t, i in tok.get_vocab().items() if t.isascii() and t.isdigit()}


def ref_number_terms(model, b: Batch, targets, table: dict[int, float], *, temperature=1.0,
                     method="mse") -> list[list[dict[str, float]]]:
    """Per sample, per number-token target (response order), in float64 from full logits:
    ``q = softmax(z[ids] / T)`` over every number token, the NTL (``mse``: ``(sum q v - y)^2``,
    ``wasserstein``: ``sum q |v - y|``), argmax correctness, max prob and the target's prob."""
    ids = torch.tensor(sorted(table), dtype=torch.long)
    vals = torch.tensor([table[i] for i in ids.tolist()], dtype=torch.float64)
    out = []
    for lg, p, t in zip(full_logits(model, b), b.prompts, targets, strict=True):
        row = []
        for j in range(len(t)):
            if t[j] < 0:
                continue
            q = torch.softmax(lg[len(p) + j - 1][ids].double() / temperature, dim=-1)
            k = int((ids == int(t[j])).nonzero())
            y = float(table[int(t[j])])
            loss = float((q @ vals - y) ** 2) if method == "mse" else float((q * (vals - y).abs()).sum())
            row.append({"loss": loss, "correct": float(int(q.argmax()) == k), "conf": float(q.max()),
                        "tp": float(q[k])})
        out.append(row)
    return out
