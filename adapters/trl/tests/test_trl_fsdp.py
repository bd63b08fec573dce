"""FSDP2 on 2 gloo ranks (CPU): the mixin's NTL gradient, on the head's digit rows and every
other parameter, equals the DDP-equivalent (rank-averaged, window-normalised) gradient.

Spawns two processes running ``fsdp_worker.py`` (see its docstring); one launch covers a
tied head (all-gathered by the root module during the forward) and an untied head sharded in
its own FSDP group (a DTensor when NTL reads it).
"""

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("trl.trainer.grpo_trainer")
pytest.importorskip("torch.distributed.fsdp")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    tmp = tmp_path_factory.mktemp("fsdp")
    out = tmp / "results.json"
    path = os.pathsep.join([os.path.join(REPO, "src"), os.path.join(REPO, "adapters", "trl"), HERE,
                            os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    procs, logs = [], []
    for rank in range(2):
        log = open(tmp / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "fsdp_worker.py"), str(out)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=str(tmp),
            stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    if codes != [0, 0]:
        tails = [(tmp / f"rank{r}.log").read_text()[-3000:] for r in range(2)]
        pytest.fail(f"FSDP workers exited with {codes}:\n" + "\n----\n".join(tails))
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tied", "untied_head_group"])
def test_fsdp2_gradient_is_the_rank_averaged_one(fsdp_results, variant):
    r = fsdp_results[variant]
    assert r["digits_per_rank"] == [6, 1] and r["ntl_num_targets"] == 7  # uneven on purpose
    assert r["head_type_in_forward"] == ("Parameter" if variant == "tied" else "DTensor")
    assert r["max_abs_grad"] > 1e-2 and r["head_digit_rows_grad"] > 1e-2
    assert r["head_digit_rows_diff"] < 1e-5
    assert r["max_abs_diff"] < 1e-5
