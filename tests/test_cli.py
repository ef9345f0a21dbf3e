"""The command line's conventions: help and defaults everywhere, --output, --device, --version, free order."""

import argparse

import pytest
import torch

from svitt_ego import __version__
from svitt_ego.cli import build_parser, main, parse_args
from svitt_ego.config import ConfigError
from svitt_ego.device import pick_device

# The commands that run a model, each with --device.
RUN_A_MODEL = {"demo", "pretrain", "eval-mcq", "visualize", "extract-features", "extract-nlq-features", "train-nlq",
               "predict-nlq", "search", "eval-epic-mir", "eval-charades-ego", "finetune-epic-mir",
               "finetune-charades-ego"}


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _shown(action: argparse.Action) -> bool:
    return action.help is not argparse.SUPPRESS and not isinstance(action, (argparse._HelpAction,
                                                                            argparse._VersionAction))


def test_every_argument_of_every_command_has_help_and_shows_its_default():
    commands = _commands()
    assert len(commands) >= 19
    for name, parser in commands.items():
        text = " ".join(parser.format_help().split())  # unwrapped
        for action in filter(_shown, parser._actions):
            where = f"{name} {action.option_strings or action.dest}"
            assert action.help and action.help.strip(), f"{where}: no help"
            default = action.default
            shows = not (default is None or default is False or default == [] or "default" in action.help)
            if action.option_strings and shows:
                assert f"(default: {default})" in text, f"{where}: its default {default!r} is not shown"
    visualize = " ".join(commands["visualize"].format_help().split())
    assert "--output OUTPUT the PNG to write (default: figure.png)" in visualize
    assert "(default: None)" not in " ".join(p.format_help() for p in commands.values())


def test_every_command_that_runs_a_model_takes_device():
    having = {name for name, parser in _commands().items()
              if any("--device" in a.option_strings for a in parser._actions)}
    assert having == RUN_A_MODEL


def test_every_command_writes_to_output_and_out_is_its_old_spelling(capsys):
    for name, parser in _commands().items():
        options = {s for a in parser._actions for s in a.option_strings}
        assert "--out" not in options or "--output" in options, name
    base = ["extract-features", "ck.pt", "videos/"]
    assert parse_args([*base, "--output", "feats"]).output == "feats"
    assert capsys.readouterr().err == ""
    assert parse_args([*base, "--out", "feats"]).output == "feats"
    assert capsys.readouterr().err == "svitt-ego extract-features: --out is deprecated; use --output\n"
    assert parse_args(["visualize", "ck.pt", "v.mp4", "--start", "0", "--end", "1"]).output == "figure.png"
    assert main(base) == 2  # still required, under either spelling
    assert "--output" in capsys.readouterr().err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"svitt-ego {__version__}\n"


def test_search_takes_queries_and_options_in_any_order():
    args = parse_args(["search", "ck.pt", "videos/", "--cache", "C", "a rabbit", "--top-k", "3", "a bike"])
    assert (args.queries, args.cache, args.top_k) == (["a rabbit", "a bike"], "C", 3)
    args = parse_args(["eval-mcq", "ck.pt", "--output", "x.json", "eval.batch_size=2"])
    assert args.overrides == ["eval.batch_size=2"]
    with pytest.raises(SystemExit):
        parse_args(["eval-mcq", "ck.pt", "--output", "x.json", "stray"])  # not KEY=VALUE


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == pick_device(None) == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^--device cuda: this machine has no CUDA device; use --device cpu$"):
        pick_device("cuda")
    with pytest.raises(ConfigError, match=r"^--device gpu0: ") as err:
        pick_device("gpu0")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cores, threads", [(1, "1"), (2, "1"), (3, "1"), (8, "4")])
def test_commands_give_torch_half_the_cores_unless_told(monkeypatch, cores, threads):
    from svitt_ego import threads as module

    monkeypatch.setattr(module, "usable_cores", lambda: cores)
    env = {}
    assert module.configure_threads(env, modules={}) == threads and env == {"OMP_NUM_THREADS": threads}
    env = {"OMP_NUM_THREADS": "3"}  # the user's own setting wins
    assert module.configure_threads(env, modules={}) == "3" and env == {"OMP_NUM_THREADS": "3"}
    env = {}  # torch already loaded: the variable would not apply, so it is not set
    assert module.configure_threads(env, modules={"torch": torch}) is None and env == {}


def test_every_command_sets_its_threads_before_it_runs(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("svitt_ego.threads.configure_threads", lambda: calls.append("threads"))
    assert main(["info", "--list"]) == 0 and calls == ["threads"]
    assert main(["--version"]) == 0 and calls == ["threads"]  # argparse's own exits need none


def test_help_lists_every_command_once_under_its_task():
    from svitt_ego.cli import TASKS

    grouped = [name for names in TASKS.values() for name in names]
    assert sorted(grouped) == sorted(_commands())  # each command in exactly one task
    text = build_parser().format_help()
    assert text.index("\ndata:\n") < text.index("\nEgo4D NLQ:\n")
    lines = [line.split() for line in text[text.index("\ndata:\n"):].splitlines() if line.startswith("  ")]
    assert [words[0] for words in lines] == grouped
    assert " ".join(lines[grouped.index("train-nlq")][1:]) == "train the NLQ grounding model on extracted features"


def test_no_command_line_builder_is_longer_than_80_lines():
    import ast
    import inspect

    import svitt_ego.cli as cli

    tree = ast.parse(inspect.getsource(cli))
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in tree.body
               if isinstance(node, ast.FunctionDef) and node.name.startswith("_add_")}
    assert len(lengths) >= 7 and max(lengths.values()) <= 80, lengths
