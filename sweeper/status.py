"""`caat-sweep status`: per cell and phase, trials by outcome and the best value so far.

Read from MLflow (what the driver has recorded, live while it runs) and the sweep's
manifest (its cells), so it works from any machine that sees the storage and the tracking
server, while the sweep runs or after.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from sweeper import hints
from sweeper._write_queue import pending_count
from sweeper.contract import RUN_STATES, check_reachable, run_state, trial_runs
from sweeper.lock import driver_of
from sweeper.spaces import parse_space
from sweeper.storage import Manifest

# The table's columns: RUN_STATES with `completed` and `running` first (done and under way).
COUNTS = tuple(sorted(RUN_STATES, key=("completed", "running").__contains__, reverse=True))


@dataclass
class CellRow:
    cell: str
    phase: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    values: list[float] = field(default_factory=list)  # selection metric, completed trials


@dataclass
class SweepStatus:
    name: str
    state: str
    storage: str
    tracking_uri: str
    metric: str
    mode: str
    rows: list[CellRow]
    pending: int = 0  # MLflow writes waiting in storage for `caat-sweep sync`
    driver: str = ""  # who runs it, or why nobody does (`driver_line`)
    sync_command: str = "caat-sweep sync"


def driver_line(manifest: Manifest) -> str:
    """The driver as its lock tells it: a `running` sweep whose driver is gone (killed, or
    its machine lost) says so, with the command that continues it."""
    holder, alive = driver_of(manifest.storage, manifest.name)
    resume = f"`{hints.for_sweep('resume', manifest)}` continues it"
    if holder is not None and alive:
        return f"driver: pid {holder.pid} on {holder.host} since {holder.since}"
    if holder is not None and alive is None:
        return (f"driver: pid {holder.pid} on {holder.host} since {holder.since} (another "
                "host: cannot tell from here whether it is alive)")
    if manifest.state == "done":
        return ""
    if manifest.state != "running":
        return f"driver: none ({manifest.state}); {resume}"
    gone = f" (pid {holder.pid} on {holder.host} is gone)" if holder is not None else ""
    return (f"driver: none{gone}: it died before recording how the sweep ended (killed, or "
            f"its machine lost); {resume}")


def sweep_status(manifest: Manifest) -> SweepStatus:
    import yaml

    plan = parse_space(yaml.safe_load(manifest.space_text) or {}, text=manifest.space_text,
                       source=manifest.space_source, name=manifest.name)
    metric, mode = plan.space.selection.primary
    rows = {(c.id, phase): CellRow(c.id, phase) for c in plan.cells
            for phase in ("tune", "confirm")}
    check_reachable(manifest.tracking_uri)  # one line now, not minutes of client retries
    for run in trial_runs(manifest.tracking_uri, manifest.name):
        tags = run.data.tags
        row = rows.setdefault((tags.get("cell"), tags.get("phase")),
                              CellRow(tags.get("cell", "?"), tags.get("phase", "?")))
        row.counts[run_state(run.info.status, tags.get("outcome"))] += 1
        value = run.data.metrics.get(metric)
        if tags.get("outcome") == "completed" and value is not None and not math.isnan(value):
            row.values.append(value)
    holder, alive = driver_of(manifest.storage, manifest.name)
    state = manifest.state
    if state == "running" and not (holder is not None and alive is not False):
        state = "stopped"  # sweep.json says running, but no live driver holds it
    return SweepStatus(manifest.name, state, manifest.sweep_dir,
                       manifest.tracking_uri, metric, mode, list(rows.values()),
                       pending=pending_count(manifest.sweep_dir, manifest.name),
                       driver=driver_line(manifest),
                       sync_command=hints.for_sweep("sync", manifest))


def format_status(s: SweepStatus) -> str:
    head = [f"sweep {s.name}: {s.state}   storage {s.storage}   tracking {s.tracking_uri}",
            *([s.driver] if s.driver else []),
            f"selection: {s.metric} ({s.mode}); tune: best so far; confirm: mean ± std"]
    width = max([len(r.cell) for r in s.rows] + [4])
    cols = f"{'cell':<{width}}  {'phase':<7}" + "".join(f" {c:>11}" for c in COUNTS)
    lines = [*head, "", cols + f"  {s.metric}", "-" * (len(cols) + len(s.metric) + 2)]
    for r in s.rows:
        counts = "".join(f" {r.counts[c]:>11}" for c in COUNTS)
        lines.append(f"{r.cell:<{width}}  {r.phase:<7}{counts}  {_value(r, s.mode)}")
    if s.pending:
        lines += ["", f"tracking: {s.pending} MLflow writes (a tracking-server outage) are not "
                      f"in the table yet; `{s.sync_command}` sends them"]
    return "\n".join(lines)


def _value(row: CellRow, mode: str) -> str:
    if not row.values:
        return "-"
    if row.phase == "confirm":
        std = statistics.stdev(row.values) if len(row.values) > 1 else 0.0
        return f"{statistics.fmean(row.values):.4f} ± {std:.4f} (n={len(row.values)})"
    return f"{(max if mode == 'max' else min)(row.values):.4f}"
