"""Rank functions run by :mod:`cpu_dist` in separate processes (verl's real workers on CPU).

``dp_updates``: one actor update per plan entry through ``ActorRolloutRefWorker.update_actor``
(``TrainingWorker.train_mini_batch`` -> verl's FSDP2 engine -> loss), every rank holding its
data-parallel share of one global mini-batch; returns the engine class, verl's metrics and the
full (all-gathered) gradients.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch
from cpu_dist import DYNAMIC_BSZ, SAMPLES_8, compose, register_stock_engine_for_cpu
from tensordict import TensorDict

# lm_head rows whose gradients are compared: the ten digits and ten ordinary tokens
HEAD_ROWS = list(range(15, 25)) + list(range(1000, 1010))


def sample_fields(tok, i: int, *, stage: str = "update") -> dict:
    """Sample ``i`` of SAMPLES_8 as the v1 trainer stores it (per-sample tensors; the random
    old log-probs / advantages depend on the sample only, not on how the batch is split)."""
    prompt, response, truth = SAMPLES_8[i]
    p = torch.tensor(tok.encode(prompt), dtype=torch.long)
    r = torch.tensor(tok.encode(response), dtype=torch.long)
    g = torch.Generator().manual_seed(1000 + i)
    f = {
        "prompts": p, "responses": r, "input_ids": torch.cat([p, r]),
        "position_ids": torch.arange(len(p) + len(r)),
        "response_mask": torch.ones(len(r), dtype=torch.int64), "loss_mask": torch.ones(len(r), dtype=torch.int64),
        "rm_scores": torch.cat([torch.zeros(len(r) - 1), torch.ones(1)]),
        "reward_model": {"ground_truth": truth, "style": "rule"},
    }
    if stage == "update":
        f["old_log_probs"] = -torch.rand(len(r), generator=g) - 0.5
        f["advantages"] = torch.randn(len(r), generator=g)
    return f


def batch_of(tok, indices: list[int], *, stage: str = "update") -> TensorDict:
    from verl.utils import tensordict_utils as tu

    rows = [sample_fields(tok, i, stage=stage) for i in indices]
    fields = {k: torch.nested.as_nested_tensor([r[k] for r in rows], layout=torch.jagged)
              for k in rows[0] if k != "reward_model"}
    td = TensorDict(fields, batch_size=[len(rows)])
    tu.assign_non_tensor(td, reward_model=[r["reward_model"] for r in rows])
    return td


def rank_indices(rank: int, world: int) -> list[int]:
    n = len(SAMPLES_8) // world
    return list(range(rank * n, (rank + 1) * n))


def full_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full gradients (FSDP2 DTensor shards all-gathered; every rank must call this)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in module.named_parameters():
        g = p.grad
        if g is None:
            continue
        g = g.full_tensor() if isinstance(g, DTensor) else g
        if "embed_tokens" in name:
            continue
        out[name] = (g[HEAD_ROWS] if name.endswith("lm_head.weight") else g).detach().clone()
    return out


def reconfigure(actor_config, **changes) -> None:
    """Change verl's actor config in place (``ntl_weight``, ``loss_agg_mode``, ...): verl's
    ``ppo_loss`` and the NTL engine read it at every loss call, so the next update uses it."""
    for key, value in changes.items():
        object.__setattr__(actor_config, key, value)
    if hasattr(actor_config, "ntl_settings"):
        object.__setattr__(actor_config.engine, "_ntl_settings", actor_config.ntl_settings)


def dp_updates(rank: int, world: int, model_path: str, plan: list) -> dict:
    """``plan``: ``(hydra overrides, [(name, config changes), ...])``: one worker built by verl
    from the overrides, then one update per name (after :func:`reconfigure` with the changes).
    Builds without the NTL ``_target_`` must come first: they run verl's stock engine,
    registered for cpu before ntl_verl is imported."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from ntl.tokenizers import qwen2_tokenizer

    register_stock_engine_for_cpu()
    tok = qwen2_tokenizer()
    results, timing = {}, {}
    for overrides, updates in plan:
        t0 = time.perf_counter()
        cfg = compose(model_path, *DYNAMIC_BSZ, *overrides)
        worker = ActorRolloutRefWorker(config=cfg.actor_rollout_ref, role="actor")
        worker.init_model()
        engine = worker.actor.engine
        actor_config = worker.loss_fn.keywords["config"]  # the actor config verl built (partial(ppo_loss))
        timing[f"build {overrides[:1]}"] = time.perf_counter() - t0
        for name, changes in updates:
            t1 = time.perf_counter()
            reconfigure(actor_config, **changes)
            grads = {}
            # the gradients the optimizer step sees (verl zeroes them when the update ends)
            # (verl's FSDP engine: its optimizer and module are not BaseEngine attributes)
            hook = engine.optimizer.register_step_pre_hook(  # pyright: ignore[reportAttributeAccessIssue]
                lambda *_, g=grads, m=engine.module: g.update(full_grads(m)))  # pyright: ignore[reportAttributeAccessIssue]
            td = batch_of(tok, rank_indices(rank, world))
            tu.assign_non_tensor(td, calculate_entropy=False, global_batch_size=len(SAMPLES_8),
                                 mini_batch_size=len(SAMPLES_8), epochs=1, seed=1,
                                 dataloader_kwargs={"shuffle": False}, temperature=0.9)
            out = worker.update_actor(td)
            hook.remove()
            results[name] = {"engine": type(engine).__qualname__, "metrics": dict(tu.get(out, "metrics")),
                             "grads": grads}
            timing[name] = time.perf_counter() - t1
        del worker, engine, actor_config
        gc.collect()
    results["_timing"] = timing
    return results


# --------------------------------------------------------------------------- Ulysses sequence parallel
def sp_updates(rank: int, world: int, model_path: str, plan: list, sp: int) -> dict:
    """:func:`dp_updates` with Ulysses sequence parallelism of size ``sp`` (``world = dp * sp``):
    verl's device mesh is ``(dp, sp)``, so ranks ``d*sp .. d*sp+sp-1`` form data-parallel rank
    ``d`` and all get its share of the mini-batch (as verl's dispatch gives every rank of an SP
    group the same data). Attention runs through verl's Ulysses patch with the CPU varlen kernel
    of :func:`cpu_dist.install_cpu_varlen_attention` (every build: ``sp`` overrides added)."""
    from cpu_dist import CPU_VARLEN, install_cpu_varlen_attention
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from ntl.tokenizers import qwen2_tokenizer

    if world % sp:
        raise ValueError(f"world {world} is not a multiple of sp {sp}")
    install_cpu_varlen_attention()
    register_stock_engine_for_cpu()
    tok = qwen2_tokenizer()
    dp, dp_rank = world // sp, rank // sp
    sp_overrides = [f"actor_rollout_ref.model.override_config.attn_implementation={CPU_VARLEN}",
                    f"actor_rollout_ref.actor.ulysses_sequence_parallel_size={sp}"]
    results, timing = {}, {}
    for overrides, updates in plan:
        t0 = time.perf_counter()
        cfg = compose(model_path, *DYNAMIC_BSZ, *sp_overrides, *overrides)
        worker = ActorRolloutRefWorker(config=cfg.actor_rollout_ref, role="actor")
        worker.init_model()
        engine: Any = worker.actor.engine  # verl's FSDP engine (module, optimizer: not BaseEngine's)
        actor_config = worker.loss_fn.keywords["config"]
        timing[f"build {overrides[:1]}"] = time.perf_counter() - t0
        setup = {"sp": engine.ulysses_sequence_parallel_size, "dp": engine.get_data_parallel_size(),
                 "dp_rank": engine.get_data_parallel_rank(), "pad_to_length": engine.pad_to_length,
                 "attn": engine.module.config._attn_implementation}
        if (setup["sp"], setup["dp"], setup["dp_rank"]) != (sp, dp, dp_rank):
            raise RuntimeError(f"verl built {setup}, expected sp={sp} dp={dp} dp_rank={dp_rank}")
        for name, changes in updates:
            t1 = time.perf_counter()
            reconfigure(actor_config, **changes)
            grads = {}
            hook = engine.optimizer.register_step_pre_hook(
                lambda *_, g=grads, m=engine.module: g.update(full_grads(m)))
            td = batch_of(tok, rank_indices(dp_rank, dp))
            tu.assign_non_tensor(td, calculate_entropy=False, global_batch_size=len(SAMPLES_8),
                                 mini_batch_size=len(SAMPLES_8), epochs=1, seed=1,
                                 dataloader_kwargs={"shuffle": False}, temperature=0.9)
            out = worker.update_actor(td)  # None on ranks other than an SP group's first
            hook.remove()
            results[name] = {"engine": type(engine).__qualname__, "grads": grads, "setup": setup,
                             "metrics": None if out is None else dict(tu.get(out, "metrics"))}
            timing[name] = time.perf_counter() - t1
        del worker, engine, actor_config
        gc.collect()
    results["_timing"] = timing
    return results


# --------------------------------------------------------------------------- LoRA
def lora_updates(rank: int, world: int, model_path: str, plan: list) -> dict:
    """:func:`dp_updates` for a LoRA actor (the plan's overrides set ``lora_rank``), plus the
    reference pass verl's trainer runs on the actor in LoRA mode (``ref_in_actor``:
    ``compute_log_prob`` with ``no_lora_adapter=True``, ``calculate_entropy=False``, on the batch
    that already holds ``old_log_probs``) and the same pass with the adapter on.

    After ``init_model`` every adapter weight is set to seeded random values (seed from the name;
    ``lora_A``: ``0.2 N(0, 1)`` instead of verl's random init, so every build has the same adapter;
    ``lora_B``: ``0.05 N(0, 1)`` instead of zero, so the adapter is live) and returned, so the test
    can rebuild the model. Returns per build name: ``adapters`` (name ->
    full weight), ``ref`` / ``actor`` (the passes' output keys and ``log_probs``) and per update
    the engine, metrics and the gradients of every trainable parameter."""
    import zlib

    from torch.distributed.tensor import DTensor, distribute_tensor
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from ntl.tokenizers import qwen2_tokenizer

    register_stock_engine_for_cpu()
    tok = qwen2_tokenizer()
    results: dict = {}
    timing = {}

    def full(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    def meta(td: TensorDict, **extra) -> TensorDict:
        tu.assign_non_tensor(td, global_batch_size=len(SAMPLES_8), mini_batch_size=len(SAMPLES_8), epochs=1,
                             seed=1, dataloader_kwargs={"shuffle": False}, temperature=0.9, **extra)
        return td

    for build, overrides, updates in plan:
        t0 = time.perf_counter()
        cfg = compose(model_path, *DYNAMIC_BSZ, *overrides)
        worker = ActorRolloutRefWorker(config=cfg.actor_rollout_ref, role="actor")
        worker.init_model()
        engine: Any = worker.actor.engine
        module = engine.module
        actor_config = worker.loss_fn.keywords["config"]
        adapters = {}
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_" in name:
                    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                    value = (0.05 if "lora_B" in name else 0.2) * torch.randn(p.shape, generator=g)
                    if isinstance(p, DTensor):
                        value = distribute_tensor(value, p.device_mesh, p.placements)
                        p.to_local().copy_(value.to_local())
                    else:
                        p.copy_(value)
            for name, p in module.named_parameters():
                if "lora_" in name:
                    adapters[name] = full(p)
        trainable = sorted(n for n, p in module.named_parameters() if p.requires_grad)
        res: dict = {"adapters": adapters, "trainable": trainable, "engine": type(engine).__qualname__}
        # the reference pass in LoRA mode (adapter off), then the same pass with the adapter on
        for key, extra in (("ref", {"no_lora_adapter": True}), ("actor", {})):
            td = meta(batch_of(tok, rank_indices(rank, world)), calculate_entropy=False, compute_loss=False, **extra)
            out = worker.compute_log_prob(td)
            res[key] = {"keys": sorted(out.keys()), "log_probs": [t.clone() for t in out["log_probs"].unbind()]}
        timing[f"build {build}"] = time.perf_counter() - t0
        for name, changes in updates:
            t1 = time.perf_counter()
            reconfigure(actor_config, **changes)
            grads: dict = {}

            def grab(*_a, g=grads, m=module):
                for n, p in m.named_parameters():
                    if p.grad is not None:
                        g[n] = full(p.grad)

            hook = engine.optimizer.register_step_pre_hook(grab)
            td = meta(batch_of(tok, rank_indices(rank, world)), calculate_entropy=False)
            out = worker.update_actor(td)
            hook.remove()
            res[name] = {"metrics": dict(tu.get(out, "metrics")), "grads": grads}
            timing[f"{build}/{name}"] = time.perf_counter() - t1
        results[build] = res
        del worker, engine, module, actor_config
        gc.collect()
    results["_timing"] = timing
    return results


# --------------------------------------------------------------------------- trainer step (Ray + TQ)
GROUP = 2  # rollout.n: responses per prompt (uid), for GRPO


def trainer_step(rank: int, world: int, model_path: str, overrides: list[str]) -> dict:
    """One v1 PPO step after the rollout, through verl's own code: the agent loop's outputs go into
    a real TransferQueue (Ray, SimpleStorage) as ``AgentLoopWorkerTQ`` puts them; then verl's
    ``PPOTrainer._compute_old_log_prob``, ``_compute_advantage`` and ``_update_actor`` run with the
    actor worker (``ActorRolloutRefWorker.compute_log_prob`` / ``update_actor`` through verl's
    ``tqbridge``, which fetches each batch from the store and writes every output back).
    Returns what the store holds after each stage and the trainer's metrics."""
    import types

    import ray
    import transfer_queue as tq
    from omegaconf import OmegaConf
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from ntl.rewards import compute_score
    from ntl.tokenizers import qwen2_tokenizer

    # logical CPUs: TransferQueue's controller and storage unit each reserve one
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 1024**2)
    try:
        tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
        cfg = compose(model_path, *overrides)
        worker = ActorRolloutRefWorker(config=cfg.actor_rollout_ref, role="actor")
        worker.init_model()
        tok = qwen2_tokenizer()
        keys, rows, tags = [], [], []
        for i, (_, response, truth) in enumerate(SAMPLES_8):
            f = sample_fields(tok, i, stage="old_log_prob")
            score = compute_score("openai/gsm8k", response, truth)["score"]
            f["rm_scores"] = torch.cat([torch.zeros(len(f["responses"]) - 1), torch.tensor([float(score)])])
            f["uid"] = f"prompt{i // GROUP}"
            f["data_source"] = "openai/gsm8k"
            keys.append(f"{f['uid']}_{i % GROUP}_0")
            rows.append(f)
            tags.append({"status": "success", "seq_len": int(f["input_ids"].numel())})
        batch = tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(rows), tags=tags)
        stock = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["rm_scores"])

        trainer = types.SimpleNamespace(config=cfg, actor_rollout_wg=worker)
        metrics: dict = {}
        batch = PPOTrainer._compute_old_log_prob(trainer, batch, metrics)
        after_old = tq.kv_batch_get(keys=keys, partition_id="train")
        batch = PPOTrainer._compute_advantage(trainer, batch, metrics)
        after_adv = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["advantages"])
        batch = PPOTrainer._update_actor(trainer, batch, metrics)

        def plain(td, names):
            out = {}
            for name in names:
                v = td[name]
                out[name] = [t.clone() for t in v.unbind()] if isinstance(v, torch.Tensor) else list(v)
            return out

        return {
            "keys": keys,
            "stock": plain(stock, ["rm_scores"]),
            "after_old": plain(after_old, ["ntl_targets", "rm_scores", "ntl_bonus", "old_log_probs", "uid"]),
            "nested": {k: bool(isinstance(after_old[k], torch.Tensor) and after_old[k].is_nested)
                       for k in ("ntl_targets", "rm_scores", "ntl_bonus")},
            "advantages": plain(after_adv, ["advantages"])["advantages"],
            "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        }
    finally:
        try:
            tq.close()
        finally:
            ray.shutdown()
