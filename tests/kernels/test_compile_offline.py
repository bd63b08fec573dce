"""Every Triton kernel compiles for sm_80 and sm_90 without register spills (no GPU needed).

``tests/kernels/offline_compile.py`` runs in a subprocess with ``TRITON_INTERPRET=0`` (the
interpreter has no compiler): it drives each launcher at Qwen2.5's ``V = 151,936``,
``K = 10`` and ``K = 1,110``, fp32/bf16/fp16 and every flag (and GPT-2's odd ``V = 50,257``
at ``K = 10``), records the real launches and compiles each with the triton wheel's ``ptxas``
(see its docstring). Cost: 730 compiles (DEL and DIST² at bf16 only), 2.3-2.9 min cold on 2
quiet cores for the 670 before them (triton 3.4 / 3.9), ~2 s a compile with both cores busy
(hence the 20-min limit; Triton's cache makes a rerun take seconds). Spill-free on triton 3.5-3.9 (3.5-3.8
checked from throwaway venvs with ``--only ce_ntl._ce_ntl_fwd ce_ntl._scale_rows``); on 3.4 (the floor environment) one listed 8 B
spill (:data:`KNOWN_SPILLS_BY_TRITON`).
Skipped only where the triton wheel has no ``ptxas``/``cuobjdump`` (a failure instead with
``NTL_REQUIRE_OFFLINE_COMPILE=1``, as scripts/test_floor.sh sets it for triton 3.4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# the module's tests share one compile (the fixture), timed under the first test's limit
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1260)]

#: Spills known at the time of writing, each with its reason; the test fails on any other
#: spill and on a listed one that has gone (then delete its line).
#: (kernel, arch, dtype of the first pointer, BLOCK_K)
KNOWN_SPILLS: dict[tuple[str, int, str, int], str] = {
}
#: Spills of one triton release only (``(major, minor)``), same form: the floor of pyproject.
KNOWN_SPILLS_BY_TRITON: dict[tuple[int, int], dict[tuple[str, int, str, int], str]] = {
    (3, 4): {
        ("ntl_loss._ntl_loss_fwd", 80, "*fp32", 16):
            "triton 3.4's code for the reweighed standalone forward (W1, fp32, sm_80, 8 warps over "
            "4k elements) keeps 8 B on the stack; 4 warps or 2k-element blocks move the 8 B to "
            "other variants. 3.5-3.9: none. Cost not measured (no GPU).",
    },
}


def known_spills() -> dict[tuple[str, int, str, int], str]:
    """:data:`KNOWN_SPILLS` and those of the installed triton release."""
    import triton

    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    return {**KNOWN_SPILLS, **KNOWN_SPILLS_BY_TRITON.get((major, minor), {})}


@pytest.fixture(scope="module")
def report():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    src = str(HERE.parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    # below this module's pytest limit (pytestmark), which would fire first and hide this error
    out = subprocess.run([sys.executable, str(HERE / "offline_compile.py"), "--arch", "80", "90"],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    doc = json.loads(out.stdout)
    if "skip" in doc:
        if os.environ.get("NTL_REQUIRE_OFFLINE_COMPILE") == "1":  # scripts/test_floor.sh
            pytest.fail(f"offline compile required (NTL_REQUIRE_OFFLINE_COMPILE=1) but impossible: {doc['skip']}")
        pytest.skip(f"offline compile impossible here: {doc['skip']}")
    return doc


def _key(r):
    first = next(iter(r["signature"].values()))
    return (r["kernel"], r["arch"], first, r["constexprs"].get("BLOCK_K"))


def test_every_jit_function_has_a_table_entry(report):
    """A new ``@triton.jit`` in src/ntl/kernels needs its line in offline_compile.KERNELS."""
    found = set(report["jit_functions"])
    table = set(report["table"])
    assert found, "no @triton.jit function found in ntl.kernels"
    assert not found - table, f"kernels without an entry in tests/kernels/offline_compile.py KERNELS: {sorted(found - table)}"
    assert not table - found, f"KERNELS entries for kernels that no longer exist: {sorted(table - found)}"


#: Kernels whose pointer dtypes never follow the logits' dtype (one signature is right).
DTYPE_FREE = {"ntl_loss._ntl_finalize": "reduces the fp32 per-tile partial sums"}


def test_every_kernel_was_launched_at_every_width(report):
    """Each driver really reached its kernel (K = 10 and 1,110, three dtypes each)."""
    for key, kind in report["table"].items():
        if kind == "inlined":
            continue
        assert report["launches"][key] >= 6, (key, report["launches"][key])
        recs = [r for r in report["records"] if r["kernel"] == key]
        assert {r["arch"] for r in recs} == {80, 90}
        floats = {v for r in recs for v in r["signature"].values()} & {"*fp32", "*bf16", "*fp16"}
        if key not in DTYPE_FREE:
            assert len(floats) >= 2, (key, floats)  # more than one dtype reached the kernel


def test_compiles_without_errors(report):
    errors = [f"{r['kernel']} sm_{r['arch']} {r['constexprs']} {r['options']}: {r['error'][-1500:]}"
              for r in report["records"] if "error" in r]
    assert not errors, "\n\n".join(errors)


def test_no_register_spills(report):
    known = known_spills()
    spills, seen = [], set()
    for r in report["records"]:
        if "error" in r or not (r["stack"] or r["local"]):
            continue
        seen.add(_key(r))
        if _key(r) not in known:
            spills.append(f"{r['kernel']} sm_{r['arch']} {r['signature']} {r['constexprs']} "
                          f"{r['options']}: {r['regs']} regs, stack {r['stack']} B, local {r['local']} B")
    assert not spills, "register spills:\n" + "\n".join(spills)
    gone = set(known) - seen
    assert not gone, f"listed spills no longer happen, delete them from KNOWN_SPILLS: {sorted(gone)}"


def test_the_launches_use_the_gpu_configs(report):
    """The launches were recorded with the GPU block sizes (not the interpreter's)."""
    from ntl.kernels import ce_ntl  # (imported under the interpreter: names only)

    fwd = [r for r in report["records"] if r["kernel"] == "ce_ntl._ce_ntl_fwd"]
    cfg = {(r["signature"]["x_ptr"], r["constexprs"]["BLOCK_K"], r["constexprs"]["ROW_SCALE"],
            r["constexprs"]["REWEIGH"]): (r["constexprs"]["BLOCK_V"], r["options"]["num_warps"])
           for r in fwd}
    # 64 KB blocks over 32 warps; fp16 row scaling, reweigh and K > 512: 16k elements over 16
    # warps; triton < 3.9: 16k elements over 16 warps throughout (its 32-warp code spills);
    # triton 3.4 (no alignment assumed): 8k elements (16k spill 8-64 B at V = 50,257)
    if ce_ntl._BEFORE_3_5:
        assert set(cfg.values()) == {(8192, 16)}
    elif ce_ntl._BEFORE_3_9:
        assert set(cfg.values()) == {(16384, 16)}
    else:
        wide = {key: (16384, 16) for key in cfg if key[1] > 512 or key[2] or key[3]}
        assert cfg == {("*bf16", 16, False, False): (32768, 32), ("*fp16", 16, False, False): (32768, 32),
                       ("*fp32", 16, False, False): (16384, 32), **wide}
    # maxnreg=128 wherever 16 warps run (sm_80's ptxas otherwise aims at 64 registers and spills)
    assert all(r["options"].get("maxnreg") == (128 if r["options"]["num_warps"] == 16 else None)
               for r in fwd)
    assert {r["constexprs"]["BLOCK_N"] for r in fwd} == {1}
    assert {(r["constexprs"]["METHOD"], r["constexprs"]["REWEIGH"], r["constexprs"]["WRITE_GRAD"])
            for r in fwd} == ({(m, rw, w) for m in (0, 1) for rw in (False, True) for w in (False, True)}
                              | {(m, False, w) for m in (4, 5) for w in (False, True)})  # DEL, DIST2
    assert any(r["constexprs"]["ROW_SCALE"] for r in fwd)
    assert ce_ntl._ce_ntl_fwd.arg_names == list(fwd[0]["signature"])


def test_odd_vocab_streams_with_128_bit_loads(report):
    """GPT-2's V = 50,257 (rows at every alignment): the streaming kernels' aligned body still
    compiles to 128-bit loads (``ld.global.v4.b32``), with no stack (test_no_register_spills).
    Triton 3.4 streams such rows unhinted (scalar loads: with the hints it spills 368-520 B)."""
    from ntl.kernels import ce_ntl

    if ce_ntl._BEFORE_3_5:
        pytest.skip("triton 3.4: rows of odd V are streamed without alignment hints")
    for key in ("ce_ntl._ce_ntl_fwd", "ce_ntl._scale_rows"):
        recs = [r for r in report["records"] if r["kernel"] == key and r.get("V") == 50_257]
        assert recs, key
        for r in recs:
            assert r["ld128"] > 0, (key, r["arch"], r["signature"], r["constexprs"])
