"""Search results a person looks at: a self-contained HTML page and a PNG contact sheet.

The page holds everything it shows (the frames as inline JPEG data, the style inline) and forbids the
browser every other source with a ``default-src 'none'`` content-security rule, so opening it sends no
request anywhere; the one exception is the user's own video files (``media-src file:``), which a
``<video>`` element plays from the moment's start when the browser can decode them.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from svitt_ego.atomic import atomic_save_png, atomic_write_text

CONTENT_SECURITY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; media-src file:"
# Codecs and containers every current browser decodes; other videos get frames but no player.
PLAYABLE_CODECS = {"h264", "vp8", "vp9", "av1"}
PLAYABLE_SUFFIXES = {".mp4", ".m4v", ".webm", ".mov"}
THUMB_HEIGHT = 96
SHEET_GAP = 6


@dataclass
class Moment:
    """One ranked result: a span of a video, its score and a few frames from it (``[H, W, 3]`` uint8)."""

    video: str
    start: float
    end: float
    score: float
    frames: list[np.ndarray] = field(default_factory=list)
    playable: bool = False  # whether a browser can play ``video``: then the page has a player at ``start``


@dataclass
class QueryResult:
    query: str
    moments: list[Moment]


def browser_playable(path: str | Path) -> bool:
    """Whether a browser can play the file: a web container holding a video stream of a web codec."""
    path = Path(path)
    if path.suffix.lower() not in PLAYABLE_SUFFIXES or not path.is_file():
        return False
    import av  # only when a real file is looked at

    try:
        with av.open(str(path)) as container:
            return any(s.codec_context.name in PLAYABLE_CODECS for s in container.streams.video)
    except (av.error.FFmpegError, OSError):
        return False


def format_time(seconds: float) -> str:
    """``m:ss.s`` (``h:mm:ss.s`` past an hour)."""
    minutes, rest = divmod(max(seconds, 0.0), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{rest:04.1f}" if hours else f"{minutes}:{rest:04.1f}"


def _jpeg_data(frame: np.ndarray) -> str:
    image = Image.fromarray(frame)
    image = image.resize((max(1, round(image.width * THUMB_HEIGHT / image.height)), THUMB_HEIGHT))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _card(rank: int, moment: Moment) -> str:
    span = f"{format_time(moment.start)} – {format_time(moment.end)}"
    strip = "".join(f'<img src="{_jpeg_data(f)}" alt="frame">' for f in moment.frames)
    player = ""
    if moment.playable:
        source = html.escape(f"{Path(moment.video).resolve().as_uri()}#t={moment.start:.2f},{moment.end:.2f}")
        player = f'<video controls preload="metadata" src="{source}"></video>'
    return (f'<div class="card" data-rank="{rank}" data-start="{moment.start:.3f}" data-end="{moment.end:.3f}">'
            f'<div class="head"><span class="rank">#{rank}</span> <span class="time">{span}</span> '
            f'<span class="score">score {moment.score:.3f}</span> '
            f'<span class="video">{html.escape(Path(moment.video).name)}</span></div>'
            f'<div class="strip">{strip}</div>{player}</div>')


STYLE = ("body{font-family:sans-serif;margin:1.5em;background:#fafafa;color:#222}"
         "section{margin-bottom:2em}h2{font-size:1.15em}.card{background:#fff;border:1px solid #ddd;"
         "border-radius:6px;padding:.6em;margin:.6em 0}.head{margin-bottom:.4em}.rank{font-weight:bold}"
         ".time{font-family:monospace}.score,.video{color:#666;margin-left:.8em}.strip img{margin-right:4px;"
         "border-radius:3px}video{display:block;margin-top:.4em;max-height:240px}")


def render_page(results: list[QueryResult], title: str = "svitt-ego search") -> str:
    """The page's HTML: one section per query, one card per ranked moment."""
    sections = "".join(
        f'<section class="query"><h2>{html.escape(r.query)}</h2>'
        + "".join(_card(rank, m) for rank, m in enumerate(r.moments, start=1))
        + ("" if r.moments else "<p>no moments</p>") + "</section>" for r in results)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY}">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{sections}</body></html>\n")


def write_page(results: list[QueryResult], path: str | Path, title: str = "svitt-ego search") -> Path:
    return atomic_write_text(path, render_page(results, title))


def contact_sheet(results: list[QueryResult]) -> Image.Image:
    """The same results as one picture: per query a title line, then per moment its time and frame strip."""
    font = ImageFont.load_default(size=14)
    rows: list[tuple[str, list[Image.Image]]] = []
    for r in results:
        rows.append((r.query, []))
        for rank, m in enumerate(r.moments, start=1):
            thumbs = [Image.fromarray(f).resize((max(1, round(f.shape[1] * THUMB_HEIGHT / f.shape[0])),
                                                 THUMB_HEIGHT)) for f in m.frames]
            rows.append((f"  #{rank}  {format_time(m.start)} - {format_time(m.end)}  score {m.score:.3f}  "
                         f"{Path(m.video).name}", thumbs))
    line = 20
    width = max([400] + [sum(t.width + SHEET_GAP for t in thumbs) + SHEET_GAP for _, thumbs in rows])
    height = sum(line + (THUMB_HEIGHT + SHEET_GAP if thumbs else 0) for _, thumbs in rows) + SHEET_GAP
    sheet = Image.new("RGB", (width, height), "white")
    draw, y = ImageDraw.Draw(sheet), SHEET_GAP
    for text, thumbs in rows:
        draw.text((SHEET_GAP, y), text, fill="black", font=font)
        y += line
        x = SHEET_GAP
        for thumb in thumbs:
            sheet.paste(thumb, (x, y))
            x += thumb.width + SHEET_GAP
        y += THUMB_HEIGHT + SHEET_GAP if thumbs else 0
    return sheet


def write_contact_sheet(results: list[QueryResult], path: str | Path) -> Path:
    return atomic_save_png(contact_sheet(results), path)
