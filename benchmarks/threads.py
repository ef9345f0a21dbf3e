"""A pretraining epoch of the demo, idle and beside three busy single-threaded processes, per thread setting.

    python benchmarks/threads.py [--demo demo_run] [--fraction 1.0] [--loads idle loaded] [--settings ...]

Each measurement is a fresh process that pretrains the demo's ``tiny`` model (the demo's config:
``data.num_workers`` 2, no evaluation) for one epoch, or ``--fraction`` of one, on the demo's toy
world (``DEMO/toy_data``, which ``svitt-ego demo`` or ``svitt-ego make-toy-data`` writes), and prints
the seconds ``pretrain`` took. ``loaded``: three processes each spinning a Python loop (one thread)
run throughout, so a 2-core machine is shared five ways and an epoch's fair share is 2.5x its idle
time. The settings (torch's intra-op threads in the main process; the DataLoader workers always use
one):

- ``svitt-ego``: what the command line sets (:func:`svitt_ego.threads.configure_threads`),
- ``cores``: torch's own default, one thread per core,
- ``cores-passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep at once),
- ``one``: ``OMP_NUM_THREADS=1``.

Printed: per setting, the idle and loaded seconds side by side and their ratio. Run it on a machine
with nothing else running; its own busy processes are the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"svitt-ego": {}, "cores": {"OMP_NUM_THREADS": ""},
            "cores-passive": {"OMP_NUM_THREADS": "", "OMP_WAIT_POLICY": "PASSIVE"}, "one": {"OMP_NUM_THREADS": "1"}}
BUSY = 3


def child(toy_data: str, fraction: float) -> None:
    """In the measured process: one pretraining epoch (or ``fraction``) of the demo's config."""
    from svitt_ego.config import load_config
    from svitt_ego.data.toy import toy_data_overrides
    from svitt_ego.train import pretrain

    import torch

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config("tiny", [*toy_data_overrides(Path(toy_data)), f"train.output_dir={out}", "train.epochs=1",
                                   "train.eval_every_epoch=false", f"data.fraction_per_epoch={fraction}"])
        start = time.perf_counter()
        pretrain(cfg)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))


def environment(setting: str) -> dict:
    """The measured process's environment: this one's, with the setting's variables ('' removes one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update({k: v for k, v in SETTINGS[setting].items() if v})
    if setting == "svitt-ego":
        from svitt_ego.threads import configure_threads

        configure_threads(env, modules={})
    return env


def measure(setting: str, toy_data: Path, fraction: float, loaded: bool) -> dict:
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(BUSY if loaded else 0)]
    try:
        done = subprocess.run([sys.executable, __file__, "--child", str(toy_data), "--fraction", str(fraction)],
                              env=environment(setting), capture_output=True, text=True, check=True)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="demo_run", help="a svitt-ego demo folder (its toy_data/ is used)")
    parser.add_argument("--fraction", type=float, default=1.0, help="of an epoch (data.fraction_per_epoch)")
    parser.add_argument("--loads", nargs="+", choices=["idle", "loaded"], default=["idle", "loaded"])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.fraction)

    toy_data = Path(args.demo) / "toy_data"
    print(f"pretraining {args.fraction:g} epoch of the demo on {toy_data}, {os.cpu_count()} cores; loaded: "
          f"{BUSY} busy single-threaded processes beside it (fair share on 2 cores: 2.5x idle)")
    print(f"{'setting':16s}{'threads':>8s}" + "".join(f"{load + ' s':>10s}" for load in args.loads)
          + (f"{'loaded / idle':>15s}" if len(args.loads) == 2 else ""))
    for setting in args.settings:
        runs = {load: measure(setting, toy_data, args.fraction, load == "loaded") for load in args.loads}
        threads = next(iter(runs.values()))["threads"]
        line = f"{setting:16s}{threads:>8d}" + "".join(f"{r['seconds']:>10.1f}" for r in runs.values())
        if len(runs) == 2:
            line += f"{runs['loaded']['seconds'] / runs['idle']['seconds']:>14.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
