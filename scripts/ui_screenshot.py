#!/usr/bin/env python
"""Open a sweep in the MLflow UI with headless Chromium: screenshot, DOM and/or visible text.

    python scripts/ui_screenshot.py NAME [--tracking-uri URI] [--artifact PATH]
                                         [--png FILE] [--dom FILE] [--text FILE]

Starts `caat-sweep ui` on a free loopback port and loads the experiment `caat-sweep/NAME`
in headless Chromium (scripts/headless_browser.py). MLflow lists the trials nested,
collapsed, under the sweep's parent run, and shows no metric columns by default; so the
script sets the page's own stored view state (parent expanded, a few tag and metric
columns, the assistant panel closed) and reloads, then writes the screenshot and/or the
rendered DOM and stops the UI and the browser again. With --artifact PATH it shows the
parent run's Artifacts tab instead, with PATH (e.g. analysis/summary.html, what
`caat-sweep analyze` logs there) selected.

It lives in scripts/ rather than in the package: it needs a browser (Debian's `chromium`,
which `make test` installs), is no part of running sweeps, and is no benchmark. The UI test
runs it, so README's screenshot comes from code that is tested.
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

from sweeper.cli import TRACKING_URI_HELP
from sweeper.contract import experiment_name, open_client, resolve_tracking_uri, search_all_runs

COLUMNS = ("tags.`cell`", "tags.`phase`", "tags.`seed`", "tags.`outcome`",
           "metrics.`test_natural_acc`", "metrics.`test_robust_acc`",
           "metrics.`test_worst_class_natural_acc`", "metrics.`val_robust_acc`")


# MLflow's own settings, in its localStorage: the assistant panel closed (it would cover a
# third of the page) and the model-training pages rather than the GenAI ones.
QUIET_UI = """
        localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
        localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
        localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');"""


# ----------------------------------------------------------------------------------- UI


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
        {QUIET_UI}
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


def show_artifact(browser: Browser, base: str, exp_id: str, parent: str, path: str,
                  timeout: float) -> str:
    """The parent run's Artifacts tab with `path` selected (its folders expanded, the file
    previewed); returns the page's address."""
    url = f"{base}/#/experiments/{exp_id}/runs/{parent}/artifacts/{path}"
    browser.open(url)
    browser.wait_for("document.body && document.body.innerText.includes('Artifacts')",
                     timeout, "the parent run's page")
    browser.js(f"(() => {{ {QUIET_UI} }})()")
    browser.send("Page.reload")
    # The header of the selected file's preview names its full path.
    browser.wait_for(f"document.body && document.body.innerText.includes({json.dumps(path)})",
                     timeout, f"the artifact {path}")
    time.sleep(1.0)  # let the preview finish rendering
    return url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="sweep name (experiment caat-sweep/NAME)")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    p.add_argument("--artifact", metavar="PATH",
                   help="show the parent run's Artifacts tab with PATH selected (e.g. "
                        "analysis/summary.html) instead of the runs page")
    p.add_argument("--columns", default=",".join(COLUMNS),
                   help="runs-table columns to show, comma-separated MLflow column keys")
    add_page_args(p, "1800,1000", "UI")
    args = p.parse_args(argv)
    if (status := cannot_capture(p, args, "ui_screenshot")) is not None:
        return status
    uri = resolve_tracking_uri(args.tracking_uri)
    exp_id, exp_name, parent, trials = sweep_runs(uri, args.name)
    if args.artifact and parent is None:
        print(f"ui_screenshot: sweep {args.name!r} has no parent run", file=sys.stderr)
        return 2

    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def show(browser) -> str:
        if args.artifact:
            return show_artifact(browser, base, exp_id, parent, args.artifact, args.timeout)
        show_sweep(browser, base, exp_id, exp_name, parent, trials,
                   args.columns.split(","), args.timeout)
        return f"{base}/#/experiments/{exp_id}/runs"

    return capture(ui_command(uri, port), base + "/health", args, show, "ui_screenshot")

if __name__ == "__main__":
    sys.exit(main())
