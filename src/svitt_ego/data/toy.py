"""A synthetic egocentric dataset in the real EgoClip / EgoMCQ / Ego4D-NLQ layout.

Each video is one scene: a wall, a table with its own colours and texture, and
3-4 coloured objects ("red cup", "blue box", ...). The camera wearer acts on
one object every few seconds; the action is visible only in the pixels: the
object moves (rises, falls, shrinks away, grows nearer, shakes, turns, slides,
is squashed) with a skin-coloured hand and arm coming from the bottom of the
frame. Everything else stays still apart from a slight camera jitter.

Outputs under ``root``, in the layout of the real data (docs/data-formats.md):

- ``videos/<video_uid>/<k>.mp4``: h264 chunks of 600 s, ``k = floor(t / 600)``
- ``egoclip.csv``: the training narrations (tab-separated, EgoClip's columns)
- ``egomcq.json``: five-way questions on held-out videos (types 1 and 2)
- ``taxonomy_verbs.json`` / ``taxonomy_nouns.json``: class id -> name
- ``nlq_train.json`` / ``nlq_val.json``: Ego4D NLQ-style annotations
- ``README.md`` and ``manifest.json`` (written first with the list of outputs, and again last:
  marks a complete dataset), and the marker :data:`MARKER`

The metadata is a pure function of ``(seed, num_videos)`` and the video
content is deterministic too.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from svitt_ego.atomic import atomic_write_json, atomic_write_text
from svitt_ego.data.errors import is_video_uid
from svitt_ego.threads import usable_cores

VERSION = 2  # 2: 240 short videos instead of 60 long ones
FPS = 10
SIZE = 96  # frames are SIZE x SIZE
PAD = 4  # the scene is drawn with this margin so the camera can jitter
CHUNK_SECONDS = 600
OBJECT_RADIUS = 16.0  # half-size of an object at rest, in pixels
# Many short videos rather than a few long ones: with only a few dozen training scenes a model
# can tell a narration from the scene alone, which does not carry over to held-out videos.
DEFAULT_NUM_VIDEOS = 240  # 192 training videos (one longer than a chunk), 48 for EgoMCQ
LONG_VIDEO_SECONDS = 620.0
TRAIN_SECONDS = (20.0, 40.0)  # range of the other videos' lengths
VAL_SECONDS = (25.0, 35.0)
MIN_GAP, MAX_GAP = 0.8, 1.6  # seconds between two actions

# (narration text, taxonomy name, base form for NLQ queries), in class-id order.
VERBS = [
    ("picks up", "pick_up", "pick up"),      # rises from the table
    ("puts down", "put_down", "put down"),   # comes down from the air onto the table
    ("pushes", "push", "push"),              # moves away: shrinks and goes up a little
    ("pulls", "pull", "pull"),               # comes nearer: grows and goes down a little
    ("shakes", "shake", "shake"),            # lifted a little and swung left and right
    ("turns", "turn", "turn"),               # rotated by half a turn
    ("slides", "slide", "slide"),            # moved sideways along the table
    ("presses", "press", "press"),           # squashed flat from above
]
COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 230),
    "green": (40, 180, 60),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (150, 60, 200),
}
SHAPES = ["ball", "box", "bottle", "cup", "plate", "bowl"]
NOUNS = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
SKIN_TONES = [(224, 172, 130), (198, 140, 100), (160, 110, 75), (240, 195, 160), (141, 96, 66)]
# Rest positions (centre x, centre y) on the table, in frame pixels.
SLOTS = [(20.0, 50.0), (48.0, 50.0), (76.0, 50.0), (20.0, 78.0), (48.0, 78.0), (76.0, 78.0)]

# Marks a folder make_toy_data made, and so may write to again (as the demo marks its run folder).
MARKER = ".made-by-svitt-ego-make-toy-data"
# The files written at the top of the folder (besides the marker); the videos go in videos/<video_uid>/.
OUTPUT_FILES = ("egoclip.csv", "egomcq.json", "taxonomy_verbs.json", "taxonomy_nouns.json", "nlq_train.json",
                "nlq_val.json", "README.md", "manifest.json")

CSV_COLUMNS = ["clip_idx", "video_uid", "video_dur", "narration_source", "narration_ind",
               "narration_time", "clip_start", "clip_end", "clip_text", "tag_verb", "tag_noun"]


@dataclass
class SceneObject:
    noun: int
    x: float
    y: float


@dataclass
class Action:
    verb: int
    obj: int  # index into the video's objects
    start: float
    end: float
    direction: int  # +1 / -1: which way a slide or a turn goes


@dataclass
class VideoPlan:
    uid: str
    split: str  # "train" | "val"
    duration: float
    wall: tuple
    table: tuple
    texture: tuple  # (kind, angle, period, amplitude)
    skin: tuple
    jitter: tuple  # ((amplitude, period, phase) for x, then for y)
    objects: list
    actions: list

    @property
    def num_frames(self) -> int:
        return round(self.duration * FPS)


# ---------------------------------------------------------------- the world plan

def _split_sizes(num_videos: int) -> tuple[int, int]:
    if num_videos < 3:
        raise ValueError(f"num_videos must be >= 3 (train and two validation videos), got {num_videos}")
    num_val = max(2, round(num_videos / 5))
    return num_videos - num_val, num_val


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return (round(r * 255), round(g * 255), round(b * 255))


def _plan_video(rng: np.random.Generator, split: str, duration: float) -> VideoPlan:
    uid = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    hue = rng.random()
    wall = _hsv_to_rgb(hue, rng.uniform(0.1, 0.3), rng.uniform(0.3, 0.55))
    table = _hsv_to_rgb((hue + rng.uniform(0.25, 0.75)) % 1.0, rng.uniform(0.1, 0.3), rng.uniform(0.25, 0.5))
    texture = (int(rng.integers(3)), float(rng.uniform(0, math.pi)), float(rng.uniform(8, 20)),
               float(rng.uniform(6, 14)))
    skin = SKIN_TONES[int(rng.integers(len(SKIN_TONES)))]
    jitter = tuple((float(rng.uniform(1, 3)), float(rng.uniform(3, 9)), float(rng.uniform(0, 2 * math.pi)))
                   for _ in range(2))
    num_objects = int(rng.integers(3, 5))
    # No two objects of a scene share a colour or a shape: within a scene either
    # one names the object, across scenes the pair is needed.
    colours = rng.choice(len(COLOURS), size=num_objects, replace=False)
    shapes = rng.choice(len(SHAPES), size=num_objects, replace=False)
    nouns = colours * len(SHAPES) + shapes
    slots = rng.choice(len(SLOTS), size=num_objects, replace=False)
    objects = [SceneObject(int(n), *SLOTS[s]) for n, s in zip(nouns, slots)]
    actions = []
    # Chunk boundaries inside the video; one action is made to straddle each.
    boundaries = [k * CHUNK_SECONDS for k in range(1, math.ceil(duration / CHUNK_SECONDS))]
    t = float(rng.uniform(0.8, 1.5))
    while True:
        length = float(rng.uniform(1.2, 2.0))
        if boundaries and t <= boundaries[0] < t + length + MAX_GAP:
            t = max(t, boundaries.pop(0) - length / 2)
        if t + length > duration - 0.5:
            break
        obj = int(rng.integers(num_objects))
        verb = int(rng.integers(len(VERBS)))
        x = objects[obj].x
        # A slide goes towards the middle of the table; in the middle either way.
        direction = int(rng.choice([-1, 1])) if x == SIZE / 2 else (1 if x < SIZE / 2 else -1)
        actions.append(Action(verb, obj, round(t, 3), round(t + length, 3), direction))
        t += length + float(rng.uniform(MIN_GAP, MAX_GAP))
    return VideoPlan(uid, split, duration, wall, table, texture, skin, jitter, objects, actions)


def plan_world(seed: int = 0, num_videos: int | None = None) -> list[VideoPlan]:
    """Every video's scene and actions: a pure function of ``(seed, num_videos)``."""
    num_videos = DEFAULT_NUM_VIDEOS if num_videos is None else num_videos
    num_train, num_val = _split_sizes(num_videos)
    rng = np.random.default_rng(seed)
    plans = []
    for i in range(num_train):
        duration = LONG_VIDEO_SECONDS if i == 0 else round(float(rng.uniform(*TRAIN_SECONDS)), 1)
        plans.append(_plan_video(rng, "train", duration))
    for _ in range(num_val):
        plans.append(_plan_video(rng, "val", round(float(rng.uniform(*VAL_SECONDS)), 1)))
    return plans


# ---------------------------------------------------------------- rendering

def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inside, marker) for unit coordinates (v points down). The marker is a darker
    part (lid, cap, rim) that makes the object's orientation visible."""
    if shape == "ball":
        inside = u * u + v * v <= 0.85**2
        marker = v < -0.35
    elif shape == "box":
        inside = (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
        marker = v < -0.4
    elif shape == "bottle":
        body = (np.abs(u) <= 0.42) & (v >= -0.25) & (v <= 0.95)
        neck = (np.abs(u) <= 0.2) & (v >= -0.95) & (v < -0.25)
        inside = body | neck
        marker = v < -0.6
    elif shape == "cup":
        w = u + 0.15
        body = (v >= -0.75) & (v <= 0.8) & (np.abs(w) <= 0.62 - 0.12 * (v + 0.75))
        ring = (w - 0.62) ** 2 + v * v
        inside = body | ((ring <= 0.36**2) & (ring >= 0.17**2))
        marker = v < -0.45
    elif shape == "plate":
        inside = (u / 0.95) ** 2 + ((v - 0.2) / 0.42) ** 2 <= 1
        marker = v < 0.05
    elif shape == "bowl":
        bowl = (u * u + (v + 0.25) ** 2 <= 0.9**2) & (v >= -0.25)
        rim = (np.abs(u) <= 0.95) & (v >= -0.42) & (v < -0.25)
        inside = bowl | rim
        marker = rim
    else:
        raise ValueError(shape)
    return inside, marker


def _draw_object(canvas: np.ndarray, noun: int, cx: float, cy: float, sx: float = 1.0,
                 sy: float = 1.0, angle: float = 0.0) -> None:
    """Draw a noun centred at canvas pixel (cx, cy), scaled and rotated."""
    colour_name, shape = NOUNS[noun].split(" ")
    colour = np.array(COLOURS[colour_name], np.uint8)
    half = OBJECT_RADIUS * max(sx, sy) * 1.45
    h, w = canvas.shape[:2]
    y0, y1 = max(0, int(cy - half)), min(h, int(cy + half) + 2)
    x0, x1 = max(0, int(cx - half)), min(w, int(cx + half) + 2)
    if y0 >= y1 or x0 >= x1:
        return
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    c, s = math.cos(angle), math.sin(angle)
    u = (c * dx + s * dy) / (OBJECT_RADIUS * sx)
    v = (-s * dx + c * dy) / (OBJECT_RADIUS * sy)
    inside, marker = _shape_mask(shape, u, v)
    region = canvas[y0:y1, x0:x1]
    region[inside] = colour
    region[inside & marker] = colour // 2


def _draw_capsule(canvas: np.ndarray, a: tuple, b: tuple, radius: float, colour: np.ndarray) -> None:
    h, w = canvas.shape[:2]
    y0, y1 = max(0, int(min(a[1], b[1]) - radius)), min(h, int(max(a[1], b[1]) + radius) + 2)
    x0, x1 = max(0, int(min(a[0], b[0]) - radius)), min(w, int(max(a[0], b[0]) + radius) + 2)
    if y0 >= y1 or x0 >= x1:
        return
    py = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - a[1]
    px = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - a[0]
    ex, ey = b[0] - a[0], b[1] - a[1]
    k = np.clip((px * ex + py * ey) / max(ex * ex + ey * ey, 1e-6), 0, 1)
    inside = (px - k * ex) ** 2 + (py - k * ey) ** 2 <= radius * radius
    canvas[y0:y1, x0:x1][inside] = colour


def _draw_ellipse(canvas: np.ndarray, cx: float, cy: float, rx: float, ry: float, colour: np.ndarray) -> None:
    h, w = canvas.shape[:2]
    y0, y1 = max(0, int(cy - ry)), min(h, int(cy + ry) + 2)
    x0, x1 = max(0, int(cx - rx)), min(w, int(cx + rx) + 2)
    if y0 >= y1 or x0 >= x1:
        return
    dy = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy) / ry
    dx = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx) / rx
    canvas[y0:y1, x0:x1][dx * dx + dy * dy <= 1] = colour


def object_pose(action: Action, rest: tuple, t: float) -> tuple:
    """(cx, cy, sx, sy, angle) in frame pixels of the acted-upon object at time t."""
    x, y = rest
    p = min(max((t - action.start) / (action.end - action.start), 0.0), 1.0)
    name = VERBS[action.verb][0]
    sx = sy = 1.0
    angle = 0.0
    if name == "picks up":
        y -= 30 * p
    elif name == "puts down":
        y -= 30 * (1 - p)
    elif name == "pushes":
        sx = sy = 1 - 0.45 * p
        y -= 12 * p
    elif name == "pulls":
        sx = sy = 1 + 0.7 * p
        y += 8 * p
    elif name == "shakes":
        y -= 6 * min(1.0, 4 * p)
        x += 12 * math.sin(2 * math.pi * 1.75 * (t - action.start))
    elif name == "turns":
        angle = action.direction * math.pi * p
    elif name == "slides":
        x += action.direction * 26 * p
    elif name == "presses":
        sy = 1 - 0.55 * p
        sx = 1 + 0.35 * p
        y += OBJECT_RADIUS * 0.8 * (1 - sy)  # stays on the table
    return x, y, sx, sy, angle


def _background(plan: VideoPlan) -> np.ndarray:
    side = SIZE + 2 * PAD
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    horizon = PAD + 34
    img = np.where((yy < horizon)[..., None], np.array(plan.wall, np.float32),
                   np.array(plan.table, np.float32))
    kind, theta, period, amplitude = plan.texture
    proj = xx * math.cos(theta) + yy * math.sin(theta)
    if kind == 0:  # stripes
        pattern = np.sign(np.sin(2 * math.pi * proj / period))
    elif kind == 1:  # checks
        other = -xx * math.sin(theta) + yy * math.cos(theta)
        pattern = np.sign(np.sin(2 * math.pi * proj / period) * np.sin(2 * math.pi * other / period))
    else:  # smooth waves
        pattern = np.sin(2 * math.pi * proj / period)
    img = img + amplitude * pattern[..., None] * np.where(yy < horizon, 0.5, 1.0)[..., None]
    img[horizon - 1:horizon + 1] *= 0.6  # the table's edge
    return np.clip(img, 0, 255).astype(np.uint8)


def _camera_offset(plan: VideoPlan, t: float) -> tuple[int, int]:
    (ax, px, fx), (ay, py, fy) = plan.jitter
    ox = PAD + round(ax * math.sin(2 * math.pi * t / px + fx))
    oy = PAD + round(ay * math.sin(2 * math.pi * t / py + fy))
    return ox, oy


def render_frames(plan: VideoPlan, start_frame: int = 0, stop_frame: int | None = None):
    """Yield the RGB frames (SIZE x SIZE x 3, uint8) of a video, in order."""
    stop_frame = plan.num_frames if stop_frame is None else stop_frame
    background = _background(plan)
    still = background.copy()
    for o in plan.objects:
        _draw_object(still, o.noun, o.x + PAD, o.y + PAD)
    without = []  # the scene without object i (drawn while it is acted upon)
    for i in range(len(plan.objects)):
        canvas = background.copy()
        for j, o in enumerate(plan.objects):
            if j != i:
                _draw_object(canvas, o.noun, o.x + PAD, o.y + PAD)
        without.append(canvas)
    skin = np.array(plan.skin, np.uint8)
    arm = (skin.astype(np.int16) * 9 // 10).astype(np.uint8)
    starts = np.array([a.start for a in plan.actions])
    for f in range(start_frame, stop_frame):
        t = f / FPS
        k = int(np.searchsorted(starts, t, side="right")) - 1
        ox, oy = _camera_offset(plan, t)
        if k < 0 or t >= plan.actions[k].end:
            yield still[oy:oy + SIZE, ox:ox + SIZE]
            continue
        action = plan.actions[k]
        obj = plan.objects[action.obj]
        x, y, sx, sy, angle = object_pose(action, (obj.x, obj.y), t)
        x, y = x + PAD, y + PAD
        canvas = without[action.obj].copy()
        hx, hy = _hand_position(action, x, y, sx, sy)
        _draw_capsule(canvas, (hx + 16, SIZE + 2 * PAD + 6), (hx, hy), 4.5, arm)
        _draw_object(canvas, obj.noun, x, y, sx, sy, angle)
        _draw_ellipse(canvas, hx, hy, 5.5, 4.5, skin)
        yield canvas[oy:oy + SIZE, ox:ox + SIZE]


def _hand_position(action: Action, x: float, y: float, sx: float, sy: float) -> tuple[float, float]:
    """Centre of the hand on an object posed at (x, y) with scale (sx, sy): on top for a press, else at its side."""
    if VERBS[action.verb][0] == "presses":
        return x + 2, y - OBJECT_RADIUS * 0.8 * sy
    return x + OBJECT_RADIUS * 0.75 * sx, y + OBJECT_RADIUS * 0.45 * sy


def actor_masks(plan: VideoPlan, frame: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the acted-upon object and the hand are visible in frame ``frame`` of a video:
    two bool ``[SIZE, SIZE]`` masks (the hand without the arm), drawn as :func:`render_frames`
    draws them (the hand in front of the object); both empty between actions."""
    t = frame / FPS
    side = SIZE + 2 * PAD
    layers = np.zeros((2, side, side, 3), np.uint8)  # the object, the hand
    k = int(np.searchsorted([a.start for a in plan.actions], t, side="right")) - 1
    if k >= 0 and t < plan.actions[k].end:
        action = plan.actions[k]
        obj = plan.objects[action.obj]
        x, y, sx, sy, angle = object_pose(action, (obj.x, obj.y), t)
        hx, hy = _hand_position(action, x + PAD, y + PAD, sx, sy)
        _draw_object(layers[0], obj.noun, x + PAD, y + PAD, sx, sy, angle)
        _draw_ellipse(layers[1], hx, hy, 5.5, 4.5, np.full(3, 255, np.uint8))
    ox, oy = _camera_offset(plan, t)
    obj_mask, hand_mask = layers[:, oy:oy + SIZE, ox:ox + SIZE].any(-1)
    return obj_mask & ~hand_mask, hand_mask


def _write_chunk(path: Path, frames) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        # One thread, no B-frames, no macroblock tree: x264 then writes the same
        # bytes every time (with B-frames and mbtree it occasionally did not).
        # A key frame every second keeps seeking cheap.
        stream.options = {"preset": "veryfast", "crf": "18", "g": str(FPS), "threads": "1",
                          "x264-params": "bframes=0:mbtree=0"}
        for i, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            picture.pts = i
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def render_video(plan: VideoPlan, video_root: str | Path) -> None:
    """Write ``video_root/<uid>/<k>.mp4``: the video cut into 600-s chunks."""
    folder = Path(video_root) / plan.uid
    folder.mkdir(parents=True, exist_ok=True)
    per_chunk = CHUNK_SECONDS * FPS
    for k in range(math.ceil(plan.num_frames / per_chunk)):
        start = k * per_chunk
        _write_chunk(folder / f"{k}.mp4", render_frames(plan, start, min(plan.num_frames, start + per_chunk)))


# ---------------------------------------------------------------- metadata

def _fmt(x: float) -> str:
    return repr(round(float(x), 3))


def _clip_rows(plans: list[VideoPlan], split: str, first_idx: int = 0) -> list[dict]:
    rows = []
    for plan in (p for p in plans if p.split == split):
        for i, a in enumerate(plan.actions):
            noun = plan.objects[a.obj].noun
            rows.append({
                "clip_idx": first_idx + len(rows),
                "video_uid": plan.uid,
                "video_dur": plan.duration,
                "narration_source": "narration_pass_1",
                "narration_ind": i,
                "narration_time": round((a.start + a.end) / 2, 3),
                "clip_start": a.start,
                "clip_end": a.end,
                "clip_text": f"#C C {VERBS[a.verb][0]} the {NOUNS[noun]}",
                "tag_verb": f"[{a.verb}]",
                "tag_noun": f"[{noun}]",
            })
    return rows


def _write_egoclip(path: Path, rows: list[dict]) -> None:
    lines = ["\t".join(CSV_COLUMNS)]
    for r in rows:
        values = [str(r["clip_idx"]), r["video_uid"], _fmt(r["video_dur"]), r["narration_source"],
                  str(r["narration_ind"]), _fmt(r["narration_time"]), _fmt(r["clip_start"]),
                  _fmt(r["clip_end"]), r["clip_text"], r["tag_verb"], r["tag_noun"]]
        lines.append("\t".join(values))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _action_key(row: dict) -> tuple:
    return row["tag_verb"], row["tag_noun"]


def _make_mcq(rows: list[dict], rng: np.random.Generator) -> dict:
    """Each validation clip is the query of one question; half inter-video (type 1:
    wrong choices from other videos), half intra-video (type 2: from the query's
    video). A wrong choice never shows the query's (verb, noun); the wrong choices
    show different actions from each other where the source has enough of them."""
    by_video: dict[str, list[dict]] = {}
    for r in rows:
        by_video.setdefault(r["video_uid"], []).append(r)
    videos = list(by_video)
    questions = {}
    for n, i in enumerate(rng.permutation(len(rows))):
        query = rows[i]
        qtype = 1 if n % 2 == 0 else 2
        if qtype == 1:
            others = [videos[j] for j in rng.permutation(len(videos)) if videos[j] != query["video_uid"]]
            sources = [others[k % len(others)] for k in range(4)]  # fewer than 5 videos: reuse some
        else:
            sources = [query["video_uid"]] * 4
        keys, wrong = {_action_key(query)}, []
        for source in sources:
            pool = [r for r in by_video[source] if _action_key(r) != _action_key(query) and r not in wrong]
            pool = [r for r in pool if _action_key(r) not in keys] or pool
            if not pool:
                break
            wrong.append(pool[int(rng.integers(len(pool)))])
            keys.add(_action_key(wrong[-1]))
        if len(wrong) < 4:
            continue
        answer = int(rng.integers(5))
        choices = wrong[:answer] + [query] + wrong[answer:]
        questions[str(len(questions))] = {
            "query": query,
            "choices": {str(c): row for c, row in enumerate(choices)},
            "answer": answer,
            "types": qtype,
        }
    return questions


def _make_nlq(plans: list[VideoPlan], split: str, rng: np.random.Generator,
              window: float = 60.0) -> dict:
    """Ego4D-NLQ-style annotations: each video cut into clips of ``window`` seconds,
    "When did I <verb> the <noun>?" for actions that happen once in their clip."""
    videos = []
    for plan in (p for p in plans if p.split == split):
        clips = []
        for k in range(math.ceil(plan.duration / window)):
            start, end = k * window, min(plan.duration, (k + 1) * window)
            inside = [a for a in plan.actions if a.start >= start and a.end <= end]
            counts: dict[tuple, int] = {}
            for a in inside:
                key = (a.verb, plan.objects[a.obj].noun)
                counts[key] = counts.get(key, 0) + 1
            queries = []
            for a in inside:
                noun = plan.objects[a.obj].noun
                if counts[(a.verb, noun)] == 1:
                    queries.append({
                        "query": f"When did I {VERBS[a.verb][2]} the {NOUNS[noun]}?",
                        "template": "When did I [verb] object X?",
                        "clip_start_sec": round(a.start - start, 3),
                        "clip_end_sec": round(a.end - start, 3),
                        "video_start_sec": a.start,
                        "video_end_sec": a.end,
                    })
            if not queries:
                continue
            clips.append({
                "clip_uid": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                "video_start_sec": start,
                "video_end_sec": end,
                "clip_start_sec": 0.0,
                "clip_end_sec": round(end - start, 3),
                "annotations": [{
                    "annotation_uid": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                    "language_queries": queries,
                }],
            })
        videos.append({"video_uid": plan.uid, "split": split, "clips": clips})
    return {"version": "toy", "description": f"svitt-ego toy NLQ annotations ({split})", "videos": videos}


def _readme(plans: list[VideoPlan], num_train_clips: int, num_questions: int, seed: int) -> str:
    verbs = ", ".join(f'"{v[0]}"' for v in VERBS)
    return f"""# svitt-ego toy data (seed {seed})

A synthetic egocentric dataset in the layout of EgoClip / EgoMCQ / Ego4D NLQ,
made by `svitt-ego make-toy-data` (svitt_ego/data/toy.py, version {VERSION}).

Each video is one scene: a wall and a table with their own colours and
texture, and 3-4 objects. An object is a colour ({", ".join(COLOURS)}) and a
shape ({", ".join(SHAPES)}): {len(NOUNS)} noun classes; no two objects of a
scene share a colour or a shape. Every few seconds the
camera wearer acts on one object ({len(VERBS)} verb classes: {verbs}); the
narration is `#C C <verb> the <colour> <shape>`. The action is shown only by
the motion of the object and of the hand and arm touching it; the rest of the
scene is still, apart from a slight camera jitter.

- `videos/<video_uid>/<k>.mp4`: {SIZE}x{SIZE}, {FPS} fps, h264, cut into
  {CHUNK_SECONDS}-s chunks (k = floor(t / {CHUNK_SECONDS})); the first
  training video is {LONG_VIDEO_SECONDS:g} s long and has two chunks.
- `egoclip.csv`: {num_train_clips} narrated clips of {sum(p.split == "train" for p in plans)}
  training videos; a clip brackets its action, `narration_time` is its middle.
- `egomcq.json`: {num_questions} questions on {sum(p.split == "val" for p in plans)} held-out
  videos; type 1 takes the wrong choices from other videos, type 2 from the
  same video (another action, or the same action on another object).
- `taxonomy_verbs.json`, `taxonomy_nouns.json`: class id -> name for
  `tag_verb` / `tag_noun`.
- `nlq_train.json`, `nlq_val.json`: 60-s clips with "When did I ...?" queries.
"""


# ---------------------------------------------------------------- entry point

def render_all(render: Callable, jobs: list[tuple], desc: str) -> None:
    """``render(*job)`` for every job, in worker processes when there are several cores, with a progress bar."""
    workers = min(usable_cores(), len(jobs))
    with tqdm(total=len(jobs), desc=desc, unit="video", dynamic_ncols=True) as progress:
        if workers > 1:
            with concurrent.futures.ProcessPoolExecutor(workers) as pool:
                for future in concurrent.futures.as_completed([pool.submit(render, *job) for job in jobs]):
                    future.result()
                    progress.update()
        else:
            for job in jobs:
                render(*job)
                progress.update()


def make_toy_data(root: str | Path, seed: int = 0, num_videos: int | None = None) -> Path:
    """Generate the toy dataset under ``root`` and return ``root``.

    ``num_videos`` (default 240) counts training plus validation videos; a fifth
    of them (at least two) are held out for EgoMCQ. A folder that already
    holds a complete dataset with the same parameters is left as it is.

    Only an empty or missing folder, or one this function made (it holds :data:`MARKER`), is
    written to; any other is refused with :class:`FileExistsError`. Regenerating a folder it
    made deletes only what its manifest lists it wrote.
    """
    root = Path(root)
    num_videos = DEFAULT_NUM_VIDEOS if num_videos is None else int(num_videos)
    plans = plan_world(seed, num_videos)
    manifest = {"generator": "svitt_ego.data.toy", "version": VERSION, "seed": seed, "num_videos": num_videos,
                "outputs": [*OUTPUT_FILES, *(f"videos/{p.uid}" for p in plans)], "complete": True}
    if (root / MARKER).is_file() and _read_manifest(root) == manifest:
        return root
    _clear(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).touch()
    # The outputs are listed before any is written, so that a killed run is cleared next time.
    atomic_write_json(root / "manifest.json", {**manifest, "complete": False})

    rng = np.random.default_rng([seed, 1])
    train_rows = _clip_rows(plans, "train")
    val_rows = _clip_rows(plans, "val", first_idx=len(train_rows))
    questions = _make_mcq(val_rows, rng)

    jobs = sorted(plans, key=lambda p: -p.duration)  # the long video first
    render_all(render_video, [(p, root / "videos") for p in jobs], "toy videos")

    _write_egoclip(root / "egoclip.csv", train_rows)
    atomic_write_text(root / "egomcq.json", json.dumps(questions))
    atomic_write_json(root / "taxonomy_verbs.json", {str(i): v[1] for i, v in enumerate(VERBS)})
    atomic_write_json(root / "taxonomy_nouns.json", {str(i): n for i, n in enumerate(NOUNS)})
    for split in ("train", "val"):
        atomic_write_json(root / f"nlq_{split}.json", _make_nlq(plans, split, rng))
    atomic_write_text(root / "README.md", _readme(plans, len(train_rows), len(questions), seed))
    atomic_write_json(root / "manifest.json", manifest)
    return root


def _read_manifest(root: Path):
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _clear(root: Path) -> None:
    """Make ``root`` ready for a new dataset: refuse a folder this module did not make, and
    delete what the manifest of one it made lists (nothing else)."""
    if not root.is_dir() or not any(root.iterdir()):
        return
    if not (root / MARKER).is_file():
        clashes = [name for name in (*OUTPUT_FILES, "videos") if os.path.lexists(root / name)]
        would = f"; it would overwrite {', '.join(clashes)}" if clashes else ""
        raise FileExistsError(f"{root} is not empty and was not made by svitt-ego make-toy-data (no {MARKER})"
                              f"{would}: move it away or choose an empty folder")
    manifest = _read_manifest(root)
    listed = manifest.get("outputs") if isinstance(manifest, dict) else None
    for name in listed if isinstance(listed, list) else []:
        if _is_output_name(name):
            _remove(root / name)
    if (root / "videos").is_dir() and not (root / "videos").is_symlink() and not any((root / "videos").iterdir()):
        (root / "videos").rmdir()


def _is_output_name(name) -> bool:
    """A name the generator writes: one of :data:`OUTPUT_FILES` or ``videos/<video id>``; a
    manifest cannot make it delete anything else."""
    if not isinstance(name, str):
        return False
    folder, _, uid = name.partition("/")
    return name in OUTPUT_FILES or (folder == "videos" and is_video_uid(uid))


def _remove(path: Path) -> None:
    """Delete a file or folder; a symbolic link is removed, never followed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def toy_data_overrides(root: str | Path) -> list[str]:
    """The config overrides that point ``data.egoclip`` / ``egomcq`` / ``video_root`` at a toy dataset."""
    root = Path(root)
    return [f"data.egoclip={root / 'egoclip.csv'}", f"data.egomcq={root / 'egomcq.json'}",
            f"data.video_root={root / 'videos'}"]
