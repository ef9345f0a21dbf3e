"""Small analogues of EPIC-Kitchens-100 multi-instance retrieval and Charades-Ego in the toy world,
in the real benchmarks' file layouts (docs/zero-shot.md), so that the zero-shot evaluations run on
them unchanged.

- ``epic_mir/``: kitchen clips, each one action with a verb class and a noun class;
  ``videos/<participant_id>/<video_id>.MP4`` (one file per video), ``EPIC_100_retrieval_test.csv``,
  ``EPIC_100_retrieval_test_sentence.csv`` (one row per distinct narration, the id of its first
  clip) and ``caption_relevancy_EPIC_100_retrieval_test.pkl`` ((verb match + noun match) / 2: each
  toy clip has one noun). Frame numbers count the toy's own frames.
- ``charades_ego/``: untrimmed videos with several actions each; ``videos/<id>.mp4``,
  ``CharadesEgo_v1_test_only1st.csv`` and ``Charades_v1_classes.txt``, whose classes are the
  (verb, shape) pairs the videos show ("pick up a cup").

Each also has a training split for fine-tuning, of other videos (each toy video is a scene of its own,
so no training scene is a held-out one): ``EPIC_100_retrieval_train.csv`` (participants P03, P04) and
``CharadesEgo_v1_train_only1st.csv`` (ids ``TRN<k>EGO``; only actions of the held-out split's classes).

Both draw from their own random streams, so the rest of the toy world does not change;
:func:`make_toy_world` makes the whole world.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np

from svitt_ego.data import toy

VERSION = 2  # 2: the training splits
MANIFEST = "zero_shot_manifest.json"  # written last: marks complete analogues
EPIC_SECONDS = (20.0, 30.0)
CHARADES_SECONDS = (8.0, 14.0)
EPIC_COLUMNS = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
                "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun",
                "noun_class", "all_nouns", "all_noun_classes"]
CHARADES_COLUMNS = ["id", "subject", "scene", "quality", "relevance", "verified", "script", "objects",
                    "descriptions", "actions", "length"]


def benchmark_sizes(num_videos: int) -> tuple[int, int]:
    """(EK-100 MIR videos, Charades-Ego videos) of a toy world of ``num_videos`` videos."""
    return max(2, num_videos // 20), max(4, num_videos // 6)


def training_sizes(num_videos: int) -> tuple[int, int]:
    """The training splits' (EK-100 MIR videos, Charades-Ego videos): twice the held-out ones."""
    return tuple(2 * n for n in benchmark_sizes(num_videos))


def _plans(seed: int, stream: int, count: int, seconds: tuple[float, float]) -> list[toy.VideoPlan]:
    rng = np.random.default_rng([seed, 22, stream])
    return [toy._plan_video(rng, "val", round(float(rng.uniform(*seconds)), 1)) for _ in range(count)]


def _timestamp(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60.0)
    return f"{int(minutes) // 60:02d}:{int(minutes) % 60:02d}:{rest:06.3f}"


def _csv(columns: list[str], rows: list[dict]) -> str:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _epic_video_id(index: int, first_participant: int = 1) -> tuple[str, str]:
    participant = f"P{index % 2 + first_participant:02d}"
    return participant, f"{participant}_{index // 2 + 1:02d}"


def _epic_rows(plans: list[toy.VideoPlan], first_participant: int = 1) -> list[dict]:
    rows = []
    for index, plan in enumerate(plans):
        participant, video = _epic_video_id(index, first_participant)
        for k, action in enumerate(plan.actions):
            noun = plan.objects[action.obj].noun
            verb = toy.VERBS[action.verb][2]
            rows.append({
                "narration_id": f"{video}_{k}", "participant_id": participant, "video_id": video,
                "narration_timestamp": _timestamp(action.start), "start_timestamp": _timestamp(action.start),
                "stop_timestamp": _timestamp(action.end), "start_frame": round(action.start * toy.FPS),
                "stop_frame": round(action.end * toy.FPS), "narration": f"{verb} {toy.NOUNS[noun]}",
                "verb": verb, "verb_class": action.verb, "noun": toy.NOUNS[noun], "noun_class": noun,
                "all_nouns": repr([toy.NOUNS[noun]]), "all_noun_classes": f"[{noun}]",
            })
    return rows


def _write_epic_mir(folder: Path, plans: list[toy.VideoPlan], train: list[toy.VideoPlan]) -> None:
    (folder / "EPIC_100_retrieval_train.csv").write_text(_csv(EPIC_COLUMNS, _epic_rows(train, first_participant=3)))
    rows = _epic_rows(plans)
    first = {}
    for i, row in enumerate(rows):
        first.setdefault(row["narration"], i)
    (folder / "EPIC_100_retrieval_test.csv").write_text(_csv(EPIC_COLUMNS, rows))
    sentences = [{"narration_id": rows[i]["narration_id"], "narration": text} for text, i in first.items()]
    (folder / "EPIC_100_retrieval_test_sentence.csv").write_text(_csv(["narration_id", "narration"], sentences))
    verbs = np.array([row["verb_class"] for row in rows])
    nouns = np.array([row["noun_class"] for row in rows])
    columns = list(first.values())
    relevancy = ((verbs[:, None] == verbs[columns]).astype(np.float64)
                 + (nouns[:, None] == nouns[columns]).astype(np.float64)) / 2
    (folder / "caption_relevancy_EPIC_100_retrieval_test.pkl").write_bytes(pickle.dumps(relevancy, protocol=4))


def _charades_classes(plans: list[toy.VideoPlan]) -> list[tuple[int, str]]:
    """The (verb, shape) pairs the videos show, in taxonomy order."""
    pairs = {(a.verb, toy.NOUNS[plan.objects[a.obj].noun].split(" ")[1]) for plan in plans for a in plan.actions}
    return sorted(pairs, key=lambda pair: (pair[0], toy.SHAPES.index(pair[1])))


def _write_charades_ego(folder: Path, plans: list[toy.VideoPlan], train: list[toy.VideoPlan]) -> None:
    classes = _charades_classes(plans)  # a training action of another class is left out
    class_id = {pair: f"c{i:03d}" for i, pair in enumerate(classes)}
    lines = [f"{class_id[(verb, shape)]} {toy.VERBS[verb][2]} a {shape}" for verb, shape in classes]
    (folder / "Charades_v1_classes.txt").write_text("\n".join(lines) + "\n")
    for name, videos, prefix in (("train", train, "TRN"), ("test", plans, "TOY")):
        rows = _charades_rows(videos, class_id, prefix)
        (folder / f"CharadesEgo_v1_{name}_only1st.csv").write_text(_csv(CHARADES_COLUMNS, rows))


def _charades_rows(plans: list[toy.VideoPlan], class_id: dict, prefix: str) -> list[dict]:
    rows = []
    for index, plan in enumerate(plans):
        pairs = [((a.verb, toy.NOUNS[plan.objects[a.obj].noun].split(" ")[1]), a) for a in plan.actions]
        actions = [(class_id[pair], a) for pair, a in pairs if pair in class_id]
        rows.append({
            "id": f"{prefix}{index:03d}EGO", "subject": "TOY", "scene": "Kitchen", "quality": 7, "relevance": 7,
            "verified": "Yes", "script": "; ".join(f"C {toy.VERBS[a.verb][0]} the {toy.NOUNS[plan.objects[a.obj].noun]}"
                                                   for _, a in actions),
            "objects": ";".join(sorted({toy.NOUNS[o.noun] for o in plan.objects})), "descriptions": "",
            "actions": ";".join(f"{c} {a.start:.2f} {a.end:.2f}" for c, a in actions), "length": f"{plan.duration:.2f}",
        })
    return rows


def _render_file(plan: toy.VideoPlan, path: Path) -> None:
    toy._write_chunk(path, toy.render_frames(plan))


def make_toy_benchmarks(root: str | Path, seed: int, num_videos: int) -> None:
    """Write ``root/epic_mir`` and ``root/charades_ego`` (see the module's docstring); a complete pair
    made with the same parameters is left as it is."""
    root = Path(root)
    manifest = {"generator": "svitt_ego.data.toy_benchmarks", "version": VERSION, "seed": seed,
                "num_videos": num_videos}
    manifest_path = root / MANIFEST
    if manifest_path.is_file() and manifest_path.read_text() == json.dumps(manifest):
        return
    manifest_path.unlink(missing_ok=True)
    for name in ("epic_mir", "charades_ego"):
        shutil.rmtree(root / name, ignore_errors=True)
    num_epic, num_charades = benchmark_sizes(num_videos)
    epic, charades = _plans(seed, 1, num_epic, EPIC_SECONDS), _plans(seed, 2, num_charades, CHARADES_SECONDS)
    train_epic, train_charades = (_plans(seed, stream, count, seconds) for stream, count, seconds in
                                  zip((3, 4), training_sizes(num_videos), (EPIC_SECONDS, CHARADES_SECONDS)))
    jobs = []
    for first, plans in ((1, epic), (3, train_epic)):
        for index, plan in enumerate(plans):
            participant, video = _epic_video_id(index, first)
            jobs.append((plan, root / "epic_mir" / "videos" / participant / f"{video}.MP4"))
    jobs += [(plan, root / "charades_ego" / "videos" / f"{prefix}{index:03d}EGO.mp4")
             for prefix, plans in (("TOY", charades), ("TRN", train_charades)) for index, plan in enumerate(plans)]
    for _, path in jobs:
        path.parent.mkdir(parents=True, exist_ok=True)
    toy.render_all(_render_file, jobs, "toy benchmark videos")
    _write_epic_mir(root / "epic_mir", epic, train_epic)
    _write_charades_ego(root / "charades_ego", charades, train_charades)
    manifest_path.write_text(json.dumps(manifest))


def make_toy_world(root: str | Path, seed: int = 0, num_videos: int | None = None) -> Path:
    """The toy dataset (:func:`svitt_ego.data.toy.make_toy_data`) and its two benchmark analogues."""
    root = toy.make_toy_data(root, seed=seed, num_videos=num_videos)
    make_toy_benchmarks(root, seed, toy.DEFAULT_NUM_VIDEOS if num_videos is None else int(num_videos))
    return root
