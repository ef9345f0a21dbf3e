"""A page as a person sees it: headless Chromium (Debian's package) loads it and hands back the DOM after
load, a screenshot, and every request the page tried to send over the network.

Chromium is started with a proxy on loopback that answers nothing and records every request sent to it,
with no proxy bypass (loopback included), so any http(s) request the page makes is seen. A test that needs
the browser skips when Chromium is absent; CI installs it, and a skip fails there (tests/ci_skips.py).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from html.parser import HTMLParser
from dataclasses import dataclass
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
         "--disable-domain-reliability", "--disable-client-side-phishing-detection", "--no-pings",
         "--disable-features=OptimizationHints,MediaRouter,Translate,NetworkTimeServiceQuerying,"
         "AutofillServerCommunication,CertificateTransparencyComponentUpdater", "--no-service-autorun",
         "--password-store=basic", "--use-mock-keychain", "--disable-sync", "--disable-breakpad"]


# Chromium's own background services (updates, sign-in) that no flag turns off: not the page's requests.
BROWSER_SERVICE_HOSTS = ("update.googleapis.com", "accounts.google.com", "clients2.google.com")


def _host(request_line: str) -> str:
    target = request_line.split(" ")[1] if " " in request_line else ""
    return target.split("://")[-1].split("/")[0].split(":")[0]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("needs Chromium (Debian: apt-get install chromium)")


class RecordingProxy:
    """A TCP server on loopback that records the first line of each request and closes the connection."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.requests: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    data = conn.recv(4096)
                except OSError:
                    data = b""
                self.requests.append(data.split(b"\r\n", 1)[0].decode("latin-1") or "(connection)")

    def close(self) -> None:
        self.server.close()


@dataclass
class Loaded:
    dom: str
    requests: list[str]


def load(page: Path, tmp: Path, screenshot: Path | None = None, size: tuple[int, int] = (1200, 900)) -> Loaded:
    """Load ``page`` in headless Chromium: its DOM after load (or a screenshot) and the requests it sent."""
    proxy = RecordingProxy()
    try:
        args = [chromium(), *FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}",
                f"--proxy-server=http://127.0.0.1:{proxy.port}", "--proxy-bypass-list=<-loopback>",
                f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=3000"]
        args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        result = subprocess.run([*args, page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return Loaded(result.stdout, [r for r in proxy.requests if _host(r) not in BROWSER_SERVICE_HOSTS])
    finally:
        proxy.close()


class Cards(HTMLParser):
    """The result cards of a page's DOM: their data attributes, time text and video sources."""

    def __init__(self):
        super().__init__()
        self.cards, self.videos, self.images, self._in_time = [], [], 0, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("class") == "card":
            self.cards.append({"start": float(attrs["data-start"]), "end": float(attrs["data-end"]), "time": "",
                               "video": None})
        self._in_time = tag == "span" and attrs.get("class") == "time"
        if tag == "video":
            self.videos.append(attrs["src"])
            self.cards[-1]["video"] = attrs["src"]
        if tag == "img":
            self.images += attrs["src"].startswith("data:image/jpeg;base64,")

    def handle_data(self, data):
        if self._in_time:
            self.cards[-1]["time"] += data
            self._in_time = False
