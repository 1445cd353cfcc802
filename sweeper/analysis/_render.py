"""The summary tables as Markdown, LaTeX (booktabs) and a standalone HTML page: one
format-neutral block per scenario, the writers only add markup."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from sweeper.analysis._model import (
    METRICS,
    Summary,
    method_key,
    method_label,
)
from sweeper.analysis._summary import (
    MASKING_TEXT,
    MASKING_TITLE,
    describe_scenario,
    robust_attack,
)
from sweeper.contract import AUTOATTACK_METRICS

# Column headers of METRICS and AUTOATTACK_METRICS, in order.
METRIC_LABELS = {
    **dict(zip(METRICS, ("natural", "robust", "worst-class natural", "worst-class robust",
                         "class std", "boundary error"), strict=True)),
    **dict(zip(AUTOATTACK_METRICS, ("AutoAttack", "worst-class AutoAttack", "PGD-AA gap"),
               strict=True))}
# Shown in every table when a value cannot be computed; the notes say why.
NA = "n/a"


def _pct(value: float) -> str:
    return NA if value is None or pd.isna(value) else f"{100 * value:.2f}"


def _signed_pct(value: float) -> str:
    return NA if value is None or pd.isna(value) else f"{100 * value:+.2f}"


def _p(value: float) -> str:
    """'p=0.035' or 'p<0.001'; NA when there is no test."""
    if value is None or pd.isna(value):
        return NA
    return "p<0.001" if value < 0.001 else f"p={value:.3f}"


@dataclass
class _Block:
    """One scenario's table in a format-neutral form; the writers only add markup."""

    scenario: str
    description: str
    methods: list[str]
    n: list[str]  # "3", or "1 (tune)" for a cell reported by its best tuning run
    cells: list[list[tuple[str, str, bool]]]  # per method, per metric: (mean, std, best)
    pareto: list[bool]
    diffs: list[list[tuple[str, str]]]  # per non-reference method, per metric: (diff, p)
    diff_methods: list[str]
    diff_pairs: list[str]
    diff_notes: list[str]

    @property
    def has_diffs(self) -> bool:
        """Whether any difference from the reference could be computed (else: notes only)."""
        return any(d != NA for row in self.diffs for d, _ in row)


def _blocks(summary: Summary) -> list[_Block]:
    blocks = []
    tidy = summary.tidy
    ref = summary.reference
    diff_col = f"diff_vs_{ref}"
    for _, srow in summary.scenarios.iterrows():
        sub = tidy[tidy["scenario"].eq(srow["scenario"])]
        methods = sorted(sub["method"].unique(), key=method_key)
        block = _Block(scenario=srow["scenario"], description=describe_scenario(srow),
                       methods=methods, n=[], cells=[], pareto=[], diffs=[], diff_methods=[],
                       diff_pairs=[], diff_notes=[])
        by_note: dict[str, list[str]] = {}
        for method in methods:
            rows = sub[sub["method"].eq(method)].set_index("metric")
            best_tune = rows["source"].iloc[0] == "best tune"
            block.n.append(f"{int(rows['n'].iloc[0])}" + (" (tune)" if best_tune else ""))
            block.pareto.append(bool(rows["pareto"].iloc[0]))
            block.cells.append([(_pct(rows.at[m, "mean"]), _pct(rows.at[m, "std"]),
                                 bool(rows.at[m, "best"])) if m in rows.index else (NA, NA, False)
                                for m in summary.metrics])
            if method == ref:
                continue
            block.diff_methods.append(method)
            block.diff_pairs.append(str(int(rows["n_pairs"].iloc[0]))
                                    if not pd.isna(rows["n_pairs"].iloc[0]) else "0")
            block.diffs.append([(_signed_pct(rows.at[m, diff_col]), _p(rows.at[m, "p"]))
                                if m in rows.index else (NA, NA) for m in summary.metrics])
            for note in sorted({n for n in rows["test_note"].dropna() if n}):
                by_note.setdefault(note, []).append(method_label(method))
        block.diff_notes = [f"{', '.join(names)}: {note}" for note, names in by_note.items()]
        blocks.append(block)
    return blocks


def _value(mean: str, std: str) -> str:
    return mean if std == NA or mean == NA else f"{mean} ± {std}"


def _headers(summary: Summary) -> list[str]:
    return [METRIC_LABELS[m] for m in summary.metrics]


def _caption(summary: Summary) -> str:
    text = ("Test-set metrics in %: mean ± std over seeds (n runs). Best per column in bold "
            "(highest accuracy; lowest class std and boundary error). † = on the scenario's "
            "natural-vs-robust Pareto front. Differences from "
            f"{method_label(summary.reference)} are in percentage points, paired by seed, "
            "with the paired t-test's p-value. Robust: accuracy under "
            f"{robust_attack(summary.selected)}, in pixel space [0, 1].")
    if any(m in AUTOATTACK_METRICS for m in summary.metrics):
        text += (" AutoAttack: accuracy under AutoAttack on a fixed test subset; PGD-AA gap: "
                 "PGD's robust accuracy minus AutoAttack's on that subset (lowest in bold; "
                 "a large one means gradient masking).")
    return text


def _masking_lines(summary: Summary) -> list[str]:
    """The masking alarm as Markdown, at the end of summary.md (nothing when none)."""
    if not summary.masking:
        return []
    return ([f"## Warning: {MASKING_TITLE}", "", MASKING_TEXT, ""]
            + [f"- {line}" for line in summary.masking] + [""])


def to_markdown(summary: Summary, title: str = "") -> str:
    lines = [f"# {title}" if title else "# Summary", "", _caption(summary), ""]
    ref = method_label(summary.reference)
    for b in _blocks(summary):
        lines += [f"## {b.scenario}" + (f" ({b.description})" if b.description else ""), ""]
        lines.append("| method | n | " + " | ".join(_headers(summary)) + " |")
        lines.append("|---|---:|" + "---:|" * len(summary.metrics))
        for i, method in enumerate(b.methods):
            name = method_label(method) + (" †" if b.pareto[i] else "")
            vals = [(f"**{_value(m, s)}**" if best else _value(m, s)) for m, s, best in b.cells[i]]
            lines.append(f"| {name} | {b.n[i]} | " + " | ".join(vals) + " |")
        lines.append("")
        if b.has_diffs:
            lines += [f"Difference from {ref} (pp; p of the paired t-test):", ""]
            lines.append("| method | pairs | " + " | ".join(_headers(summary)) + " |")
            lines.append("|---|---:|" + "---:|" * len(summary.metrics))
            for method, pairs, diffs in zip(b.diff_methods, b.diff_pairs, b.diffs, strict=True):
                vals = [d if p == NA else f"{d} ({p})" for d, p in diffs]
                lines.append(f"| {method_label(method)} | {pairs} | " + " | ".join(vals) + " |")
            lines.append("")
        if b.diff_notes:
            prefix = "" if b.has_diffs else f"Difference from {ref}: "
            lines += [f"- {prefix}{n}" for n in b.diff_notes] + [""]
    if summary.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in summary.notes] + [""]
    return "\n".join(lines + _masking_lines(summary))


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}", "±": r"$\pm$", "†": r"$^\dagger$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(summary: Summary, title: str = "") -> str:
    """Two booktabs tables (results; differences from the reference), one block per scenario."""
    ncol = 2 + len(summary.metrics)
    spec = "l" + "r" * (ncol - 1)
    head = " & ".join(["Method", "$n$"] + [tex_escape(h) for h in _headers(summary)]) + r" \\"
    blocks = _blocks(summary)
    ref = method_label(summary.reference)

    def table(caption: str, label: str, body: list[str], header: str) -> list[str]:
        return [r"\begin{table*}[t]", r"\centering", r"\small",
                rf"\caption{{{tex_escape(caption)}}}", rf"\label{{{label}}}",
                rf"\begin{{tabular}}{{{spec}}}", r"\toprule", header, *body,
                r"\bottomrule", r"\end{tabular}", r"\end{table*}", ""]

    body: list[str] = []
    for b in blocks:
        body += [r"\midrule", rf"\multicolumn{{{ncol}}}{{l}}{{\textit{{"
                 + tex_escape(b.scenario + (f" ({b.description})" if b.description else ""))
                 + r"}} \\", r"\midrule"]
        for i, method in enumerate(b.methods):
            name = tex_escape(method_label(method)) + (r"$^\dagger$" if b.pareto[i] else "")
            vals = []
            for m, s, best in b.cells[i]:
                v = m if s == NA or m == NA else rf"{m} $\pm$ {s}"
                vals.append(rf"\textbf{{{v}}}" if best else v)
            body.append(" & ".join([name, str(b.n[i]), *vals]) + r" \\")
    out = [f"% {tex_escape(title)}" if title else "% summary",
           "% needs \\usepackage{booktabs}", ""]
    out += table(_caption(summary), "tab:summary", body, head)

    diff_body: list[str] = []
    for b in blocks:
        if not b.has_diffs:
            continue
        diff_body += [r"\midrule", rf"\multicolumn{{{ncol}}}{{l}}{{\textit{{"
                      + tex_escape(b.scenario) + r"}} \\", r"\midrule"]
        for method, pairs, diffs in zip(b.diff_methods, b.diff_pairs, b.diffs, strict=True):
            # A typeset minus, not a hyphen.
            vals = [(d if p == NA else f"{d} (${p}$)").replace("-", "$-$", 1) for d, p in diffs]
            diff_body.append(" & ".join([tex_escape(method_label(method)), pairs, *vals])
                             + r" \\")
    if diff_body:
        diff_head = head.replace("$n$", "pairs")
        out += table(f"Difference from {ref} in percentage points (paired by seed) and the "
                     "p-value of the paired t-test; n/a: fewer than 2 paired seeds.",
                     "tab:vs-reference", diff_body, diff_head)
    # Why a value is n/a, per scenario, and what the sweep is missing: as comments, so the
    # file still compiles as is.
    notes = [f"{b.scenario}: {n}" for b in blocks for n in b.diff_notes] + summary.notes
    out += [f"% note: {n}" for n in notes]
    out += [f"% warning: {w}" for w in ([f"{MASKING_TITLE}: {MASKING_TEXT}"] if summary.masking
                                        else []) + summary.masking]
    return "\n".join(out) + "\n"


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


def to_html(summary: Summary, title: str = "", plots: Sequence[str] = (),
            views: Mapping[str, Sequence[tuple[str, str]]] | None = None) -> str:
    """A standalone page: the tables, the notes, the plots (linked by relative path) and,
    per cell, links to its interactive Optuna views (`views`: cell -> [(label, path)])."""
    esc = html.escape
    ref = method_label(summary.reference)
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'>",
             f"<title>{esc(title or 'Summary')}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
             "th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}"
             "th:first-child,td:first-child{text-align:left}"
             "thead th{border-bottom:2px solid #333}img{max-width:100%;margin:1em 0}"
             ".note{color:#555}</style></head><body>",
             f"<h1>{esc(title or 'Summary')}</h1>", f"<p>{esc(_caption(summary))}</p>"]
    head = "".join(f"<th>{esc(h)}</th>" for h in ["method", "n", *_headers(summary)])
    for b in _blocks(summary):
        parts.append(f"<h2>{esc(b.scenario)}"
                     + (f" <small>({esc(b.description)})</small>" if b.description else "")
                     + "</h2>")
        parts.append(f"<table class='summary'><thead><tr>{head}</tr></thead><tbody>")
        for i, method in enumerate(b.methods):
            name = esc(method_label(method)) + (" †" if b.pareto[i] else "")
            tds = "".join(f"<td>{'<b>' if best else ''}{esc(_value(m, s))}"
                          f"{'</b>' if best else ''}</td>" for m, s, best in b.cells[i])
            parts.append(f"<tr><td>{name}</td><td>{b.n[i]}</td>{tds}</tr>")
        parts.append("</tbody></table>")
        if b.has_diffs:
            parts.append(f"<p>Difference from {esc(ref)} (pp; p of the paired t-test):</p>")
            dhead = head.replace("<th>n</th>", "<th>pairs</th>", 1)
            parts.append(f"<table class='diff'><thead><tr>{dhead}</tr></thead><tbody>")
            for method, pairs, diffs in zip(b.diff_methods, b.diff_pairs, b.diffs, strict=True):
                tds = "".join(f"<td>{esc(d if p == NA else f'{d} ({p})')}</td>"
                              for d, p in diffs)
                parts.append(f"<tr><td>{esc(method_label(method))}</td><td>{pairs}</td>"
                             f"{tds}</tr>")
            parts.append("</tbody></table>")
        for note in b.diff_notes:
            prefix = "" if b.has_diffs else f"Difference from {ref}: "
            parts.append(f"<p class='note'>{esc(prefix + note)}</p>")
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
