"""Launchers x Hydra: verl's ppo_trainer config composed with each launcher's overrides."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
from conftest import verl_version

v = verl_version()
if v is None or v.release[:2] < (0, 9):
    pytest.skip("needs verl >= 0.9 (scripts/test_verl.sh runs this in its venv)", allow_module_level=True)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
EXAMPLES = os.path.join(REPO, "examples", "verl")


def launcher_overrides(script: str, tmp_path, env: dict | None = None) -> list[str]:
    """Run the launcher with a fake ``python3`` that records its arguments; return the
    Hydra overrides it passes to ``python3 -m verl.trainer.main_ppo``."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    out = tmp_path / "argv.txt"
    py = fake / "python3"
    py.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{out}"\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    e = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "HOME": str(tmp_path), **(env or {})}
    subprocess.run(["bash", os.path.join(EXAMPLES, script)], env=e, check=True, timeout=60)
    argv = out.read_text().splitlines()
    assert argv[:2] == ["-m", "verl.trainer.main_ppo"], argv[:3]
    return argv[2:]


def compose(overrides: list[str]):
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    cfg_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=cfg_dir, version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)


def actor_of(cfg):
    from verl.utils.config import omega_conf_to_dataclass

    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


COMMON = {
    "data.train_batch_size": 256,
    "actor_rollout_ref.actor.ppo_mini_batch_size": 64,
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 4,
    "actor_rollout_ref.actor.optim.lr": 1e-6,
    "critic.optim.lr": 1e-5,
    "data.max_prompt_length": 1024,
    "data.max_response_length": 512,
    "algorithm.adv_estimator": "gae",
    "algorithm.gamma": 1.0,
    "algorithm.lam": 1.0,
    "trainer.total_epochs": 15,
    "trainer.test_freq": 10,
    "trainer.n_gpus_per_node": 4,
}


def check_common(cfg):
    from omegaconf import OmegaConf

    for key, want in COMMON.items():
        assert OmegaConf.select(cfg, key) == want, key


@pytest.mark.parametrize(
    ("script", "labels"),
    [("train_gsm8k_qwen_ppo_ntl.sh", "all"), ("train_gsm8k_qwen_ppo_ntl_final_answer.sh", "final_answer")],
)
def test_ntl_launchers_compose_and_instantiate(script, labels, tmp_path):
    from ntl_verl.config import NTLActorConfig

    cfg = compose(launcher_overrides(script, tmp_path))
    check_common(cfg)
    actor = actor_of(cfg)
    assert type(actor) is NTLActorConfig
    assert actor.ntl_enabled is True
    assert actor.ntl_labels == labels
    assert actor.ntl_method == "mse"
    assert actor.ntl_weight == pytest.approx(0.1)
    assert actor.extract_digit_info is False
    assert actor.engine._ntl_settings == actor.ntl_settings  # reaches the engine config
    assert actor.ppo_micro_batch_size_per_gpu == 4


def test_bonus_and_method_from_environment(tmp_path):
    env = {"NTL_BONUS_TYPE": "final_answer", "NTL_METHOD": "wasserstein", "NTL_WEIGHT": "0.3"}
    actor = actor_of(compose(launcher_overrides("train_gsm8k_qwen_ppo_ntl.sh", tmp_path, env)))
    s = actor.ntl_settings
    assert (s.ntl_method, s.ntl_weight, s.extract_digit_info, s.ntl_bonus_type) == (
        "wasserstein", pytest.approx(0.3), True, "final_answer")
    assert s.bonus_enabled


def test_w1_is_an_alias_of_wasserstein_as_in_ntl():
    from ntl_verl.settings import NTLSettings

    assert NTLSettings(ntl_method="w1").ntl_method == "wasserstein"
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.actor\.ntl_method must be one of"):
        NTLSettings(ntl_method="l2")


def test_baseline_launcher_is_stock_verl(tmp_path):
    from verl.workers.config import FSDPActorConfig

    overrides = launcher_overrides("train_gsm8k_qwen_ppo.sh", tmp_path)
    assert not any("ntl_verl" in o or ".ntl_" in o for o in overrides)
    cfg = compose(overrides)
    check_common(cfg)
    assert type(actor_of(cfg)) is FSDPActorConfig


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("++actor_rollout_ref.actor.ntl_method=l2", "actor_rollout_ref.actor.ntl_method"),
        ("++actor_rollout_ref.actor.ntl_labels=some", "actor_rollout_ref.actor.ntl_labels"),
        ("++actor_rollout_ref.actor.ntl_weight=-1", "actor_rollout_ref.actor.ntl_weight"),
        ("++actor_rollout_ref.actor.ntl_weight=abc", "actor_rollout_ref.actor.ntl_weight"),
        ("++actor_rollout_ref.actor.ntl_enabled=maybe", "actor_rollout_ref.actor.ntl_enabled"),
        ("++actor_rollout_ref.actor.ntl_bonus_type=all", "extract_digit_info"),
    ],
)
def test_bad_values_fail_naming_the_key(override, match, tmp_path):
    overrides = [o for o in launcher_overrides("train_gsm8k_qwen_ppo_ntl.sh", tmp_path) if not o.startswith(
        "++actor_rollout_ref.actor." + override.split(".")[-1].split("=")[0] + "=")]
    cfg = compose([*overrides, override])
    with pytest.raises(Exception, match=match):
        actor_of(cfg)


def test_ntl_keys_without_target_fail_in_stock_verl(tmp_path):
    """Without the _target_ override verl's own dataclass rejects the NTL keys (why we subclass)."""
    overrides = [o for o in launcher_overrides("train_gsm8k_qwen_ppo_ntl.sh", tmp_path) if "_target_" not in o]
    with pytest.raises(Exception, match="ntl_"):
        actor_of(compose(overrides))


def tiny_model_dir(path, tok) -> str:
    """A local model directory (config + tokenizer, no weights): what HFModelConfig reads."""
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2,
                architectures=["Qwen2ForCausalLM"]).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_validate_config_runs_before_any_worker(tmp_path, qwen_tok):
    """verl's driver-side validate_config instantiates the actor config: bad NTL values stop the
    run there (before Ray / GPUs), good ones pass."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    model = tiny_model_dir(tmp_path / "model", qwen_tok)
    overrides = launcher_overrides("train_gsm8k_qwen_ppo_ntl_final_answer.sh", tmp_path, {"MODEL": model})
    cfg = compose(overrides)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    bad = compose([*overrides, "++actor_rollout_ref.actor.ntl_method=l1"])
    with pytest.raises(Exception, match=r"actor_rollout_ref\.actor\.ntl_method"):
        validate_config(bad, use_reference_policy=need_reference_policy(bad), use_critic=need_critic(bad))


def test_proximity_reward_function_file(tmp_path):
    """The text-only proximity bonus goes through verl's ordinary custom_reward_function."""
    from verl.trainer.ppo.reward import get_custom_reward_fn

    overrides = launcher_overrides("train_gsm8k_qwen_ppo.sh", tmp_path)
    cfg = compose([*overrides, "reward.custom_reward_function.name=compute_score_proximity",
                   "+reward.custom_reward_function.reward_kwargs.ntl_bonus_weight=0.5"])
    fn = get_custom_reward_fn(cfg)
    exact = fn("openai/gsm8k", "so #### 42", "42")
    near = fn("openai/gsm8k", "so #### 40", "42")
    assert exact["score"] == pytest.approx(1.0 + 0.5)
    import math

    assert near["score"] == pytest.approx(0.5 * math.exp(-2 / 42))


def test_target_import_registers_the_engine_for_this_platform():
    """Importing the config (what the _target_ override does in each worker) makes verl's
    EngineRegistry hand out the NTL engine for language models; critics stay stock."""
    import ntl_verl.config  # noqa: F401
    from ntl_verl.engine import NTLEngineMixin, register_ntl_engine
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithValueHead

    for backend in ("fsdp", "fsdp2"):
        assert issubclass(EngineRegistry.get_engine_cls("language_model", backend), NTLEngineMixin)
        assert EngineRegistry.get_engine_cls("value_model", backend) is FSDPEngineWithValueHead
    assert register_ntl_engine() is register_ntl_engine()  # idempotent


# --------------------------------------------------------------------------- fail loudly at start-up
def bonus_overrides(tmp_path, qwen_tok):
    model = tiny_model_dir(tmp_path / "model", qwen_tok)
    env = {"MODEL": model, "NTL_BONUS_TYPE": "final_answer"}
    return launcher_overrides("train_gsm8k_qwen_ppo_ntl_final_answer.sh", tmp_path, env)


def run_validate(cfg):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("algorithm.rollout_correction.bypass_mode=true", r"algorithm\.rollout_correction\.bypass_mode=true skips it"),
        ("trainer.use_v1=false", r"trainer\.use_v1=true"),
    ],
)
def test_bonus_without_old_log_prob_outputs_fails_in_validate_config(override, match, tmp_path, qwen_tok):
    """verl's driver-side validate_config (before Ray starts) refuses the digit bonus when no
    old-log-prob pass would deliver it (the same config with the bonus validates: the smoke test)."""
    overrides = bonus_overrides(tmp_path, qwen_tok)  # bonus on, v1, no bypass: validates (smoke test)
    with pytest.raises(ValueError, match=match):
        run_validate(compose([*overrides, override]))
    if "bypass" in override:  # the NTL loss alone works in bypass mode
        no_bonus = [o for o in overrides if "ntl_bonus_type" not in o and "extract_digit_info" not in o]
        run_validate(compose([*no_bonus, override]))


@pytest.fixture
def fresh_registry(monkeypatch):
    """verl's EngineRegistry without the NTL engine (restored afterwards)."""
    import ntl_verl.engine as ne
    from verl.workers.engine.base import EngineRegistry

    cls = ne._engine_class()
    table = {mt: {b: {k: c for k, c in keys.items() if c is not cls} for b, keys in backends.items()}
             for mt, backends in EngineRegistry._engines.items()}
    monkeypatch.setattr(EngineRegistry, "_engines", table)
    monkeypatch.setattr(ne, "_REGISTERED", [])
    return EngineRegistry, cls


def test_engine_vendor_override_gets_the_ntl_engine(fresh_registry, monkeypatch):
    """VERL_ENGINE_VENDOR sends verl's lookup to another key; before registration that is verl's
    stock engine (plain PPO), after it the NTL engine."""
    from ntl_verl.engine import register_ntl_engine
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    registry, cls = fresh_registry
    monkeypatch.setenv("VERL_ENGINE_VENDOR", "some-vendor")
    assert registry.get_engine_cls("language_model", "fsdp") is FSDPEngineWithLMHead
    assert register_ntl_engine() is cls
    for backend in ("fsdp", "fsdp2"):
        assert registry.get_engine_cls("language_model", backend) is cls
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "npu")
    register_ntl_engine()
    assert registry.get_engine_cls("language_model", "fsdp2") is cls


def test_another_engine_on_the_lookup_key_is_an_error(fresh_registry, monkeypatch):
    from ntl_verl.engine import register_ntl_engine
    from verl.utils.device import get_device_name
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    registry, _ = fresh_registry

    class VendorEngine(FSDPEngineWithLMHead):
        pass

    monkeypatch.setenv("VERL_ENGINE_VENDOR", "some-vendor")
    registry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device=get_device_name(),
                      vendor="some-vendor")(VendorEngine)
    with pytest.raises(RuntimeError, match=r"VendorEngine.*VERL_ENGINE_VENDOR='some-vendor'"):
        register_ntl_engine()


def test_lookup_that_misses_the_ntl_engine_is_an_error(fresh_registry, monkeypatch):
    from ntl_verl.engine import register_ntl_engine
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    registry, _ = fresh_registry
    monkeypatch.setattr(registry, "get_engine_cls", classmethod(lambda c, m, b: FSDPEngineWithLMHead))
    with pytest.raises(RuntimeError, match="NTL would silently not apply"):
        register_ntl_engine()


def test_verl_version_is_checked(monkeypatch):
    import verl
    import verl.workers.engine.fsdp.transformer_impl as ti
    from ntl_verl._compat import require_verl_09

    assert require_verl_09() == verl.__version__
    with monkeypatch.context() as m:
        m.setattr(verl, "__version__", "0.9.0")
        with pytest.raises(ImportError, match=r"needs verl>=0\.9\.1, found verl 0\.9\.0"):
            require_verl_09()
    with monkeypatch.context() as m:
        m.delattr(ti, "_scale_logits_by_temperature")
        with pytest.raises(ImportError, match="_scale_logits_by_temperature"):
            require_verl_09()


def test_import_fails_on_a_verl_without_the_api(tmp_path):
    """The check runs when ntl_verl.config is imported (what the _target_ override does)."""
    import sys

    code = ("import verl.workers.engine.fsdp.transformer_impl as t\n"
            "del t._scale_logits_by_temperature\n"
            "import ntl_verl.config\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode != 0
    assert "ImportError: ntl_verl needs verl>=0.9.1" in r.stderr and "_scale_logits_by_temperature" in r.stderr


# --------------------------------------------------------------------------- 1-GPU smoke configuration
def test_one_gpu_smoke_configuration(tmp_path, qwen_tok):
    """examples/verl/smoke_gsm8k_qwen_ntl_1gpu.sh: 2 steps on one GPU, console logger, NTL loss and
    digit bonus on; verl's driver-side validate_config accepts it."""
    from ntl_verl.config import NTLActorConfig
    from omegaconf import OmegaConf

    model = tiny_model_dir(tmp_path / "model", qwen_tok)
    cfg = compose(launcher_overrides("smoke_gsm8k_qwen_ntl_1gpu.sh", tmp_path, {"MODEL": model}))
    want = {
        "trainer.n_gpus_per_node": 1, "trainer.nnodes": 1, "trainer.total_training_steps": 2,
        "trainer.val_before_train": False, "trainer.test_freq": -1, "data.train_batch_size": 16,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 16, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 4,
        "data.max_response_length": 256, "trainer.use_v1": True,
    }
    for key, value in want.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert list(cfg.trainer.logger) == ["console"]  # prints every metric, actor/ntl/* included
    actor = actor_of(cfg)
    assert type(actor) is NTLActorConfig
    s = actor.ntl_settings
    assert (s.ntl_enabled, s.ntl_labels, s.bonus_enabled, s.loss_agg_mode) == (True, "final_answer", True, "token-mean")
    run_validate(cfg)
