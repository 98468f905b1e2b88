"""Open a page in Debian's headless Chromium and collect what went wrong, over the DevTools
protocol on a pipe (`--remote-debugging-pipe`: fds 3 and 4), so no extra library is needed.

Collected as errors: console.error calls, uncaught exceptions, the browser's own error log
entries (failed loads, blocked resources) and images that did not decode.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
]

BROKEN_IMAGES_JS = (
    "JSON.stringify(Array.from(document.images)"
    ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 120)))"
)


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium():
    if find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: scripts/system-deps.sh should install it")
        pytest.skip("chromium is not installed (bash scripts/system-deps.sh installs it)")


@dataclass
class PageResult:
    errors: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    title: str = ""
    images: int = 0
    screenshot: bytes = b""


class _Pipe:
    def __init__(self, proc, to_browser: int, from_browser: int, deadline: float):
        self.proc, self.w, self.r, self.deadline = proc, to_browser, from_browser, deadline
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_message(self) -> dict:
        while b"\0" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self.r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe (exit {self.proc.poll()})")
                self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read_message()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str) -> dict:
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            event = self._read_message()
            if event.get("method") == method:
                return event
            self.events.append(event)


def _high_fd(fd: int) -> int:
    """A copy of `fd` numbered >= 10, clear of the 3 and 4 that Chromium's pipe must use."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


def open_page(url: str, timeout: float = 120, screenshot: bool = False) -> PageResult:
    """Load `url` in a fresh headless Chromium profile; wait for the load event; report."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (scripts/system-deps.sh installs it)")
    to_r, to_w = (_high_fd(fd) for fd in os.pipe())
    from_r, from_w = (_high_fd(fd) for fd in os.pipe())

    with tempfile.TemporaryDirectory(prefix="k3b-chromium-") as profile:
        # The protocol pipe must be fds 3 (commands in) and 4 (replies out) in Chromium.
        proc = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$0" "$@" 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-',
                binary,
                *FLAGS,
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(to_r, from_w),
        )
        os.close(to_r)
        os.close(from_w)
        pipe = _Pipe(proc, to_w, from_r, time.monotonic() + timeout)
        try:
            return _inspect(pipe, url, screenshot)
        finally:
            with contextlib.suppress(Exception):  # it may already be gone
                pipe.call("Browser.close")
            os.close(to_w)
            os.close(from_r)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _inspect(pipe: _Pipe, url: str, screenshot: bool) -> PageResult:
    target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Runtime", "Log", "Page"):
        pipe.call(f"{domain}.enable", session=session)
    viewport = {"width": 1280, "height": 1600, "deviceScaleFactor": 1, "mobile": False}
    pipe.call("Emulation.setDeviceMetricsOverride", viewport, session=session)
    nav = pipe.call("Page.navigate", {"url": url}, session=session)
    result = PageResult()
    if nav.get("errorText"):
        result.errors.append(f"navigation: {nav['errorText']}")
        return result
    pipe.wait_event("Page.loadEventFired")
    expression = f"[document.title, document.images.length, {BROKEN_IMAGES_JS}]"
    evaluated = pipe.call(
        "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session
    )["result"]["value"]
    result.title, result.images = evaluated[0], evaluated[1]
    result.broken_images = json.loads(evaluated[2])
    if screenshot:
        shot = pipe.call("Page.captureScreenshot", {"format": "png"}, session=session)
        result.screenshot = base64.b64decode(shot["data"])
    for event in pipe.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = [a.get("value", a.get("description", "")) for a in params.get("args", [])]
            result.errors.append(f"console.{params['type']}: {' '.join(map(str, args))}")
        elif method == "Runtime.exceptionThrown":
            result.errors.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            result.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
    return result
