"""The summary tables as Markdown and LaTeX (booktabs): the format-neutral blocks of `_blocks`
with markup added. The standalone HTML page is `_html`."""

from __future__ import annotations

from sweeper.analysis._blocks import (
    METRIC_LABELS,
    NA,
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

__all__ = ["METRIC_LABELS", "NA", "tex_escape", "to_latex", "to_markdown"]


def _masking_lines(summary: Summary) -> list[str]:
    """The masking alarm as Markdown, at the end of summary.md (nothing when none)."""
    if not summary.masking:
        return []
    return ([f"## Warning: {MASKING_TITLE}", "", MASKING_TEXT, ""]
            + [f"- {line}" for line in summary.masking] + [""])


def checklist_markdown(summary: Summary) -> list[str]:
    """The reviewer's checklist, one line per item, for the top of summary.md."""
    if not summary.checklist:
        return []
    return [f"## {CHECKLIST_TITLE}", ""] + [f"- {item.line()}" for item in summary.checklist] + [
        ""]


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_table(table: Table, ref: str, title: str | None) -> list[str]:
    lines = [f"### {title}", ""] if title else []
    lines.append(_md_row(["method", "n", *headers(table.metrics)]))
    lines.append("|---|---:|" + "---:|" * len(table.metrics))
    for i, method in enumerate(table.methods):
        name = method_label(method) + (" †" if table.pareto[i] else "")
        vals = [f"**{v}**" if best else v for v, best in table.cells[i]]
        lines.append(_md_row([name, table.n[i], *vals]))
    lines.append("")
    if table.wilson_metrics:
        lines += [WILSON_INTRO, "", _md_row(["method", *headers(tuple(table.wilson_metrics))]),
                  "|---|" + "---:|" * len(table.wilson_metrics)]
        lines += [_md_row([method_label(m), *w]) for m, w in zip(table.methods, table.wilson,
                                                                 strict=True)] + [""]
    if table.has_diffs:
        lines += [diff_intro(table, ref), ""]
        lines.append(_md_row(["method", "pairs", *headers(table.diff_metrics)]))
        lines.append("|---|---:|" + "---:|" * len(table.diff_metrics))
        for method, pairs, diffs in zip(table.diff_methods, table.diff_pairs, table.diffs,
                                        strict=True):
            vals = [diff_text(*d) for d in diffs]
            lines.append(_md_row([method_label(method), pairs, *vals]))
        lines.append("")
    if table.diff_notes:
        prefix = "" if table.has_diffs else f"Difference from {ref}: "
        lines += [f"- {prefix}{n}" for n in table.diff_notes] + [""]
    return lines


def to_markdown(summary: Summary, title: str = "") -> str:
    lines = [f"# {title}" if title else "# Summary", "", *checklist_markdown(summary),
             caption(summary), ""]
    ref = method_label(summary.reference)
    for b in blocks(summary):
        lines += [f"## {b.scenario}" + (f" ({b.description})" if b.description else ""), ""]
        for table in b.tables:
            # The last epoch's table is the scenario's own; a second one names its weights.
            lines += _md_table(table, ref, table.title if table.checkpoint != "last" else None)
    if summary.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in summary.notes] + [""]
    return "\n".join(lines + _masking_lines(summary))


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}", "±": r"$\pm$", "†": r"$^\dagger$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def _tex_number(text: str) -> str:
    """A table value with typeset minus signs (not hyphens); n/a as it is."""
    return text.replace("-", "$-$")


def _tex_diff(diff: str, p: str, holm: str) -> str:
    if p == NA:
        return _tex_number(diff)
    return f"{_tex_number(diff)} (${p}$, Holm ${holm}$)"


def _tex_table(caption_text: str, label: str, spec: str, header: str,
               body: list[str]) -> list[str]:
    return [r"\begin{table*}[t]", r"\centering", r"\small",
            rf"\caption{{{tex_escape(caption_text)}}}", rf"\label{{{label}}}",
            rf"\begin{{tabular}}{{{spec}}}", r"\toprule", header, *body,
            r"\bottomrule", r"\end{tabular}", r"\end{table*}", ""]


def _tex_heading(ncol: int, text: str) -> list[str]:
    return [r"\midrule", rf"\multicolumn{{{ncol}}}{{l}}{{\textit{{{tex_escape(text)}}}}} \\",
            r"\midrule"]


def _tex_results(tables: list[tuple[str, Table]], caption_text: str, label: str) -> list[str]:
    """One booktabs table of one checkpoint's results, a block per scenario."""
    metrics = tables[0][1].metrics
    ncol = 2 + len(metrics)
    head = " & ".join(["Method", "$n$", *map(tex_escape, headers(metrics))]) + r" \\"
    body: list[str] = []
    for heading, t in tables:
        body += _tex_heading(ncol, heading)
        for i, method in enumerate(t.methods):
            name = tex_escape(method_label(method)) + (r"$^\dagger$" if t.pareto[i] else "")
            vals = [rf"\textbf{{{_tex_number(v)}}}" if best else _tex_number(v)
                    for v, best in t.cells[i]]
            body.append(" & ".join([name, t.n[i], *vals]) + r" \\")
    return _tex_table(caption_text, label, "l" + "r" * (ncol - 1), head, body)


def _tex_diffs(tables: list[tuple[str, Table]], ref: str, label: str) -> list[str]:
    """One booktabs table of one checkpoint's differences from the reference; each
    scenario's block is one Holm family and names its count."""
    tables = [(h, t) for h, t in tables if t.has_diffs]
    if not tables:
        return []
    metrics = tables[0][1].diff_metrics
    ncol = 2 + len(metrics)
    head = " & ".join(["Method", "pairs", *map(tex_escape, headers(metrics))]) + r" \\"
    body: list[str] = []
    for heading, t in tables:
        body += _tex_heading(ncol, f"{heading} (Holm over {t.holm_n} comparisons)")
        for method, pairs, diffs in zip(t.diff_methods, t.diff_pairs, t.diffs, strict=True):
            body.append(" & ".join([tex_escape(method_label(method)), pairs,
                                    *(_tex_diff(*d) for d in diffs)]) + r" \\")
    what = tables[0][1].title
    return _tex_table(f"Difference from {ref} in percentage points, {what}: the mean "
                      "difference over paired seeds, its 95% t-interval, the paired t-test's "
                      "p and p Holm-adjusted over the comparisons of the scenario's block "
                      "(count in its heading); n/a: fewer than 2 paired seeds.", label,
                      "l" + "r" * (ncol - 1), head, body)


def to_latex(summary: Summary, title: str = "") -> str:
    """Booktabs tables, one block per scenario in each: the last epoch's results and their
    differences from the reference, then the best checkpoint's when runs report one."""
    ref = method_label(summary.reference)
    all_blocks = blocks(summary)
    out = [f"% {tex_escape(title)}" if title else "% summary",
           "% needs \\usepackage{booktabs}", ""]
    out += [f"% checklist: {item.line()}" for item in summary.checklist]
    for k, checkpoint in enumerate(("last", "best")):
        tables = [(b.scenario + (f" ({b.description})" if b.description else ""),
                   b.tables[k]) for b in all_blocks if len(b.tables) > k]
        if not tables:
            continue
        suffix = "" if checkpoint == "last" else "-best"
        text = caption(summary) if checkpoint == "last" else (
            "Best checkpoint (chosen on validation): the metrics of each run's weights of its "
            "best epoch by a validation metric, as in the last epoch's table; robust "
            "overfitting gap: its robust accuracy minus the last epoch's.")
        out += _tex_results(tables, text, f"tab:summary{suffix}")
        out += _tex_diffs(tables, ref, f"tab:vs-reference{suffix}")
    # Why a value is n/a, per scenario, and what the sweep is missing: as comments, so the
    # file still compiles as is.
    notes = [f"{b.scenario}: {n}" for b in all_blocks for t in b.tables for n in t.diff_notes]
    out += [f"% note: {n}" for n in notes + summary.notes]
    out += [f"% warning: {w}" for w in ([f"{MASKING_TITLE}: {MASKING_TEXT}"] if summary.masking
                                        else []) + summary.masking]
    return "\n".join(out) + "\n"
