import json

import torch

from svitt_ego.cli import main
from svitt_ego.data.egoclip import COLUMNS
from svitt_ego.nlq.annotations import parse_nlq
from svitt_ego.nlq.narrations import jitter, narration_queries

#           video  narration time, clip start, clip end, text
NARRATIONS = [("v1", "12", "11.5", "12.5", "#C C opens the drawer"),
              ("v1", "20", "19.0", "21.0", "#C C cuts the onion"),
              ("v1", "30", "29.5", "30.5", "#C C outside the clip"),   # after the clip's end
              ("v1", "10.2", "10.0", "10.4", "#C C on the clip start"),  # starts exactly at the clip's start
              ("v2", "5", "4.0", "6.0", "#C C in a val video"),
              ("v3", "8", "7.0", "9.0", "#C C in a second training file")]


def _write(tmp_path):
    rows = [(str(i), v, "100", "narration_pass_1", str(i), t, a, b, text, "[]", "[]")
            for i, (v, t, a, b, text) in enumerate(NARRATIONS)]
    (tmp_path / "egoclip.csv").write_text("\n".join("\t".join(r) for r in [COLUMNS, *rows]) + "\n")

    def clips(*items):
        return {"videos": [{"video_uid": v, "clips": [{"clip_uid": c, "video_start_sec": s, "video_end_sec": e}]}
                           for v, c, s, e in items]}

    (tmp_path / "nlq_train.json").write_text(json.dumps(clips(("v1", "c1", 10.0, 25.0), ("v2", "c2", 0.0, 10.0))))
    (tmp_path / "moments_train.json").write_text(json.dumps(clips(("v3", "c3", 5.0, 15.0), ("v1", "c1", 10.0, 25.0))))
    (tmp_path / "nlq_val.json").write_text(json.dumps(clips(("v2", "c9", 20.0, 30.0))))
    return tmp_path


def test_narrations_inside_training_clips_become_queries(tmp_path):
    root = _write(tmp_path)
    out = narration_queries(root / "egoclip.csv", [root / "nlq_train.json", root / "moments_train.json"],
                            [root / "nlq_val.json"])
    parsed = parse_nlq(out, "narrations")
    assert {c: (q.text, q.start, q.end) for c, q in ((q.clip_uid + str(q.query_idx), q) for q in parsed.queries)} == {
        "c10": ("#C C opens the drawer", 1.5, 2.5), "c11": ("#C C cuts the onion", 9.0, 11.0),
        "c30": ("#C C in a second training file", 2.0, 4.0)}
    assert parsed.queries[0].annotation_uid == "c1_narrations"
    assert out["skipped_videos"] == 1  # v2 is a val video: its training clip gives nothing


def test_narration_queries_command(tmp_path, capsys):
    root = _write(tmp_path)
    assert main(["narration-queries", str(root / "egoclip.csv"), "--train", str(root / "nlq_train.json"),
                 "--exclude", str(root / "nlq_val.json"), "--output", str(root / "out.json")]) == 0
    assert "2 narration queries in 1 clips" in capsys.readouterr().out
    assert json.loads((root / "out.json").read_text())["videos"][0]["video_uid"] == "v1"
    (root / "bad.json").write_text(json.dumps({"videos": [{"video_uid": "../x", "clips": []}]}))
    assert main(["narration-queries", str(root / "egoclip.csv"), "--train", str(root / "bad.json"),
                 "--output", str(root / "out2.json")]) == 2
    assert "field 'video_uid'" in capsys.readouterr().err


def test_jitter_keeps_the_answer_inside_and_the_clip_around():
    generator = torch.Generator().manual_seed(0)
    factors = set()
    for _ in range(300):
        start, end = jitter(40.0, 42.0, 100.0, generator)
        assert start <= 40.0 and end >= 42.0 and 0.0 <= start and end <= 100.0
        assert end - start <= 20.0 + 1e-9
        factors.add(round((end - start) / 2))
    assert factors == set(range(1, 11))
    assert jitter(0.5, 1.5, 2.0, generator)[0] >= 0.0 and jitter(0.5, 1.5, 2.0, generator)[1] <= 2.0


def test_narration_queries_never_write_over_an_input(tmp_path, capsys):
    root = _write(tmp_path)
    for output in ("egoclip.csv", "nlq_train.json"):
        saved = (root / output).read_bytes()
        assert main(["narration-queries", str(root / "egoclip.csv"), "--train", str(root / "nlq_train.json"),
                     "--output", str(root / output)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{root / output} is also an input of this command" in err
        assert (root / output).read_bytes() == saved
