"""One JSON line per test from the log of ``pytest -v -rfE`` (also of a run cut short by a time limit).

    python3 benchmarks/pytest_rows.py LOG --results gpu_results.jsonl

Each ``NODEID OUTCOME`` line of the verbose log gives a row ``{"part": "gpu_tests", "test", "outcome"}``,
with the message of the short summary (``FAILED NODEID - MESSAGE``) where the log has one; a last row
counts the outcomes. Prints the counts.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

from svitt_ego.atomic import append_jsonl

OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
_LIVE = re.compile(rf"^(\S+::\S+) ({'|'.join(OUTCOMES)})\b")
_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+) - (.*)$")


def rows_of_log(log: str) -> list[dict]:
    """The rows of ``log``, in the order the tests finished."""
    outcomes = {m[1]: m[2] for m in map(_LIVE.match, log.splitlines()) if m}
    messages = {m[2]: m[3][:300] for m in map(_SUMMARY.match, log.splitlines()) if m}
    return [{"part": "gpu_tests", "test": test, "outcome": outcome, **({"message": messages[test]}
                                                                       if test in messages else {})}
            for test, outcome in outcomes.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log")
    parser.add_argument("--results", required=True, help="append the rows to this file, one JSON line each")
    args = parser.parse_args()
    rows = rows_of_log(Path(args.log).read_text(errors="replace"))
    counts = dict(collections.Counter(row["outcome"].lower() for row in rows))
    for row in [*rows, {"part": "gpu_tests", "counts": counts}]:
        append_jsonl(args.results, row)
    print(f"GPU tests: {', '.join(f'{n} {k}' for k, n in counts.items()) or 'none ran'}")


if __name__ == "__main__":
    main()
