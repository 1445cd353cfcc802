"""summary.html: a standalone page with the reviewer's checklist, the tables of `_blocks`, the
notes, the plots (linked by relative path), the Optuna views and the masking alarm."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

from sweeper.analysis._blocks import (
    WILSON_INTRO,
    Table,
    blocks,
    caption,
    diff_intro,
    diff_text,
    headers,
)
from sweeper.analysis._checklist import CHECKLIST_TITLE
from sweeper.analysis._model import MASKING_TEXT, MASKING_TITLE, Summary, method_label

_STYLE = ("<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
          "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
          "th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}"
          "th:first-child,td:first-child{text-align:left}"
          "thead th{border-bottom:2px solid #333}img{max-width:100%;margin:1em 0}"
          ".note{color:#555}.checklist li.met{color:#060}.checklist li.not-met{color:#a00}"
          ".checklist li.unknown{color:#850}</style>")


def _views_html(views: Mapping[str, Sequence[tuple[str, str]]]) -> list[str]:
    """A section per cell linking its interactive Optuna views (relative paths)."""
    if not views:
        return []
    esc = html.escape
    parts = ["<h2>Optuna studies: interactive views</h2>",
             "<p class='note'>Per cell, Optuna's plots of its tuning trials (plotly; they load "
             "optuna/plotly.min.js, so keep the folder together). The same studies open in "
             "optuna-dashboard with the sweep's Optuna storage.</p>"]
    for cell, links in views.items():
        parts.append(f"<h3>{esc(cell)}</h3><ul class='views'>"
                     + "".join(f"<li><a href='{esc(path)}'>{esc(label)}</a></li>"
                               for label, path in links) + "</ul>")
    return parts


def _checklist_html(summary: Summary) -> list[str]:
    if not summary.checklist:
        return []
    items = "".join(f"<li class='{item.status.replace(' ', '-')}'>{html.escape(item.line())}"
                    "</li>" for item in summary.checklist)
    return [f"<h2>{html.escape(CHECKLIST_TITLE)}</h2>", f"<ul class='checklist'>{items}</ul>"]


def _row(cells: Sequence[str], bold: Sequence[bool] = ()) -> str:
    bold = list(bold) + [False] * (len(cells) - len(bold))
    return "<tr>" + "".join(f"<td><b>{c}</b></td>" if b else f"<td>{c}</td>"
                            for c, b in zip(cells, bold, strict=True)) + "</tr>"


def _head(cells: Sequence[str]) -> str:
    return "<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr></thead>"


def _table_html(table: Table, ref: str) -> list[str]:
    esc = html.escape
    parts = [] if table.checkpoint == "last" else [f"<h3>{esc(table.title)}</h3>"]
    parts.append(f"<table class='summary'>{_head(['method', 'n', *headers(table.metrics)])}"
                 "<tbody>")
    for i, method in enumerate(table.methods):
        name = esc(method_label(method)) + (" †" if table.pareto[i] else "")
        parts.append(_row([name, table.n[i], *(esc(v) for v, _ in table.cells[i])],
                          [False, False, *(best for _, best in table.cells[i])]))
    parts.append("</tbody></table>")
    if table.wilson_metrics:
        parts.append(f"<p class='note'>{esc(WILSON_INTRO)}</p>")
        parts.append(f"<table class='wilson'>"
                     f"{_head(['method', *headers(tuple(table.wilson_metrics))])}<tbody>")
        parts += [_row([esc(method_label(m)), *map(esc, w)])
                  for m, w in zip(table.methods, table.wilson, strict=True)]
        parts.append("</tbody></table>")
    if table.has_diffs:
        parts.append(f"<p>{esc(diff_intro(table, ref))}</p>")
        parts.append(f"<table class='diff'>"
                     f"{_head(['method', 'pairs', *headers(table.diff_metrics)])}<tbody>")
        for method, pairs, diffs in zip(table.diff_methods, table.diff_pairs, table.diffs,
                                        strict=True):
            parts.append(_row([esc(method_label(method)), pairs,
                               *(esc(diff_text(*d)) for d in diffs)]))
        parts.append("</tbody></table>")
    for note in table.diff_notes:
        prefix = "" if table.has_diffs else f"Difference from {ref}: "
        parts.append(f"<p class='note'>{esc(prefix + note)}</p>")
    return parts


def to_html(summary: Summary, title: str = "", plots: Sequence[str] = (),
            views: Mapping[str, Sequence[tuple[str, str]]] | None = None) -> str:
    """A standalone page: the checklist, the tables, the notes, the plots (linked by relative
    path) and, per cell, links to its interactive Optuna views (`views`: cell -> [(label,
    path)])."""
    esc = html.escape
    ref = method_label(summary.reference)
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'>",
             f"<title>{esc(title or 'Summary')}</title>", _STYLE, "</head><body>",
             f"<h1>{esc(title or 'Summary')}</h1>", *_checklist_html(summary),
             f"<p>{esc(caption(summary))}</p>"]
    for b in blocks(summary):
        parts.append(f"<h2>{esc(b.scenario)}"
                     + (f" <small>({esc(b.description)})</small>" if b.description else "")
                     + "</h2>")
        for table in b.tables:
            parts += _table_html(table, ref)
    if summary.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in summary.notes)
                     + "</ul>")
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f"<img src='{esc(p)}' alt='{esc(p)}'>" for p in plots]
    parts += _views_html(views or {})
    if summary.masking:
        parts.append(f"<div class='warning' style='color:#a00'><h2>Warning: "
                     f"{esc(MASKING_TITLE)}</h2><p>{esc(MASKING_TEXT)}</p><ul>"
                     + "".join(f"<li>{esc(w)}</li>" for w in summary.masking) + "</ul></div>")
    parts.append("</body></html>")
    return "\n".join(parts)
