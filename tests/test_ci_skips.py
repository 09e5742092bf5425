"""Under CI=true a skip fails the run unless its reason is one CPU-only CI cannot avoid (CUDA);
outside CI skips stay skips.  Each case runs pytest on a small test file in a child process with
the project's hook plugin (tests/ci_skips.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ci_skips import CUDA_SKIP

TESTS = Path(__file__).resolve().parent

CASES = f'''
import pytest

def test_tool_missing():
    pytest.skip("reference converter is not installed")

@pytest.mark.skipif(True, reason="{CUDA_SKIP}: AWQ on the GPU")
def test_cuda():
    pass

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False

def test_runs():
    pass
'''

MODULE_SKIP = '''
import pytest
pytest.importorskip("no_such_module_anywhere")

def test_never():
    pass
'''


def _pytest(folder: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_skips", "-p", "no:cacheprovider", "-q", "-rA", str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True)


@pytest.fixture
def cases(tmp_path: Path) -> Path:
    (tmp_path / "test_cases.py").write_text(CASES)
    return tmp_path


def test_in_ci_a_skip_fails_the_run_and_names_its_reason(cases: Path) -> None:
    res = _pytest(cases, "true")
    assert res.returncode == 1, res.stdout
    assert "FAILED test_cases.py::test_tool_missing" in res.stdout
    assert "reference converter is not installed" in res.stdout
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed" in res.stdout  # the CUDA skip and the xfail stay


def test_outside_ci_skips_stay_skips(cases: Path) -> None:
    for ci in (None, "false"):
        res = _pytest(cases, ci)
        assert res.returncode == 0, res.stdout
        assert "1 passed, 2 skipped, 1 xfailed" in res.stdout


def test_in_ci_a_module_skipped_at_collection_fails(tmp_path: Path) -> None:
    (tmp_path / "test_module.py").write_text(MODULE_SKIP)
    res = _pytest(tmp_path, "true")
    assert res.returncode != 0, res.stdout
    assert "no_such_module_anywhere" in res.stdout and "skipped under CI=true" in res.stdout
    local = _pytest(tmp_path, None)
    assert "1 skipped" in local.stdout and "failed" not in local.stdout, local.stdout
