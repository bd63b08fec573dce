"""Fused kernels with an untied LM head (verl 0.9.1's FSDP2 engine, real worker, gloo ranks).

verl wraps an untied ``lm_head`` as its own FSDP2 unit. Its fused log-prob forward never calls that
module, so inside the forward the head's weight is still a sharded DTensor. NTL's decoder hook
gathers only the ``K`` number rows of it (``ntl.rl.capture.number_rows_of_param``), with the
gradient averaged over the ranks like FSDP2's reduce-scatter. verl's own fused kernel fails on the
sharded weight (verl #7520), so the NTL engine refuses the configuration at worker init.

* ``rows_rank`` (2 ranks): the row gather against ``W[ids]`` and the rank-averaged gradient of
  hand-made per-rank losses (float64 formula), rows on both shards, an uneven split.
* ``untied_fused`` (1 and 2 ranks): stock verl 0.9.1 is refused naming #7520. Then either fix of
  verl's side: its kernel taught to gather a sharded weight (``full_tensor(grad_placements=
  [Partial("avg")])``; NTL gathers its own rows from the shard), or the head kept in the root
  FSDP2 unit (verl PR #7427; NTL indexes the gathered weight). Each: ``ntl/loss``,
  ``ntl/total_digits`` and the NTL share of the digit rows' gradient equal an independent
  full-logits reference, with 1 and 2 ranks.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from conftest import verl_version

v = verl_version()
if v is None or v.release[:2] < (0, 9):
    pytest.skip("needs verl >= 0.9 (scripts/test_verl.sh runs this in its venv)", allow_module_level=True)

import cpu_dist  # noqa: E402

TIMEOUT = 600  # seconds for the 3 rank processes (1 and 2 ranks at once) on 2 busy cores
W = 0.5
T = 0.9
FUSED = [
    cpu_dist.NTL_TARGET,
    "+actor_rollout_ref.actor.ntl_weight=0.0",
    "actor_rollout_ref.model.use_fused_kernels=True",
    "++actor_rollout_ref.model.fused_kernel_options.impl_backend=torch",
]

# rows_rank: a [7, 3] weight over 2 ranks (torch.chunk: rows 0-3 on rank 0, 4-6 on rank 1)
ROWS_V, ROWS_H = 7, 3
ROWS_IDS = [6, 0, 3, 4, 5]


def _rows_weight() -> torch.Tensor:
    return torch.arange(ROWS_V * ROWS_H, dtype=torch.float64).reshape(ROWS_V, ROWS_H) / 10 - 1


# --------------------------------------------------------------------------- rank functions
def rows_rank(rank: int, world: int) -> dict:
    """``number_rows_of_param`` on a ``Shard(0)`` DTensor parameter; rank ``r``'s loss is
    ``(r + 1) * sum(rows ** 2)``."""
    from ntl_verl.engine import number_rows_of_param
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    param: Any = torch.nn.Parameter(distribute_tensor(_rows_weight(), mesh, [Shard(0)]))
    rows = number_rows_of_param(param, torch.tensor(ROWS_IDS), torch.device("cpu"))
    ((rank + 1) * (rows**2).sum()).backward()
    grad: Any = param.grad
    assert grad is not None
    return {"rows": rows.detach(), "grad": grad.full_tensor(), "placements": str(grad.placements),
            "local_rows": int(param.to_local().shape[0])}


def _patch_verl_fused_kernel() -> None:
    """What verl lacks (#7520): its fused kernel gathers a sharded LM-head weight, its gradient
    rank-averaged like FSDP2's own reduction."""
    from torch.distributed.tensor import DTensor, Partial
    from verl.utils.experimental import torch_functional as tf

    orig = tf.FusedLinearForPPO.forward

    def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
        if isinstance(vocab_weights, DTensor):
            vocab_weights = vocab_weights.full_tensor(grad_placements=[Partial("avg")])
        return orig(self, hidden_states, vocab_weights, input_ids, temperature)

    tf.FusedLinearForPPO.forward = forward  # pyright: ignore[reportAttributeAccessIssue]


def _patch_verl_wrap_head_in_root() -> None:
    """The other fix (verl PR #7427): with fused kernels, an untied ``lm_head`` is not wrapped
    as its own FSDP2 unit, so the root unit gathers it for the forward."""
    import verl.utils.fsdp_utils as fu

    select = fu._select_fsdp2_wrap_targets

    def targets(model, cls_names):
        return [m for m in select(model, cls_names) if m is not model.get_output_embeddings()]

    fu._select_fsdp2_wrap_targets = targets


def _updates(worker, tok, rank: int, world: int, calls: list[str]) -> dict:
    """Updates with ``ntl_weight`` 0 and ``W`` (token-mean): verl's metrics, the gradients the
    optimizer sees, the hook's gathers of a sharded head."""
    from dist_scenarios import batch_of, full_grads, rank_indices, reconfigure
    from verl.utils import tensordict_utils as tu

    engine = worker.actor.engine
    module = engine.module  # pyright: ignore[reportAttributeAccessIssue]
    actor_config = worker.loss_fn.keywords["config"]
    out: dict = {}
    for name, changes in [("w0", {}), ("ntl", {"ntl_weight": W})]:
        reconfigure(actor_config, **changes)
        grads: dict = {}
        hook = engine.optimizer.register_step_pre_hook(  # pyright: ignore[reportAttributeAccessIssue]
            lambda *_, g=grads, m=module: g.update(full_grads(m)))
        td = batch_of(tok, rank_indices(rank, world))
        tu.assign_non_tensor(td, calculate_entropy=False, global_batch_size=len(cpu_dist.SAMPLES_8),
                             mini_batch_size=len(cpu_dist.SAMPLES_8), epochs=1, seed=1,
                             dataloader_kwargs={"shuffle": False}, temperature=T)
        n_calls = len(calls)
        res = worker.update_actor(td)
        hook.remove()
        out[name] = {"metrics": dict(tu.get(res, "metrics")), "grads": grads, "gathers": calls[n_calls:]}
    return out


def untied_fused(rank: int, world: int, model_path: str) -> dict:
    """Stock verl: the worker build is refused. Patched kernel (``"kernel"``), then the head kept
    in the root unit (``"root"``): :func:`_updates` of a worker built from the same config."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from ntl.tokenizers import qwen2_tokenizer

    cpu_dist.register_stock_engine_for_cpu()
    tok = qwen2_tokenizer()
    out: dict = {"timing": {}}
    t0 = time.perf_counter()
    cfg = cpu_dist.compose(model_path, *cpu_dist.DYNAMIC_BSZ, *FUSED)
    try:
        ActorRolloutRefWorker(config=cfg.actor_rollout_ref, role="actor").init_model()
        out["refusal"] = None
    except ValueError as e:
        out["refusal"] = str(e)
    out["timing"]["refused build"] = time.perf_counter() - t0

    import ntl.rl.capture as E  # the hook's gather lives in the shared capture (ntl_verl.engine re-exports it)

    calls: list[str] = []
    gather = E.number_rows_of_param

    def observed(param, ids, device):
        calls.append(f"{type(param).__name__}{getattr(param, 'placements', '')}")
        return gather(param, ids, device)

    E.number_rows_of_param = observed  # observe (not change) the hook's gather
    for fix, patch in [("kernel", _patch_verl_fused_kernel), ("root", _patch_verl_wrap_head_in_root)]:
        patch()  # cumulative: "root" also has the kernel patch, which a gathered weight never reaches
        t0 = time.perf_counter()
        worker = ActorRolloutRefWorker(config=cfg.actor_rollout_ref, role="actor")
        worker.init_model()
        module = worker.actor.engine.module  # pyright: ignore[reportAttributeAccessIssue]
        head = {"own_unit": isinstance(module.lm_head, FSDPModule),
                "dtensor": isinstance(module.lm_head.weight, DTensor),
                "engine": type(worker.actor.engine).__qualname__}
        out[fix] = {"head": head, **_updates(worker, tok, rank, world, calls)}
        out["timing"][fix] = time.perf_counter() - t0
        del worker, module
    return out


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return cpu_dist.model_dir(str(tmp_path_factory.mktemp("tiny_qwen2_untied")))


@pytest.fixture(scope="module")
def runs(model_path, tmp_path_factory):
    """{1: rank 0's result with one rank, 2: with two ranks} (both started at once)."""
    dirs = {w: str(tmp_path_factory.mktemp(f"untied{w}")) for w in (1, 2)}
    procs = {w: cpu_dist.start("test_verl09_untied:untied_fused", w, dirs[w], model_path, timeout=TIMEOUT)
             for w in (2, 1)}
    try:
        return {w: cpu_dist.join(procs[w], w, dirs[w]) for w in (1, 2)}
    finally:
        for p in procs.values():
            p.kill()


@pytest.fixture(scope="module")
def ref(model_path, qwen_tok):
    """Independent reference from full logits of the saved model (test_verl09_dist.reference):
    the token-mean NTL over the digit targets and its gradient."""
    from dist_scenarios import HEAD_ROWS
    from test_verl09_dist import agg, reference

    model, per, probs = reference(model_path, qwen_tok)
    value = agg(per, "token-mean")
    value.backward()  # pyright: ignore[reportAttributeAccessIssue]
    grads = {n: (p.grad[HEAD_ROWS] if n.endswith("lm_head.weight") else p.grad).clone()
             for n, p in model.named_parameters() if p.grad is not None and "embed_tokens" not in n}
    return {"value": float(value), "n": len(probs), "grads": grads}


def metric(res, name):
    (value,) = res["metrics"][name]
    return float(value)


# --------------------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sharded_rows_gather_and_rank_averaged_gradient(tmp_path):
    res = cpu_dist.run("test_verl09_untied:rows_rank", 2, str(tmp_path), timeout=240)
    w = _rows_weight()
    torch.testing.assert_close(res["rows"], w[ROWS_IDS], rtol=0, atol=0)
    assert res["local_rows"] == 4  # rank 0 holds rows 0-3: ids 0 and 3 there, 6, 4, 5 on rank 1
    # d/dW of (r+1) sum(W[ids]^2) is 2 (r+1) W at the ids; averaged over r = 0, 1: 3 W
    want = torch.zeros_like(w)
    want[ROWS_IDS] = 2 * (1 + 2) / 2 * w[ROWS_IDS]
    torch.testing.assert_close(res["grad"], want, rtol=1e-12, atol=1e-12)
    assert "Shard(dim=0)" in res["placements"]


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 120)
def test_stock_verl_fused_untied_head_is_refused_naming_7520(runs):
    for w in (1, 2):
        msg = runs[w]["refusal"]
        assert msg is not None, w
        assert "#7520" in msg and "use_fused_kernels=False" in msg and "untied" in msg, msg


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 120)
def test_head_layout_and_where_ntl_reads_it(runs):
    """verl's wrapping: the head its own sharded unit, NTL gathers its rows from the shard; with the
    head in the root unit (verl PR #7427) the forward sees it gathered and NTL indexes it."""
    for w in (1, 2):
        engine = "NTLFSDPEngineWithLMHead"
        assert runs[w]["kernel"]["head"] == {"own_unit": True, "dtensor": True, "engine": engine}
        gathers = runs[w]["kernel"]["ntl"]["gathers"]
        assert gathers and all(g == "DTensor(Shard(dim=0),)" for g in gathers), gathers
        assert runs[w]["root"]["head"] == {"own_unit": False, "dtensor": True, "engine": engine}
        assert runs[w]["root"]["ntl"]["gathers"] == []


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 120)
@pytest.mark.parametrize("fix", ["kernel", "root"])
def test_ntl_loss_and_digit_row_gradient_equal_the_reference_dp1_dp2(runs, ref, fix):
    for w in (1, 2):
        r = runs[w][fix]
        assert metric(r["ntl"], "ntl/loss") == pytest.approx(ref["value"], rel=1e-4), w
        assert metric(r["ntl"], "ntl/total_digits") == ref["n"]
        extra = metric(r["ntl"], "loss") - metric(r["w0"], "loss")
        assert extra == pytest.approx(W * ref["value"], rel=1e-4), w
    g = {w: {n: (runs[w][fix]["ntl"]["grads"][n] - runs[w][fix]["w0"]["grads"][n]) / W
             for n in runs[w][fix]["w0"]["grads"]} for w in (1, 2)}
    head = g[1]["lm_head.weight"]
    assert head[:10].abs().max() > 1e-3  # digit rows move ...
    assert head[10:].abs().max() < 1e-6  # ... ordinary rows do not
    for n in ref["grads"]:
        scale = max(1e-6, float(ref["grads"][n].abs().max()))
        for w in (1, 2):
            torch.testing.assert_close(g[w][n], ref["grads"][n], rtol=2e-3, atol=1e-4 * scale, msg=f"{w}: {n}")
        torch.testing.assert_close(g[2][n], g[1][n], rtol=1e-4, atol=1e-5 * scale, msg=f"DP2 vs DP1: {n}")
