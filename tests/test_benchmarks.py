"""Every script in benchmarks/ runs: with --help, and at its smallest setting on the CPU, so each is ready for
the machine it is meant for (``gpu_check.sh`` only drives the others on a GPU)."""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import SMALL_MODEL, load_benchmark

from svitt_ego.config import load_config
from svitt_ego.data.toy import make_toy_data, toy_data_overrides
from svitt_ego.models import create_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


def _run(*args, timeout=600):  # generous: a shared CI machine can be slow; a hang still ends
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """A `svitt-ego demo` folder's layout: a small toy world and an untrained `tiny` model in run/."""
    folder = tmp_path_factory.mktemp("demo")
    make_toy_data(folder / "toy_data", seed=0, num_videos=10)
    cfg = load_config("tiny", [*toy_data_overrides(folder / "toy_data"), f"train.output_dir={folder / 'run'}"])
    (folder / "run").mkdir()
    cfg.save(folder / "run" / "config.yaml")
    create_model(cfg.model).save_pretrained(folder / "run" / "model")
    return folder


def smallest_runs(demo: Path, tmp: Path) -> dict[str, tuple]:
    """Each script's arguments for a run of seconds on a CPU, and a text its output must contain (or a check)."""
    model, toy = demo / "run" / "model", demo / "toy_data"
    return {
        "attention.py": (("--device", "cpu", "--frames", "1", "--batch", "1", "--repeats", "1", "--dtype", "float32",
                          "--methods", "blocked", "dense_bias", "flash"), "dense_bias"),
        "dataloader.py": (("--clips", "24", "--video-seconds", "8", "--workdir", tmp), "clips/s per worker"),
        "finetune_toy.py": ((demo, "--out", tmp / "finetune", "--seeds", "0", "1", "--epochs", "1", "--num-videos", "6",
                             "--batch-size", "4", "--probe"), _zero_shot_and_two_seeds_per_metric),
        "extract_features.py": (("--preset", "tiny", "--device", "cpu", "--batch-size", "8", "--repeats", "1",
                                 "--synthetic", "0.5"), "4 windows of synthetic (15 frames at 30 fps)"),
        "egoclip_metadata.py": (("--rows", "2000", "--videos", "20"), "warm (from cache)"),
        "gpu_check.py": (("--device", "cpu", "--methods", "blocked", "--frames", "1", "--batch", "1", "--heads", "2",
                          "--dtypes", "float32"), " ok"),
        "memory_calibration.py": (("--targets", "--set", *SMALL_MODEL), "svitt_ego_kr3:16"),
        "multimodal.py": ((model, toy, "--questions", "10"), "held-out VTM accuracy"),
        "objectives.py": (("--quick", "--seeds", "0", "--arms", "egonce", "--workdir", tmp), "mean +- standard error"),
        "saliency.py": (("--demo", demo, "--max-clips", "2"), "pretrained"),
        "search_toy.py": (("--demo", demo, "--videos", "2"), "random moment"),
        "search_scene_cuts.py": (("--demo", demo, "--videos", "1", "--seconds", "4", "--cut-every", "2"),
                                 "match (now)"),
        "threads.py": (("--demo", demo, "--fraction", "0.5", "--loads", "idle", "--settings", "one"),
                       _one_thread_one_time),
        "train_step.py": (("--device", "cpu", "--runs", "vit_b:4", "tiny:4", "encoder:tiny:4", "--clips", "1",
                           "--steps", "1", "--image-size", "64", "--anchor-width", "64", "--anchor-depth", "2",
                           "--anchor-heads", "2"), _ratios_are_to_the_anchor),
        "vtm_probe.py": ((model, toy, "--steps", "1", "--batches", "1", "--candidates", "mean"), "candidate"),
        "nlq_seeds.py": ((demo, "--output", tmp / "seeds", "--videos", "4", "--seeds", "0", "1", "--epochs", "1",
                          "--arms", "all", "half", "narrations", "--pretrain-epochs", "1"),
                         _three_arms_two_seeds_honest_split),
        "nlq_memory.py": (("--windows", "64", "128", "--hidden", "16", "--levels", "3", "--video-dim", "8",
                           "--text-dim", "8"), _memory_ratio_is_to_the_first_row),
    }


# Scripts whose smallest run is a test of its own, with checks of what it counts.
TESTED_ELSEWHERE = {
    "kernel_atomics.py": "test_kernel_benchmarks::test_atomics_counted_in_the_interpreter_match_a_hand_count",
    "kernel_host_ops.py": "test_kernel_benchmarks::test_triton_path_takes_at_most_20_aten_ops_per_layer",
    "kernel_registers.py": "test_kernel_benchmarks::test_kernels_meet_the_register_target_for_sm90a_with_triton_3_6",
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_help(script):
    assert "usage:" in _run(f"benchmarks/{script}", "--help", timeout=120)


def test_every_benchmark_has_a_smallest_run(tmp_path):
    assert sorted([*smallest_runs(tmp_path, tmp_path), *TESTED_ELSEWHERE]) == SCRIPTS
    for test in TESTED_ELSEWHERE.values():
        module, name = test.split("::")
        assert callable(getattr(importlib.import_module(module), name))


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - set(TESTED_ELSEWHERE)))
def test_benchmark_smallest_run(script, demo_folder, tmp_path):
    args, expected = smallest_runs(demo_folder, tmp_path)[script]
    out = _run(f"benchmarks/{script}", *args)
    if callable(expected):
        expected(out)
    else:
        assert expected in out


def _three_arms_two_seeds_honest_split(out: str) -> None:
    sets = re.findall(r"^(fine-tuning|narration pretraining) set: (\d+) videos, (\d+) queries", out, re.MULTILINE)
    assert [name for name, *_ in sets] == ["fine-tuning", "narration pretraining"], out
    assert all(int(videos) > 0 and int(queries) > 0 for _, videos, queries in sets), out
    assert len(re.findall(r", seed [01]: R@1 IoU=0.3 ", out)) == 6, out
    table = out.split("mean +- standard error\n")[1].splitlines()
    assert len(table) == 4 and all(len(re.findall(r"\d+\.\d \+- \d+\.\d", row)) == 5 for row in table[1:]), out


def _zero_shot_and_two_seeds_per_metric(out: str) -> None:
    probes = re.findall(r"^probe (\w+), (zero-shot|seed \d): (.*)$", out, re.MULTILINE)
    assert [(b, who) for b, who, _ in probes] == [(b, who) for b in ("charades_ego", "epic_mir")
                                                  for who in ("zero-shot", "seed 0", "seed 1")], out
    parts = {b: re.findall(r"(\w+) [\d.]+% \(chance [\d.]+%\)", found) for b, _, found in probes}
    assert parts == {"charades_ego": ["class", "verb", "object"], "epic_mir": ["verb", "object", "colour", "shape"]}, out
    table = out.split("mean +- standard error\n")[1].split("\nval: ")[0].splitlines()[1:]
    assert [row.split()[:2] for row in table] == [["charades_ego", "val"], ["charades_ego", "mAP"], ["epic_mir", "val"],
                                                  ["epic_mir", "mAP"], ["epic_mir", "nDCG"]]
    # A gain in standard errors; nan where the seeds' validation gains are equal (a tiny world's few videos).
    assert all(re.fullmatch(r".*\d+\.\d +\d+\.\d \+- \d+\.\d +(-?\d+\.\d|nan)", row) for row in table), out


def _one_thread_one_time(out: str) -> None:
    row = out.splitlines()[-1].split()
    assert row[:2] == ["one", "1"] and float(row[2]) > 0, out


def _memory_ratio_is_to_the_first_row(out: str) -> None:
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["64", "128"] and rows[0][2] == "1.00" and float(rows[1][1]) > 0
    assert float(rows[1][2]) == pytest.approx(float(rows[1][1]) / float(rows[0][1]), rel=0.05)  # printed rounded


def _ratios_are_to_the_anchor(out: str) -> None:
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert set(rows) == {"tiny:4", "encoder:tiny:4", "vit_b:4"}
    assert rows["vit_b:4"][2] == "1.00"  # the anchor against itself; the other rows carry their ratio to it
    anchor = float(rows["vit_b:4"][1])
    for r in ("tiny:4", "encoder:tiny:4"):  # each ratio is the row's clips/s over the anchor's
        assert float(rows[r][1]) > 0 and float(rows[r][2]) == pytest.approx(float(rows[r][1]) / anchor, abs=0.011)


def _nlq_seeds():
    return load_benchmark("nlq_seeds")


def test_nlq_seeds_validation_split_is_every_fourth_training_video(tmp_path):
    from svitt_ego.atomic import atomic_write_json
    from svitt_ego.nlq.annotations import load_json

    videos = [{"video_uid": f"v{i}", "clips": []} for i in (5, 2, 7, 0, 3, 6, 1, 4, 8)]
    train = atomic_write_json(tmp_path / "nlq_train.json", {"version": "v2", "videos": videos})
    fit, validation = _nlq_seeds().validation_split(train, tmp_path)
    uids = lambda path: [v["video_uid"] for v in load_json(path)["videos"]]  # noqa: E731
    assert uids(validation) == ["v0", "v4", "v8"]
    assert uids(fit) == ["v1", "v2", "v3", "v5", "v6", "v7"]
    assert load_json(fit)["version"] == "v2"


def test_nlq_seeds_model_settings_take_each_fields_type():
    module = _nlq_seeds()
    settings = module.model_settings(["drop_path=0", "stem_layers=2", "label_smoothing=0.05"])
    assert settings == {"drop_path": 0.0, "stem_layers": 2, "label_smoothing": 0.05}
    assert isinstance(settings["drop_path"], float) and isinstance(settings["stem_layers"], int)
    with pytest.raises(SystemExit, match="--model hiden=32: not a grounding-model setting"):
        module.model_settings(["hiden=32"])
    with pytest.raises(SystemExit, match="video_dim"):
        module.model_settings(["video_dim=8"])
    with pytest.raises(SystemExit, match="--model stem_layers=2.5: not a whole number"):
        module.model_settings(["stem_layers=2.5"])


def test_nlq_seeds_long_clips_are_the_clips_end_to_end(tmp_path):
    """Six 24-window clips (two queries each, answers at known windows), five for training and one
    held out: long clips of at least 40 windows. Every kept answer points at the same windows, and
    the same features, in its long clip as in its clip; the held-out file's one clip is filled up
    with training clips whose queries are not asked."""
    import json

    import torch

    from svitt_ego.nlq.annotations import read_nlq
    from svitt_ego.nlq.features import NLQFeatures
    from test_nlq_model import _feature_folder

    nlq = json.loads(_feature_folder(tmp_path / "features").read_text())
    files = []
    for name, videos in (("nlq_train.json", nlq["videos"][:5]), ("nlq_val.json", nlq["videos"][5:])):
        files.append(tmp_path / name)
        files[-1].write_text(json.dumps({"videos": videos}))
    train, val = _nlq_seeds().long_clip_split(tmp_path / "features", files, 40, tmp_path / "long")
    source, long = NLQFeatures(tmp_path / "features"), NLQFeatures(tmp_path / "long" / "features")
    assert [len(long.video(uid)) for uid in read_nlq(train).clips] == [48, 72]  # 2 clips, then the last 3
    held_out = read_nlq(val)
    assert [len(long.video(uid)) for uid in held_out.clips] == [48]  # c5 filled up with a training clip
    originals = {(q.clip_uid, q.query_idx): q for f in files for q in read_nlq(f).queries}
    checked = 0
    for path in (train, val):
        for q in read_nlq(path).queries:
            clip_uid = q.annotation_uid.split("_")[0]
            original = originals[(clip_uid, q.query_idx)]
            shifts = [long.to_index(q.clip_uid, t) - source.to_index(clip_uid, t0)
                      for t, t0 in ((q.start, original.start), (q.end, original.end))]
            offset = round(shifts[0])
            assert shifts == pytest.approx([offset, offset], abs=1e-6) and offset % 24 == 0
            torch.testing.assert_close(long.video(q.clip_uid)[offset:offset + 24], source.video(clip_uid))
            torch.testing.assert_close(long.text(q), source.text(original))
            checked += 1
    assert {q.annotation_uid.split("_")[0] for q in held_out.queries} == {"c5"}
    assert checked == len(read_nlq(train).queries) + len(held_out.queries) > 0


def test_finetune_toy_probe_counts_top1_and_chance_by_hand():
    keys = ["turn a plate", "turn a cup", "push a plate"]
    similarity = np.array([[0.9, 0.1, 0.0],   # own "turn a plate": picks it
                           [0.8, 0.1, 0.0],   # own "turn a cup": picks "turn a plate" (same verb only)
                           [0.1, 0.7, 0.2]])  # own "push a plate": picks "turn a cup" (nothing shared)
    own, top1 = keys, load_benchmark("finetune_toy")._top1
    assert top1(similarity, own, keys, lambda k: k) == pytest.approx((100 / 3, 100 / 3))
    # verb: hits 1, 1, 0; chance: "turn" is 2 of 3 keys, "push" 1 of 3 -> (2/3 + 2/3 + 1/3) / 3
    assert top1(similarity, own, keys, lambda k: k.split(" a ")[0]) == pytest.approx((200 / 3, 500 / 9))
    # Each item picks among its allowed keys: item 1 now picks its own (0.1 over 0.0); chance 1 / allowed.
    allowed = np.array([[True, True, False], [False, True, True], [True, True, True]])
    assert top1(similarity, own, keys, lambda k: k, allowed) == pytest.approx((200 / 3, 100 * (1 / 2 + 1 / 2 + 1 / 3) / 3))


def test_nlq_seeds_merges_the_seeds_of_separate_processes(tmp_path):
    def row(seed, value):
        return {"seed": seed, **{m: value for m in ("R@1 IoU=0.3", "R@5 IoU=0.3", "R@1 IoU=0.5", "R@5 IoU=0.5",
                                                     "mIoU")}}

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"arms": {"whole": [row(0, 10.0), row(1, 20.0)], "cropped": [row(0, 4.0)]}}))
    second.write_text(json.dumps({"arms": {"whole": [row(2, 30.0)], "cropped": [row(1, 6.0), row(2, 8.0)]}}))
    table = _nlq_seeds().merged_table([first, second]).splitlines()
    assert table[0] == "seeds [0, 1, 2], mean +- standard error"
    # whole: 10, 20, 30 -> mean 20, sample s.d. 10, s.e. 10 / sqrt(3) = 5.77; cropped: 4, 6, 8 -> 6 +- 1.15
    assert table[2].split() == ["whole"] + ["20.0", "+-", "5.8"] * 5
    assert table[3].split() == ["cropped"] + ["6.0", "+-", "1.2"] * 5


@pytest.mark.slow
def test_nlq_seeds_long_clips_smallest_run(demo_folder, tmp_path):
    out = _run("benchmarks/nlq_seeds.py", demo_folder, "--output", tmp_path / "long", "--videos", "2", "--seeds", "0",
               "--long-clips", "64", "--crop", "32", "--epochs", "1", "--warmup-epochs", "0", "--model", "hidden=32",
               "levels=3")
    lengths = re.findall(r"^(training|held-out) long clips: \d+ clips, (\d+) queries, (\d+)-(\d+) windows", out,
                         re.MULTILINE)
    assert [name for name, *_ in lengths] == ["training", "held-out"], out
    assert all(int(queries) > 0 and int(low) >= 64 for _, queries, low, _ in lengths), out
    assert re.search(r"^whole clips, 0 \+ 1 ep, seed 0: R@1 IoU=0.3 ", out, re.MULTILINE), out
    assert re.search(r"^cropped to 32, 0 \+ 1 ep, seed 0: R@1 IoU=0.3 ", out, re.MULTILINE), out
    assert "max_windows=32" in out and "lr=0.0001, batch_size=4" in out, out  # the recipe's from-scratch stage
