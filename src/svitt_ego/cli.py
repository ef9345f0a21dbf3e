"""svitt-ego: pretrain and evaluate SViTT-Ego, a sparse video-text transformer for egocentric video.

Each subcommand parses its own arguments here and imports the module that does
the work only when it runs, so ``svitt-ego --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def _add_config_args(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--config", default=default,
                        help=f"a preset under configs/ or a YAML file (default: {default})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. model.vision.k_random=5 train.batch_size=4")


def _cmd_info(args: argparse.Namespace) -> int:
    from svitt_ego.config import load_config
    from svitt_ego.models import create_model

    cfg = load_config(args.config, args.overrides)
    model = create_model(cfg.model, load_pretrained=False)
    print(model.describe())
    return 0


def _cmd_make_toy_data(args: argparse.Namespace) -> int:
    from svitt_ego.data.toy import make_toy_data

    make_toy_data(args.dir, seed=args.seed, num_videos=args.num_videos)
    return 0


def _cmd_prepare_videos(args: argparse.Namespace) -> int:
    from svitt_ego.data.prepare import prepare_videos

    summary = prepare_videos(args.src, args.dst, short_side=args.short_side,
                             chunk_seconds=args.chunk_seconds, workers=args.workers)
    return 1 if summary.failed else 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from svitt_ego.config import load_config
    from svitt_ego.train import pretrain

    pretrain(load_config(args.config, args.overrides), resume=args.resume)
    return 0


def _cmd_eval_mcq(args: argparse.Namespace) -> int:
    from svitt_ego.evaluate import run_egomcq

    run_egomcq(args.checkpoint, args.config, args.overrides, output=args.output)
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from svitt_ego.data.video import VideoReadError
    from svitt_ego.visualize import visualize

    try:
        path = visualize(args.checkpoint, args.video, args.start, args.end, text=args.text, out=args.out,
                         chunk_seconds=args.chunk_seconds)
    except (VideoReadError, FileNotFoundError, ValueError) as err:
        print(f"svitt-ego: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from svitt_ego.demo import demo

    demo(args.workdir, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svitt-ego", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="build a model from a config and print its size")
    _add_config_args(p, "svitt_ego_kr3")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("make-toy-data", help="generate the synthetic egocentric dataset")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-videos", type=int, default=None, help="default: the standard toy size")
    p.set_defaults(func=_cmd_make_toy_data)

    p = sub.add_parser("prepare-videos", help="resize Ego4D videos to short side 256 and cut 600-s chunks")
    p.add_argument("src", help="folder of <video_uid>.mp4 files")
    p.add_argument("dst", help="output root: DST/<video_uid>/<k>.mp4")
    p.add_argument("--short-side", type=int, default=256)
    p.add_argument("--chunk-seconds", type=float, default=600.0)
    p.add_argument("--workers", type=int, default=4)
    p.set_defaults(func=_cmd_prepare_videos)

    p = sub.add_parser("pretrain", help="pretrain on EgoClip (use torchrun for several GPUs)")
    _add_config_args(p, "svitt_ego_kr3")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.output_dir")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("eval-mcq", help="EgoMCQ accuracy (inter / intra) of a checkpoint")
    p.add_argument("checkpoint", help="a training checkpoint (.pt) or a save_pretrained folder")
    p.add_argument("--config", default=None,
                   help="a preset or YAML file for the data settings (default: the checkpoint's own)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.egomcq=...")
    p.add_argument("--output", default=None, help="write the accuracies as JSON here")
    p.set_defaults(func=_cmd_eval_mcq)

    p = sub.add_parser("visualize", help="draw the video patches node sparsity keeps for one clip (PNG)")
    p.add_argument("checkpoint", help="a training checkpoint (.pt) or a save_pretrained folder")
    p.add_argument("video", help="a video file PyAV reads, or a prepared chunk folder ROOT/VIDEO_UID")
    p.add_argument("--start", type=float, required=True, help="clip start (seconds)")
    p.add_argument("--end", type=float, required=True, help="clip end (seconds)")
    p.add_argument("--text", default=None, help="also draw what the first fusion layer keeps for this text")
    p.add_argument("--out", default="figure.png")
    p.add_argument("--chunk-seconds", type=float, default=600.0, help="chunk length of a chunk folder")
    p.set_defaults(func=_cmd_visualize)

    p = sub.add_parser("demo", help="toy data -> evaluate -> pretrain the tiny model -> evaluate again")
    p.add_argument("--workdir", default="demo_run")
    p.add_argument("--quick", action="store_true", help="a short run (for tests)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from svitt_ego.config import ConfigError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills the overrides with the first run of positionals only: take KEY=VALUE words
    # that come after an option (``eval-mcq CKPT --output X a=b``) as overrides too.
    if extra and hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"svitt-ego: config error: {err}", file=sys.stderr)
        return 2
    except FileExistsError as err:
        print(f"svitt-ego: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
