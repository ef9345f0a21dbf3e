"""The NLQ grounding model on the synthetic world over several seeds: mean +- standard error.

Takes a ``svitt-ego demo`` folder (its pretrained model in ``run/model`` and its ``toy_data``),
extracts the window features of the toy NLQ clips once, then trains the grounding model with the
NLQ demo's settings (``svitt_ego.nlq.demo.TOY_SETTINGS``) once per seed and scores the held-out
split with the official metric. It uses only what every version of the NLQ code has had
(``extract_nlq_features``, ``train_nlq``, ``predict_moments``, ``evaluate_nlq``), so the same
script measures another checkout of the code: put its ``src`` first on ``PYTHONPATH``.

``--arms half narrations`` compares GroundNLQ's narration pretraining with none, on an honest split: the
toy world's NLQ training videos are also its EgoClip videos, so the training videos are cut in
two by video uid; the NLQ queries of one half are the fine-tuning set, and the EgoClip
narrations of the *other* half (``narration_queries`` with the fine-tuning and held-out files
excluded) are the pretraining set. Both arms fine-tune on the same half; no narration comes from
a fine-tuning or held-out video.

``--validation`` is for choosing settings without looking at the held-out split: every fourth
training video (by uid) is set aside and scored instead, the others are trained on.

    python benchmarks/nlq_seeds.py demo_run                        # 3 seeds, the demo's 40 epochs
    python benchmarks/nlq_seeds.py demo_run --validation --lr 1e-3 --model drop_path=0   # a setting to try
    python benchmarks/nlq_seeds.py demo_run --arms half narrations # narrations vs none (one process an arm works too)
    PYTHONPATH=/path/to/other/checkout/src python benchmarks/nlq_seeds.py demo_run --output other
"""

from __future__ import annotations

import argparse
import math
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

METRICS = ("R@1 IoU=0.3", "R@5 IoU=0.3", "R@1 IoU=0.5", "R@5 IoU=0.5", "mIoU")
ARMS = ("all", "half", "narrations")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", type=Path, help="a `svitt-ego demo` folder (run/model, toy_data)")
    parser.add_argument("--output", type=Path, default=None, help="features and results (default DEMO/nlq_seeds)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="none: the baselines only")
    parser.add_argument("--epochs", type=int, default=None,
                        help="NLQ training (fine-tuning) epochs (default: the NLQ demo's)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=["all"],
                        help="all: the NLQ training videos; half: every other one; narrations: the narrations of "
                             "the other half first, then half")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
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
    args = parser.parse_args()

    from svitt_ego.atomic import atomic_write_json
    from svitt_ego.nlq.demo import EPOCHS, TOY_SETTINGS
    from svitt_ego.nlq.features import extract_nlq_features
    from svitt_ego.nlq.train import Stage

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
    print(f"code: {_code()}\nextracting the features of {len(files)} files into {out / 'features'}", flush=True)
    start = time.perf_counter()
    extract_nlq_features(args.demo / "run" / "model", files, toy / "videos", out / "features",
                         batch_size=args.batch_size)
    print(f"extracted in {(time.perf_counter() - start) / 60:.1f} min", flush=True)

    args.epochs = args.epochs or EPOCHS
    arms = {"all": (f"all training videos, {args.epochs} ep", [Stage([str(train)], args.epochs)])}
    if split:
        arms["half"] = (f"half, no pretraining, {args.epochs} ep", [Stage([str(finetune)], args.epochs)])
        arms["narrations"] = (f"half, narrations {args.pretrain_epochs} ep{', jittered' * args.jitter} first",
                              [Stage([str(narrations)], args.pretrain_epochs, jitter=args.jitter),
                               Stage([str(finetune)], args.epochs)])
    for name, row in anchors(out / "features", train, val).items():
        print(f"{name} (deterministic): " + ", ".join(f"{m} {row[m]:.1f}" for m in METRICS), flush=True)
    changes = {"lr": args.lr, "warmup_epochs": args.warmup_epochs}  # only those given: older code lacks some
    base = replace(TOY_SETTINGS, **{k: v for k, v in changes.items() if v is not None},
                   model={**TOY_SETTINGS.model, **model_settings(args.model)})
    print(f"grounding model: {base} (seed aside)", flush=True)
    results: dict[str, list[dict]] = {}
    for name, stages in (arms[arm] for arm in args.arms):
        for seed in args.seeds:
            begun = time.perf_counter()
            row = _scores(stages, out / "features", val, replace(base, seed=seed), out)
            results.setdefault(name, []).append({"seed": seed, **{m: row[m] for m in METRICS}})
            print(f"{name}, seed {seed}: " + ", ".join(f"{m} {row[m]:.1f}" for m in METRICS)
                  + f" ({(time.perf_counter() - begun) / 60:.1f} min)", flush=True)
    if results:
        print(f"\nseeds {args.seeds}, mean +- standard error\n" + _table(results))
    atomic_write_json(out / f"results-{'-'.join(args.arms)}.json", {"code": _code(), "seeds": args.seeds, "arms": results})


if __name__ == "__main__":
    main()
