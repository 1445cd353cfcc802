"""`caat-sweep status`: per cell and phase, trials by outcome and the best value so far.

Read from MLflow (what the driver has recorded, live while it runs) and the sweep's
manifest (its cells), so it works from any machine that sees the storage and the tracking
server, while the sweep runs or after.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from sweeper._write_queue import pending_count
from sweeper.contract import RUN_STATES, check_reachable, run_state, trial_runs
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
    return SweepStatus(manifest.name, manifest.state, manifest.sweep_dir,
                       manifest.tracking_uri, metric, mode, list(rows.values()),
                       pending=pending_count(manifest.sweep_dir, manifest.name))


def format_status(s: SweepStatus) -> str:
    head = [f"sweep {s.name}: {s.state}   storage {s.storage}   tracking {s.tracking_uri}",
            f"selection: {s.metric} ({s.mode}); tune: best so far; confirm: mean ± std"]
    width = max([len(r.cell) for r in s.rows] + [4])
    cols = f"{'cell':<{width}}  {'phase':<7}" + "".join(f" {c:>11}" for c in COUNTS)
    lines = [*head, "", cols + f"  {s.metric}", "-" * (len(cols) + len(s.metric) + 2)]
    for r in s.rows:
        counts = "".join(f" {r.counts[c]:>11}" for c in COUNTS)
        lines.append(f"{r.cell:<{width}}  {r.phase:<7}{counts}  {_value(r, s.mode)}")
    if s.pending:
        lines += ["", f"tracking: {s.pending} MLflow writes (a tracking-server outage) are not "
                      f"in the table yet; `caat-sweep sync {s.name}` sends them"]
    return "\n".join(lines)


def _value(row: CellRow, mode: str) -> str:
    if not row.values:
        return "-"
    if row.phase == "confirm":
        std = statistics.stdev(row.values) if len(row.values) > 1 else 0.0
        return f"{statistics.fmean(row.values):.4f} ± {std:.4f} (n={len(row.values)})"
    return f"{(max if mode == 'max' else min)(row.values):.4f}"
