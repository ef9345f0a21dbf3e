"""The NLQ grounding model on the synthetic world over several seeds: mean +- standard error.

Takes a ``svitt-ego demo`` folder (its pretrained model in ``run/model`` and its ``toy_data``),
extracts the window features of the toy NLQ clips once, then trains the grounding model with the
NLQ demo's settings (``svitt_ego.nlq.demo.TOY_SETTINGS`` and ``toy_stage``) once per seed and
scores the held-out split with the official metric. It uses ``extract_nlq_features``,
``train_nlq``, ``predict_moments`` and ``evaluate_nlq``, so the same script measures another
checkout with the same interface (per-stage schedules, from the commit that added
``svitt_ego.nlq.recipe``): put its ``src`` first on ``PYTHONPATH``.

``--arms half narrations`` compares GroundNLQ's narration pretraining with none, on an honest split: the
toy world's NLQ training videos are also its EgoClip videos, so the training videos are cut in
two by video uid; the NLQ queries of one half are the fine-tuning set, and the EgoClip
narrations of the *other* half (``narration_queries`` with the fine-tuning and held-out files
excluded) are the pretraining set. Both arms fine-tune on the same half; no narration comes from
a fine-tuning or held-out video.

``--validation`` is for choosing settings without looking at the held-out split: every fourth
training video (by uid) is set aside and scored instead, the others are trained on.

``--long-clips W`` asks whether training on whole clips beats cropping them, with GroundNLQ's
recipe (its from-scratch stage, the paper's model) on a long-clip toy split: the toy clips (30-60 s)
are far shorter than Ego4D's, so each split's clips are laid end to end, in an order drawn with
seed 0, into long clips of at least ``W`` windows (``long_clip_split``; a split with fewer windows
is filled up with the other split's clips, whose queries are not asked). A query is kept only when
no other clip of its long clip has a query of the same text. The arms are ``whole`` (nothing
cropped, the default now) and ``cropped`` (``--crop C`` windows around the answer, the earlier
default 2,560). ``--stride 1`` extracts four times as many windows per second as the default 4.

    python benchmarks/nlq_seeds.py demo_run                        # 3 seeds, the demo's 40 epochs
    python benchmarks/nlq_seeds.py demo_run --validation --lr 1e-3 --model drop_path=0   # a setting to try
    python benchmarks/nlq_seeds.py demo_run --arms half narrations # narrations vs none (one process an arm works too)
    python benchmarks/nlq_seeds.py demo_run --long-clips 2560 --crop 1280 --stride 1   # whole vs cropped
    python benchmarks/nlq_seeds.py --merge a/results-whole.json b/results-cropped.json  # processes' table
    PYTHONPATH=/path/to/other/checkout/src python benchmarks/nlq_seeds.py demo_run --output other
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

METRICS = ("R@1 IoU=0.3", "R@5 IoU=0.3", "R@1 IoU=0.5", "R@5 IoU=0.5", "mIoU")
ARMS = ("all", "half", "narrations")
LONG_ARMS = ("whole", "cropped")


def _code() -> str:
    """Where ``svitt_ego`` was imported from, and that checkout's commit."""
    import svitt_ego

    where = Path(svitt_ego.__file__).resolve().parent
    commit = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], check=False,
                            capture_output=True, text=True).stdout.strip()
    return f"{where} at {commit or 'an unknown commit'}"


def _by_uid(videos: list[dict]) -> list[dict]:
    return sorted(videos, key=lambda v: v["video_uid"])


def fewer_videos(path: Path, videos: int, out: Path) -> Path:
    """A copy of an NLQ file with only its first ``videos`` videos by uid (a quick check)."""
    from svitt_ego.atomic import atomic_write_json
    from svitt_ego.nlq.annotations import load_json

    data = load_json(path)
    return atomic_write_json(out / path.name, {**data, "videos": _by_uid(data["videos"])[:videos]})


def validation_split(train: Path, out: Path, every: int = 4) -> tuple[Path, Path]:
    """The training file without every ``every``-th video by uid, and a file of those videos."""
    from svitt_ego.atomic import atomic_write_json
    from svitt_ego.nlq.annotations import load_json

    data = load_json(train)
    videos = _by_uid(data["videos"])
    fit = [v for i, v in enumerate(videos) if i % every]
    return (atomic_write_json(out / "nlq_fit.json", {**data, "videos": fit}),
            atomic_write_json(out / "nlq_validation.json", {**data, "videos": videos[::every]}))


def model_settings(pairs: list[str]) -> dict:
    """``KEY=VALUE`` grounding-model settings, each value read as its ``GroundingConfig`` field's type."""
    import dataclasses

    from svitt_ego.nlq.model import GroundingConfig

    types = {f.name: int if f.type in ("int", int) else float for f in dataclasses.fields(GroundingConfig)
             if f.name not in ("video_dim", "text_dim")}  # the features' dimensions, not settings
    settings = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types:
            raise SystemExit(f"--model {pair}: not a grounding-model setting (one of {sorted(types)})")
        try:
            settings[key] = types[key](value)
        except ValueError:
            raise SystemExit(f"--model {pair}: not {'a whole number' if types[key] is int else 'a number'}") from None
    return settings


def honest_split(egoclip: Path, train: Path, val: Path, out: Path) -> tuple[Path, Path]:
    """The fine-tuning file (NLQ training queries of every other training video, by uid) and the
    narration queries of the remaining training videos."""
    from svitt_ego.atomic import atomic_write_json
    from svitt_ego.nlq.annotations import load_json
    from svitt_ego.nlq.narrations import narration_queries

    data = load_json(train)
    finetune = atomic_write_json(out / "nlq_finetune.json", {**data, "videos": _by_uid(data["videos"])[::2]})
    narrations = narration_queries(egoclip, [train], exclude=[val, finetune])
    kept = {v["video_uid"] for v in narrations["videos"]}
    held = {v["video_uid"] for path in (finetune, val) for v in load_json(path)["videos"]}
    assert not kept & held, "a narration video is also a fine-tuning or held-out video"
    return finetune, atomic_write_json(out / "narrations.json", narrations)


def _groups(lengths: dict[str, int], order: list[str], windows: int) -> list[list[str]]:
    """``order`` cut into runs of at least ``windows`` windows (a short remainder joins the last run)."""
    groups, run, total = [], [], 0
    for uid in order:
        run, total = run + [uid], total + lengths[uid]
        if total >= windows:
            groups, run, total = groups + [run], [], 0
    if run:
        groups = groups[:-1] + [groups[-1] + run] if groups else [run]
    return groups


def long_clip_split(features_dir: Path, files: list[Path], windows: int, out: Path, seed: int = 0) -> list[Path]:
    """A feature folder ``out/features`` of long clips and one NLQ file per file of ``files``.

    Each file's clips, in an order drawn with ``seed``, are laid end to end into long clips of at
    least ``windows`` windows (their window features concatenated: window ``j`` of a clip placed
    after ``n`` windows becomes window ``n + j``, so its answers move by ``n * stride / fps``
    seconds). A file with fewer windows makes one long clip, filled up with the other files'
    clips (their queries not asked). A query is kept when no other clip of its long clip has a
    query of the same text.
    """
    import random

    import torch

    from svitt_ego.atomic import atomic_write_json
    from svitt_ego.features import begin_folder, feature_file, write_tensors
    from svitt_ego.nlq.annotations import NLQQuery, load_json, read_nlq
    from svitt_ego.nlq.features import NLQFeatures, text_file

    features = NLQFeatures(features_dir)
    stride, rates = features.manifest["stride"], {info["fps"] for info in features.manifest["videos"].values()}
    if len(rates) != 1:
        raise SystemExit(f"{features_dir}: clips at several frame rates {sorted(rates)}; long clips need one")
    fps, parsed = rates.pop(), [read_nlq(path) for path in files]
    clips = {uid: clip for p in parsed for uid, clip in p.clips.items()}
    texts = {uid: [] for uid in clips}
    for p in parsed:
        for q in p.queries:
            texts[q.clip_uid].append(q.text.lower())
    lengths = {uid: len(features.video(uid)) for uid in clips}
    header = {k: v for k, v in features.manifest.items() if k not in ("videos", "failed")}
    plans = []
    for index, p in enumerate(parsed):
        order = sorted(p.clips)
        random.Random(seed).shuffle(order)
        groups = _groups(lengths, order, windows)
        if sum(lengths[uid] for uid in groups[0]) < windows:  # too few windows: fill up with other clips
            others = [uid for uid in sorted(clips) if uid not in p.clips]
            random.Random(seed).shuffle(others)
            filler = _groups(lengths, others, windows - sum(lengths[u] for u in groups[0]))
            groups = [groups[0] + (filler[0] if filler else [])]
        plans.append([(f"long_{index}_{i}", group, set(p.clips)) for i, group in enumerate(groups)])
    entries = {name: {"source": "concatenated toy clips", "fps": fps, "first_frame": 0,
                      "frames": stride * sum(lengths[u] for u in group), "windows": sum(lengths[u] for u in group)}
               for plan in plans for name, group, _ in plan}
    begin_folder(out / "features", header, entries)
    written = []
    for path, p, plan in zip(files, parsed, plans):
        videos = []
        for name, group, asked in plan:
            video = torch.cat([features.video(uid) for uid in group])
            write_tensors(feature_file(out / "features", name), {"features": video})
            seen = [text for uid in group for text in set(texts[uid])]
            annotations, offset = [], 0
            for uid in group:
                kept = [q for q in p.queries if q.clip_uid == uid and uid in asked and seen.count(q.text.lower()) == 1]
                for annotation_uid in dict.fromkeys(q.annotation_uid for q in kept):
                    queries = [q for q in kept if q.annotation_uid == annotation_uid]
                    annotations.append({"annotation_uid": f"{uid}_{annotation_uid}", "language_queries": [
                        {"query": q.text, "clip_start_sec": q.start + offset * stride / fps,
                         "clip_end_sec": q.end + offset * stride / fps} for q in queries]})
                    for k, q in enumerate(queries):
                        moved = NLQQuery(name, f"{uid}_{annotation_uid}", k, q.text, None, None)
                        write_tensors(text_file(out / "features", moved), {"states": features.text(q)})
                offset += lengths[uid]
            videos.append({"video_uid": name, "clips": [{"clip_uid": name, "video_start_sec": 0.0,
                                                         "video_end_sec": offset * stride / fps,
                                                         "annotations": annotations}]})
        written.append(atomic_write_json(out / f"long_{path.name}", {**load_json(path), "videos": videos}))
    return written


def _count(path: Path) -> tuple[int, int]:
    from svitt_ego.nlq.annotations import read_nlq

    parsed = read_nlq(path)
    return len({c.video_uid for c in parsed.clips.values()}), len(parsed.queries)


def _scores(stages: list, features_dir: Path, val: Path, settings, runs: Path) -> dict:
    from svitt_ego.nlq.annotations import load_json, read_nlq
    from svitt_ego.nlq.features import NLQFeatures
    from svitt_ego.nlq.metric import evaluate_nlq, make_submission
    from svitt_ego.nlq.train import predict_moments, train_nlq

    with tempfile.TemporaryDirectory(dir=runs) as run:
        model = train_nlq(features_dir, stages, Path(run) / "run", settings)
    held_out = read_nlq(val)
    results = predict_moments(model, NLQFeatures(features_dir), held_out.queries, held_out.clips)
    return evaluate_nlq(load_json(val), make_submission(results))


def anchors(features_dir: Path, train: Path, val: Path) -> dict:
    """The NLQ demo's two baselines, deterministic: the best fixed window (fitted on ``train``) and
    the dual encoder's zero-shot moments."""
    from svitt_ego.nlq.annotations import load_json, read_nlq
    from svitt_ego.nlq.features import NLQFeatures
    from svitt_ego.nlq.metric import evaluate_nlq, make_submission
    from svitt_ego.nlq.search import (
        fixed_window_baseline,
        fixed_window_results,
        load_dual_encoder,
        zero_shot_results,
    )

    features, held_out, answers = NLQFeatures(features_dir), read_nlq(val), load_json(val)
    fixed = fixed_window_results(held_out, fixed_window_baseline(read_nlq(train)))
    zero_shot = zero_shot_results(load_dual_encoder(features), features, held_out)
    return {"fixed window": evaluate_nlq(answers, make_submission(fixed)),
            "zero-shot dual encoder": evaluate_nlq(answers, make_submission(zero_shot))}


def _summary(rows: list[dict]) -> dict:
    out = {}
    for m in METRICS:
        values = [r[m] for r in rows]
        mean = sum(values) / len(values)
        spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        out[m] = (mean, spread / math.sqrt(len(values)))
    return out


def _table(arms: dict) -> str:
    lines = [f"{'NLQ held-out (%)':34s}" + "".join(f"{m:>16s}" for m in METRICS)]
    for name, rows in arms.items():
        summary = _summary(rows)
        lines.append(f"{name:34s}" + "".join(f"{summary[m][0]:>9.1f} +- {summary[m][1]:<4.1f}" for m in METRICS))
    return "\n".join(lines)


def merged_table(paths: list[Path]) -> str:
    """The table of several runs' ``results-*.json`` (arms or seeds run in separate processes)."""
    arms: dict[str, list[dict]] = {}
    for path in paths:
        for name, rows in json.loads(path.read_text())["arms"].items():
            arms.setdefault(name, []).extend(rows)
    seeds = sorted({row["seed"] for rows in arms.values() for row in rows})
    return f"seeds {seeds}, mean +- standard error\n" + _table(arms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", type=Path, nargs="?", help="a `svitt-ego demo` folder (run/model, toy_data)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="RESULTS",
                        help="only print the table of these results-*.json files (runs of separate processes)")
    parser.add_argument("--output", type=Path, default=None, help="features and results (default DEMO/nlq_seeds)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="none: the baselines only")
    parser.add_argument("--epochs", type=int, default=None,
                        help="NLQ training (fine-tuning) epochs after the warm-up (default: the NLQ demo's)")
    parser.add_argument("--arms", nargs="+", choices=ARMS + LONG_ARMS, default=None,
                        help="all (default): the NLQ training videos; half: every other one; narrations: the "
                             "narrations of the other half first, then half; with --long-clips whole and cropped "
                             "(both by default; one process an arm works too)")
    parser.add_argument("--pretrain-epochs", type=int, default=10, help="after the warm-up")
    parser.add_argument("--jitter", action=argparse.BooleanOptionalAction, default=True,
                        help="GroundNLQ's temporal jittering of the narration queries")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the NLQ demo's)")
    parser.add_argument("--warmup-epochs", type=int, default=None, help="(default: the NLQ demo's)")
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                        help="grounding-model settings over the NLQ demo's, e.g. drop_path=0 stem_layers=2")
    parser.add_argument("--validation", action="store_true",
                        help="score every fourth training video, trained on the others (never the held-out split)")
    parser.add_argument("--batch-size", type=int, default=128, help="windows per forward pass in extraction")
    parser.add_argument("--videos", type=int, default=None, help="only the first N videos of each NLQ file (a check)")
    parser.add_argument("--long-clips", type=int, default=None, metavar="W",
                        help="whole vs cropped clips with GroundNLQ's from-scratch recipe, on long clips of at least "
                             "W windows (e.g. 2560); --epochs and --warmup-epochs default to the recipe's")
    parser.add_argument("--crop", type=int, default=2560, help="the cropped arm's windows (with --long-clips)")
    parser.add_argument("--stride", type=int, default=4, help="frames between window starts in extraction")
    args = parser.parse_args()
    if args.merge:
        print(merged_table(args.merge))
        return
    if args.demo is None:
        parser.error("the demo folder is required (unless --merge)")
    long_arms = args.long_clips is not None
    args.arms = args.arms or list(LONG_ARMS if long_arms else ["all"])
    if any((arm in LONG_ARMS) != long_arms for arm in args.arms):
        parser.error(f"--arms: {', '.join(LONG_ARMS)} go with --long-clips, {', '.join(ARMS)} without it")

    from svitt_ego.atomic import atomic_write_json
    from svitt_ego.nlq.demo import EPOCHS, TOY_SETTINGS, toy_stage
    from svitt_ego.nlq.features import extract_nlq_features
    from svitt_ego.features import read_manifest
    from svitt_ego.nlq.annotations import read_nlq
    from svitt_ego.nlq.train import TrainSettings, recipe_stage

    toy, out = args.demo / "toy_data", args.output or args.demo / "nlq_seeds"
    out.mkdir(parents=True, exist_ok=True)
    train, val = toy / "nlq_train.json", toy / "nlq_val.json"
    if args.videos is not None:
        train, val = (fewer_videos(path, args.videos, out) for path in (train, val))
    if args.validation:
        train, val = validation_split(train, out)
    files, split = [train, val], "half" in args.arms or "narrations" in args.arms
    if split:
        finetune, narrations = honest_split(toy / "egoclip.csv", train, val, out)
        files.append(narrations)
        for name, path in (("fine-tuning", finetune), ("narration pretraining", narrations)):
            print("{} set: {} videos, {} queries ({})".format(name, *_count(path), path), flush=True)
    features = out / ("features" if args.stride == 4 else f"features_stride{args.stride}")
    print(f"code: {_code()}\nextracting the features of {len(files)} files into {features}", flush=True)
    start = time.perf_counter()
    extract_nlq_features(args.demo / "run" / "model", files, toy / "videos", features, stride=args.stride,
                         batch_size=args.batch_size)
    print(f"extracted in {(time.perf_counter() - start) / 60:.1f} min", flush=True)

    if args.long_clips is not None:
        shutil.rmtree(out / "long", ignore_errors=True)
        train, val = long_clip_split(features, [train, val], args.long_clips, out / "long")
        features = out / "long" / "features"
        windows = {uid: info["windows"] for uid, info in read_manifest(features)["videos"].items()}
        for name, path in (("training", train), ("held-out", val)):
            lengths = [windows[uid] for uid in read_nlq(path).clips]
            print("{} long clips: {} clips, {} queries".format(name, *_count(path))
                  + f", {min(lengths)}-{max(lengths)} windows", flush=True)
        stage = recipe_stage("scratch", [train], epochs=args.epochs, warmup_epochs=args.warmup_epochs, lr=args.lr)
        base = TrainSettings(model=model_settings(args.model))  # the paper's grounding model
        arms = {"whole": (f"whole clips, {stage.warmup_epochs} + {stage.epochs} ep", [stage], base),
                "cropped": (f"cropped to {args.crop}, {stage.warmup_epochs} + {stage.epochs} ep", [stage],
                            replace(base, max_windows=args.crop))}
    else:
        args.epochs = EPOCHS if args.epochs is None else args.epochs
        schedule = {"lr": args.lr, "warmup_epochs": args.warmup_epochs}
        stage = lambda files, epochs, **more: toy_stage(files, epochs, **schedule, **more)  # noqa: E731
        base = replace(TOY_SETTINGS, model={**TOY_SETTINGS.model, **model_settings(args.model)})
        arms = {"all": (f"all training videos, {args.epochs} ep", [stage([train], args.epochs)], base)}
        if split:
            arms["half"] = (f"half, no pretraining, {args.epochs} ep", [stage([finetune], args.epochs)], base)
            arms["narrations"] = (f"half, narrations {args.pretrain_epochs} ep{', jittered' * args.jitter} first",
                                  [stage([narrations], args.pretrain_epochs, jitter=args.jitter),
                                   stage([finetune], args.epochs)], base)
    for name, row in anchors(features, train, val).items():
        print(f"{name} (deterministic): " + ", ".join(f"{m} {row[m]:.1f}" for m in METRICS), flush=True)
    for arm in args.arms:
        print(f"{arm}: {arms[arm][2]} (seed aside); stages: {arms[arm][1]}", flush=True)
    results: dict[str, list[dict]] = {}
    results_file = out / f"results-{'-'.join(args.arms)}.json"  # written after every seed: a killed run keeps them
    for name, stages, settings in (arms[arm] for arm in args.arms):
        for seed in args.seeds:
            begun = time.perf_counter()
            row = _scores(stages, features, val, replace(settings, seed=seed), out)
            results.setdefault(name, []).append({"seed": seed, **{m: row[m] for m in METRICS}})
            print(f"{name}, seed {seed}: " + ", ".join(f"{m} {row[m]:.1f}" for m in METRICS)
                  + f" ({(time.perf_counter() - begun) / 60:.1f} min)", flush=True)
            atomic_write_json(results_file, {"code": _code(), "seeds": args.seeds, "arms": results})  # seed by seed
    if results:
        print(f"\nseeds {args.seeds}, mean +- standard error\n" + _table(results))
    atomic_write_json(results_file, {"code": _code(), "seeds": args.seeds, "arms": results})


if __name__ == "__main__":
    main()
