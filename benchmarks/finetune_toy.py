"""Fine-tuning against zero-shot on the toy analogues of EK-100 MIR and Charades-Ego, several seeds.

Takes a ``svitt-ego demo`` folder (its pretrained model in ``run/model``), makes the toy benchmarks
(their training splits are videos of scenes the held-out splits never show) in ``--out``, scores the
model zero-shot on each held-out split (deterministic: one number), then fine-tunes it once per seed
with ``svitt-ego finetune-epic-mir`` / ``finetune-charades-ego`` and scores the held-out split after
the last epoch. It prints each benchmark's zero-shot score, the fine-tuned mean +- standard error
over the seeds, and the gain in standard errors (fine-tuning must win by more than two).

    python benchmarks/finetune_toy.py demo_run                    # 3 seeds, the demo's world size
    python benchmarks/finetune_toy.py demo_run --seeds 0 --epochs 1 --num-videos 6 --batch-size 4  # seconds

A run folder is named by its benchmark, settings and seed; one that already holds its ``test.json``
is read, not run again: seeds can be run in separate calls with the same ``--out`` and the table
printed by a last call with all of them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

METRICS = {"epic_mir": ("mAP avg", "nDCG avg"), "charades_ego": ("mAP",)}


def mean_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n); NaN for one value)."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def zero_shot(model: Path, root: Path, benchmark: str, num_frames: int) -> dict:
    if benchmark == "epic_mir":
        from svitt_ego.eval.epic_mir import run_epic_mir

        return run_epic_mir(model, root / "epic_mir", videos=root / "epic_mir" / "videos", num_frames=num_frames,
                            workers=0)
    from svitt_ego.eval.charades_ego import run_charades_ego

    return run_charades_ego(model, root / "charades_ego", root / "charades_ego" / "videos", num_frames=num_frames,
                            workers=0)


def finetuned(model: Path, root: Path, benchmark: str, seed: int, out: Path, args) -> dict:
    """One seed's held-out scores after the last epoch; a run that already has them is read, not rerun."""
    from svitt_ego.cli import main

    if (out / "test.json").is_file():
        print(f"{out}: finished earlier, its test.json read", flush=True)
        return _scores(out)
    folder = root / benchmark
    classes = len((folder / "Charades_v1_classes.txt").read_text().splitlines()) if benchmark == "charades_ego" else 0
    command = ["finetune-epic-mir"] if benchmark == "epic_mir" else ["finetune-charades-ego", "--num-classes",
                                                                     str(classes)]
    status = main([*command, str(model), "--annotations", str(folder), "--videos", str(folder / "videos"),
                   "--output", str(out), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                   "--lr", str(args.lr), "--min-lr", str(args.lr / 10), "--num-frames", str(args.num_frames),
                   "--val-fraction", str(args.val_fraction), "--seed", str(seed), "--workers", "0",
                   "--device", args.device])
    if status != 0:
        raise SystemExit(f"{command[0]} failed (status {status})")
    return _scores(out)


def _scores(out: Path) -> dict:
    """A run's test scores, and its validation score before the first step and after the last epoch."""
    val = [record["val_score"] for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if "val_score" in record]
    return {**json.loads((out / "test.json").read_text()), "val start": val[0], "val last": val[-1]}


def probe(model: Path, root: Path, num_frames: int) -> dict:
    """What decides the EK-100 analogue's held-out retrieval: for each clip, is its own narration the
    closest of the narrations naming its object (only the verb differs: ``verb``), and of those naming
    its verb (only the object differs: ``object``)? Top-1 accuracy and chance, in %."""
    import torch

    from svitt_ego.eval.embed import embed_clips, embed_texts
    from svitt_ego.eval.epic_mir import ClipReader, read_mir_annotations
    from svitt_ego.models.loading import load_for_eval

    net, cfg = load_for_eval(model, overrides=[f"model.vision.num_frames={num_frames}", "data.num_workers=0"])
    folder, device = root / "epic_mir", torch.device("cpu")
    clips = read_mir_annotations(folder).clips
    videos, _ = embed_clips(net, clips, ClipReader(folder / "videos", "videos", num_frames), cfg, device, 32, "fail",
                            "probe")
    keys = sorted({(c.narration, c.verb_class, c.noun_classes) for c in clips})
    similarity = (videos @ embed_texts(net, [k[0] for k in keys], cfg, device).T).numpy()
    scores = {}
    for name, shared in (("verb", 2), ("object", 1)):  # the key field the candidates share with the clip's own
        hits, chance = [], []
        for i, clip in enumerate(clips):
            own = (clip.narration, clip.verb_class, clip.noun_classes)
            candidates = [j for j, key in enumerate(keys) if key[shared] == own[shared]]
            hits.append(keys[max(candidates, key=lambda j: similarity[i, j])] == own)
            chance.append(1 / len(candidates))
        scores[name] = (100 * statistics.fmean(hits), 100 * statistics.fmean(chance))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="a `svitt-ego demo` folder: its run/model is fine-tuned")
    parser.add_argument("--out", type=Path, default=Path("finetune_toy"), help="the toy benchmarks and the runs")
    parser.add_argument("--benchmarks", nargs="+", choices=sorted(METRICS), default=sorted(METRICS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-videos", type=int, default=None,
                        help="the toy world's size the analogues are drawn for (default: the demo's)")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (the cosine ends at a tenth)")
    parser.add_argument("--num-frames", type=int, default=4, help="the toy model's own")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="training videos held out for best.pt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe", action="store_true",
                        help="also ask what decides EK-100 retrieval (verb or object), zero-shot and fine-tuned")
    args = parser.parse_args()

    from svitt_ego.data.toy import DEFAULT_NUM_VIDEOS
    from svitt_ego.data.toy_benchmarks import make_toy_benchmarks

    model, root = args.demo / "run" / "model", args.out / "toy"
    make_toy_benchmarks(root, seed=0, num_videos=args.num_videos or DEFAULT_NUM_VIDEOS)
    rows, tic = [], time.perf_counter()
    for benchmark in args.benchmarks:
        base = zero_shot(model, root, benchmark, args.num_frames)
        name = f"{benchmark}-e{args.epochs}-b{args.batch_size}-lr{args.lr:g}-f{args.num_frames}-v{args.val_fraction:g}"
        runs = [finetuned(model, root, benchmark, seed, args.out / f"{name}-seed{seed}", args) for seed in args.seeds]
        if args.probe and benchmark == "epic_mir":
            for label, path in [("zero-shot", model)] + [(f"seed {seed}", args.out / f"{name}-seed{seed}" / "model")
                                                          for seed in args.seeds]:
                found = probe(path, root, args.num_frames)
                print(f"probe, {label}: " + ", ".join(f"{what} decides: top-1 {hit:.1f}% (chance {chance:.1f}%)"
                                                      for what, (hit, chance) in found.items()), flush=True)
        mean, se = mean_se([run["val last"] for run in runs])
        gain, gain_se = mean_se([run["val last"] - run["val start"] for run in runs])  # each seed holds out its own
        rows.append((benchmark, "val", statistics.fmean(run["val start"] for run in runs), mean, se,
                     gain / gain_se if gain_se > 0 else math.nan))
        for metric in METRICS[benchmark]:
            mean, se = mean_se([run[metric] for run in runs])
            rows.append((benchmark, metric, base[metric], mean, se, (mean - base[metric]) / se if se > 0 else math.nan))
    print(f"\nseeds {args.seeds}, {args.epochs} epochs, lr {args.lr:g}, batch {args.batch_size}; "
          f"{time.perf_counter() - tic:.0f} s; held-out splits, mean +- standard error")
    print(f"{'benchmark':14s}{'metric':>10s}{'zero-shot':>11s}{'fine-tuned':>18s}{'gain / s.e.':>13s}")
    for benchmark, metric, base, mean, se, gain in rows:
        print(f"{benchmark:14s}{metric:>10s}{base:>11.1f}{f'{mean:.1f} +- {se:.1f}':>18s}{gain:>13.1f}")
    print("val: the score on the held-out training videos (which choose settings; each seed holds out its own) "
          "before the first step and after the last epoch, its gain over the paired differences")


if __name__ == "__main__":
    main()
