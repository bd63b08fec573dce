"""DEL and DIST² in the verl 0.9 NTL engine: ``ntl_method: del`` / ``dist2`` with their parameter
keys (``ntl_del_place_weights``, ``ntl_dist2_tau``), against the core loss and a float64 formula
on the model's shifted full logits (tiny Qwen2 on CPU, no Ray).

DEL ``pw (1/10) sum_k q_k BCE(sigmoid(z_k), [k = y])``, ``pw`` by hand (integer place ``p``:
``2 (p + 1)``; ``d``-th decimal: ``1.02^-(d + 1)``; a ``,`` splits a number, as in the core's
segmentation of labels); DIST² ``KL(t || q)``, ``t = softmax(-(k - y)^2 / tau)``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import verl_version

v = verl_version()
if v is None or v.release[:2] < (0, 9):
    pytest.skip("needs verl >= 0.9 (scripts/test_verl.sh runs this in its venv)", allow_module_level=True)

import harness as H  # noqa: E402

import ntl  # noqa: E402

# (prompt, response, truth) and the final-answer targets: (digit, place weight) per answer digit
SAMPLES = [
    ("Q: 1.5+1?", " so #### 2.5", "2.5"),
    ("Question: 7*6", " 7*6 = 42 so #### 45", "42"),
    ("Q: 2?", " #### 2,001", "2001"),
    ("Q: x", " it is #### 10.25", "10.75"),
]
TARGETS = [
    [(2, 2.0), (5, 1.02 ** -2)],
    [(4, 4.0), (2, 2.0)],
    [(2, 2.0), (0, 6.0), (0, 4.0), (1, 2.0)],  # '2' ',' '001': two numbers for the segmentation
    [(1, 4.0), (0, 2.0), (7, 1.02 ** -2), (5, 1.02 ** -3)],
]
DIGIT = range(15, 25)  # Qwen2.5's '0'..'9'


@pytest.fixture(scope="module")
def batch(qwen_tok):
    return H.encode(qwen_tok, SAMPLES)


def run_update(model, tok, monkeypatch, batch, ntl_keys):
    from verl.workers.utils.losses import ppo_loss

    cfg = H.actor_config(**ntl_keys)
    eng = H.make_engine(model, tok, monkeypatch=monkeypatch, config=cfg)
    td = H.assign_update_meta(H.v1_batch(batch))
    model.zero_grad(set_to_none=True)
    out = eng.forward_backward_batch(td, functools.partial(ppo_loss, config=cfg), forward_only=False)
    return sum(out["loss"]), out


def vocab(tok):
    """The tokenizer's number vocab for the harness model's V (smaller than Qwen2.5's)."""
    return ntl.vocab_for_tokenizer(tok, vocab_size=H.V)


def labelled(tok, batch):
    """Per sample: the answer's ``(position, digit, place weight)`` and the core's labels
    ``[r]`` (target digit ids, the answer's '.' kept, -100 elsewhere)."""
    dot = tok.convert_tokens_to_ids(".")
    out = []
    for r, tg in zip(batch.responses, TARGETS, strict=True):
        ids = r.tolist()
        pos = [i for i, x in enumerate(ids) if x in DIGIT][-len(tg):]
        labels = torch.full((len(ids),), -100)
        for p, (d, _) in zip(pos, tg, strict=True):
            labels[p] = 15 + d
        for i in range(pos[0], pos[-1]):
            if ids[i] == dot:
                labels[i] = dot
        out.append(([(p, d, w) for p, (d, w) in zip(pos, tg, strict=True)], labels))
    return out


def reference(model, tok, batch, method, *, place_weights=True, tau=1.0):
    """``(float64 formula mean, core ntl_loss mean)`` over every answer digit."""
    terms, core_sum, n = [], 0.0, 0
    for lg, p, (tg, labels) in zip(H.full_logits(model, batch), batch.prompts, labelled(tok, batch),
                                   strict=True):
        shifted = lg[len(p) - 1 : len(p) - 1 + len(labels)]  # position t-1 predicts token t
        for t, d, w in tg:
            z = shifted[t, list(DIGIT)].double()
            q = torch.softmax(z, -1)
            if method == "del":
                b = F.softplus(z) - F.one_hot(torch.tensor(d), 10).double() * z
                terms.append((w if place_weights else 1.0) * float((q * b).sum()) / 10)
            else:
                k = torch.arange(10, dtype=torch.float64)
                logt = torch.log_softmax(-((k - d) ** 2) / tau, -1)
                terms.append(float((logt.exp() * (logt - torch.log_softmax(z, -1))).sum()))
        m = (ntl.methods.DEL(place_weights=place_weights, decimal_point_id=tok.convert_tokens_to_ids("."))
             if method == "del" else ntl.methods.DIST2(tau=tau))
        core_sum += float(ntl.ntl_loss(shifted[None], labels[None], vocab(tok), method=m, reduction="sum"))
        n += len(tg)
    return sum(terms) / len(terms), core_sum / n


CASES = [
    ("del", {}, {}),
    ("del", {"ntl_del_place_weights": False}, {"place_weights": False}),
    ("dist2", {}, {}),
    ("dist2", {"ntl_dist2_tau": 2.0}, {"tau": 2.0}),
]


@pytest.mark.parametrize(("method", "keys", "kw"), CASES, ids=lambda c: str(c))
def test_engine_loss_equals_core_loss_and_formula(qwen_tok, batch, dist_group, monkeypatch, method, keys, kw):
    model = H.tiny_model()
    w = 0.5
    base = {"ntl_labels": "final_answer", "ntl_method": method, **keys}
    l0, _ = run_update(model, qwen_tok, monkeypatch, batch, {**base, "ntl_weight": 0.0})
    lw, out = run_update(model, qwen_tok, monkeypatch, batch, {**base, "ntl_weight": w})
    formula, core = reference(model, qwen_tok, batch, method, **kw)
    assert core == pytest.approx(formula, rel=1e-5)
    assert (lw - l0) / w == pytest.approx(core, rel=1e-4, abs=1e-6)
    assert out["metrics"]["ntl/loss"].aggregate() == pytest.approx(core, rel=1e-4)
    assert out["metrics"]["ntl/total_digits"].aggregate() == sum(map(len, TARGETS))


def test_del_place_weights_see_the_decimal_point(qwen_tok, batch, dist_group, monkeypatch):
    """Without the answer's '.', 2.5 would be two integers (5 weighted 2, not 1.02^-2)."""
    model = H.tiny_model()
    base = {"ntl_labels": "final_answer", "ntl_method": "del"}
    l0, _ = run_update(model, qwen_tok, monkeypatch, batch, {**base, "ntl_weight": 0.0})
    l1, _ = run_update(model, qwen_tok, monkeypatch, batch, {**base, "ntl_weight": 1.0})
    formula, _ = reference(model, qwen_tok, batch, "del")
    assert l1 - l0 == pytest.approx(formula, rel=1e-4)
    no_dot = []
    for lg, p, (_, labels) in zip(H.full_logits(model, batch), batch.prompts, labelled(qwen_tok, batch),
                                  strict=True):
        shifted = lg[len(p) - 1 : len(p) - 1 + len(labels)][None]
        plain = labels.masked_fill(labels == qwen_tok.convert_tokens_to_ids("."), -100)[None]
        no_dot.append(float(ntl.ntl_loss(shifted, plain, vocab(qwen_tok), method="del", reduction="sum")))
    assert sum(no_dot) / sum(map(len, TARGETS)) != pytest.approx(l1 - l0, rel=0.01)


# --------------------------------------------------------------------------- settings
def test_settings_build_the_method_with_its_parameters():
    from ntl_verl.settings import NTLSettings

    assert NTLSettings(ntl_method="dist2", ntl_dist2_tau=2).method == ntl.methods.DIST2(tau=2.0)
    assert NTLSettings(ntl_method="del", ntl_del_place_weights=False).method == ntl.methods.DEL(
        place_weights=False)
    assert NTLSettings(ntl_method="del").method == ntl.methods.DEL()
    assert NTLSettings(ntl_method="w1").method == ntl.methods.W1()
    cfg = H.actor_config(ntl_method="dist2", ntl_dist2_tau=0.5)
    assert cfg.ntl_settings.method == ntl.methods.DIST2(tau=0.5)


@pytest.mark.parametrize(("keys", "err", "match"), [
    ({"ntl_method": "mse", "ntl_dist2_tau": 2.0}, ValueError,
     r"actor_rollout_ref\.actor\.ntl_dist2_tau applies to .*ntl_method=dist2 only"),
    ({"ntl_method": "dist2", "ntl_del_place_weights": False}, ValueError,
     r"ntl_del_place_weights applies to .*ntl_method=del only"),
    ({"ntl_method": "dist2", "ntl_dist2_tau": 0.0}, ValueError,
     r"actor_rollout_ref\.actor\.ntl_dist2_tau: tau must be a positive finite number"),
    ({"ntl_method": "del", "ntl_del_place_weights": "yes"}, TypeError,
     r"actor_rollout_ref\.actor\.ntl_del_place_weights: place_weights must be a bool"),
    ({"ntl_method": "dell"}, ValueError, r"actor_rollout_ref\.actor\.ntl_method must be one of"),
])
def test_bad_method_keys_are_refused_at_construction(keys, err, match):
    from ntl_verl.settings import NTLSettings

    with pytest.raises(err, match=match):
        NTLSettings(**keys)
    with pytest.raises(Exception, match=match):  # hydra wraps it in an InstantiationException
        H.actor_config(**keys)
