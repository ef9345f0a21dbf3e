"""A pytest plugin: under ``CI=true`` a skipped test fails the run unless it is marked ``gpu``.

CI installs everything the tests need, so a test that skips there for any other reason (a missing package,
a missing file) hides a setup step a new user would also miss. Needing a CUDA device is the one reason a test
may skip in CI. Loaded by ``tests/conftest.py``.
"""

from __future__ import annotations

import os

import pytest


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _fail_skip(report, what: str) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{what} skipped under CI=true without the 'gpu' mark: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (_in_ci() and report.skipped and not hasattr(report, "wasxfail")
            and item.get_closest_marker("gpu") is None):
        _fail_skip(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped:  # a module-level skip (importorskip) skips all of its tests, gpu or not
        _fail_skip(report, collector.nodeid)
