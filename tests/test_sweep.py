"""``python -m ntl.bench.sweep``: the fused kernel's launch-configuration sweep, on CPU.

``--smoke`` runs every code path of the GPU sweep (override, checks, timing, outputs) in
Triton's interpreter at a tiny shape; the numbers mean nothing. The override is checked to
reach the kernel launch and to fail loudly when the launcher does not use it.
"""

from __future__ import annotations

import json

import pytest
import torch

import ntl
from ntl.bench import sweep
from ntl.kernels import ce_ntl as fused_ce
from ntl.kernels import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="the smoke sweep runs in Triton's interpreter")


def test_smoke_sweep_runs_every_config_and_writes_outputs(tmp_path):
    rc = sweep.main(["--smoke", "--out", str(tmp_path), "--name", "s"])
    assert rc == 0
    doc = json.loads((tmp_path / "s.json").read_text())
    md = (tmp_path / "s.md").read_text()
    assert doc["smoke"] and doc["config"]["N"] == 32 and doc["config"]["V"] == 1000
    assert doc["config"]["dtypes"] == ["bfloat16", "float16"]
    assert doc["config"]["modes"] == ["eval", "fwd", "fwd+bwd"]
    for dt in ("bfloat16", "float16"):
        recs = [r for r in doc["results"] if r["dtype"] == dt]
        assert [r["config"] for r in recs] == ["default", *sweep.SMOKE_CONFIGS]
        assert recs[0]["is_default"] and recs[0]["BLOCK_V"] == doc["defaults"][dt]["BLOCK_V"]
        for r, want in zip(recs[1:], sweep.SMOKE_CONFIGS, strict=True):
            assert f"{r['BLOCK_V']}/{r['num_warps']}" == want
        for r in recs:
            assert r["status"] == "ok", r
            assert r["check"]["ok"] and r["check"]["loss_rel_err"] <= sweep.LOSS_RTOL
            assert set(r["modes"]) == {"eval", "fwd", "fwd+bwd"}
            assert all(t["median"] > 0 and t["n"] == 1 for t in r["modes"].values())
        assert set(doc["best"][dt]) == {"eval", "fwd", "fwd+bwd"}
        assert f"## {dt}" in md
    assert "| 256/8 | 256 | 8 |" in md and "Smoke run" in md and "Problems: none" in md
    assert sweep.problems(doc) == []


def test_forced_config_reaches_the_launch(monkeypatch):
    """The kernel is launched with the forced BLOCK_V / num_warps (maxnreg only when named), the
    result equals the default launch's, and the launcher's function is restored afterwards."""
    vocab = ntl.DigitVocab(list(range(15, 25)), vocab_size=1000)
    g = torch.Generator().manual_seed(3)
    x, y = 3 * torch.randn(32, 1000, generator=g), torch.randint(0, 1000, (32,), generator=g)
    real, seen = fused_ce._ce_ntl_fwd, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append({k: kw[k] for k in ("BLOCK_V", "num_warps", "maxnreg") if k in kw})
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(fused_ce, "_ce_ntl_fwd", Spy())
    orig = fused_ce.fwd_config
    a = ntl.cross_entropy_with_ntl(x, y, vocab, backend="triton", reduction="none")
    with sweep.forced_fwd_config(128, 8) as used:
        b = ntl.cross_entropy_with_ntl(x, y, vocab, backend="triton", reduction="none")
    with sweep.forced_fwd_config(256, 16, 128):
        c = ntl.cross_entropy_with_ntl(x, y, vocab, backend="triton", reduction="none")
    assert fused_ce.fwd_config is orig
    assert len(used) == 1
    assert seen == [{"BLOCK_V": 1024, "num_warps": 4}, {"BLOCK_V": 128, "num_warps": 8},
                    {"BLOCK_V": 256, "num_warps": 16, "maxnreg": 128}], seen
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-5)


def test_a_launcher_that_ignores_the_override_fails(tmp_path, monkeypatch):
    """If cross_entropy_with_ntl stops asking fused_ce.fwd_config (here: the torch backend),
    every forced config is an error and the sweep exits 1, rather than timing the default."""
    orig = ntl.cross_entropy_with_ntl
    monkeypatch.setattr(ntl, "cross_entropy_with_ntl",
                        lambda *a, backend=None, **k: orig(*a, backend="torch", **k))
    rc = sweep.main(["--smoke", "--out", str(tmp_path), "--name", "s", "--dtype", "bf16", "--modes", "fwd",
                     "--configs", "128/4"])
    assert rc == 1
    doc = json.loads((tmp_path / "s.json").read_text())
    r = doc["results"][1]
    assert r["status"] == "not-forced" and "did not ask fused_ce.fwd_config" in r["reason"]
    assert sweep.problems(doc) and "did not ask" in sweep.problems(doc)[0]


def test_config_parsing_and_problems(monkeypatch):
    assert sweep.parse_config("8192/8") == {"BLOCK_V": 8192, "num_warps": 8}
    assert sweep.parse_config("16384/16/128") == {"BLOCK_V": 16384, "num_warps": 16, "maxnreg": 128}
    for bad in ("8192", "8192/x", "8000/8", "8192/6", "8192/64", "0/8", "8192/8/128/1"):
        with pytest.raises(ValueError):
            sweep.parse_config(bad)
    with pytest.raises(SystemExit):
        sweep.parse_args(["--configs", "8192/6"])
    base = {"required": False, "is_default": False, "dtype": "bfloat16"}
    doc = {"results": [{**base, "config": "a", "status": "mismatch", "check": {}},
                       {**base, "config": "8192/8", "required": True, "status": "error", "reason": "x"},
                       {**base, "config": "c", "status": "error", "reason": "out of resources"},
                       {**base, "config": "d", "status": "skipped", "reason": "time budget"},
                       {**base, "config": "e", "status": "not-forced", "reason": "did not ask"},
                       {**base, "config": "default", "is_default": True, "status": "error", "reason": "y"}]}
    assert [p.split(":")[0] for p in sweep.problems(doc)] == ["bfloat16 a", "bfloat16 8192/8", "bfloat16 e",
                                                             "bfloat16 default"]
    monkeypatch.delattr(fused_ce, "fwd_config")
    with pytest.raises(RuntimeError, match="no fwd_config"), sweep.forced_fwd_config(8192, 8):
        pass
