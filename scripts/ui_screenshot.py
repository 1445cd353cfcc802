#!/usr/bin/env python
"""Open a sweep's runs page in the MLflow UI with headless Chromium: screenshot and/or DOM.

    python scripts/ui_screenshot.py NAME [--tracking-uri URI] [--png FILE] [--dom FILE]
                                         [--text FILE]

Starts `caat-sweep ui` on a free loopback port and loads the experiment `caat-sweep/NAME`
in headless Chromium, driven over the DevTools protocol on a pipe (standard library only,
no webdriver). MLflow lists the trials nested, collapsed, under the sweep's parent run, and
shows no metric columns by default; so the script sets the page's own stored view state
(parent expanded, a few tag and metric columns, the assistant panel closed) and reloads,
then writes the screenshot and/or the rendered DOM and stops the UI and the browser again.

It lives in scripts/ rather than in the package: it needs a browser (Debian's `chromium`,
which `make test` installs), is no part of running sweeps, and is no benchmark. The UI test
runs it, so README's screenshot comes from code that is tested.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from sweeper.cli import TRACKING_URI_HELP
from sweeper.contract import experiment_name, open_client, resolve_tracking_uri, search_all_runs

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# A headless run on a CI machine without network, GPU, user namespaces or a large /dev/shm.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--disable-dev-shm-usage", "--remote-debugging-pipe")
COLUMNS = ("tags.`cell`", "tags.`phase`", "tags.`seed`", "tags.`outcome`",
           "metrics.`test_natural_acc`", "metrics.`test_robust_acc`",
           "metrics.`test_worst_class_natural_acc`", "metrics.`val_robust_acc`")


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


# ----------------------------------------------------------------------------------- UI


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ui_command(uri: str, port: int) -> list[str]:
    """`caat-sweep ui` when the CLI has it; plain `mlflow ui` (same binding) otherwise."""
    from sweeper.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "ui" in sub.choices:
        return [sys.executable, "-m", "sweeper.cli", "ui", "--tracking-uri", uri,
                "--port", str(port)]
    print("note: `caat-sweep ui` is not available; starting `mlflow ui` directly",
          file=sys.stderr)
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
            "--host", "127.0.0.1", "--port", str(port)]


def wait_until_up(base: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the UI exited with status {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the UI did not answer on {base} within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop the UI and the workers it started (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def sweep_runs(uri: str, name: str) -> tuple[str, str, str | None, list[str]]:
    """(experiment id, experiment name, parent run id, trial run names) of the sweep."""
    client = open_client(uri)
    exp = client.get_experiment_by_name(experiment_name(name))
    if exp is None:
        raise SystemExit(f"ui_screenshot: no sweep {name!r} in {uri}")
    runs = search_all_runs(client, exp.experiment_id)
    parent = next((r.info.run_id for r in runs if r.data.tags.get("role") == "parent"), None)
    trials = [r.info.run_name for r in runs if r.data.tags.get("role") != "parent"]
    return exp.experiment_id, exp.name, parent, trials


def show_sweep(browser: Browser, base: str, exp_id: str, exp_name: str, parent: str | None,
               trials: list[str], columns: list[str], timeout: float) -> None:
    """Load the runs page, then set MLflow's stored view state for it and reload."""
    browser.open(f"{base}/#/experiments/{exp_id}/runs")
    browser.wait_for("document.body && document.body.innerText.includes('matching runs')",
                     timeout, "the runs table")
    # The page keeps its view state in localStorage under a key naming the experiment;
    # editing the state it wrote itself (rather than writing one) keeps every other field.
    # It writes that state a moment after the table shows (later on a loaded machine): wait
    # for it, or the edit finds nothing and the parent run stays collapsed.
    state_key = f"""k => k.endsWith('ExperimentPage-["{exp_id}"]-ReactComponentState')"""
    browser.wait_for(f"Object.keys(localStorage).some({state_key})", timeout,
                     "the page's stored view state")
    state = {"selectedColumns": columns, "runsExpanded": {parent: True} if parent else {},
             # Widths wide enough for names and values; MLflow applies stored widths only to
             # the columns of a stored order.
             "columnOrder": columns,
             "columnWidths": {c: 140 if c.startswith("metrics.") else 90 for c in columns}}
    if "tags.`cell`" in columns:
        state["columnWidths"]["tags.`cell`"] = 210
    edit = f"""(() => {{
        const key = Object.keys(localStorage).find({state_key});
        if (key) {{
            const s = JSON.parse(localStorage.getItem(key));
            Object.assign(s, {json.dumps(state)});
            localStorage.setItem(key, JSON.stringify(s));
        }}
        localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
        localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
        localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
        return Boolean(key);
    }})()"""
    # The page may save its in-memory state over our edit before the reload (a CI run on a
    # loaded machine once never showed the trials): then the parent is still collapsed
    # after the reload, and we edit again.
    attempts = 3
    first = json.dumps(min(trials)) if trials else None
    for attempt in range(1, attempts + 1):
        browser.js(edit)
        browser.send("Page.reload")
        browser.wait_for("document.body && document.body.innerText.includes('matching runs')",
                         timeout, "the runs table after reload")
        if first is None:
            break
        try:
            browser.wait_for(f"document.body.innerText.includes({first})",
                             timeout if attempt == attempts else min(timeout, 30.0),
                             "the trial runs under the sweep's parent run")
            break
        except RuntimeError:
            if attempt == attempts:
                raise
            print(f"ui_screenshot: the parent run is still collapsed after reload {attempt}; "
                  "setting the view state again", file=sys.stderr)
    # The experiment's name comes from a request of its own, which can answer after the
    # runs on a loaded machine.
    browser.wait_for(f"document.body.innerText.includes({json.dumps(exp_name)})", timeout,
                     "the experiment's name")
    time.sleep(1.0)  # let the grid finish laying out its columns


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="sweep name (experiment caat-sweep/NAME)")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    p.add_argument("--png", help="write a screenshot of the runs page here")
    p.add_argument("--dom", help="write the rendered DOM (HTML) of the runs page here")
    p.add_argument("--text", help="write the page's visible text (innerText) here")
    p.add_argument("--size", default="1800,1000", help="window WIDTH,HEIGHT in pixels")
    p.add_argument("--columns", default=",".join(COLUMNS),
                   help="runs-table columns to show, comma-separated MLflow column keys")
    p.add_argument("--timeout", type=float, default=120,
                   help="seconds to wait for the UI to start and for each page state")
    args = p.parse_args(argv)
    if not (args.png or args.dom or args.text):
        p.error("nothing to do: give --png, --dom and/or --text")
    binary = find_browser()
    if binary is None:
        print("ui_screenshot: no chromium found (apt-get install chromium)", file=sys.stderr)
        return 2
    uri = resolve_tracking_uri(args.tracking_uri)
    exp_id, exp_name, parent, trials = sweep_runs(uri, args.name)
    width, height = (int(v) for v in args.size.split(","))

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen(ui_command(uri, port), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    browser = None
    try:
        wait_until_up(base, ui, args.timeout)
        browser = Browser(binary, (width, height))
        show_sweep(browser, base, exp_id, exp_name, parent, trials, args.columns.split(","),
                   args.timeout)
        if args.dom:
            Path(args.dom).write_text(browser.js("document.documentElement.outerHTML"))
            print(f"DOM of {base}/#/experiments/{exp_id}/runs -> {args.dom}")
        if args.text:
            Path(args.text).write_text(browser.js("document.body.innerText"))
            print(f"text of {base}/#/experiments/{exp_id}/runs -> {args.text}")
        if args.png:
            Path(args.png).parent.mkdir(parents=True, exist_ok=True)
            browser.screenshot(Path(args.png))
            print(f"screenshot of {base}/#/experiments/{exp_id}/runs -> {args.png}")
    except RuntimeError as err:
        print(f"ui_screenshot: {err}", file=sys.stderr)
        return 1
    finally:
        if browser is not None:
            browser.close()
        stop(ui)
    return 0


if __name__ == "__main__":
    sys.exit(main())
