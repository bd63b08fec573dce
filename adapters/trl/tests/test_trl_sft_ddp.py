"""NTLSFTTrainer under data parallelism (2 gloo ranks on CPU, accelerate's DDP through the real
``train()``): the update equals one process's on both rows, so NTL is normalised by the
window's digit count summed over ranks (each rank holds a very different number of digits).
Spawns ``sft_ddp_worker.py`` twice (see its docstring)."""

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("trl")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_update_equals_single_process_window(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    out = tmp_path / "results.json"
    path = os.pathsep.join([os.path.join(REPO, "src"), os.path.join(REPO, "adapters", "trl"), HERE,
                            os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    procs, logs = [], []
    for rank in range(2):
        log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "sft_ddp_worker.py"), str(out)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=str(tmp_path),
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
        tails = [(tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(2)]
        pytest.fail(f"DDP workers exited with {codes}:\n" + "\n----\n".join(tails))
    r = json.loads(out.read_text())
    assert sorted(r["digits_per_rank"]) == [1, 16]  # uneven on purpose
    assert r["logged_total_digits"] == 17  # summed over ranks
    assert r["max_abs_update"] > 1e-2
    assert r["max_abs_diff"] < 1e-5
