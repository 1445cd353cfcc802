"""`caat-sweep`: train one trial, launch/resume/inspect/sync sweeps, analyse them, open the UIs.

Bad input exits with status 2 and one line naming the field and what is allowed; nothing
is written before the input has been validated.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sweeper.contract import (
    ANALYSIS_ARTIFACTS,
    DEFAULT_TRACKING_URI,
    TRACKING_URI_ENV,
    log_analysis,
    resolve_tracking_uri,
)
from trainables.errors import CliError, ConfigError, ServiceUnavailable, one_line

EXIT_BAD_INPUT = 2
DRIVER_NOTES = ("One driver per sweep: a second launch or resume of a running sweep exits 2 "
                "naming the driver that holds it. Ctrl-C or SIGTERM stops the sweep cleanly "
                "(trials keep their last epoch's checkpoint, their runs are marked "
                "interrupted) and prints the resume command; exit status 130 (SIGINT) or 143 "
                "(SIGTERM). Exit status 0: every trial ended well; 1: the sweep ran to its "
                "end but some trials failed or a cell got no confirmation runs (a trial "
                "whose config, plugin or checkpoint cannot load in its worker fails at "
                "once, not retried); 2: bad input (a trial that asks "
                "for more CPUs or GPUs than a local Ray has included); 4: stopped because "
                "trials waited resources.pending_timeout_s for resources with none "
                "running (a cluster behind --address that never gave them; resume "
                "continues). sweep.json's state: running, interrupted, failed or done.")


def cmd_train(args: argparse.Namespace) -> int:
    from sweeper._train import train

    return train(args)


def cmd_methods(args: argparse.Namespace) -> int:
    from sweeper.catalog import catalog, format_catalog

    entries = catalog()
    print(json.dumps(entries, indent=2, default=str) if args.json else format_catalog(entries))
    return 0


# ----------------------------------------------------------------------------- sweeps


def cmd_launch(args: argparse.Namespace) -> int:
    from sweeper import search

    return search.launch(args.space, name=args.name, storage=args.storage,
                         tracking_uri=args.tracking_uri, address=args.address,
                         options=search.SweepOptions(verbose=0 if args.quiet else 1),
                         force=args.force, optuna_storage=args.optuna_storage)


def cmd_resume(args: argparse.Namespace) -> int:
    from sweeper import search

    return search.resume(args.name, storage=args.storage, address=args.address,
                         options=search.SweepOptions(verbose=0 if args.quiet else 1))


def cmd_status(args: argparse.Namespace) -> int:
    from sweeper import storage
    from sweeper.status import format_status, sweep_status

    manifest = storage.load_manifest(storage.resolve_storage(args.storage), args.name)
    print(format_status(sweep_status(manifest)))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from sweeper import storage
    from sweeper.tracking import Tracker, pending_path, sync_pending

    manifest = storage.load_manifest(storage.resolve_storage(args.storage), args.name)
    uri = resolve_tracking_uri(args.tracking_uri) if args.tracking_uri else manifest.tracking_uri
    tracker = Tracker(uri, manifest.name)
    tracker.check_reachable()
    sent, left = sync_pending(tracker, pending_path(manifest.sweep_dir))
    if left:
        print(f"sync {args.name}: {sent} MLflow writes sent, {left} still pending ({uri} "
              "stopped answering); run it again", file=sys.stderr)
        return 1
    print(f"sync {args.name}: {sent} MLflow writes sent; nothing pending", file=sys.stderr)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from sweeper.servers import run_mlflow_ui

    return run_mlflow_ui(resolve_tracking_uri(args.tracking_uri), args.port)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from sweeper import storage
    from sweeper.servers import (
        DASHBOARD_PATH,
        LOOPBACK,
        check_port_free,
        open_studies,
        serve_dashboard,
        shown_url,
    )

    manifest = storage.load_manifest(storage.resolve_storage(args.storage), args.name)
    check_port_free(args.port)
    url = manifest.studies_url
    studies, names = open_studies(url)
    print(f"optuna-dashboard for sweep {args.name!r} ({len(names)} cell studies in "
          f"{shown_url(url)}) on http://{LOOPBACK}:{args.port}{DASHBOARD_PATH} "
          "(Ctrl-C stops it)", file=sys.stderr)
    serve_dashboard(studies, args.port)
    return 0


# ---------------------------------------------------------------------------- analyze


EXIT_NOTHING_YET = 3


def cmd_analyze(args: argparse.Namespace) -> int:
    from sweeper import analysis

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out: {out} exists and is not a directory")
    try:
        summary, files = analysis.analyze(args.name, out, args.tracking_uri)
    except analysis.NothingToAnalyse as err:
        # Not bad input: the sweep is there but nothing has finished. A distinct status lets
        # scripts poll until there is something to analyse.
        print(f"caat-sweep analyze: {err}", file=sys.stderr)
        return EXIT_NOTHING_YET
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    if summary.masking:
        # The same warning as summary.md's last section: nobody should miss it.
        print(f"warning: {analysis.MASKING_TITLE}: {analysis.MASKING_TEXT}", file=sys.stderr)
        for line in summary.masking:
            print(f"warning: {line}", file=sys.stderr)
    n_cells = summary.selected["cell"].nunique()
    # The reviewer's checklist first: what a reader of the tables will ask before anything.
    if summary.checklist:
        print(f"{analysis.CHECKLIST_TITLE}:")
        for item in summary.checklist:
            print(f"  {item.line()}")
    print(f"analysed {n_cells} cells ({len(summary.selected)} runs) of sweep {args.name!r}:")
    for path in files:
        print(f"  {path}")
    print(f"open {out / 'summary.html'} in a browser for the tables and plots together")
    uri = resolve_tracking_uri(args.tracking_uri)
    log_to_parent_run(args.name, uri, files)
    print(f"every trial in the MLflow UI: caat-sweep ui --tracking-uri {uri} "
          "(then http://127.0.0.1:5000)")
    return 0


def log_to_parent_run(name: str, uri: str, files: list[Path]) -> None:
    """The outputs as artifacts of the sweep's parent run. Best effort: the local files are
    the analysis, so a failed upload is one warning line, never a failed command."""
    try:
        run_id = log_analysis(uri, name, files)
    except Exception as err:
        # Any artifact store MLflow supports (local, its server's proxy, S3, GCS, ...) can
        # fail here, each with exceptions of its own.
        print(f"warning: outputs not logged to MLflow ({one_line(err, 200)}); the files "
              "above are complete; run analyze again to log them", file=sys.stderr)
        return
    if run_id is None:
        print(f"warning: sweep {name!r} has no parent run in {uri}: outputs not logged to "
              "MLflow", file=sys.stderr)
        return
    print(f"logged as artifacts {ANALYSIS_ARTIFACTS}/ of the sweep's parent run {run_id} "
          "(MLflow UI: the run's Artifacts tab)")


# ------------------------------------------------------------------------------ parser


def package_version() -> str:
    """The installed distribution's version (pyproject.toml's), and torch's."""
    from importlib import metadata

    try:
        mine = metadata.version("caat-sweeper")
    except metadata.PackageNotFoundError:
        mine = "unknown (not installed: pip install -e .)"
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "missing"
    return f"{mine} (torch {torch})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caat-sweep",
        description="CAAT and its baselines: single trials, Ray Tune sweeps, MLflow tracking "
                    "and trade-off analysis.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="run one trial without Ray",
                       description="Run one trial without Ray. Writes OUT/metrics.json (final "
                                   "test metrics of the last and the best checkpoint, "
                                   "class-wise lists, resolved config), OUT/model.pt (the "
                                   "last epoch's weights) and OUT/model_best.pt (the best "
                                   "epoch's by eval.best_metric on validation). An "
                                   "interrupted run resumes from "
                                   "OUT/checkpoint when started again with the same config. "
                                   "Exit status 2, with one line naming the field, on a bad "
                                   "config or override, before anything is written; 130 "
                                   "after Ctrl-C (run it again to resume).")
    p.add_argument("config", nargs="?", default=None,
                   help="trial config YAML (omit for the defaults: Fashion-MNIST)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="dotted override, e.g. --set method.name=erm (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="replace a run of another config in OUT (finished or not)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("methods", help="every method (built-in and plugins) with its knobs",
                       description="List every training method, built-in or from an "
                                   "installed plugin (entry points caat_sweeper.methods), "
                                   "with its method.* knobs: type, default, bounds and what "
                                   "each does. A config or a space may set only the chosen "
                                   "method's own knobs. A plugin that does not import is "
                                   "listed with its error.")
    p.add_argument("--json", action="store_true", help="machine-readable, one list")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("launch", help="start a sweep (Ray Tune + Optuna + ASHA, MLflow)",
                       description="Validate SPACE (exit 2 on any problem, before anything "
                                   "is written), then run the sweep: per-cell Optuna "
                                   "studies with ASHA, then confirmation seeds. Shows Ray's "
                                   "live progress table; every trial is an MLflow run. "
                                   + DRIVER_NOTES)
    p.add_argument("space", help="search-space YAML, e.g. search_spaces/quick.yaml")
    p.add_argument("--name", help="sweep name (default: the space's `name`, else file stem)")
    _storage_arg(p)
    _tracking_arg(p)
    p.add_argument("--force", action="store_true",
                   help="run a space with more trials than its max_trials (default 10000)")
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="database of the cells' Optuna studies, one per cell named by its id "
                        "(any URL Optuna's RDBStorage takes, e.g. postgresql://user@host/db; "
                        "needed when --storage is not a local directory; default: "
                        "STORAGE/NAME/optuna.db)")
    _address_arg(p)
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("resume", help="continue an interrupted sweep",
                       description="Continue sweep NAME from its storage: unfinished trials "
                                   "resume from their checkpoints, the Optuna studies and "
                                   "MLflow runs are kept, then the confirmation phase "
                                   "runs. MLflow writes a tracking-server outage left pending "
                                   "are sent first (see `sync`). The space is the one stored "
                                   "at launch (a note says when the file has been edited "
                                   "since). " + DRIVER_NOTES)
    p.add_argument("name", help="sweep name")
    _storage_arg(p)
    _address_arg(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", help="trials per cell and the best so far",
                       description="Per cell and phase: trials completed, running, pruned, "
                                   "failed and interrupted, and the best selection metric so "
                                   "far; the sweep's state (running, interrupted, failed, "
                                   "done, or stopped: sweep.json says running but no live "
                                   "driver holds its lock) and its driver; and how many "
                                   "MLflow writes await `caat-sweep sync`, if any. Exit "
                                   "status 2: no such sweep, or its tracking store does not "
                                   "answer.")
    p.add_argument("name", help="sweep name")
    _storage_arg(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("ui", help="MLflow UI on 127.0.0.1",
                       description="Start the MLflow UI bound to 127.0.0.1 (no "
                                   "authentication: reach it through ssh -L from elsewhere).")
    _tracking_arg(p)
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("dashboard", help="optuna-dashboard of a sweep's studies on 127.0.0.1",
                       description="Serve optuna-dashboard over sweep NAME's Optuna studies, "
                                   "one per cell, named by the cell id (scenario/method): "
                                   "trials, optimisation history, parameter importances, "
                                   "Pareto fronts. It reads them where the sweep keeps them "
                                   "(STORAGE/NAME/optuna.db, or the --optuna-storage URL it "
                                   "was launched with), also while the sweep runs. Bound to "
                                   "127.0.0.1 (no authentication: reach it through ssh -L "
                                   "from elsewhere); the page can also edit notes and delete "
                                   "studies, so delete nothing of a sweep you may resume. "
                                   "Ctrl-C stops it.")
    p.add_argument("name", help="sweep name")
    _storage_arg(p)
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("analyze", help="summary tables and trade-off plots of a sweep",
                       description="Read a sweep's runs from MLflow and write summary tables "
                                   "(csv, md, tex, html) and plots into OUT, opening with a "
                                   "reviewer's checklist (also printed). Per cell: its "
                                   "confirmation runs aggregated over seeds (mean and 95% "
                                   "t-interval; differences from TRADES Holm-adjusted), "
                                   "else its best tuning run; the last and the best "
                                   "checkpoint (chosen on validation). The files written "
                                   "are also logged as "
                                   "artifacts analysis/ of the sweep's parent run (a re-run "
                                   "replaces those of the same name; if that upload fails, a "
                                   "warning, and the files in OUT are still complete). A "
                                   "sweep still running is analysed as far as it has got. "
                                   "Exit status 2: bad input (no such sweep or store, OUT "
                                   "not a directory); 3: nothing has finished yet.")
    p.add_argument("name", help="sweep name (MLflow experiment caat-sweep/NAME)")
    p.add_argument("--out", required=True, help="output directory")
    _tracking_arg(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("sync", help="send MLflow writes a tracking-server outage left behind",
                       description="Send the MLflow writes that sweep NAME's driver could not "
                                   "(its tracking server did not answer until the driver "
                                   "ended), kept in its storage as tracking_queue.json: runs, "
                                   "epochs, outcomes and the sweep's end status. Each is sent "
                                   "once. Exit status 1 when some are still pending.")
    p.add_argument("name", help="sweep name")
    _storage_arg(p)
    p.add_argument("--tracking-uri", default=None,
                   help="where the sweep's tracking server answers now, if it moved (default: "
                        "the URI the sweep was launched with, from its storage)")
    p.set_defaults(func=cmd_sync)
    return parser


def _storage_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=None,
                   help="directory or cloud URI (s3://, gs://) holding sweeps (default ./runs)")


# The order sweeper.contract.resolve_tracking_uri applies.
TRACKING_URI_HELP = ("MLflow tracking URI: http://host:port for a tracking server, or a SQLite "
                     f"store (default: ${TRACKING_URI_ENV} when set, else {DEFAULT_TRACKING_URI})")


def _tracking_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster to join, from one of its nodes (auto, or HEAD_IP:6379); "
                        "default: a local Ray on this machine's cores")
    p.add_argument("--quiet", action="store_true", help="no live progress table")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, ServiceUnavailable) as err:
        # Bad input, or a tracking server that does not answer: one line, exit 2.
        print(f"caat-sweep {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
