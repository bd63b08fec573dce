"""Test probes: count Triton launches and see which PyTorch ops touch big tensors.

* :func:`count_launches`: every ``@triton.jit`` kernel referenced by an ``ntl`` module is
  wrapped for the duration (the launch still happens); yields ``{kernel name: launches}``.
  Device functions (called by other kernels, which look them up by name) are left alone.
  On a GPU, compile a kernel before counting its launches (a warm-up call).
* :class:`BigOps`: a ``TorchDispatchMode`` recording every non-view ATen op whose inputs
  or outputs hold at least ``threshold`` elements, and every host read of a tensor value
  (``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``.tolist()``; a sync on CUDA).
  Ops issued inside a launch counted by :func:`count_launches` are the Triton
  interpreter's own argument plumbing (it re-binds every tensor's storage around a
  launch) and are not recorded: use both together.
* :class:`HostSyncs` (beside :func:`count_launches`) and :func:`count_syncs` (the number-level
  tests: also boolean-mask indexing and ``__array__``): the host reads a call makes.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_IN_LAUNCH = [0]


def _is_kernel(obj: Any) -> bool:
    return type(obj).__name__ in ("JITFunction", "InterpretedFunction") and hasattr(obj, "fn")


class _Counted:
    def __init__(self, fn: Any, name: str, counts: Counter) -> None:
        self.fn, self.name, self.counts = fn, name, counts

    def __call__(self, *args: Any, **kw: Any) -> Any:  # a device function called by a kernel
        return self.fn(*args, **kw)

    def __getitem__(self, grid: Any):
        launch = self.fn[grid]

        def run(*args: Any, **kw: Any) -> Any:
            self.counts[self.name] += 1
            _IN_LAUNCH[0] += 1
            try:
                return launch(*args, **kw)
            finally:
                _IN_LAUNCH[0] -= 1
        return run


@contextlib.contextmanager
def count_launches() -> Iterator[Counter]:
    import ntl.kernels

    for info in pkgutil.iter_modules(ntl.kernels.__path__):  # the launchers import them lazily
        importlib.import_module(f"ntl.kernels.{info.name}")
    counts: Counter = Counter()
    patched = []
    kernels = {id(o): o for m in list(sys.modules.values()) if getattr(m, "__name__", "").startswith("ntl")
               for o in vars(m).values() if _is_kernel(o)}
    # device functions (called by other kernels) stay as they are: kernels resolve them by name
    sources = [inspect.getsource(o.fn) for o in kernels.values()]
    device_fns = {i for i, o in kernels.items()
                  if any(f"{o.fn.__name__}(" in src and f"def {o.fn.__name__}(" not in src for src in sources)}
    for modname, mod in list(sys.modules.items()):
        if not modname.startswith("ntl"):
            continue
        for attr, obj in list(vars(mod).items()):
            if _is_kernel(obj) and id(obj) not in device_fns:
                patched.append((mod, attr, obj))
                setattr(mod, attr, _Counted(obj, obj.fn.__name__, counts))
    try:
        yield counts
    finally:
        for mod, attr, obj in patched:
            setattr(mod, attr, obj)


class BigOps(TorchDispatchMode):
    """Records ``(op name, largest numel)`` for non-view ops on tensors of >= ``threshold``
    elements in ``self.big``, and host reads of tensor values in ``self.host_reads``."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold
        self.big: list[tuple[str, int]] = []
        self.host_reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _IN_LAUNCH[0]:
            return out
        name = str(func.overloadpacket.__name__)
        if name == "_local_scalar_dense":
            self.host_reads.append(name)
        if not func.is_view:
            sizes = [t.numel() for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            if sizes and max(sizes) >= self.threshold:
                self.big.append((name, max(sizes)))
        return out


#: ATen ops that read a tensor's value on the host (a device sync on CUDA): ``.item()``,
#: ``bool(t)``, ``torch.equal`` and the ops whose output shape depends on the data.
SYNC_OPS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select",
                      "unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave"})


class HostReadMode(TorchDispatchMode):
    """A dispatch mode that also sees ``Tensor.tolist`` / ``Tensor.numpy`` (which read a CPU
    tensor on the host without dispatching anything): each call inside the ``with`` block goes
    to :meth:`on_host_read` with its name."""

    HOST_READS = ("tolist", "numpy")

    def __init__(self) -> None:
        super().__init__()
        self._saved: dict[str, Any] = {}

    def on_host_read(self, name: str) -> None:
        raise NotImplementedError

    def __enter__(self):
        for name in self.HOST_READS:
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def wrapped(t, *a, _orig=orig, _name=name, **k):
                self.on_host_read(_name)
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        return super().__exit__(*exc)


class HostSyncs(HostReadMode):
    """Records in ``self.syncs`` every op of :data:`SYNC_OPS` and every ``Tensor.tolist`` /
    ``Tensor.numpy`` issued inside the ``with`` block, outside the launches counted by
    :func:`count_launches` (the Triton interpreter's own plumbing): on CPU, the ops that would
    be host syncs on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def on_host_read(self, name: str) -> None:
        if not _IN_LAUNCH[0]:
            self.syncs.append(f"Tensor.{name}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _IN_LAUNCH[0] and str(func.overloadpacket.__name__) in SYNC_OPS:
            self.syncs.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


#: :class:`SyncCounter`: the ops that read data on the host (boolean-mask indexing is counted too).
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
             "unique_consecutive", "repeat_interleave"}


class SyncCounter(TorchDispatchMode):
    """Counts ops that read tensor data on the host (``.item()``, ``bool()``, boolean-mask
    indexing, ``nonzero``...). ``tolist``/``numpy`` bypass dispatch: patched separately."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name.startswith("index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for i in a)
        if name in _SYNC_OPS or bool_index:
            self.n += 1
        return func(*args, **(kwargs or {}))


def count_syncs(fn, monkeypatch):
    """How many host reads ``fn()`` makes (:class:`SyncCounter`); undoes ``monkeypatch`` after."""
    counter = SyncCounter()
    for name in ("tolist", "numpy", "__array__"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, **k):
            counter.n += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    with counter:
        fn()
    monkeypatch.undo()
    return counter.n
