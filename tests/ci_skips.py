"""pytest hooks: under ``CI=true`` a skipped test, or a test module skipped at collection, fails the
run unless its reason names something a CPU-only runner cannot have (``UNAVOIDABLE_ON_CPU``).
Outside CI a skip stays a skip.  Loaded by conftest.py, or with ``-p ci_skips``."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

# Skip reasons CI accepts, matched as substrings: the project's tests that need a CUDA GPU say so
# with CUDA_SKIP.  Everything else a test can skip on (a tool, a package, a model) CI must have.
CUDA_SKIP = "needs a CUDA GPU"
UNAVOIDABLE_ON_CPU = (CUDA_SKIP,)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr: Any = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_unless_unavoidable(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not (_in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _reason(report)
    if any(ok in reason for ok in UNAVOIDABLE_ON_CPU):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true, which fails the run: {reason}\n"
                       f"(CI accepts only skips whose reason contains one of {UNAVOIDABLE_ON_CPU}; install what the test needs)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    _fail_unless_unavoidable(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    _fail_unless_unavoidable(outcome.get_result())
