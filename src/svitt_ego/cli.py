"""svitt-ego: pretrain and evaluate SViTT-Ego, a sparse video-text transformer for egocentric video.

Each subcommand parses its own arguments here and imports the module that does
the work only when it runs, so ``svitt-ego --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

from svitt_ego.untrusted import one_line
from svitt_ego import __version__


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless there is none to show (None, False, an empty
    list) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _RecipeHelpFormatter(argparse.RawDescriptionHelpFormatter, _HelpFormatter):
    """A description and epilog printed as written (``train-nlq``'s recipe table, the commands by task),
    options as :class:`_HelpFormatter`."""


class _Parser(argparse.ArgumentParser):
    """A bad argument gets one line and exit status 2, as every other bad input does; help shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _OldSpelling(argparse.Action):
    """An option's old spelling (``--out``): sets the new option (``--output``) and says so on stderr."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_output(p: argparse.ArgumentParser, help: str, required: bool = False, default: str | None = None) -> None:
    """``--output``, every command's name for what it writes; ``--out``, its old spelling, still works."""
    spellings = p.add_mutually_exclusive_group(required=required)
    spellings.add_argument("--output", default=default, help=help)
    spellings.add_argument("--out", dest="output", action=_OldSpelling, new="--output", help=argparse.SUPPRESS)


def _add_device(p: argparse.ArgumentParser) -> None:
    """``--device``, on every command that runs a model (svitt_ego.device.pick_device)."""
    p.add_argument("--device", default=None,
                   help="where the model runs: cpu, cuda, cuda:1, ... (default: cuda when there is a GPU, else cpu)")


def _bounded(kind: type, low: float | None = None, high: float | None = None, above: bool = False):
    """An argparse type: a finite ``kind`` (int or float) >= ``low`` (> ``low`` if ``above``), <= ``high``."""
    what = "an integer" if kind is int else "a finite number"
    bounds = " and ".join(part for part in (low is not None and f"{'>' if above else '>='} {low}",
                                            high is not None and f"<= {high}") if part)
    expected = f"{what} {bounds}".strip()

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
        too_low = low is not None and (value <= low if above else value < low)
        if (kind is float and not math.isfinite(value)) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    return parse


positive_int = _bounded(int, 1)
nonnegative_int = _bounded(int, 0)
seed = _bounded(int, 0, 2**31 - 1)
positive_float = _bounded(float, 0, above=True)
nonnegative_float = _bounded(float, 0)
finite_float = _bounded(float)


def _add_config_args(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--config", default=default,
                        help=f"a preset (svitt-ego info --list) or a YAML file (default: {default})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. model.vision.k_random=5 train.batch_size=4")


def _cmd_info(args: argparse.Namespace) -> int:
    from svitt_ego.config import load_config, preset_names
    from svitt_ego.models import create_model

    if args.list:
        print("\n".join(preset_names()))
        return 0
    cfg = load_config(args.config, args.overrides)
    model = create_model(cfg.model, load_pretrained=False)
    print(model.describe())
    return 0


def _cmd_plan_memory(args: argparse.Namespace) -> int:
    import json

    from svitt_ego.atomic import atomic_write_json
    from svitt_ego.memory import fit, format_plan, load_plan_config, parse_memory, plan_memory

    gpu = parse_memory(args.gpu_memory) if args.gpu_memory is not None else None
    cfg = load_plan_config(args.config, args.overrides)
    plan = plan_memory(cfg, args.world_size)
    fitted = fit(cfg, gpu, args.world_size, known=plan) if gpu is not None else None
    report = plan.to_dict(fitted)
    print(json.dumps(report) if args.json else format_plan(plan, fitted))
    if args.output:
        atomic_write_json(args.output, report)
    return 0


def _cmd_make_toy_data(args: argparse.Namespace) -> int:
    from svitt_ego.data.toy_benchmarks import make_toy_world

    make_toy_world(args.dir, seed=args.seed, num_videos=args.num_videos)
    return 0


def _cmd_prepare_videos(args: argparse.Namespace) -> int:
    from svitt_ego.data.prepare import prepare_videos
    from svitt_ego.run_folder import run_folder

    uids = None
    if args.uids is not None:
        from svitt_ego.data.video_uids import read_uid_list

        uids = read_uid_list(args.uids)
    with run_folder(args.dst, "prepare-videos"):
        summary = prepare_videos(args.src, args.dst, short_side=args.short_side,
                                 chunk_seconds=args.chunk_seconds, workers=args.workers, uids=uids)
    return 1 if summary.failed else 0


def _cmd_video_uids(args: argparse.Namespace) -> int:
    from svitt_ego.atomic import atomic_write_text
    from svitt_ego.data.video_uids import collect_videos

    videos = collect_videos(args.files, args.exclude)
    listing = "".join(f"{uid}\n" for uid in videos.uids)
    if args.output:
        atomic_write_text(args.output, listing)
    else:
        sys.stdout.write(listing)
    known = [d for d in videos.durations.values() if d is not None]
    kinds = ", ".join(f"{path} ({kind})" for path, kind in videos.kinds.items())
    hours = f"; {sum(known) / 3600:.1f} hours in the {len(known)} whose duration EgoClip states" if known else ""
    print(f"video-uids: {len(videos.uids)} videos from {kinds}"
          f"{f', less those of {len(args.exclude)} files' if args.exclude else ''}{hours}", file=sys.stderr)
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from svitt_ego.config import load_config
    from svitt_ego.train import pretrain

    pretrain(load_config(args.config, args.overrides), resume=args.resume,
             allow_config_change=args.allow_config_change, device=args.device)
    return 0


def _cmd_convert_svitt(args: argparse.Namespace) -> int:
    from svitt_ego.models.svitt_weights import convert_svitt, model_overrides

    folder = convert_svitt(args.checkpoint, args.output, vocab=args.vocab, overrides=model_overrides(args.overrides),
                           text_heads=args.text_heads, allow_unused=args.allow_unused)
    print(f"convert-svitt: wrote {folder}")
    return 0


def _cmd_eval_mcq(args: argparse.Namespace) -> int:
    from svitt_ego.eval.egomcq import run_egomcq

    run_egomcq(args.checkpoint, args.config, args.overrides, output=args.output, score=args.score,
               vtm_weight=args.vtm_weight, device=args.device)
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from svitt_ego.data.video import VideoReadError
    from svitt_ego.visualize import visualize

    try:
        path = visualize(args.checkpoint, args.video, args.start, args.end, text=args.text, out=args.output,
                         chunk_seconds=args.chunk_seconds, device=args.device)
    except (VideoReadError, FileNotFoundError, ValueError) as err:
        print(f"svitt-ego: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.task == "nlq":
        if args.epochs is not None:
            from svitt_ego.config import ConfigError

            raise ConfigError("--epochs sets the pretraining's length; pretrain with `svitt-ego demo --epochs N` "
                              "first, then run --task nlq", "--epochs")
        from svitt_ego.nlq.demo import demo_nlq

        demo_nlq(args.workdir, quick=args.quick, device=args.device)
        return 0
    from svitt_ego.demo import demo

    demo(args.workdir, quick=args.quick, epochs=args.epochs, device=args.device)
    return 0


def _cmd_extract_nlq_features(args: argparse.Namespace) -> int:
    from svitt_ego.nlq.features import extract_nlq_features

    meta = extract_nlq_features(args.checkpoint, args.annotations, args.videos, args.output, window=args.window,
                                stride=args.stride, batch_size=args.batch_size, chunk_seconds=args.chunk_seconds,
                                text=args.text, device=args.device)
    return 1 if meta["failed"] else 0


def _cmd_extract_features(args: argparse.Namespace) -> int:
    from svitt_ego.features import extract_features

    manifest = extract_features(args.checkpoint, args.videos, args.output, what=args.what, window=args.window,
                                stride=args.stride, frames=args.frames, fps=args.fps, dtype=args.dtype,
                                batch_size=args.batch_size, chunk_seconds=args.chunk_seconds, root=args.root,
                                device=args.device)
    return 1 if manifest["failed"] else 0


def _cmd_train_nlq(args: argparse.Namespace) -> int:
    from svitt_ego.device import pick_device
    from svitt_ego.nlq.train import TrainSettings, recipe_stage, train_nlq

    stages = [recipe_stage("pretrain", args.pretrain, epochs=args.pretrain_epochs, lr=args.pretrain_lr,
                           batch_size=args.pretrain_batch_size, warmup_epochs=args.pretrain_warmup_epochs,
                           jitter=args.jitter)] if args.pretrain else []
    stages.append(recipe_stage("finetune" if args.pretrain else "scratch", args.annotations, epochs=args.epochs,
                               lr=args.lr, batch_size=args.batch_size, warmup_epochs=args.warmup_epochs))
    settings = TrainSettings(seed=args.seed, max_nonfinite=args.max_nonfinite, max_windows=args.max_windows,
                             micro_batch=args.micro_batch)
    train_nlq(args.features, stages, args.output, settings,
              resume=args.resume, device=pick_device(args.device), val=args.val,
              allow_config_change=args.allow_config_change)
    return 0


def _cmd_predict_nlq(args: argparse.Namespace) -> int:
    if args.zero_shot:
        from svitt_ego.nlq.commands import predict_zero_shot

        predict_zero_shot(args.features, args.annotations, args.output, args.top_k)
    else:
        from svitt_ego.nlq.train import predict_nlq

        predict_nlq(args.features, args.model, args.annotations, args.output, args.top_k, device=args.device)
    return 0


def _cmd_eval_nlq(args: argparse.Namespace) -> int:
    from svitt_ego.nlq.commands import eval_nlq

    eval_nlq(args.submission, args.annotations, args.output)
    return 0


def _cmd_narration_queries(args: argparse.Namespace) -> int:
    from svitt_ego.atomic import atomic_write_json
    from svitt_ego.nlq.narrations import narration_queries

    queries = narration_queries(args.egoclip, args.train, args.exclude)
    atomic_write_json(args.output, queries)
    count = sum(len(c["annotations"][0]["language_queries"]) for v in queries["videos"] for c in v["clips"])
    print(f"{count} narration queries in {sum(len(v['clips']) for v in queries['videos'])} clips -> {args.output}; "
          f"{queries['skipped_videos']} training videos left out (in --exclude)")
    return 0


def _cmd_export_nlq_features(args: argparse.Namespace) -> int:
    from svitt_ego.nlq.export import export_groundnlq

    config = export_groundnlq(args.features, args.annotations, args.out)
    print(f"GroundNLQ's inputs in {args.out}: video_features/, text_features/, one jsonl per annotation file, "
          f"groundnlq_dataset.yaml ({', '.join(f'{k} {v}' for k, v in config.items())})")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from svitt_ego.device import pick_device
    from svitt_ego.search import Extraction, run_search

    how = Extraction(args.window, args.stride, args.frames, args.fps, args.batch_size,
                     str(pick_device(args.device)), args.chunk_seconds)
    return run_search(args.checkpoint, args.input, args.queries, args.mode, args.top_k, args.cache, how,
                      args.pairs, args.html, args.png)


def _cmd_eval_epic_mir(args: argparse.Namespace) -> int:
    from svitt_ego.eval.epic_mir import run_epic_mir

    result = run_epic_mir(args.checkpoint, args.annotations, videos=args.videos, frames_root=args.frames_root,
                          relevancy=args.relevancy, num_frames=args.num_frames, batch_size=args.batch_size,
                          on_error=args.on_error, workers=args.workers, output=args.output, device=args.device)
    return 1 if result["skipped_clips"] else 0


def _cmd_epic_mir_relevancy(args: argparse.Namespace) -> int:
    from svitt_ego.eval.epic_mir import write_relevancy

    write_relevancy(args.annotations, args.output, compare=args.compare)
    return 0


def _cmd_eval_charades_ego(args: argparse.Namespace) -> int:
    from svitt_ego.eval.charades_ego import run_charades_ego

    result = run_charades_ego(args.checkpoint, args.annotations, args.videos, num_frames=args.num_frames,
                              batch_size=args.batch_size, on_error=args.on_error, workers=args.workers,
                              output=args.output, device=args.device)
    return 1 if result["skipped_videos"] else 0


def _recipe(args: argparse.Namespace):
    from svitt_ego.eval.finetune import Recipe

    return Recipe(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                  weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, num_frames=args.num_frames,
                  val_fraction=args.val_fraction, seed=args.seed, workers=args.workers)


def _cmd_finetune_epic_mir(args: argparse.Namespace) -> int:
    from svitt_ego.eval.epic_mir_finetune import run_finetune_epic_mir

    run_finetune_epic_mir(args.model, args.annotations, args.videos, args.output, _recipe(args),
                          relevancy=args.relevancy, device=args.device, resume=args.resume,
                          allow_config_change=args.allow_config_change)
    return 0


def _cmd_finetune_charades_ego(args: argparse.Namespace) -> int:
    from svitt_ego.eval.charades_ego_finetune import run_finetune_charades_ego

    run_finetune_charades_ego(args.model, args.annotations, args.videos, args.output, _recipe(args),
                              num_classes=args.num_classes, device=args.device, resume=args.resume,
                              allow_config_change=args.allow_config_change)
    return 0


def _add_window_args(p: argparse.ArgumentParser) -> None:
    """How videos are cut into windows and read: extract-features and search."""
    p.add_argument("--frames", type=positive_int, default=None,
                   help="frames the model sees per window (default: the model's num_frames; another re-inflates it); "
                        "with fewer than --window they are spread evenly over the window")
    p.add_argument("--window", type=positive_int, default=None, help="frames per window (default: --frames)")
    p.add_argument("--stride", type=positive_int, default=None, help="frames between window starts (default: --window)")
    p.add_argument("--fps", type=positive_float, default=None,
                   help="resample every video to this frame rate first (default: each file's own)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="windows per forward pass")
    p.add_argument("--chunk-seconds", type=positive_float, default=600.0, help="chunk length of chunk folders")


# ``svitt-ego --help`` lists the commands by task, in this order.
TASKS = {
    "data": ["make-toy-data", "prepare-videos", "video-uids"],
    "the model and pretraining": ["demo", "info", "plan-memory", "pretrain", "convert-svitt", "visualize"],
    "evaluation (zero-shot)": ["eval-mcq", "eval-epic-mir", "epic-mir-relevancy", "eval-charades-ego"],
    "fine-tuning": ["finetune-epic-mir", "finetune-charades-ego"],
    "features and search of any video": ["extract-features", "search"],
    "Ego4D NLQ": ["extract-nlq-features", "narration-queries", "train-nlq", "predict-nlq", "eval-nlq",
                  "export-nlq-features"],
}


class _Commands:
    """The subcommands: each parser's one-line help is its description, and ``svitt-ego --help`` lists
    them by :data:`TASKS` (argparse alone lists them in one block)."""

    def __init__(self, sub):
        self._sub, self.helps = sub, {}

    def add_parser(self, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
        self.helps[name] = help
        kwargs.setdefault("description", help)
        return self._sub.add_parser(name, **kwargs)

    def listing(self) -> str:
        return "\n\n".join(f"{task}:\n" + "\n".join(f"  {name:<23} {self.helps[name]}" for name in names)
                           for task, names in TASKS.items())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="svitt-ego", description=__doc__.splitlines()[0], formatter_class=_RecipeHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    help = "one of the commands below; svitt-ego COMMAND --help for its options"
    commands = _Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=help))
    for add in (_add_data_commands, _add_pretraining_commands, _add_zero_shot_commands, _add_finetune_commands,
                _add_features_commands, _add_nlq_input_commands, _add_nlq_commands):
        add(commands)
    parser.epilog = commands.listing()
    return parser


def _add_data_commands(sub) -> None:
    """The toy world, Ego4D videos and their uids."""
    p = sub.add_parser("make-toy-data", help="generate the synthetic egocentric dataset")
    p.add_argument("dir", help="the folder to generate it in")
    p.add_argument("--seed", type=seed, default=0, help="the generator's seed")
    p.add_argument("--num-videos", type=positive_int, default=None, help="videos (default: the standard toy size)")
    p.set_defaults(func=_cmd_make_toy_data)

    p = sub.add_parser("prepare-videos", help="resize Ego4D videos to short side 256 and cut 600-s chunks")
    p.add_argument("src", help="folder of <video_uid>.mp4 files")
    p.add_argument("dst", help="output root: DST/<video_uid>/<k>.mp4")
    p.add_argument("--short-side", type=positive_int, default=256, help="pixels of the shorter side")
    p.add_argument("--chunk-seconds", type=positive_float, default=600.0, help="length of each chunk")
    p.add_argument("--workers", type=positive_int, default=4, help="videos prepared at once")
    p.add_argument("--uids", default=None, help="prepare only the videos of this uid list (svitt-ego video-uids)")
    p.set_defaults(func=_cmd_prepare_videos)

    p = sub.add_parser("video-uids", help="the Ego4D video uids annotation files refer to, one per line",
                       description="The Ego4D video uids that EgoClip, EgoMCQ, NLQ, MQ or VQ annotation files refer "
                                   "to (each file's kind recognised), one per line: the Ego4D download tool's "
                                   "--video_uid_file, and prepare-videos --uids.")
    p.add_argument("files", nargs="+", help="egoclip.csv, egomcq.json, nlq_*.json, moments_*.json, vq_*.json")
    p.add_argument("--exclude", nargs="+", default=[],
                   help="leave out the videos of these annotation files or uid lists (.txt)")
    p.add_argument("--output", default=None, help="write the list here (default: standard output)")
    p.set_defaults(func=_cmd_video_uids)


def _add_pretraining_commands(sub) -> None:
    """The model: its size, its memory, pretraining, SViTT's weights, the figure and the demo."""
    p = sub.add_parser("info", help="build a model from a config and print its size")
    _add_config_args(p, "svitt_ego_kr3")
    p.add_argument("--list", action="store_true", help="print the names of the presets shipped with svitt-ego")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("plan-memory", help="predict a training step's peak GPU memory, on any CPU (will it fit?)",
                       description="Runs one real training step (forward with hard negatives, backward, optimizer "
                                   "step) on fake tensors and prints its predicted peak GPU memory by part, and the "
                                   "training FLOPs per clip beside the same encoder dense (docs/memory.md).")
    _add_config_args(p, "svitt_ego_kr3")
    p.add_argument("--world-size", type=_bounded(int, 1, 4096), default=1,
                   help="GPUs (torchrun processes) the run uses: DDP's buckets, train.shard_optimizer's share")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="the card's memory (12GB, 11.5GiB, 24000MiB; a bare number is GiB): also print the largest "
                        "train.batch_size that fits, with the reserve, and whether activation checkpointing is needed")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    _add_output(p, "also write the JSON object to this file")
    p.set_defaults(func=_cmd_plan_memory)

    p = sub.add_parser("pretrain", help="pretrain on EgoClip (use torchrun for several GPUs)")
    _add_config_args(p, "svitt_ego_kr3")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.output_dir")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though settings that change the saved state's meaning differ (logged)")
    _add_device(p)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("convert-svitt",
                       help="a checkpoint SViTT's code wrote (SViTT's, SViTT-Ego's) as a model folder")
    p.add_argument("checkpoint", help="the .pth file (read without running code)")
    p.add_argument("output", help="the model folder to write (new or empty)")
    p.add_argument("--vocab", default=None,
                   help="a local BERT folder with vocab.txt (default: the checkpoint's text_encoder if local)")
    p.add_argument("--text-heads", type=positive_int, default=12,
                   help="BERT's attention heads when the checkpoint's config does not say (default: 12, BERT-base)")
    p.add_argument("--allow-unused", action="store_true",
                   help="drop the checkpoint's tensors that have no place in the model instead of refusing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="model settings to change after reading, e.g. model.vision.num_frames=8")
    p.set_defaults(func=_cmd_convert_svitt)

    p = sub.add_parser("visualize", help="draw the video patches node sparsity keeps for one clip (PNG)")
    p.add_argument("checkpoint", help="a training checkpoint (.pt) or a save_pretrained folder")
    p.add_argument("video", help="a video file PyAV reads, or a prepared chunk folder ROOT/VIDEO_UID")
    p.add_argument("--start", type=nonnegative_float, required=True, help="clip start (seconds)")
    p.add_argument("--end", type=nonnegative_float, required=True, help="clip end (seconds)")
    p.add_argument("--text", default=None, help="also draw what the first fusion layer keeps for this text")
    _add_output(p, "the PNG to write", default="figure.png")
    p.add_argument("--chunk-seconds", type=positive_float, default=600.0, help="chunk length of a chunk folder")
    _add_device(p)
    p.set_defaults(func=_cmd_visualize)

    p = sub.add_parser("demo", help="toy data -> evaluate -> pretrain the tiny model -> evaluate again")
    p.add_argument("--workdir", default="demo_run", help="the folder the toy data, the run and the results go in")
    p.add_argument("--quick", action="store_true", help="a short run (for tests)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="pretraining epochs (default: the tiny preset's 5, about 9 minutes on 2 quiet CPU cores; "
                        "10 takes twice as long and trains the multimodal encoder further)")
    p.add_argument("--task", choices=["pretrain", "nlq"], default="pretrain",
                   help="nlq: ground queries with the pretrained demo model (pretraining it first if missing)")
    _add_device(p)
    p.set_defaults(func=_cmd_demo)


def _add_nlq_input_commands(sub) -> None:
    """Ego4D NLQ's inputs: window and query features, narration queries, GroundNLQ's own format."""
    p = sub.add_parser("extract-nlq-features", help="window features of Ego4D NLQ clips and their queries")
    p.add_argument("checkpoint", help="a training checkpoint (.pt) or a save_pretrained folder")
    p.add_argument("--annotations", nargs="+", required=True, help="nlq_*.json files (clips of all of them)")
    p.add_argument("--videos", required=True, help="videos as prepare-videos writes them")
    _add_output(p, "the feature folder (manifest.json, the clips' and the queries' features)", required=True)
    p.add_argument("--window", type=positive_int, default=4, help="frames per window (the model's num_frames)")
    p.add_argument("--stride", type=positive_int, default=4, help="frames between window starts")
    p.add_argument("--batch-size", type=positive_int, default=32, help="windows per forward pass")
    p.add_argument("--chunk-seconds", type=positive_float, default=600.0, help="chunk length of chunk folders")
    p.add_argument("--text", nargs="+", default=["svitt-ego"], metavar="ENCODER",
                   help="the queries' token states: 'clip FOLDER' (a local Hugging Face CLIPTextModel and its "
                        "tokenizer, GroundNLQ's text features, 512-d float32 for ViT-B/32) or 'svitt-ego' (the "
                        "checkpoint's text encoder; the default)")
    _add_device(p)
    p.set_defaults(func=_cmd_extract_nlq_features)

    p = sub.add_parser("narration-queries", help="EgoClip narrations inside training clips, as NLQ queries "
                       "(GroundNLQ's pretraining set)")
    p.add_argument("egoclip", help="egoclip.csv")
    p.add_argument("--train", nargs="+", required=True, help="NLQ / MQ / VQ training files: their clips")
    p.add_argument("--exclude", nargs="*", default=[], help="val / test files: none of their videos is used")
    p.add_argument("--output", required=True, help="the NLQ-format file to write")
    p.set_defaults(func=_cmd_narration_queries)

    p = sub.add_parser("export-nlq-features", help="a features folder as another project's inputs (GroundNLQ's lmdb)")
    p.add_argument("features", help="a feature folder of extract-nlq-features")
    p.add_argument("--to", choices=["groundnlq"], required=True, help="whose inputs")
    p.add_argument("out", help="the folder to write them in")
    p.add_argument("--annotations", nargs="+", required=True, help="NLQ files whose queries to export (one jsonl each)")
    p.set_defaults(func=_cmd_export_nlq_features)


def _add_nlq_commands(sub) -> None:
    """Ego4D NLQ: the grounding model's training, predictions and the official metric."""
    from svitt_ego.nlq.recipe import recipe_help

    p = sub.add_parser("train-nlq", help="train the NLQ grounding model on extracted features",
                       formatter_class=_RecipeHelpFormatter, description=recipe_help())
    p.add_argument("features", help="a feature folder of extract-nlq-features")
    p.add_argument("--annotations", nargs="+", required=True,
                   help="NLQ-format training files (nlq_train.json, or nlq_train.json nlq_val.json for the test "
                        "server)")
    _add_output(p, "the run folder (last.pt, best.pt with --val, metrics.jsonl)", required=True)
    stage = "(default: the recipe's, fine-tuning after --pretrain, else from scratch)"
    p.add_argument("--epochs", type=positive_int, default=None, help=f"epochs after the warm-up {stage}")
    p.add_argument("--warmup-epochs", type=nonnegative_int, default=None, help=f"warm-up epochs {stage}")
    p.add_argument("--batch-size", type=positive_int, default=None, help=f"queries per step {stage}")
    p.add_argument("--lr", type=positive_float, default=None, help=f"peak learning rate {stage}")
    p.add_argument("--pretrain", nargs="+", default=None,
                   help="NLQ-format files (e.g. narration queries) to train on first; the heads restart after")
    pretrain = "of the --pretrain stage (default: the recipe's)"
    p.add_argument("--pretrain-epochs", type=positive_int, default=None, help=f"epochs after the warm-up {pretrain}")
    p.add_argument("--pretrain-warmup-epochs", type=nonnegative_int, default=None, help=f"warm-up epochs {pretrain}")
    p.add_argument("--pretrain-batch-size", type=positive_int, default=None, help=f"queries per step {pretrain}")
    p.add_argument("--pretrain-lr", type=positive_float, default=None, help=f"peak learning rate {pretrain}")
    p.add_argument("--jitter", action=argparse.BooleanOptionalAction, default=None,
                   help="GroundNLQ's temporal jittering of the --pretrain answers (default: on, the recipe's)")
    p.add_argument("--max-windows", type=positive_int, default=None,
                   help="crop longer training clips to this many windows around the answer (default: whole clips)")
    p.add_argument("--micro-batch", type=positive_int, default=None,
                   help="queries per forward pass: a batch is run in parts and their gradients summed, the same "
                        "step in less memory (default: the whole batch at once)")
    p.add_argument("--seed", type=seed, default=0, help="the seed of initialisation and shuffling")
    p.add_argument("--max-nonfinite", type=nonnegative_int, default=10,
                   help="steps skipped for a non-finite loss or gradient before the run stops")
    _add_device(p)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though settings, stages or features differ from the run's own (logged)")
    p.add_argument("--val", default=None, help="an NLQ file with answers: score every epoch, keep OUTPUT/best.pt")
    p.set_defaults(func=_cmd_train_nlq)

    p = sub.add_parser("predict-nlq", help="write an official NLQ submission")
    p.add_argument("features", help="a feature folder of extract-nlq-features")
    p.add_argument("--annotations", required=True, help="the NLQ file whose queries to answer")
    _add_output(p, "the submission (JSON) to write", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a train-nlq checkpoint (OUTPUT/last.pt or best.pt)")
    which.add_argument("--zero-shot", action="store_true", help="score windows with the dual encoder instead")
    p.add_argument("--top-k", type=positive_int, default=5, help="moments per query")
    _add_device(p)
    p.set_defaults(func=_cmd_predict_nlq)

    p = sub.add_parser("eval-nlq", help="Recall@{1,5} at IoU {0.3,0.5} and mIoU of an NLQ submission")
    p.add_argument("submission", help="a predict-nlq submission (JSON)")
    p.add_argument("--annotations", required=True, help="the NLQ file with the answers")
    p.add_argument("--output", default=None, help="write the metrics as JSON here")
    p.set_defaults(func=_cmd_eval_nlq)


def _add_features_commands(sub) -> None:
    """Window features of any videos, and zero-shot search of their moments or clips by free text."""
    p = sub.add_parser("extract-features", help="window features of any videos (files, folders, lists, chunk folders)",
                       description="One row per window of --window frames, every --stride frames; the model sees "
                                   "--frames of each window's frames, spread evenly over the window when fewer. "
                                   "Row i stands for the window's centre, (stride*i + window/2)/fps s. Resumable: "
                                   "rerun with the same settings to continue.")
    p.add_argument("checkpoint", help="a training checkpoint (.pt) or a save_pretrained folder")
    p.add_argument("videos", nargs="+", help="video files, prepared chunk folders ROOT/VIDEO_UID, folders of either, "
                                             "or .txt files of such paths (one a line)")
    _add_output(p, "the feature folder (manifest.json, videos/<name>.safetensors)", required=True)
    p.add_argument("--root", default=None, help="a prepare-videos root: VIDEOS may then be video uids under it")
    p.add_argument("--what", choices=["pooled", "projected", "tokens"], default="pooled",
                   help="pooled: the video encoder's pooled vector; projected: the joint-space embedding; "
                        "tokens: the last layer's kept tokens and their (t, h, w) positions")
    _add_window_args(p)
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="of the stored features")
    _add_device(p)
    p.set_defaults(func=_cmd_extract_features)

    p = sub.add_parser("search", help="zero-shot: the moments of videos (or the clips) that best match queries",
                       description="The dual encoder alone: per query the best moments of every video, or with "
                                   "--mode clips the best clips (Recall@1/5/10 with --pairs). Raw videos are "
                                   "extracted once into --cache; a feature folder is searched as it is. Queries "
                                   "and options may come in any order.")
    p.add_argument("checkpoint", help="a training checkpoint (.pt) or a save_pretrained folder")
    p.add_argument("input", help="a video file, a prepared chunk folder, a folder of either, a .txt list of such "
                                 "paths, or a feature folder (extract-features, extract-nlq-features)")
    p.add_argument("queries", nargs="*", metavar="QUERY", help='free text, e.g. "when did I open the drawer?"')
    p.add_argument("--mode", choices=["moments", "clips"], default="moments",
                   help="moments: spans of each video; clips: each video is one clip, ranked whole")
    p.add_argument("--top-k", type=positive_int, default=5, help="moments per video (clips: clips) per query")
    p.add_argument("--cache", default=None, help="the folder raw videos' features are kept in (needed for raw "
                                                 "videos in --mode moments); one entry per video and setting")
    _add_window_args(p)
    _add_device(p)
    p.add_argument("--pairs", default=None, help="--mode clips: a CSV video,text of true pairs; its texts are "
                                                 "the queries, and Recall@1/5/10 is printed both ways")
    p.add_argument("--html", default=None, help="write the results as a self-contained page here")
    p.add_argument("--png", default=None, help="draw the results as a contact sheet here")
    p.set_defaults(func=_cmd_search)


def _add_zero_shot_commands(sub) -> None:
    """Zero-shot evaluation: EgoMCQ and the peers' EPIC-Kitchens-100 MIR and Charades-Ego (docs/zero-shot.md)."""
    def common(p, frames: int, batch: int) -> None:
        p.add_argument("checkpoint", help="a training checkpoint (.pt) or a save_pretrained folder")
        p.add_argument("--num-frames", type=int, choices=[4, 16], default=frames,
                       help=f"frames per clip; the model is re-inflated to them (default: {frames})")
        p.add_argument("--batch-size", type=positive_int, default=batch, help="clips per forward pass")
        p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                       help="an unreadable video stops the run (fail) or is named, counted and left out (skip)")
        p.add_argument("--workers", type=nonnegative_int, default=4, help="video-reading processes")
        p.add_argument("--output", default=None, help="write the scores as JSON here")
        _add_device(p)

    p = sub.add_parser("eval-mcq", help="EgoMCQ accuracy (inter / intra) of a checkpoint")
    p.add_argument("checkpoint", help="a training checkpoint (.pt) or a save_pretrained folder")
    p.add_argument("--config", default=None,
                   help="a preset or YAML file for the data settings (default: the checkpoint's own)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.egomcq=...")
    p.add_argument("--output", default=None, help="write the accuracies as JSON here")
    p.add_argument("--score", choices=["dual", "vtm", "both"], default="dual",
                   help="dual: cosine of the two encoders; vtm: the VTM head's log-odds of a match; "
                        "both: dual + VTM_WEIGHT * vtm")
    p.add_argument("--vtm-weight", type=finite_float, default=None, metavar="VTM_WEIGHT",
                   help="the weight of the VTM log-odds in --score both (default: the one picked on the "
                        "training split, svitt_ego.eval.egomcq.VTM_WEIGHT)")
    _add_device(p)
    p.set_defaults(func=_cmd_eval_mcq)

    p = sub.add_parser("eval-epic-mir", help="EPIC-Kitchens-100 multi-instance retrieval, zero-shot (mAP, nDCG)")
    p.add_argument("--annotations", required=True,
                   help="folder of EPIC_100_retrieval_test.csv and EPIC_100_retrieval_test_sentence.csv")
    layout = p.add_mutually_exclusive_group(required=True)
    layout.add_argument("--videos", help="VIDEOS/<participant_id>/<video_id>.MP4, read by timestamps at each "
                                         "file's frame rate (LaViLa's protocol)")
    layout.add_argument("--frames-root", help="FRAMES_ROOT/<video_id>/frame_%%010d.jpg, read by the CSV's frame "
                                              "numbers (EgoVLP's protocol)")
    p.add_argument("--relevancy", default=None,
                   help="caption_relevancy_EPIC_100_retrieval_test.pkl (loaded allowing only a numpy array) or "
                        "an .npy from epic-mir-relevancy (default: built from the CSVs)")
    common(p, 4, 32)
    p.set_defaults(func=_cmd_eval_epic_mir)

    p = sub.add_parser("epic-mir-relevancy", help="build the EK-100 MIR relevancy matrix from the CSVs (.npy)")
    p.add_argument("--annotations", required=True, help="folder of the two EPIC_100_retrieval_test CSVs")
    _add_output(p, "the .npy file to write", required=True)
    p.add_argument("--compare", default=None, help="a distributed .pkl (or .npy) to report the largest difference from")
    p.set_defaults(func=_cmd_epic_mir_relevancy)

    p = sub.add_parser("eval-charades-ego", help="Charades-Ego action recognition, zero-shot (mAP)")
    p.add_argument("--annotations", required=True,
                   help="folder of CharadesEgo_v1_test_only1st.csv and Charades_v1_classes.txt")
    p.add_argument("--videos", required=True, help="VIDEOS/<id>.mp4")
    common(p, 16, 16)
    p.set_defaults(func=_cmd_eval_charades_ego)


def _add_finetune_commands(sub) -> None:
    """Fine-tuning on the peers' benchmarks: EPIC-Kitchens-100 MIR and Charades-Ego (docs/downstream.md)."""
    def common(p, epochs: int, annotations: str, videos: str) -> None:
        p.add_argument("model", metavar="MODEL", help="the model to start from: a save_pretrained folder or a "
                                                      "pretraining checkpoint (.pt)")
        p.add_argument("--annotations", required=True, help=annotations)
        p.add_argument("--videos", required=True, help=videos)
        p.add_argument("--output", required=True, help="the run's folder (checkpoints, best.pt, metrics.jsonl, "
                                                       "test.json, model/); never the pretraining run's")
        p.add_argument("--epochs", type=positive_int, default=epochs, help=f"default: {epochs} (LaViLa's)")
        p.add_argument("--batch-size", type=positive_int, default=16,
                       help="clips per process; the loss sees every process's (default: 16, LaViLa's per GPU)")
        p.add_argument("--lr", type=positive_float, default=3e-5, help="peak learning rate (default: 3e-5)")
        p.add_argument("--min-lr", type=positive_float, default=1e-5, help="the cosine's end (default: 1e-5)")
        p.add_argument("--weight-decay", type=nonnegative_float, default=0.01, help="AdamW's (default: 0.01)")
        p.add_argument("--warmup-epochs", type=nonnegative_float, default=1.0, help="linear warm-up (default: 1)")
        p.add_argument("--num-frames", type=positive_int, default=16,
                       help="frames per clip; the model is re-inflated to them (default: 16)")
        p.add_argument("--val-fraction", type=_bounded(float, 0, 1, above=True), default=0.1,
                       help="the share of training videos held out to choose best.pt (default: 0.1)")
        p.add_argument("--seed", type=seed, default=0, help="data order, held-out videos, augmentation")
        p.add_argument("--workers", type=nonnegative_int, default=4, help="video-reading processes")
        _add_device(p)
        p.add_argument("--resume", action="store_true", help="continue the run in --output from its last.pt")
        p.add_argument("--allow-config-change", action="store_true",
                       help="resume even though settings that change the saved state's meaning differ (logged)")

    p = sub.add_parser("finetune-epic-mir", help="fine-tune the dual encoder on EK-100 MIR's training split, "
                                                 "score its test split (mAP, nDCG)")
    common(p, 100, "folder of EPIC_100_retrieval_train.csv and the two EPIC_100_retrieval_test CSVs",
           "VIDEOS/<participant_id>/<video_id>.MP4, read by timestamps (LaViLa's protocol)")
    p.add_argument("--relevancy", default=None, help="the test split's relevancy matrix (.pkl or .npy; default: "
                                                     "built from the CSVs)")
    p.set_defaults(func=_cmd_finetune_epic_mir)

    p = sub.add_parser("finetune-charades-ego", help="fine-tune the dual encoder on Charades-Ego's training "
                                                     "split, score its test split (mAP)")
    common(p, 10, "folder of CharadesEgo_v1_train_only1st.csv, CharadesEgo_v1_test_only1st.csv and "
                  "Charades_v1_classes.txt", "VIDEOS/<id>.mp4")
    p.add_argument("--num-classes", type=positive_int, default=157,
                   help="the classes Charades_v1_classes.txt must hold (default: 157)")
    p.set_defaults(func=_cmd_finetune_charades_ego)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input (a file, a value, a checkpoint), not a bug: one line, exit 2."""
    from svitt_ego.atomic import WriteError
    from svitt_ego.checkpoint import CheckpointError
    from svitt_ego.config import ConfigError
    from svitt_ego.data.errors import MetadataError
    from svitt_ego.data.video import VideoReadError
    from svitt_ego.nlq.annotations import NLQFormatError

    return (ConfigError, CheckpointError, MetadataError, NLQFormatError, VideoReadError, FileNotFoundError,
            FileExistsError, WriteError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a bad argument exits with one line and status 2 (``--help``: status 0)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills a trailing list of positionals with their first run only: take the KEY=VALUE words
    # (``eval-mcq CKPT --output X a=b``) or search's queries (``search CKPT VIDEOS --cache C "a query"``)
    # that come after an option into it too.
    trailing = "queries" if hasattr(args, "queries") else "overrides"
    if extra and hasattr(args, trailing) and all(not word.startswith("-") and (trailing == "queries" or "=" in word)
                                                 for word in extra):
        setattr(args, trailing, [*getattr(args, trailing), *extra])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


# The options a command writes to; every other path on its command line is an input, never written over.
OUTPUTS = ("output", "out", "dst", "html", "png", "cache")
NOT_PATHS = ("func", "command", "overrides", "queries", "device")


def refuse_inputs_as_outputs(args: argparse.Namespace) -> None:
    """One line when an output of the command (:data:`OUTPUTS`) is the same file or folder as a path it
    reads (``search v.mp4 --html v.mp4``, ``narration-queries --train x.json --output x.json``)."""
    from svitt_ego.atomic import refuse_input_as_output

    inputs = [value for name, given in vars(args).items() if name not in OUTPUTS + NOT_PATHS
              for value in (given if isinstance(given, list) else [given]) if isinstance(value, str)]
    for name in OUTPUTS:
        refuse_input_as_output(getattr(args, name, None), inputs)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit:  # argparse's own exit: --help, or a bad argument (one line, status 2)
        return exit.code if isinstance(exit.code, int) else 2
    from svitt_ego.threads import configure_threads

    configure_threads()  # before the command loads torch
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        refuse_inputs_as_outputs(args)
        return args.func(args)
    except _user_errors() as err:
        print(f"svitt-ego: error: {one_line(str(err))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
