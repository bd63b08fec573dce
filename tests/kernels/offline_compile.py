"""Offline GPU compile of every ``@triton.jit`` kernel in ``src/ntl/kernels`` (no GPU needed).

Run with ``TRITON_INTERPRET=0`` (``tests/kernels/test_compile_offline.py`` starts it in a
subprocess): ``python tests/kernels/offline_compile.py --arch 80 90 [--jobs 2] [--only NAME]``
prints one JSON document on stdout.

How: each entry of :data:`KERNELS` names a ``@triton.jit`` function (``"module.name"``
inside ``ntl.kernels``) and a *driver* that calls the library's own launcher for one
:class:`Case` (Qwen2.5's ``V = 151,936``, ``K = 10`` and Llama-3's ``K = 1,110``,
fp32/bf16/fp16; GPT-2's odd ``V = 50,257`` with ``K = 10``) over every flag the launcher takes. During a driver the kernel objects
are replaced by recorders, so each launch is captured with the exact arguments,
constexprs and ``num_warps`` the launcher computed (from its own config functions: they
cannot drift). Every distinct launch is then compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda",
arch, 32))`` (the ``ptxas`` of the triton wheel) and its cubin's resource usage is read
with the wheel's ``cuobjdump``: a non-zero ``STACK`` or ``LOCAL`` size is a register
spill (what Triton reports as ``n_spills`` on a GPU). ``ld128`` / ``ld_other`` count the
PTX's 128-bit and other global loads.

Adding a kernel: one line in :data:`KERNELS` (a driver, or :data:`INLINED` for a
``@triton.jit`` device function that only other kernels call). A kernel without an
entry fails the guard test.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import itertools
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

V_QWEN = 151_936
V_GPT2 = 50_257  # odd: rows start at every alignment (the aligned body + masked ends)
KS = (10, 1110)  # Qwen2.5 digits; Llama-3's 1,110 number tokens
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ARCHS = (80, 90)
INLINED = "inlined"  # a device function: compiled inside every kernel that calls it


@dataclass
class Case:
    """Small CPU inputs at the real widths: ``N = 3`` rows (the grid does not matter here)."""

    V: int
    K: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        N = self.N = 3
        g = torch.Generator().manual_seed(0)
        self.logits = torch.randn(N, self.V, generator=g).to(self.dtype)
        self.ids = torch.randperm(self.V, generator=g)[:self.K].sort().values
        self.values = torch.arange(self.K, dtype=torch.float32)
        self.labels = self.ids[:N].clone()
        self.k = torch.arange(N, dtype=torch.long)
        self.a = torch.full((N,), 1.0 / N)
        self.b = 0.3 * self.a
        self.soft = torch.softmax(torch.randn(N, self.K, generator=g), -1)
        self.dz = torch.randn(N, self.K, generator=g)


# --------------------------------------------------------------------------- drivers
def _fused_fwd(c: Case) -> None:
    from ntl.kernels.ce_ntl import ce_ntl_fwd_triton

    for method, reweigh, write_grad, inplace in itertools.product(
            ("mse", "wasserstein"), (False, True), (True, False), (False, True)):
        if inplace and not write_grad:
            continue
        x = c.logits.clone() if inplace else c.logits
        ce_ntl_fwd_triton(x, c.labels, c.k, c.ids, c.values, c.a, c.b, method, reweigh, 9.09,
                          inplace, write_grad)
    # DEL and DIST2 (unbounded: never with reweigh; DIST2's tau rides in the delta scalar): their
    # branches are fp32 after the load, so at bf16 only (each K, each arch; 180 -> 60 compiles)
    for method, write_grad in itertools.product(("del", "dist2") if c.dtype == torch.bfloat16 else (),
                                                (True, False)):
        ce_ntl_fwd_triton(c.logits, c.labels, c.k, c.ids, c.values, c.a, c.b, method, False, 0.0,
                          False, write_grad, huber_delta=0.5)
    # squash_factor: runtime scalars (sq_a, sq_b), so the same specialisations with other values
    for reweigh, write_grad in itertools.product((False, True), (True, False)):
        ce_ntl_fwd_triton(c.logits, c.labels, c.k, c.ids, c.values, c.a, c.b, "wasserstein", reweigh,
                          3.03, False, write_grad, squash=(0.75, 0.25))


def _fused_scale(c: Case) -> None:
    from ntl.kernels.ce_ntl import scale_rows_triton

    rinv = torch.ones(c.N) if c.dtype == torch.float16 else None  # fp16 gradients carry rinv
    for go in (torch.tensor(2.0), torch.full((c.N,), 2.0)):  # mean/sum; reduction="none"
        scale_rows_triton(c.logits.clone(), go, rinv)


def _loss_args(c: Case, x: torch.Tensor, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, index table)`` for the standalone-loss launchers (table: label -> k, else -1)."""
    table = torch.full((x.shape[1] + 1,), -1, dtype=torch.long)
    cols = ids if ids is not None else torch.arange(c.K)
    table[cols] = torch.arange(c.K)
    return cols[:c.N].clone(), table


def _loss_fwd(c: Case) -> None:
    from ntl.kernels.ntl_loss import ntl_loss_fwd_triton

    # every METHOD x REWEIGH x PARTIAL at each K and dtype; the rarer flags (SOFT, squash,
    # weights, digit-logit input, no dz) once per K, at bf16
    variants = [(m, rw, red, None, None, True, True, False)
                for m in ("mse", "wasserstein", "mae", "huber") for rw in (False, True)
                for red in ("none", "mean")]
    if c.dtype == torch.bfloat16:
        variants += [(m, False, red, None, None, True, True, False)  # unbounded: no reweigh
                     for m in ("del", "dist2") for red in ("none", "mean")]
        variants += [("wasserstein", False, "mean", c.soft, None, True, True, False),
                     ("wasserstein", False, "mean", None, None, True, True, True),
                     ("mse", False, "sum", None, torch.ones(c.N), True, True, False),
                     ("wasserstein", True, "mean", None, torch.ones(c.N, dtype=torch.long), True, True, True),
                     ("wasserstein", False, "mean", None, None, False, True, False),
                     ("huber", False, "none", None, None, False, True, False),
                     ("mse", False, "mean", None, None, True, False, False)]
    for method, reweigh, red, soft, w, use_ids, need_dz, squash in variants:
        ids = c.ids if use_ids else None
        x = c.logits if use_ids else c.logits[:, :c.K].contiguous()
        labels, table = _loss_args(c, x, ids)
        ntl_loss_fwd_triton(x, labels, w, soft, ids, c.values, table, -100, method, red, reweigh,
                            9.09, (0.5, 1.5) if squash else None, 1.0, need_dz)
    # DEL's place weights: a per-row factor of the loss (HAS_PS), with and without weights
    if c.dtype != torch.bfloat16:
        return
    x = c.logits
    labels, table = _loss_args(c, x, c.ids)
    for w, red in ((None, "mean"), (torch.ones(c.N), "none")):
        ntl_loss_fwd_triton(x, labels, w, None, c.ids, c.values, table, -100, "del", red, False,
                            0.0, None, 1.0, True, torch.full((c.N,), 2.0))


def _loss_bwd(c: Case) -> None:
    from ntl.kernels.ntl_loss import ntl_loss_bwd_triton

    N, V, K = c.N, c.V, c.K
    f = torch.rand(N)
    for reweigh, g, use_ids in ((False, torch.tensor(1.0), True), (False, torch.ones(N), True),
                                (False, torch.tensor(1.0), False), (True, torch.tensor(1.0), True),
                                (True, torch.ones(N), True)):
        ids = c.ids if use_ids else None
        size = (N, V if use_ids else K)
        ntl_loss_bwd_triton(g, c.logits if use_ids else c.logits[:, :K].contiguous(), size, c.dtype,
                            c.dz, f, torch.tensor(3.0), f, f, f, ids, reweigh, 9.09)


def _gather_fwd(c: Case) -> None:
    from ntl.kernels.number_columns import gather_triton

    gather_triton(c.logits, c.ids)


def _scatter_bwd(c: Case) -> None:
    from ntl.kernels.number_columns import scatter_rows

    for scale in (None, torch.ones(c.N)):
        scatter_rows(c.dz.to(c.dtype) if scale is None else c.dz, c.ids, c.V, c.dtype, scale=scale)


def _mass(c: Case) -> None:
    from ntl.kernels.number_mass import number_mass_triton

    x = c.logits.clone().requires_grad_(True)
    z, m = number_mass_triton(x, c.ids)
    (z.sum() + m.sum()).backward()  # _mass_fwd, then _mass_bwd


#: Every ``@triton.jit`` function of ``ntl.kernels`` -> its driver (or INLINED).
KERNELS: dict[str, Callable[[Case], None] | str] = {
    "ce_ntl._ce_ntl_fwd": _fused_fwd,
    "ce_ntl._scale_rows": _fused_scale,
    "ce_ntl._lse_step": INLINED,
    "ce_ntl._grad_step": INLINED,
    "ce_ntl._row_layout": INLINED,
    "ce_ntl._edge_offsets": INLINED,
    "ntl_loss._ntl_loss_fwd": _loss_fwd,
    "ntl_loss._ntl_finalize": _loss_fwd,
    "ntl_loss._ntl_loss_bwd": _loss_bwd,
    "ntl_loss._ntl_loss_bwd_reweigh": _loss_bwd,
    "ntl_loss.ntl_row_math": INLINED,
    "ntl_loss._bwd_row_scale": INLINED,
    "number_columns._gather_fwd": _gather_fwd,
    "number_columns._scatter_bwd": _scatter_bwd,
    "number_mass._mass_fwd": _mass,
    "number_mass._mass_bwd": _mass,
}


def cases() -> Iterator[Case]:
    for K, dt in itertools.product(KS, DTYPES.values()):
        yield Case(V_QWEN, K, dt)
    for dt in DTYPES.values():  # GPT-2: digits only
        yield Case(V_GPT2, KS[0], dt)


# --------------------------------------------------------------------------- discovery
def jit_functions() -> dict[str, Any]:
    """``{"module.name": JITFunction}`` for every ``@triton.jit`` defined in ``ntl.kernels``."""
    from triton.runtime.jit import JITFunction

    import ntl.kernels as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"ntl.kernels.{info.name}")
        if mod.__name__ != f"ntl.kernels.{info.name}":  # an alias (a former name): counted once
            continue
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                found[f"{info.name}.{name}"] = obj
    return found


class _Recorder:
    """Stands in for a kernel: ``rec[grid](*args, **kw)`` records the launch."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.launches: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kw: self.launches.append((args, kw))


@contextlib.contextmanager
def recording(fns: dict[str, Any]) -> Iterator[dict[str, _Recorder]]:
    """Replace every module attribute that is one of ``fns`` by a recorder."""
    recs = {key: _Recorder(fn) for key, fn in fns.items()}
    by_id = {id(fn): recs[key] for key, fn in fns.items()}
    patched = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith("ntl"):
            continue
        for attr, obj in list(vars(mod).items()):
            if id(obj) in by_id:
                patched.append((mod, attr, obj))
                setattr(mod, attr, by_id[id(obj)])
    try:
        yield recs
    finally:
        for mod, attr, obj in patched:
            setattr(mod, attr, obj)


# --------------------------------------------------------------------------- compile
def _arg_type(arg: Any) -> tuple[str, Any]:
    """``(signature type, constexpr value or attr)`` as Triton's launcher specialises it."""
    from triton.runtime.jit import mangle_type

    if arg is None:
        return "constexpr", None
    if isinstance(arg, torch.Tensor):
        return mangle_type(arg), ("D" if arg.data_ptr() % 16 == 0 else "")
    if isinstance(arg, bool):
        return mangle_type(arg), ""
    if isinstance(arg, int):
        if arg == 1:  # Triton specialises the integer 1 into a constant
            return "constexpr", arg
        # (not mangle_type(arg, True): triton 3.4's raises a TypeError for every int)
        return mangle_type(arg), ("D" if arg % 16 == 0 else "")
    return mangle_type(arg), ""


def launch_spec(fn: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> dict[str, Any]:
    """Signature, constexprs, attrs and options of one recorded launch (JSON-able)."""
    names = fn.arg_names
    bound = dict(zip(names, args, strict=False))
    options = {}
    for key, val in kw.items():
        if key in names:
            bound[key] = val
        else:
            options[key] = val
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"{fn.__name__}: launch lacks arguments {missing}")
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        val = bound[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constexprs[p.name] = val
            continue
        ty, extra = _arg_type(val)
        sig[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = extra
        elif extra == "D" and not p.do_not_specialize:
            attrs[str(i)] = "D"
    return {"signature": sig, "constexprs": constexprs, "attrs": attrs, "options": options}


def _resource_usage(cubin: bytes) -> dict[str, int]:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{out}")
    return dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups()), strict=True))


def _global_access(ptx: str) -> dict[str, int]:
    """Global loads in the PTX: 128-bit (``ld.global...v4.b32``, or ``v2.b64``) and others."""
    loads = re.findall(r"^\s*(?:@%p\d+\s+)?ld\.global[\w.]*", ptx, re.M)
    wide = [ld for ld in loads if ".v4.b32" in ld or ".v4.f32" in ld or ".v4.u32" in ld or ".v2.b64" in ld]
    return {"ld128": len(wide), "ld_other": len(loads) - len(wide)}


def compile_one(job: tuple[str, dict[str, Any], int]) -> dict[str, Any]:
    """Compile one launch for ``sm_<arch>``; returns the record (``error`` on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    key, spec, arch = job
    fn = jit_functions()[key]
    rec = {"kernel": key, "arch": arch, **spec}
    t0 = time.perf_counter()
    try:
        attrs = {(int(i),): [["tt.divisibility", 16]] for i, v in spec["attrs"].items() if v == "D"}
        src = ASTSource(fn, spec["signature"], spec["constexprs"], attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec["options"])
        rec.update(_resource_usage(kernel.asm["cubin"]))
        rec.update(_global_access(kernel.asm["ptx"]))
    except Exception as e:  # reported, and failed by the test
        rec["error"] = f"{type(e).__name__}: {e}"[-4000:]
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def collect(only: list[str] | None = None) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, int]]:
    """Drive every launcher over every case; the distinct launches and a count per kernel."""
    fns = jit_functions()
    specs: dict[str, tuple[str, dict[str, Any]]] = {}
    counts = dict.fromkeys(fns, 0)
    for c in cases():
        with recording(fns) as recs:
            for key, driver in KERNELS.items():
                if driver == INLINED or key not in fns or (only and key not in only):
                    continue
                driver(c)  # type: ignore[operator]
        for key, rec in recs.items():
            for args, kw in rec.launches:
                spec = launch_spec(fns[key], args, kw)
                counts[key] += 1
                # the first case's V names the launch (the specialisation does not hold V itself)
                specs.setdefault(json.dumps([key, spec], sort_keys=True, default=str),
                                 (key, {**spec, "V": c.V}))
    return list(specs.values()), counts


def has_toolchain() -> str | None:
    """Why an offline compile cannot run here, or None."""
    try:
        from triton import knobs
    except ImportError:
        return f"triton {__import__('triton').__version__} has no triton.knobs (this script needs >= 3.4)"
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        return f"triton has no NVIDIA backend ({e})"
    takes_arch = bool(inspect.signature(get_ptxas).parameters)  # get_ptxas(arch) since triton 3.5
    for arch in ARCHS:
        try:
            path = (get_ptxas(arch) if takes_arch else get_ptxas()).path  # pyright: ignore[reportCallIssue] (3.4's signature)
        except Exception as e:
            return f"the triton wheel has no ptxas for sm_{arch} ({e})"
        if not path or not os.path.exists(path):
            return f"the triton wheel has no ptxas for sm_{arch}"
    cuobjdump = getattr(knobs.nvidia.cuobjdump, "path", None)
    if not cuobjdump or not os.path.exists(cuobjdump):
        return "the triton wheel has no cuobjdump (needed to read register spills)"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", type=int, default=list(ARCHS))
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--only", nargs="+", help="kernel keys (module.name) to compile")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run with TRITON_INTERPRET=0: the interpreter has no compiler")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence Triton 3.9's notice; its default
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"triton": __import__("triton").__version__}
    why = has_toolchain()
    fns = jit_functions()
    doc["jit_functions"] = sorted(fns)
    doc["table"] = {k: ("inlined" if v == INLINED else "driver") for k, v in KERNELS.items()}
    if why is not None:
        doc["skip"] = why
    else:
        specs, counts = collect(a.only)
        doc["launches"] = counts
        jobs = [(key, spec, arch) for key, spec in specs for arch in a.arch]
        if a.jobs > 1:
            with ProcessPoolExecutor(a.jobs) as ex:
                doc["records"] = list(ex.map(compile_one, jobs))
        else:
            doc["records"] = [compile_one(j) for j in jobs]
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    json.dump(doc, sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
