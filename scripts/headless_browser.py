"""Headless Chromium for the scripts that look at our web UIs (ui_screenshot.py: the MLflow
UI; dashboard_screenshot.py: optuna-dashboard), and the server process each one starts.

Chromium is driven over the DevTools protocol on a pipe (standard library only, no
webdriver). A server runs in its own process group, so stopping it stops the workers it
started too (the MLflow UI has some). Not a module of the package: it needs a browser
(Debian's `chromium`, which `make test` installs) and is no part of running sweeps.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# A headless run on a CI machine without network, GPU, user namespaces or a large /dev/shm.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--disable-dev-shm-usage", "--remote-debugging-pipe")


# ------------------------------------------------------------------------------ browser


class Browser:
    """Headless Chromium over --remote-debugging-pipe: JSON messages, NUL-separated, fd 3/4."""

    def __init__(self, binary: str, size: tuple[int, int]):
        self.size = size
        self._profile = tempfile.TemporaryDirectory(prefix="ui-screenshot-")
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()

        def pipes_on_3_and_4() -> None:
            # Fresh copies first: a pipe end may itself sit on fd 3 or 4 in the parent.
            a, b = os.dup(cmd_r), os.dup(res_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}",
             f"--window-size={size[0]},{size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False,
            preexec_fn=pipes_on_3_and_4)
        os.close(cmd_r)
        os.close(res_w)
        self._buf = b""
        self._id = 0
        self._session: str | None = None

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("the browser did not answer in time")
            ready, _, _ = select.select([self._res_r], [], [], left)
            if ready:
                chunk = os.read(self._res_r, 1 << 16)
                if not chunk:
                    raise RuntimeError("the browser exited")
                self._buf += chunk
        message, _, self._buf = self._buf.partition(b"\0")
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, *, page: bool = True,
             timeout: float = 30) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if page and self._session:
            message["sessionId"] = self._session
        os.write(self._cmd_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)  # events in between are not needed: skipped
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, page=False)
        self._session = self.send("Target.attachToTarget", {"targetId": target["targetId"],
                                                            "flatten": True},
                                  page=False)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", {
            "width": self.size[0], "height": self.size[1], "deviceScaleFactor": 1,
            "mobile": False})
        self.send("Page.navigate", {"url": url})

    def js(self, expression: str):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"script failed: {str(res['exceptionDetails'])[:300]}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.js(expression):
                return
            time.sleep(0.25)
        raise RuntimeError(f"the page never showed {what} within {timeout:.0f} s")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):  # it may be gone already
            self.send("Browser.close", page=False, timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._res_r)
        self._profile.cleanup()


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


# ------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until `url` answers 200; RuntimeError when the server exits first or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before "
                               "serving")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer on {url} within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and the workers it started (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def served(cmd: Sequence[str], probe: str, timeout: float) -> Iterator[subprocess.Popen]:
    """Run server `cmd` until the block ends, once `probe` (a URL) answers."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until_up(probe, proc, timeout)
        yield proc
    finally:
        stop(proc)


@contextlib.contextmanager
def headless(size: tuple[int, int]) -> Iterator[Browser]:
    binary = find_browser()
    if binary is None:
        raise RuntimeError("no chromium found (apt-get install chromium)")
    browser = Browser(binary, size)
    try:
        yield browser
    finally:
        browser.close()


def save_page(browser: Browser, label: str, *, png: str | None = None, dom: str | None = None,
              text: str | None = None) -> None:
    """The page as shown now: a screenshot, the rendered DOM, the visible text (each when
    its path is given)."""
    if dom:
        Path(dom).write_text(browser.js("document.documentElement.outerHTML"))
        print(f"DOM of {label} -> {dom}")
    if text:
        Path(text).write_text(browser.js("document.body.innerText"))
        print(f"text of {label} -> {text}")
    if png:
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        browser.screenshot(Path(png))
        print(f"screenshot of {label} -> {png}")


def parse_size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.split(","))
    return width, height


def add_page_args(p, size: str, server: str) -> None:
    """The options every page-capturing script takes: outputs, window size, waits."""
    p.add_argument("--png", help="write a screenshot of the page here")
    p.add_argument("--dom", help="write the rendered DOM (HTML) of the page here")
    p.add_argument("--text", help="write the page's visible text (innerText) here")
    p.add_argument("--size", default=size, help="window WIDTH,HEIGHT in pixels")
    p.add_argument("--timeout", type=float, default=120,
                   help=f"seconds to wait for the {server} to start and for each page state")


def cannot_capture(p, args, prog: str) -> int | None:
    """Exit status 2 (with the reason on stderr) when there is nothing to capture with or
    nothing asked for; None when the script can go on."""
    import sys

    if not (args.png or args.dom or args.text):
        p.error("nothing to do: give --png, --dom and/or --text")
    if find_browser() is None:
        print(f"{prog}: no chromium found (apt-get install chromium)", file=sys.stderr)
        return 2
    return None


def capture(cmd: Sequence[str], probe: str, args, show, prog: str) -> int:
    """Serve `cmd` until `probe` answers, let `show(browser)` bring up the page (it returns
    the page's label), save what `args` asks for; 1 when the server or page never came."""
    import sys

    try:
        with served(cmd, probe, args.timeout), headless(parse_size(args.size)) as browser:
            save_page(browser, show(browser), png=args.png, dom=args.dom, text=args.text)
    except RuntimeError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    return 0
