"""The CPU threads of a ``svitt-ego`` command: how many torch uses, set once before torch loads.

torch runs each CPU operation on a pool of OpenMP threads, by default one per core. Beside the
run's own DataLoader workers (``data.num_workers`` processes, one thread each: torch sets that in
every worker) or other jobs, that pool has no free core: its threads wait for each other at the
end of every operation whenever one of them is descheduled, so a busy machine slows an epoch far
more than its share of the cores (``benchmarks/threads.py`` times an epoch idle and beside three
busy processes, per setting). The command line therefore gives torch half the cores this process
may use (at least one) and leaves the rest to the data workers and video decoding.

The user's ``OMP_NUM_THREADS``, when set, wins. The setting reaches torch through that variable,
which torch reads when it loads: it applies to ``svitt-ego`` commands, and to nothing once torch
is imported (a Python program that uses the library sets its own, ``torch.set_num_threads``).
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping

THREADS_ENV = "OMP_NUM_THREADS"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """torch's intra-op threads when the user sets none: half the usable cores, at least one."""
    return max(1, usable_cores() // 2)


def configure_threads(environ: MutableMapping[str, str] = os.environ, modules: dict = sys.modules) -> str | None:
    """Set :data:`THREADS_ENV` to :func:`default_threads` unless the user set it or torch is already
    loaded (then it would not apply); returns the value the command runs with, None when unknown."""
    if "torch" not in modules:
        environ.setdefault(THREADS_ENV, str(default_threads()))
    return environ.get(THREADS_ENV)
