"""Fine-tuning against zero-shot on the toy analogues of EK-100 MIR and Charades-Ego, several seeds.

Takes a ``svitt-ego demo`` folder (its pretrained model in ``run/model``), makes the toy benchmarks
(their training splits are videos of scenes the held-out splits never show) in ``--out``, scores the
model zero-shot on each held-out split (deterministic: one number), then fine-tunes it once per seed
with ``svitt-ego finetune-epic-mir`` / ``finetune-charades-ego`` and scores the held-out split after
the last epoch. It prints each benchmark's zero-shot score, the fine-tuned mean +- standard error
over the seeds, and the gain in standard errors (fine-tuning must win by more than two).

    python benchmarks/finetune_toy.py demo_run --probe            # 3 seeds, the demo's world, SETTINGS
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
# Each benchmark's settings, chosen on the held-out training videos (benchmarks/RESULTS.md): EK-100 at
# the toy model's 4 frames; Charades-Ego at 16 frames, as the references score it, with LaViLa's
# Charades-Ego schedule (10 epochs at lr 3e-5).
SETTINGS = {"epic_mir": {"epochs": 6, "lr": 1e-5, "num_frames": 4},
            "charades_ego": {"epochs": 10, "lr": 3e-5, "num_frames": 16}}


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


def _loaded(model: Path, num_frames: int):
    import torch

    from svitt_ego.models.loading import load_for_eval

    net, cfg = load_for_eval(model, overrides=[f"model.vision.num_frames={num_frames}", "data.num_workers=0"])
    return net, cfg, torch.device("cpu")


def _top1(similarity, own: list, keys: list, part, allowed=None) -> tuple[float, float]:
    """How often the closest key shares ``part`` with the item's own key, and how often a key drawn
    uniformly from those the item could pick does (%). ``allowed`` [items, keys] (bool, default all):
    the keys each item picks from."""
    import numpy as np

    allowed = np.ones(similarity.shape, dtype=bool) if allowed is None else allowed
    picked = [keys[j] for j in np.where(allowed, similarity, -np.inf).argmax(axis=1)]
    hits = [part(p) == part(o) for p, o in zip(picked, own)]
    chance = [sum(part(k) == part(o) for k, ok in zip(keys, row) if ok) / row.sum() for o, row in zip(own, allowed)]
    return 100 * statistics.fmean(hits), 100 * statistics.fmean(chance)


def probe_epic_mir(model: Path, root: Path, num_frames: int) -> dict:
    """What decides the EK-100 analogue's held-out retrieval ("push red cup"): for each clip, is its own
    narration the closest of those that differ from it only in the verb (``verb``), only in the object
    (``object``), only in the object's colour (``colour``) or only in its shape (``shape``)? Top-1 and
    chance (one of those narrations drawn uniformly), in %."""
    import numpy as np

    from svitt_ego.eval.embed import embed_clips, embed_texts
    from svitt_ego.eval.epic_mir import ClipReader, read_mir_annotations

    net, cfg, device = _loaded(model, num_frames)
    folder = root / "epic_mir"
    clips = read_mir_annotations(folder).clips
    videos, _ = embed_clips(net, clips, ClipReader(folder / "videos", "videos", num_frames), cfg, device, 32, "fail",
                            "probe")
    keys = sorted({(c.narration, c.verb_class, c.noun_classes) for c in clips})
    similarity = (videos @ embed_texts(net, [k[0] for k in keys], cfg, device).T).numpy()
    own = [(c.narration, c.verb_class, c.noun_classes) for c in clips]
    words = {k: k[0].split() for k in keys}  # [verb words..., colour, shape]
    kept = {"verb": lambda k, o: k[2] == o[2], "object": lambda k, o: k[1] == o[1],
            "colour": lambda k, o: k[1] == o[1] and words[k][-1] == words[o][-1],
            "shape": lambda k, o: k[1] == o[1] and words[k][-2] == words[o][-2]}
    scores = {}
    for name, same in kept.items():
        allowed = np.array([[same(k, o) for k in keys] for o in own])
        rows = allowed.sum(axis=1) > 1  # clips with a narration to confuse theirs with
        scores[name] = _top1(similarity[rows], [o for o, r in zip(own, rows) if r], keys, lambda k: k, allowed[rows])
    return scores


def probe_charades_ego(model: Path, root: Path, num_frames: int) -> dict:
    """What the model knows of the Charades-Ego analogue's classes ("turn a plate"): each held-out action
    trimmed to its own span, is the closest class name its class, its verb, its object? Top-1 and chance, %."""
    from svitt_ego.data.video import read_frames_by_index
    from svitt_ego.eval.charades_ego import read_charades_annotations
    from svitt_ego.eval.embed import embed_clips, embed_texts, segment_frame_ids

    net, cfg, device = _loaded(model, num_frames)
    folder = root / "charades_ego"
    annotations = read_charades_annotations(folder)
    actions = [(video.video_id, c, start, end) for video in annotations.videos for c, start, end in video.segments]

    def read(action):
        return read_frames_by_index(folder / "videos" / f"{action[0]}.mp4", lambda fps: segment_frame_ids(
            action[2] * float(fps), action[3] * float(fps), num_frames))

    videos, _ = embed_clips(net, actions, read, cfg, device, 32, "fail", "probe")
    names = annotations.class_names
    similarity = (videos @ embed_texts(net, names, cfg, device).T).numpy()
    own = [names[c] for _, c, _, _ in actions]
    return {what: _top1(similarity, own, names, part) for what, part in (
        ("class", lambda n: n), ("verb", lambda n: n.rsplit(" a ", 1)[0]), ("object", lambda n: n.rsplit(" ", 1)[1]))}


PROBES = {"epic_mir": probe_epic_mir, "charades_ego": probe_charades_ego}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="a `svitt-ego demo` folder: its run/model is fine-tuned")
    parser.add_argument("--out", type=Path, default=Path("finetune_toy"), help="the toy benchmarks and the runs")
    parser.add_argument("--benchmarks", nargs="+", choices=sorted(METRICS), default=sorted(METRICS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-videos", type=int, default=None,
                        help="the toy world's size the analogues are drawn for (default: the demo's)")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: SETTINGS)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate, the cosine ends at a tenth (default: SETTINGS)")
    parser.add_argument("--num-frames", type=int, default=None, help="(default: SETTINGS)")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="training videos held out for best.pt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe", action="store_true",
                        help="also ask what the models know, zero-shot and fine-tuned: EK-100, whether the verb or the object "
                             "decides retrieval; Charades-Ego, whether trimmed actions find their class, verb, object")
    args = parser.parse_args()

    from svitt_ego.data.toy import DEFAULT_NUM_VIDEOS
    from svitt_ego.data.toy_benchmarks import make_toy_benchmarks

    model, root = args.demo / "run" / "model", args.out / "toy"
    make_toy_benchmarks(root, seed=0, num_videos=args.num_videos or DEFAULT_NUM_VIDEOS)
    rows, settings, tic = [], [], time.perf_counter()
    for benchmark in args.benchmarks:
        given = {key: getattr(args, key) for key in SETTINGS[benchmark] if getattr(args, key) is not None}
        recipe = argparse.Namespace(**{**vars(args), **SETTINGS[benchmark], **given})
        base = zero_shot(model, root, benchmark, recipe.num_frames)
        name = (f"{benchmark}-e{recipe.epochs}-b{recipe.batch_size}-lr{recipe.lr:g}-f{recipe.num_frames}"
                f"-v{recipe.val_fraction:g}")
        runs = [finetuned(model, root, benchmark, seed, args.out / f"{name}-seed{seed}", recipe) for seed in args.seeds]
        settings.append(f"{benchmark} {recipe.epochs} epochs, lr {recipe.lr:g}, {recipe.num_frames} frames")
        if args.probe:
            for label, path in [("zero-shot", model)] + [(f"seed {seed}", args.out / f"{name}-seed{seed}" / "model")
                                                          for seed in args.seeds]:
                found = PROBES[benchmark](path, root, recipe.num_frames)
                print(f"probe {benchmark}, {label}: " + ", ".join(
                    f"{what} {hit:.1f}% (chance {chance:.1f}%)" for what, (hit, chance) in found.items()), flush=True)
        mean, se = mean_se([run["val last"] for run in runs])
        gain, gain_se = mean_se([run["val last"] - run["val start"] for run in runs])  # each seed holds out its own
        rows.append((benchmark, "val", statistics.fmean(run["val start"] for run in runs), mean, se,
                     gain / gain_se if gain_se > 0 else math.nan))
        for metric in METRICS[benchmark]:
            mean, se = mean_se([run[metric] for run in runs])
            rows.append((benchmark, metric, base[metric], mean, se, (mean - base[metric]) / se if se > 0 else math.nan))
    print(f"\nseeds {args.seeds}; {'; '.join(settings)}; batch {args.batch_size}; "
          f"{time.perf_counter() - tic:.0f} s; held-out splits, mean +- standard error")
    print(f"{'benchmark':14s}{'metric':>10s}{'zero-shot':>11s}{'fine-tuned':>18s}{'gain / s.e.':>13s}")
    for benchmark, metric, base, mean, se, gain in rows:
        print(f"{benchmark:14s}{metric:>10s}{base:>11.1f}{f'{mean:.1f} +- {se:.1f}':>18s}{gain:>13.1f}")
    print("val: the score on the held-out training videos (which choose settings; each seed holds out its own) "
          "before the first step and after the last epoch, its gain over the paired differences")


if __name__ == "__main__":
    main()
