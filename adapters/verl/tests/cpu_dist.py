"""verl's real workers on CPU, in separate rank processes.

* :func:`install_cpu_platform`: a verl platform for CPUs (verl's own extension point,
  ``verl.plugin.platform.PlatformRegistry``; selected with ``VERL_PLATFORM=cpu``): gloo, device
  ``"cpu"``, no-op memory/stream calls. verl's FSDP2 engine then runs unchanged on CPU.
* :func:`start` / :func:`join` / :func:`run`: ``world`` rank processes (``python cpu_dist.py``,
  started, timed out, killed and their logs shown by ``tests/support/ranks.py``, the helper the
  TRL tests use too), a gloo process group on a free 127.0.0.1 port; rank 0's result is written
  to ``out_dir`` and read back by the test.
* :func:`model_dir`: a tiny Qwen2 (weights + Qwen2.5's real tokenizer) saved to disk, what verl's
  ``HFModelConfig`` loads; :func:`compose` / :data:`CPU_OVERRIDES`: verl's ``ppo_trainer`` config for it.

Nothing here imports verl at module level: the platform must be chosen before verl's first import
in a rank process (``transformer_impl`` resolves it at import time).
"""

from __future__ import annotations

import os
import pickle
import sys

import ranks  # tests/support (conftest.py; PYTHONPATH in the rank processes)
import torch

V = 32768  # > every token id of the samples (Qwen2.5 itself has 151936); keeps CPU ranks fast

# (prompt, response text, ground truth): harness.SAMPLES plus four more; the last has no answer
# (no digit targets with either label mode), sample 1 and 6 answer wrongly.
SAMPLES_8 = [
    ("Q: 100 + 23?", " First 100 then 23. #### 123", "123"),
    ("Question: 7*6", " 7*6 = 42 so #### 45", "42"),
    ("Q: add 5 and 9", " 5+9 is 14. The answer #### 14", "14"),
    ("Q: 2?", " #### 2,001", "2001"),
    ("Q: 9 + 9?", " 9 plus 9 makes 18. #### 18", "18"),
    ("Q: 30 / 5?", " thirty over five is #### 7", "6"),
    ("Q: 12 * 12?", " #### 144", "144"),
    ("Q: 7 - 3?", " it is four", "4"),
]

CPU_OVERRIDES = [
    "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
    # the tiny model's vocabulary (32768) is smaller than Qwen's special-token ids
    "+actor_rollout_ref.model.override_config.pad_token_id=0",
    "+actor_rollout_ref.model.override_config.bos_token_id=0",
    "+actor_rollout_ref.model.override_config.eos_token_id=0",
    "actor_rollout_ref.model.use_remove_padding=True",
    "actor_rollout_ref.actor.strategy=fsdp2",
    "actor_rollout_ref.actor.use_torch_compile=False",
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision.reduce_dtype=fp32",
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision.buffer_dtype=fp32",
    # lr 0: the update leaves the weights alone, so several updates see the same model
    "actor_rollout_ref.actor.optim.lr=0.0",
    "actor_rollout_ref.actor.optim.clip_grad=1e9",
    "actor_rollout_ref.actor.optim.total_training_steps=1",
    "actor_rollout_ref.actor.ppo_mini_batch_size=8",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.actor.use_kl_loss=False",
    "actor_rollout_ref.actor.entropy_coeff=0.0",
    "actor_rollout_ref.actor.shuffle=False",
    "algorithm.use_kl_in_reward=False",
    "trainer.n_gpus_per_node=1",
    "data.train_batch_size=8",
]

DYNAMIC_BSZ = [
    "actor_rollout_ref.actor.use_dynamic_bsz=True",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=64",
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=64",
]

NTL_TARGET = "actor_rollout_ref.actor._target_=ntl_verl.config.NTLActorConfig"


def model_dir(path: str, seed: int = 0) -> str:
    """A tiny Qwen2 (2 layers, hidden 32, untied head scaled for non-trivial digit logits) with
    Qwen2.5's tokenizer, saved like a hub checkpoint."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ntl.tokenizers import qwen2_tokenizer

    cfg = Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        architectures=["Qwen2ForCausalLM"], pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    qwen2_tokenizer().save_pretrained(path)
    return path


def compose(model_path: str, *overrides: str):
    """verl's ``ppo_trainer`` config (Hydra) for a CPU actor on ``model_path``."""
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    cfg_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=cfg_dir, version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=[
            f"actor_rollout_ref.model.path={model_path}", f"critic.model.path={model_path}",
            *CPU_OVERRIDES, *overrides,
        ])


def install_cpu_platform() -> None:
    """Register and select verl's ``cpu`` platform (call before anything imports verl's engine)."""
    os.environ["VERL_PLATFORM"] = "cpu"
    import types
    from contextlib import contextmanager

    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry

    def nothing(*_a, **_k):
        return None

    module = types.SimpleNamespace(
        is_available=lambda: True, empty_cache=nothing, synchronize=nothing, set_device=nothing,
        current_device=lambda: "cpu", device_count=lambda: 1, manual_seed=torch.manual_seed,
        manual_seed_all=torch.manual_seed, max_memory_allocated=lambda *a: 0, max_memory_reserved=lambda *a: 0,
        memory_allocated=lambda *a: 0, memory_reserved=lambda *a: 0, mem_get_info=lambda *a: (1 << 34, 1 << 34),
        get_rng_state=torch.get_rng_state, set_rng_state=torch.set_rng_state, reset_peak_memory_stats=nothing,
        ipc_collect=nothing, get_device_name=lambda *a: "cpu",
    )

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        # class attributes where verl declares properties (read the same way)
        device_name = "cpu"  # pyright: ignore[reportAssignmentType]
        vendor_name = "cpu"  # pyright: ignore[reportAssignmentType]
        device_module = module  # pyright: ignore[reportAssignmentType]

        def is_available(self): return True
        def current_device(self): return "cpu"
        def device_count(self): return 1
        def set_device(self, device_index): pass
        def synchronize(self, device_index=None): pass
        def manual_seed(self, seed): torch.manual_seed(seed)
        def manual_seed_all(self, seed): torch.manual_seed(seed)
        def set_allocator_settings(self, settings): pass
        def empty_cache(self): pass
        def get_device_capability(self, device_index=0): return (None, None)
        def communication_backend_name(self): return "gloo"
        def visible_devices_envvar(self): return "CPU_VISIBLE_DEVICES"
        def profiler_start(self): pass
        def profiler_stop(self): pass
        def ray_resource_name(self): return "CPU"
        def ray_noset_envvars(self): return []
        def is_ipc_supported(self): return False
        def cudart(self): return None

        @contextmanager
        def nvtx_range(self, msg):
            yield


def register_stock_engine_for_cpu() -> None:
    """verl registers its FSDP engine for cuda/npu only; register it (vendor-less, as verl does)
    for the cpu platform. Call before ``ntl_verl`` is imported in the rank."""
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cpu")(
        FSDPEngineWithLMHead)


#: ``attn_implementation`` of :func:`install_cpu_varlen_attention` (an ``override_config`` value)
CPU_VARLEN = "cpu_varlen"


def cpu_varlen_flash_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    query_length: int, *args, position_ids: torch.Tensor | None = None, softmax_scale: float | None = None,
    is_causal: bool = True, **kwargs,
) -> torch.Tensor:
    """A CPU stand-in for flash-attn's packed ("varlen") kernel, with transformers'
    ``_flash_attention_forward`` signature: ``q [1, S, H, D]``, ``k, v [1, S, H_kv, D]``; the packed
    sequences are the runs of ``position_ids [1, S]`` that restart (a position not greater than the
    one before starts a new sequence; verl's padding restarts at 0 too). Causal attention within
    each sequence: ``softmax(q k^T * scale + causal/block mask) v`` in one masked SDPA call."""
    if position_ids is None or query.shape[0] != 1:
        raise ValueError("the CPU varlen attention needs packed inputs (batch 1) with position_ids")
    pos = position_ids.reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] <= pos[:-1]
    seq = starts.long().cumsum(0)
    S = pos.numel()
    idx = torch.arange(S, device=pos.device)
    allowed = (seq[:, None] == seq[None, :]) & ((idx[None, :] <= idx[:, None]) | (not is_causal))
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [1, H, S, D]
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=softmax_scale)
    return out.transpose(1, 2)


def install_cpu_varlen_attention() -> None:
    """Make verl's remove-padding / Ulysses attention path run on CPU.

    verl patches only flash attention for packed inputs and Ulysses SP
    (``transformers.integrations.flash_attention._flash_attention_forward`` becomes
    ``_ulysses_flash_attention_forward``: all-to-all to full sequence / split heads, the kernel,
    all-to-all back). This registers transformers' own ``flash_attention_forward`` under the name
    :data:`CPU_VARLEN` (mask function: flash attention's, no dense mask) and points the kernel
    verl's patch calls to :func:`cpu_varlen_flash_attention`, so everything around the kernel is
    verl's and transformers' own code. Select it with
    ``actor_rollout_ref.model.override_config.attn_implementation=cpu_varlen``. Call in the rank
    before the model is built."""
    import verl.models.transformers.monkey_patch as mp
    from transformers import AttentionInterface
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(CPU_VARLEN, flash_attention_forward)
    AttentionMaskInterface.register(CPU_VARLEN, flash_attention_mask)
    mp._flash_attention_forward = cpu_varlen_flash_attention  # pyright: ignore[reportAttributeAccessIssue]


def rank_main() -> int:
    """One rank (``python cpu_dist.py OUT_DIR TARGET``, ``RANK``/``WORLD_SIZE``/... set by
    :func:`start`): the cpu platform, the gloo group, ``target(rank, world, *args)`` with the
    arguments :func:`start` pickled; rank 0 writes the result (atomically)."""
    out_dir, target = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    install_cpu_platform()
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    with open(os.path.join(out_dir, f"args_{world}.pkl"), "rb") as f:
        args = pickle.load(f)
    module, name = target.rsplit(":", 1)
    fn = getattr(__import__(module, fromlist=[name]), name)
    result = fn(rank, world, *args)
    if rank == 0:
        ranks.atomic_write(os.path.join(out_dir, f"result_{world}.pt"), lambda f: torch.save(result, f))
    return 0  # ranks.run_rank: the final barrier, then os._exit


def start(target: str, world: int, out_dir: str, *args, timeout: float) -> ranks.Ranks:
    """Start ``world`` rank processes running ``target(rank, world, *args)`` (``"module:function"``;
    rank 0's return value is saved; ``args`` are pickled). They are killed, and the test fails
    with every rank's log tail, ``timeout`` s after the start (or soon after one rank fails).
    :func:`join` them."""
    with open(os.path.join(out_dir, f"args_{world}.pkl"), "wb") as f:
        pickle.dump(args, f)
    port = ranks.free_port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return ranks.start(
        f"{target} on {world} rank(s)", [[sys.executable, os.path.abspath(__file__), out_dir, target]] * world,
        log_dir=os.path.join(out_dir, "logs"), timeout=timeout, env=env,
        rank_env=[ranks.dist_env(r, world, port) for r in range(world)], pythonpath=[os.path.dirname(__file__)])


def join(procs: ranks.Ranks, world: int, out_dir: str):
    """Wait for the ranks of :func:`start` (``ranks.RanksFailed`` with every rank's log tail if one
    fails or they time out); returns rank 0's result."""
    procs.wait()
    return torch.load(os.path.join(out_dir, f"result_{world}.pt"), weights_only=False)


def run(target: str, world: int, out_dir: str, *args, timeout: float):
    """:func:`start` + :func:`join`."""
    return join(start(target, world, out_dir, *args, timeout=timeout), world, out_dir)


if os.path.dirname(__file__) not in sys.path:  # the rank processes import the scenario modules by name
    sys.path.insert(0, os.path.dirname(__file__))


if __name__ == "__main__":
    import cpu_dist  # the rank runs the module the scenarios import, not a second copy (__main__)

    ranks.run_rank(cpu_dist.rank_main)
