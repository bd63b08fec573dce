"""One gloo rank of tests/test_parallel.py: vocab-parallel NTL on this rank's shard.

``python parallel_rank.py CASES OUT_DIR`` (``env://`` rendezvous variables set by
``ranks.dist_env``). ``CASES`` is a ``torch.save``'d list of dicts written by the test (full,
unsharded tensors; every rank loads the same file and slices its own shard). For each case
the rank runs ``ntl.vocab_parallel_ntl_loss`` (``kind="logits"``) or
``ntl.vocab_parallel_ntl_loss_from_hidden`` (``kind="hidden"``), backpropagates
``loss.backward(case["upstream"])`` and records the loss, its shard's gradients and every
collective it issued in forward and in backward; a case with ``expect_error`` records the
``ValueError`` instead. Results go to ``OUT_DIR/rank<r>.pt`` (atomically) and the process
ends through ``ranks.run_rank`` (final barrier, ``os._exit``).
"""

from __future__ import annotations

import sys
from typing import Any

from ranks import atomic_write, run_rank

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
               "reduce_scatter_tensor", "reduce", "all_to_all_single")


def _count_collectives(log: list[tuple[str, int]]) -> None:
    """Wrap torch.distributed's collectives: each call appends ``(name, numel)`` to ``log``."""
    import torch.distributed as dist

    for name in COLLECTIVES:
        real = getattr(dist, name)

        def wrapped(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            t = args[0] if args else next(iter(kwargs.values()))
            log.append((_name, int(t.numel()) if hasattr(t, "numel") else -1))
            return _real(*args, **kwargs)

        setattr(dist, name, wrapped)


def _groups(world: int) -> dict[int, Any]:
    """Tensor-parallel subgroups of 2 ranks ({0, 1}, {2, 3}, ...); every rank creates each."""
    import torch.distributed as dist

    out: dict[int, Any] = {}
    if world >= 4:
        for g in range(world // 2):
            members = [2 * g, 2 * g + 1]
            group = dist.new_group(members)
            for m in members:
                out[m] = group
    return out


def _run_case(case: dict[str, Any], rank: int, world: int, tp_groups: dict[int, Any],
              log: list[tuple[str, int]]) -> dict[str, Any]:
    import torch

    import ntl

    tp = case.get("tp", world)
    group = tp_groups[rank] if tp != world else None
    tp_rank = rank % tp
    start, width = case["starts"][tp_rank], case["widths"][tp_rank]
    vc = case["vocab"]
    vocab = (ntl.DigitVocab(vc["ids"], case["V"]) if vc["digit"]
             else ntl.NumberVocab(vc["ids"], vc["values"], case["V"]))
    kw: dict[str, Any] = dict(vocab_start=start, method=case["method"],
                              reduction=case["reduction"], weights=case.get("weights"))
    if group is not None:
        kw["group"] = group
    if case.get("explicit_size"):
        kw["vocab_size"] = case["V"]
    out: dict[str, Any] = {"start": start, "width": width}
    leaves: dict[str, torch.Tensor] = {}
    n0 = len(log)
    try:
        if case["kind"] == "logits":
            x = case["logits"][..., start:start + width].clone().requires_grad_(True)
            leaves["grad"] = x
            loss = ntl.vocab_parallel_ntl_loss(x, case["labels"], vocab, **kw)
        else:
            h = case["hidden"].clone().requires_grad_(True)
            w = case["weight"][start:start + width].clone().requires_grad_(True)
            b = case["bias"][start:start + width].clone().requires_grad_(True)
            leaves.update(dh=h, dW=w, db=b)
            loss = ntl.vocab_parallel_ntl_loss_from_hidden(
                h, w, case["labels"], vocab, bias_shard=b, temperature=case["temperature"], **kw)
    except ValueError as e:
        if not case.get("expect_error"):
            raise
        out["error"] = str(e)
        out["forward_collectives"] = log[n0:]
        return out
    if case.get("expect_error"):
        raise AssertionError(f"case {case['name']}: no ValueError raised")
    out["forward_collectives"] = log[n0:]
    n1 = len(log)
    loss.backward(case["upstream"])
    out["backward_collectives"] = log[n1:]
    out["loss"] = loss.detach()
    out["loss_dtype"] = str(loss.dtype)
    for key, leaf in leaves.items():
        out[key] = leaf.grad
        out[key + "_dtype"] = str(leaf.dtype)
    return out


def main() -> int:
    import torch
    import torch.distributed as dist

    cases_path, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tp_groups = _groups(world)
    cases = torch.load(cases_path, weights_only=True)
    log: list[tuple[str, int]] = []
    _count_collectives(log)
    results = {c["name"]: _run_case(c, rank, world, tp_groups, log) for c in cases}
    results["__world__"] = {"rank": rank, "world": world}
    atomic_write(f"{out_dir}/rank{rank}.pt", lambda f: torch.save(results, f))
    return 0


if __name__ == "__main__":
    run_rank(main)
