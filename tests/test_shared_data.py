"""tests/support/shared_data.py: a missing data file skips a test locally and fails it in CI."""

import os
import subprocess
import sys
import textwrap

import pytest
import shared_data
from shared_data import require_file

MISSING = "/nonexistent/ntl-test-data/train.parquet"


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_ci_missing_file_fails(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=r"CI: .*not found: /nonexistent/.*not a skip"):
        require_file(MISSING)
    monkeypatch.setattr(shared_data, "GSM8K_DIR", os.path.dirname(MISSING))
    with pytest.raises(pytest.fail.Exception, match="GSM8K train split not found"):
        shared_data.gsm8k_file("train")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_local_missing_file_skips(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match="not found: /nonexistent/"):
        require_file(MISSING)


def test_present_file_is_returned(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")
    f = tmp_path / "train.parquet"
    f.write_bytes(b"")
    assert require_file(str(f)) == str(f)


@pytest.mark.parametrize("ci", [True, False])
def test_fixture_in_a_pytest_run(tmp_path, ci):
    """The ``gsm8k_dir`` fixture in a real pytest run pointed at a missing folder: the test errors
    (the run fails) under CI=true, is skipped without CI."""
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(os.path.dirname(__file__), "support")!r})
        from shared_data import gsm8k_dir  # noqa: F401
    """))
    (tmp_path / "test_uses_data.py").write_text("def test_reads(gsm8k_dir):\n    assert False\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["NTL_GSM8K_DIR"] = os.path.dirname(MISSING)
    if ci:
        env["CI"] = "true"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "-p", "no:randomly", str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    if ci:
        assert out.returncode == 1, text
        assert "1 error" in text and "In CI a missing data file is a failure" in text, text
    else:
        assert out.returncode == 0, text
        assert "1 skipped" in text and "GSM8K train split not found" in text, text
