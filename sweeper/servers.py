"""The two web UIs `caat-sweep` starts: the MLflow UI over a tracking store (`ui`) and
optuna-dashboard over a sweep's Optuna studies (`dashboard`).

Both bind to 127.0.0.1 only: neither has authentication, and optuna-dashboard can edit and
delete studies. From another machine, reach them through `ssh -L`.

The MLflow UI runs as `mlflow ui` in a child process: it is a server with worker processes
of its own. optuna-dashboard runs in this process, on its public `wsgi` app and the
standard library's threaded WSGI server (what its own command uses without gunicorn). We
open the studies' storage ourselves to refuse a bad one in one line, and the server gets
that open storage. A child process would open it a second time and start another
interpreter. It would also have to go through a console script that may not be on PATH, or
a private module, since optuna_dashboard has no `__main__`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from sweeper.contract import store_exists
from trainables.errors import ConfigError, one_line

LOOPBACK = "127.0.0.1"
DASHBOARD_PATH = "/dashboard"


def check_port_free(port: int, host: str = LOOPBACK) -> None:
    """Refuse a busy port before a server starts (it would fail after we printed a URL)."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port: {port} is not a port number (1-65535)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise _busy(host, port, err) from None


def _busy(host: str, port: int, err: OSError) -> ConfigError:
    return ConfigError(f"--port: {host}:{port} is not free ({err.strerror or err}); "
                       "choose another with --port")


# ------------------------------------------------------------------------------ MLflow UI


def run_mlflow_ui(tracking_uri: str, port: int) -> int:
    """`mlflow ui` on 127.0.0.1:`port` until it exits; its exit status."""
    check_port_free(port)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
           "--host", LOOPBACK, "--port", str(port)]
    print(f"MLflow UI for {tracking_uri} on http://{LOOPBACK}:{port} (Ctrl-C stops it)",
          file=sys.stderr)
    return run_process_group(cmd, "MLflow UI")


def run_process_group(cmd: list[str], what: str, grace_s: float = 10.0) -> int:
    """Run `cmd` in a process group of its own until it exits; its exit status.

    `mlflow ui` forks uvicorn, which forks workers and job runners. Killed by pid (`kill`,
    a batch system, nohup's parent), a plain child would be left serving the port, its
    workers orphaned. So SIGTERM and SIGINT to this process stop the whole group: SIGTERM,
    then SIGKILL for whatever is left after `grace_s`."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    stopped: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        stopped.append(signum)
        _signal_group(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_group(proc.pid, grace_s)
    if stopped:
        print(f"{what} stopped", file=sys.stderr)
        return 0
    return rc


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False when none of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM the group, wait up to `grace_s` for all of it to exit, SIGKILL the rest."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _signal_group(pgid, 0):
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)


# ------------------------------------------------------------------------ optuna-dashboard


def shown_url(url: str) -> str:
    """A database URL fit for a terminal: any password masked."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url  # not a URL SQLAlchemy parses: it has no password field to hide either


def open_studies(url: str) -> tuple[Any, list[str]]:
    """The Optuna RDB storage at `url` and the names of its studies. ConfigError, one line,
    when it does not open. A SQLite file that does not exist is refused rather than opened,
    because opening would create an empty database in the sweep's directory."""
    if not store_exists(url):
        raise ConfigError(f"Optuna storage {url}: no such file (the sweep has created no "
                          "study there yet)")
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        storage = optuna.storages.RDBStorage(url)
        names = sorted(s.study_name for s in storage.get_all_studies())
    except Exception as err:
        # Any SQLAlchemy dialect, driver or schema error; what matters is which URL failed.
        raise ConfigError(f"Optuna storage {shown_url(url)}: cannot open it "
                          f"({one_line(err, 200)})") from None
    return storage, names


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    # The page fetches several API routes at once. Daemon threads: Ctrl-C does not wait
    # for a browser's open requests.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # a line per request would bury the URL line; errors are still logged


def serve_dashboard(storage: Any, port: int, host: str = LOOPBACK) -> None:
    """Serve optuna-dashboard over `storage` on host:port until Ctrl-C."""
    from optuna_dashboard import wsgi

    app = wsgi(storage)
    try:
        server = make_server(host, port, app, server_class=_ThreadedServer,
                             handler_class=_QuietHandler)
    except OSError as err:  # taken since check_port_free looked
        raise _busy(host, port, err) from None
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("optuna-dashboard stopped", file=sys.stderr)
