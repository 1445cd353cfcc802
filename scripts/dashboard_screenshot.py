#!/usr/bin/env python
"""Open a sweep's Optuna studies in optuna-dashboard with headless Chromium: screenshot, DOM
and/or visible text.

    python scripts/dashboard_screenshot.py NAME [--storage DIR] [--study CELL]
                                                [--png FILE] [--dom FILE] [--text FILE]

Starts `caat-sweep dashboard NAME` on a free loopback port and loads its list of studies in
headless Chromium (scripts/headless_browser.py); waits until every study of the sweep (read
from its Optuna storage) is listed, then writes the screenshot, the rendered DOM and/or the
page's text and stops the dashboard and the browser again. With --study CELL it shows that
cell's study page instead. A script rather than package code for the reasons
ui_screenshot.py gives; the dashboard test runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from headless_browser import (
    Browser,
    add_page_args,
    cannot_capture,
    capture,
    free_port,
)

from sweeper import storage
from sweeper.servers import DASHBOARD_PATH, open_studies
from trainables.errors import ConfigError


def sweep_studies(name: str, where: str | None) -> dict[str, int]:
    """{study name: the dashboard's study id} of the sweep's studies."""
    manifest = storage.load_manifest(storage.resolve_storage(where), name)
    studies, names = open_studies(manifest.studies_url)
    return {n: studies.get_study_id_from_name(n) for n in names}


def show_studies(browser: Browser, base: str, names: list[str], timeout: float) -> str:
    url = base + DASHBOARD_PATH
    browser.open(url)
    for name in names:
        browser.wait_for(f"document.body && document.body.innerText.includes({json.dumps(name)})",
                         timeout, f"the study {name}")
    time.sleep(1.0)  # let the cards finish laying out
    return url


def show_study(browser: Browser, base: str, name: str, study_id: int, timeout: float) -> str:
    url = f"{base}{DASHBOARD_PATH}/studies/{study_id}"
    browser.open(url)
    # The history plot is the page's first chart; plotly draws it into an SVG.
    browser.wait_for(f"document.body && document.body.innerText.includes({json.dumps(name)})"
                     " && document.querySelector('.main-svg') !== null", timeout,
                     f"the study {name} with its history plot")
    time.sleep(2.0)  # plotly animates its first draw
    return url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="sweep name")
    p.add_argument("--storage", default=None,
                   help="directory or cloud URI holding sweeps (default ./runs)")
    p.add_argument("--study", metavar="CELL", help="show this cell's study page instead")
    add_page_args(p, "1600,1000", "dashboard")
    args = p.parse_args(argv)
    if (status := cannot_capture(p, args, "dashboard_screenshot")) is not None:
        return status
    try:
        studies = sweep_studies(args.name, args.storage)
    except ConfigError as err:
        print(f"dashboard_screenshot: {err}", file=sys.stderr)
        return 2
    if args.study is not None and args.study not in studies:
        print(f"dashboard_screenshot: --study: no study {args.study!r}; the sweep's: "
              f"{', '.join(studies) or 'none'}", file=sys.stderr)
        return 2

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sweeper.cli", "dashboard", args.name, "--port", str(port)]
    if args.storage:
        cmd += ["--storage", args.storage]

    def show(browser) -> str:
        if args.study is None:
            return show_studies(browser, base, list(studies), args.timeout)
        return show_study(browser, base, args.study, studies[args.study], args.timeout)

    return capture(cmd, base + "/api/meta", args, show, "dashboard_screenshot")

if __name__ == "__main__":
    sys.exit(main())
