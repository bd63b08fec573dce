"""Tiny offline pieces for the TRL adapter tests: a char-level tokenizer and a Qwen2 model."""

from __future__ import annotations

from typing import cast

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

DIGITS = "0123456789"
CHARS = DIGITS + " #+-*=?.\nabcdefghijklmnopqrstuvwxyz"
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def char_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    """One token per character (digits are single tokens), built without any download."""
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(set(chars)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_qwen2(tok: PreTrainedTokenizerFast, seed: int = 0, hidden: int = 32,
               tied: bool = True) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 with vocab = len(tok) rounded up to a multiple of 8 (tied embeddings
    unless ``tied=False``).

    With the default characters len(tok) = 48, so no padding row can be sampled."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=(len(tok) + 7) // 8 * 8, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=tied,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    return Qwen2ForCausalLM(cfg)


def digit_ids(tok: PreTrainedTokenizerFast) -> list[int]:
    return [cast(int, tok.convert_tokens_to_ids(d)) for d in DIGITS]  # one token: one id


PROMPTS = ["what is 2+3? ", "what is 7*8? ", "12+30=", "9-4=", "6*7=", "100-1=", "3+3=", "8*2="]
ANSWERS = ["5", "56", "42", "5", "42", "99", "6", "16"]


def tiny_dataset(n: int = 8):
    """A standard-format (plain-text prompt) dataset with a ``ground_truth`` column."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS[:n], "ground_truth": ANSWERS[:n]})


def digit_count_reward(completions, **kwargs):
    """Rewards digits, so that the policy keeps sampling them (and advantages are nonzero)."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def trainer_args(cls_name: str = "GRPOConfig", **overrides):
    """CPU, offline, tiny: SGD so parameter updates are linear in the gradient."""
    import trl

    kw = dict(
        output_dir=overrides.pop("output_dir"), use_cpu=True, bf16=False, report_to=[],
        max_completion_length=8, num_generations=4, per_device_train_batch_size=4,
        max_steps=3, logging_steps=1, save_strategy="no", seed=42, optim="sgd",
        learning_rate=0.5, disable_tqdm=True, gradient_checkpointing=False, max_grad_norm=0.0,
        beta=0.0,
    )
    kw.update(overrides)
    return getattr(trl, cls_name)(**kw)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def w1_from_full_logits(model, inputs, tok, temperature, requires_grad=False):
    """Independent NTL-W1 of a TRL micro-batch: the model's full logits, the causal shift
    by hand, a plain log_softmax over the ten digit columns, ``sum_k q_k |k - y|`` averaged
    over the completion positions whose token is a digit. Returns (loss, n)."""
    p_ids, c_ids = inputs["prompt_ids"], inputs["completion_ids"]
    ids = torch.cat([p_ids, c_ids], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.set_grad_enabled(requires_grad):
        logits = model(input_ids=ids, attention_mask=am).logits.float()
        P, C = p_ids.shape[1], c_ids.shape[1]
        pred = logits[:, P - 1 : P + C - 1] / temperature  # position t-1 predicts token t
        dig = digit_ids(tok)
        q = torch.softmax(pred[..., dig], dim=-1)
        terms = []
        for b in range(c_ids.shape[0]):
            for t in range(C):
                tokid = int(c_ids[b, t])
                if inputs["completion_mask"][b, t] and tokid in dig:
                    y = dig.index(tokid)
                    dist = torch.tensor([abs(k - y) for k in range(10)], dtype=torch.float32)
                    terms.append((q[b, t] * dist).sum())
        if not terms:
            return torch.zeros(()), 0
        return torch.stack(terms).mean(), len(terms)


def grads_of(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {k: (v.grad.detach().clone() if v.grad is not None else torch.zeros_like(v))
            for k, v in model.named_parameters()}


def constant_reward(completions, **kwargs):
    """Every completion scores 1: all advantages are 0, so the policy loss has no gradient
    and an update is the NTL gradient alone."""
    return [1.0] * len(completions)


def script_generate(model, tok, completions: dict[str, list[str]]):
    """Replace ``model.generate`` by a stub: the ``j``-th copy of a prompt in one call gets
    ``completions[prompt][j % len]`` (+ EOS, right-padded), so the tiny model "writes" exactly
    those texts (e.g. with ``####`` answers) while everything after generation is real TRL."""

    def generate(input_ids=None, attention_mask=None, **kwargs):
        seen: dict[str, int] = {}
        rows = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
            prompt = tok.decode(ids.tolist(), skip_special_tokens=True)
            j = seen.get(prompt, 0)
            seen[prompt] = j + 1
            texts = completions[prompt]
            rows.append([*tok(texts[j % len(texts)]).input_ids, tok.eos_token_id])
        C = max(map(len, rows))
        comp = torch.tensor([r + [tok.pad_token_id] * (C - len(r)) for r in rows],
                            device=input_ids.device)
        return torch.cat([input_ids, comp], dim=1)

    model.generate = generate
    return model


def w1_with_targets(model, inputs, tok, temperature, targets, requires_grad=False):
    """Independent NTL-W1 *sum* over hand-given targets: ``targets[(b, t)] = y`` for
    completion position ``t`` of row ``b``; the model's full logits, the causal shift by hand,
    ``sum_k q_k |k - y|``. Returns (sum, n)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.set_grad_enabled(requires_grad):
        logits = model(input_ids=ids, attention_mask=am).logits.float()
        P = inputs["prompt_ids"].shape[1]
        dig = digit_ids(tok)
        terms = []
        for (b, t), y in targets.items():
            q = torch.softmax(logits[b, P + t - 1, dig] / temperature, -1)
            terms.append((q * torch.tensor([abs(k - y) for k in range(10)], dtype=torch.float32)).sum())
        if not terms:
            return torch.zeros(()), 0
        return torch.stack(terms).sum(), len(terms)


def sampled_digit_targets(inputs, tok) -> dict[tuple[int, int], int]:
    """``{(b, t): digit}`` for every real completion token that is a digit (``all`` labels)."""
    dig = digit_ids(tok)
    out = {}
    c_ids, mask = inputs["completion_ids"], inputs["completion_mask"]
    for b in range(c_ids.shape[0]):
        for t in range(c_ids.shape[1]):
            if mask[b, t] and int(c_ids[b, t]) in dig:
                out[(b, t)] = dig.index(int(c_ids[b, t]))
    return out


def crafted_batch(tok, texts, prompt="3+9="):
    """A TRL micro-batch (prompt/completion ids and masks) for hand-written completions."""
    prompt_ids = tok([prompt] * len(texts), return_tensors="pt").input_ids
    comp = [[*tok(t).input_ids, tok.eos_token_id] for t in texts]
    C = max(map(len, comp))
    c_ids = torch.tensor([c + [tok.pad_token_id] * (C - len(c)) for c in comp])
    c_mask = torch.tensor([[1] * len(c) + [0] * (C - len(c)) for c in comp])
    return {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
            "completion_ids": c_ids, "completion_mask": c_mask}


def ntl_through_compute_loss(tr, inputs):
    """The mixin's real path on a crafted micro-batch: ntl_annotate (as at generation),
    then compute_loss with zero advantages, so the returned loss is ntl_weight * NTL."""
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1  # set by the HF training loop
    B = inputs["completion_ids"].shape[0]
    batch = {**inputs, "advantages": torch.zeros(B), "num_items_in_batch": inputs["completion_mask"].sum()}
    tr._metrics["train"].clear()
    tr.ntl_annotate(batch)
    return tr.compute_loss(tr.model, batch), batch
