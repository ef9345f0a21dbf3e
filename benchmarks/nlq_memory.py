"""Peak CPU memory and time of one training step (forward + backward) of the NLQ grounding model, by clip length.

Each length runs in a fresh process: the kernel's peak-RSS mark (``VmHWM``) is reset just before
the step and read after it, less the resident size before it, so the figure is what the step
itself added (activations, gradients, workspace). With banded local attention the step's memory
grows linearly with the clip; a ``T x T`` attention mask would grow it quadratically. The step's
wall time and CPU time (one thread unless ``OMP_NUM_THREADS`` says otherwise; on a shared machine the
CPU time is the steadier figure) are printed beside it.

    python benchmarks/nlq_memory.py                       # 2,560 and 9,216 windows at hidden 128, CLIP text
    python benchmarks/nlq_memory.py --windows 64 128 --hidden 16 --video-dim 8 --text-dim 8   # smallest
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _status(field: str) -> int:
    """A ``/proc/self/status`` size, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _step(args: argparse.Namespace) -> dict:
    import time

    import torch

    from svitt_ego.nlq.detection import grounding_loss
    from svitt_ego.nlq.model import GroundingConfig, GroundingModel

    torch.manual_seed(0)
    cfg = GroundingConfig(video_dim=args.video_dim, text_dim=args.text_dim, hidden=args.hidden, levels=args.levels)
    model = GroundingModel(cfg).train()
    T = args.windows[0]
    video, text = torch.randn(1, T, args.video_dim), torch.randn(1, 12, args.text_dim)
    masks = torch.ones(1, T, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)
    moment = torch.tensor([[T / 3, T / 3 + 40.0]])
    short = model.multiple  # a first step on a short clip, so one-time set-up is not counted
    grounding_loss(model(video[:, :short], masks[0][:, :short], text, masks[1]), moment * 0 + 1, cfg,
                   float(model.loss_normalizer))["loss"].backward()
    model.zero_grad(set_to_none=False)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start, cpu = time.perf_counter(), time.process_time()
    outputs = model(video, masks[0], text, masks[1])
    grounding_loss(outputs, moment, cfg, float(model.loss_normalizer))["loss"].backward()
    return {"windows": T, "peak_mib": (_status("VmHWM") - before) / 2 ** 20, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, nargs="+", default=[2560, 9216], help="clip lengths; the first is the anchor")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--levels", type=int, default=7)
    parser.add_argument("--video-dim", type=int, default=768, help="SViTT-Ego's pooled video feature")
    parser.add_argument("--text-dim", type=int, default=512, help="CLIP ViT-B/32's token states")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_step(args)))
        return
    rows = []
    for windows in args.windows:
        command = [sys.executable, __file__, "--child", "--windows", str(windows), "--hidden", str(args.hidden),
                   "--levels", str(args.levels), "--video-dim", str(args.video_dim), "--text-dim", str(args.text_dim)]
        rows.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
    anchor = rows[0]["peak_mib"]
    print(f"{'windows':>8s} {'peak MiB':>9s} {'ratio':>6s} {'length ratio':>13s} {'step s':>7s} {'CPU s':>6s}")
    for row in rows:
        print(f"{row['windows']:8d} {row['peak_mib']:9.2f} {row['peak_mib'] / anchor:6.2f} "
              f"{row['windows'] / rows[0]['windows']:13.2f} {row['seconds']:7.2f} {row['cpu_seconds']:6.2f}")


if __name__ == "__main__":
    main()
