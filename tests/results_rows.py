"""A pytest plugin: with ``SVITT_EGO_TEST_RESULTS=FILE`` each test's outcome is appended to FILE as one JSON
line as soon as it is known, so that a run cut short by a time limit keeps the outcomes it reached
(``benchmarks/gpu_check.sh``). Loaded by ``tests/conftest.py``.
"""

from __future__ import annotations

import os

from svitt_ego.atomic import append_jsonl


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("SVITT_EGO_TEST_RESULTS")
    if not path or (report.when != "call" and report.passed):  # one row a test: its call, or what stopped it
        return
    row = {"part": "gpu_tests", "test": report.nodeid, "outcome": report.outcome}
    if not report.passed:
        longrepr = report.longrepr
        message = longrepr[2] if isinstance(longrepr, tuple) else getattr(getattr(longrepr, "reprcrash", None),
                                                                           "message", str(longrepr))
        row["message"] = message.strip()[:300]
    append_jsonl(path, row)
