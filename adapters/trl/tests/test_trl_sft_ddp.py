"""NTLSFTTrainer under data parallelism (2 gloo ranks on CPU, accelerate's DDP through the real
``train()``): the update equals one process's on both rows, so NTL is normalised by the
window's digit count summed over ranks (each rank holds a very different number of digits).
Spawns ``sft_ddp_worker.py`` twice (see its docstring)."""

import json
import os
import sys

import pytest
import ranks  # tests/support (conftest.py)

pytest.importorskip("trl")
# at collection, not inside the test: torch's import (a minute on loaded cores) is no part of
# the ranks' work that the test's timeouts are sized to
dist = pytest.importorskip("torch.distributed")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
# seconds for both ranks: ~3x their time with both cores busy (scripts/stress.sh); alone ~10 s
TIMEOUT = 90


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
def test_ddp_update_equals_single_process_window(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    out = tmp_path / "results.json"
    port = ranks.free_port()
    ranks.run("SFT DDP ranks", [[sys.executable, os.path.join(HERE, "sft_ddp_worker.py"), str(out)]] * 2,
              log_dir=tmp_path, timeout=TIMEOUT, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
              rank_env=[ranks.dist_env(r, 2, port) for r in range(2)],
              pythonpath=[os.path.join(REPO, "src"), os.path.join(REPO, "adapters", "trl"), HERE])
    r = json.loads(out.read_text())
    assert sorted(r["digits_per_rank"]) == [1, 16]  # uneven on purpose
    assert r["logged_total_digits"] == 17  # summed over ranks
    assert r["max_abs_update"] > 1e-2
    assert r["max_abs_diff"] < 1e-5
