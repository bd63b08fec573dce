"""FSDP2 on 2 gloo ranks (CPU): the mixin's NTL gradient, on the head's digit rows and every
other parameter, equals the DDP-equivalent (rank-averaged, window-normalised) gradient.

Spawns two processes running ``fsdp_worker.py`` (see its docstring); one launch covers a
tied head (all-gathered by the root module during the forward) and an untied head sharded in
its own FSDP group (a DTensor when NTL reads it).
"""

import json
import os
import sys

import pytest
import ranks  # tests/support (conftest.py)

pytest.importorskip("trl.trainer.grpo_trainer")
pytest.importorskip("torch.distributed.fsdp")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
# seconds for both ranks: ~3x their time with both cores busy (scripts/stress.sh)
TIMEOUT = 90
# the first test sets the module's fixture up (both ranks); a little above the ranks' own limit
pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT + 60)]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    tmp = tmp_path_factory.mktemp("fsdp")
    out = tmp / "results.json"
    port = ranks.free_port()
    ranks.run("FSDP2 ranks", [[sys.executable, os.path.join(HERE, "fsdp_worker.py"), str(out)]] * 2,
              log_dir=tmp, timeout=TIMEOUT, cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"},
              rank_env=[ranks.dist_env(r, 2, port) for r in range(2)],
              pythonpath=[os.path.join(REPO, "src"), os.path.join(REPO, "adapters", "trl"), HERE])
    return json.loads(out.read_text())


@pytest.mark.parametrize("variant", ["tied", "untied_head_group"])
def test_fsdp2_gradient_is_the_rank_averaged_one(fsdp_results, variant):
    r = fsdp_results[variant]
    assert r["digits_per_rank"] == [6, 1] and r["ntl_num_targets"] == 7  # uneven on purpose
    assert r["head_type_in_forward"] == ("Parameter" if variant == "tied" else "DTensor")
    assert r["max_abs_grad"] > 1e-2 and r["head_digit_rows_grad"] > 1e-2
    assert r["head_digit_rows_diff"] < 1e-5
    assert r["max_abs_diff"] < 1e-5
