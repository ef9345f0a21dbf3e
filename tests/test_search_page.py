"""The search results page and contact sheet, checked as a person sees them (a real browser, a decoded PNG)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from browser import Cards, load
from helpers import write_video
from PIL import Image

from svitt_ego.search_page import (Moment, QueryResult, browser_playable, format_time, render_page,
                                   write_contact_sheet, write_page)

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 30), (30, 30, 220)


def solid(colour, height=48, width=64) -> np.ndarray:
    return np.full((height, width, 3), colour, dtype=np.uint8)


@pytest.fixture
def results(tmp_path):
    video = write_video(tmp_path / "kitchen.mp4", [solid(RED)] * 20, Fraction(10))  # h264 in mp4: playable
    other = tmp_path / "garage.avi"
    other.write_bytes(b"not a video a browser plays")
    return [QueryResult("when did I open the drawer?", [
                Moment(str(video), 0.4, 1.2, 0.81, [solid(RED), solid(GREEN)], browser_playable(video)),
                Moment(str(other), 65.0, 3725.5, 0.52, [solid(BLUE)], browser_playable(other))]),
            QueryResult("where is the <cup> & saucer?", [])]


def test_times_read_as_a_person_reads_them():
    assert [format_time(t) for t in (0.0, 5.25, 65.0, 3725.5)] == ["0:00.0", "0:05.2", "1:05.0", "1:02:05.5"]


def test_the_page_shows_every_card_in_a_browser_and_sends_no_request(results, tmp_path):
    page = write_page(results, tmp_path / "results.html")
    loaded = load(page, tmp_path)
    cards = Cards()
    cards.feed(loaded.dom)
    assert loaded.requests == []
    assert [(c["start"], c["end"], c["time"]) for c in cards.cards] == [
        (0.4, 1.2, "0:00.4 – 0:01.2"), (65.0, 3725.5, "1:05.0 – 1:02:05.5")]
    assert cards.images == 3  # every frame inline
    assert cards.videos == [f"{(tmp_path / 'kitchen.mp4').resolve().as_uri()}#t=0.40,1.20"]  # the .avi: no player
    assert "where is the &lt;cup&gt; &amp; saucer?" in loaded.dom and "no moments" in loaded.dom


def test_the_content_rule_is_what_stops_requests(results, tmp_path):
    """The same page with an outside image: blocked by the page's rule; seen by the browser check without it."""
    bait = '<img src="http://example.com/track.png">'
    page = tmp_path / "bait.html"
    page.write_text(render_page(results).replace("</body>", bait + "</body>"))
    assert load(page, tmp_path).requests == []
    page.write_text(page.read_text().replace('http-equiv="Content-Security-Policy"', 'name="no-rule"'))
    assert load(page, tmp_path).requests == ["GET http://example.com/track.png HTTP/1.1"]


def test_the_page_renders_frames_in_a_screenshot(results, tmp_path):
    page = write_page(results, tmp_path / "results.html")
    load(page, tmp_path, screenshot=tmp_path / "shot.png", size=(900, 700))
    pixels = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB")).reshape(-1, 3).astype(int)
    for colour in (RED, GREEN, BLUE):  # each frame's colour is on screen (JPEG moves it by a few levels)
        assert (np.abs(pixels - colour).max(axis=1) < 25).sum() > 1000


def test_the_contact_sheet_draws_each_strip(results, tmp_path):
    path = write_contact_sheet(results, tmp_path / "sheet.png")
    sheet = np.asarray(Image.open(path).convert("RGB")).astype(int)
    thumb = 96  # THUMB_HEIGHT: a 48 x 64 frame becomes 96 x 128
    rows = [(np.abs(sheet - c).max(axis=2) < 10) for c in (RED, GREEN, BLUE)]
    for mask in rows:
        assert mask.sum() == thumb * 128  # one thumbnail of each colour, whole
    red_rows, blue_rows = np.where(rows[0].any(axis=1))[0], np.where(rows[2].any(axis=1))[0]
    assert np.array_equal(np.where(rows[1].any(axis=1))[0], red_rows)  # the first moment's frames side by side
    assert blue_rows.min() > red_rows.max()  # the second moment below the first
