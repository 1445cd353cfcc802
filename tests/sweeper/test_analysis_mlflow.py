"""`caat-sweep analyze` on a real MLflow store (temporary SQLite) with known runs.

Every number in summary.csv / .md / .tex / .html and classwise.csv is checked against a hand
computation from the values the store was written with (exact fractions; the paired t-test's
p-value from the closed forms of Student's t with 1 and 2 degrees of freedom), including
the selection of runs, the Pareto fronts and the best-per-column marks.
"""

import math
import subprocess
import sys
from fractions import Fraction
from html.parser import HTMLParser

import pandas as pd
import pytest
from analysis_store import (
    CONFIRM,
    DIRECTIONS,
    EMPTY_CLASS,
    LT10_ERM_SEED1,
    METRIC_KEYS,
    NOISY_TUNE,
    NUM_CLASSES,
    build_store,
    class_frac_anti,
    class_lists,
    class_mean_eps,
)

from sweeper.analysis import (
    DIRECTION_COLUMNS,
    DIRECTION_METRICS,
    class_direction_table,
    class_means_at_last,
    class_means_by_epoch,
    direction_means,
    load_classwise,
    load_directions,
    load_sweep,
    select_runs,
)
from sweeper.cli import main

LABELS = {"erm": "ERM", "pgd_at": "PGD-AT", "trades": "TRADES", "caat": "CAAT"}
ORDER = ["erm", "pgd_at", "trades", "caat"]
LOWER = {"class_natural_acc_std", "boundary_error"}
SCENARIOS = ["clean", "lt10", "noisy20"]  # clean first, then by noise rate / imbalance
NOT_APPLICABLE = "no confirmation runs (one best tuning run per cell): paired test not applicable"

# ------------------------------------------------------------------- the hand computation


def cells():
    """(scenario, method) -> (source, {seed: final test metrics}), picked by hand."""
    out = {key: ("confirm", dict(enumerate(seeds))) for key, seeds in CONFIRM.items()}
    # lt10/erm: only seed 1 finished; seed 2 is still running and must not count.
    out["lt10", "erm"] = ("confirm", {1: LT10_ERM_SEED1})
    # noisy20 has no confirmation runs: the completed tuning run with the highest final
    # val_robust_acc (ERM's pruned trial has .50 but pruned runs never count).
    out["noisy20", "erm"] = ("best tune", {1: NOISY_TUNE["erm"][1][1]})
    out["noisy20", "trades"] = ("best tune", {1: NOISY_TUNE["trades"][1][1]})
    out["noisy20", "caat"] = ("best tune", {0: NOISY_TUNE["caat"][0][1]})
    return out


CELLS = cells()


def exact(x) -> Fraction:
    return Fraction(str(x))


def stats(scenario, method, key):
    """(mean, sample std or None, n) of a cell's metric, exactly."""
    values = [exact(m[key]) for m in CELLS[scenario, method][1].values()]
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std, n


# t(0.975) of Student's t with 1, 2 degrees of freedom (tables): the 95% interval's factor.
T975 = {1: 12.706204736174704, 2: 4.302652729911275}


def half_width(sd: float, n: int) -> float:
    """Half-width of the 95% t-interval of a mean of n values with sample sd `sd`."""
    return T975[n - 1] * sd / math.sqrt(n)


def t_pvalue(t: float, df: int) -> float:
    """Two-sided p of Student's t, closed forms for 1 and 2 degrees of freedom."""
    if df == 1:
        return 1 - 2 / math.pi * math.atan(abs(t))
    assert df == 2
    return 1 - abs(t) / math.sqrt(2 + t * t)


def vs_trades(scenario, method, key):
    """(n_pairs, mean diff, t, p, note) of method - TRADES, paired by seed."""
    source, runs = CELLS[scenario, method]
    ref_source, ref = CELLS[scenario, "trades"]
    if "best tune" in (source, ref_source):
        return 0, None, None, None, NOT_APPLICABLE
    seeds = sorted(set(runs) & set(ref))
    d = [exact(runs[s][key]) - exact(ref[s][key]) for s in seeds]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return n, mean, None, None, f"paired test needs >= 2 seeds run by both methods, have {n}"
    if len(set(d)) == 1:
        return n, mean, None, None, "differences identical on every seed: t undefined"
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    t = float(mean) / (sd / math.sqrt(n))
    return n, mean, t, t_pvalue(t, n - 1), ""


def best_methods(scenario, key):
    methods = [m for s, m in CELLS if s == scenario]
    means = {m: stats(scenario, m, key)[0] for m in methods}
    target = (min if key in LOWER else max)(means.values())
    return {m for m, v in means.items() if v == target}


# Worked out on paper from the means (natural, robust): clean: PGD-AT (80, 40) is dominated by
# TRADES (82, 45); lt10: TRADES (71, 30.5) by CAAT (76, 33); noisy20: ERM (72, 2) by TRADES.
PARETO = {"clean": {"erm", "trades", "caat"}, "lt10": {"erm", "caat"},
          "noisy20": {"trades", "caat"}}


def methods_of(scenario):
    return [m for m in ORDER if (scenario, m) in CELLS]


def pct(x) -> str:
    return f"{100 * float(x):.2f}"


def cell_text(scenario, method, key) -> str:
    mean, std, n = stats(scenario, method, key)
    h = None if std is None else half_width(std, n)
    text = pct(mean) if std is None else (f"{pct(mean)} [{pct(float(mean) - h)}, "
                                          f"{pct(float(mean) + h)}]")
    return f"**{text}**" if method in best_methods(scenario, key) else text


def expected_rows(scenario):
    """The results table's rows as summary.md should print them."""
    rows = []
    for method in methods_of(scenario):
        source, runs = CELLS[scenario, method]
        n = str(len(runs)) + (" (tune)" if source == "best tune" else "")
        name = LABELS[method] + (" †" if method in PARETO[scenario] else "")
        rows.append([name, n] + [cell_text(scenario, method, k) for k in METRIC_KEYS])
    return rows


def holm_by_hand(scenario, method, key):
    """Holm's p of one comparison, over every comparison with a p in the scenario's table
    (statsmodels' multipletests), and the table's number of comparisons."""
    from statsmodels.stats.multitest import multipletests

    family = [(m, k) for s, m in CELLS if s == scenario and m != "trades" for k in METRIC_KEYS
              if vs_trades(s, m, k)[3] is not None]
    adjusted = multipletests([vs_trades(scenario, m, k)[3] for m, k in family],
                             method="holm")[1]
    return dict(zip(family, adjusted, strict=True)).get((method, key)), len(family)


def diff_interval(scenario, method, key):
    """The 95% t-interval of the mean paired difference (None without a test)."""
    n, mean, t, _, _ = vs_trades(scenario, method, key)
    if t is None:
        return None
    h = half_width(float(mean) / t * math.sqrt(n), n)  # sd = mean / t * sqrt(n)
    return float(mean) - h, float(mean) + h


def diff_text(scenario, method, key) -> str:
    _, mean, _, p, _ = vs_trades(scenario, method, key)
    if mean is None:
        return "n/a"
    text = f"{100 * float(mean):+.2f}"
    if p is not None:
        low, high = diff_interval(scenario, method, key)
        holm = holm_by_hand(scenario, method, key)[0]
        text += f" [{100 * low:+.2f}, {100 * high:+.2f}]"
        text += " (p<0.001" if p < 0.001 else f" (p={p:.3f}"
        text += ", Holm <0.001)" if holm < 0.001 else f", Holm {holm:.3f})"
    return text


def expected_diff_rows(scenario):
    return [[LABELS[m], str(vs_trades(scenario, m, "natural_acc")[0])]
            + [diff_text(scenario, m, k) for k in METRIC_KEYS]
            for m in methods_of(scenario) if m != "trades"]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def analysed(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "toy"
    assert main(["analyze", "toy", "--out", str(out), "--tracking-uri", store]) == 0
    return out


def md_tables(text):
    """summary.md -> {section title: [table rows as lists of cells]} (tables in order)."""
    sections, title, tables = {}, None, []
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:].split(" (")[0]
            tables = sections.setdefault(title, [])
        elif line.startswith("| ") and title:
            cells_ = [c.strip() for c in line.strip("|").split("|")]
            if cells_[0] == "method":
                tables.append([])
            else:
                tables[-1].append(cells_)
    return sections


# --------------------------------------------------------------------------------- tests


def test_summary_csv_matches_the_hand_computation(analysed):
    tidy = pd.read_csv(analysed / "summary.csv")
    assert len(tidy) == len(CELLS) * len(METRIC_KEYS)  # lt10/mwn only failed: no rows
    for (scenario, method), (source, _) in CELLS.items():
        for key in METRIC_KEYS:
            row = tidy[(tidy["scenario"] == scenario) & (tidy["method"] == method)
                       & (tidy["metric"] == f"test_{key}")]
            assert len(row) == 1, (scenario, method, key)
            row = row.iloc[0]
            mean, std, n = stats(scenario, method, key)
            assert row["mean"] == pytest.approx(float(mean), abs=1e-9)
            if std is None:
                assert math.isnan(row["std"])
                assert math.isnan(row["ci_low"]) and math.isnan(row["ci_high"])
            else:
                assert row["std"] == pytest.approx(std, abs=1e-9)
                h = half_width(std, n)
                assert (row["ci_low"], row["ci_high"]) == pytest.approx(
                    (float(mean) - h, float(mean) + h), abs=1e-9)
                assert row["checkpoint"] == "last"
            # The toy runs carry no per-class image counts: no Wilson interval.
            assert math.isnan(row["wilson_low"]) and math.isnan(row["wilson_n"])
            assert (row["n"], row["source"]) == (n, source)
            assert row["best"] == (method in best_methods(scenario, key))
            assert row["pareto"] == (method in PARETO[scenario])


def test_paired_tests_in_the_csv_match_the_hand_computation(analysed):
    tidy = pd.read_csv(analysed / "summary.csv", keep_default_na=False, na_values=[""])
    for (scenario, method) in CELLS:
        for key in METRIC_KEYS:
            row = tidy[(tidy["scenario"] == scenario) & (tidy["method"] == method)
                       & (tidy["metric"] == f"test_{key}")].iloc[0]
            if method == "trades":
                assert row["test_note"] == "reference"
                continue
            n_pairs, mean, t, p, note = vs_trades(scenario, method, key)
            assert row["n_pairs"] == n_pairs
            interval = diff_interval(scenario, method, key) or (None, None)
            holm, family = holm_by_hand(scenario, method, key)
            assert row["holm_n"] == family
            for column, want in (("diff_vs_trades", mean), ("t", t), ("p", p),
                                 ("diff_ci_low", interval[0]), ("diff_ci_high", interval[1]),
                                 ("p_holm", holm)):
                if want is None:
                    assert math.isnan(row[column]), (scenario, method, key, column)
                else:
                    assert row[column] == pytest.approx(float(want), rel=1e-7), (
                        scenario, method, key, column)
            assert (row["test_note"] if isinstance(row["test_note"], str) else "") == note


def test_the_hand_computation_covers_every_case():
    # The store is built so that each branch of the paired test is exercised.
    outcomes = {vs_trades(s, m, k)[4] for s, m in CELLS if m != "trades" for k in METRIC_KEYS}
    assert "" in outcomes and NOT_APPLICABLE in outcomes
    assert any("identical" in o for o in outcomes) and any(">= 2" in o for o in outcomes)
    assert {vs_trades("lt10", "caat", "natural_acc")[0], vs_trades("clean", "caat",
                                                                   "natural_acc")[0]} == {2, 3}


def test_markdown_tables_print_the_hand_computed_numbers(analysed):
    text = (analysed / "summary.md").read_text()
    tables = md_tables(text)
    assert list(tables) == ["Reviewer's checklist"] + SCENARIOS + ["Notes"]
    for scenario in SCENARIOS:
        assert tables[scenario][0] == expected_rows(scenario), scenario
    for scenario in ("clean", "lt10"):
        assert tables[scenario][1] == expected_diff_rows(scenario), scenario
    # noisy20 has no paired comparison at all: no difference table, a note instead.
    assert len(tables["noisy20"]) == 1
    assert f"- Difference from TRADES: ERM, CAAT: {NOT_APPLICABLE}" in text
    assert "## clean (no label noise, balanced)" in text
    assert "## noisy20 (uniform noise 20%, balanced)" in text
    assert "## lt10 (no label noise, imbalance ratio 10)" in text
    assert "- ERM: differences identical on every seed: t undefined" in text
    assert "- ERM: paired test needs >= 2 seeds run by both methods, have 1" in text
    # Each difference table names its Holm family's size: every comparison with a p in it.
    for scenario in ("clean", "lt10"):
        n = holm_by_hand(scenario, "caat", "natural_acc")[1]
        assert (f"p of the paired t-test, Holm-adjusted over {n} comparisons in this table):"
                in text.split(f"## {scenario} (")[1].split("\n## ")[0])
    assert holm_by_hand("clean", "caat", "natural_acc")[1] == 17  # ERM's 1 identical: no p


def test_notes_say_what_a_half_finished_sweep_is_missing(analysed):
    text = (analysed / "summary.md").read_text()
    assert "- half-finished sweep: analysed 10 of 11 cells; missing: lt10/mwn (1 failed)" in text
    assert ("- running trials in analysed cells (not counted): lt10/erm (1), noisy20/trades (1)"
            in text)
    assert "best tuning run (n = 1, by val_robust_acc)" in text


def tex_row(cells_, first_bold_marker="**"):
    out = []
    for i, c in enumerate(cells_):
        bold = c.startswith(first_bold_marker)
        c = c.strip("*")
        c = c.replace("-", "$-$") if i else c  # typeset minus signs in the values
        out.append(rf"\textbf{{{c}}}" if bold else c)
    return " & ".join(out) + r" \\"


def test_latex_tables_print_the_same_numbers(analysed):
    tex = (analysed / "summary.tex").read_text()
    lines = tex.splitlines()
    assert tex.count(r"\begin{tabular}") == 2 and tex.count(r"\end{table*}") == 2
    for scenario in SCENARIOS:
        for row in expected_rows(scenario):
            name = row[0].replace(" †", r"$^\dagger$").replace("_", r"\_")
            assert tex_row([name, *row[1:]]) in lines, (scenario, row)
    for scenario in ("clean", "lt10"):
        for row in expected_diff_rows(scenario):
            vals = [v.replace("-", "$-$").replace("(p", "($p").replace(", Holm ", "$, Holm $")
                    .replace(")", "$)") for v in row[2:]]
            assert " & ".join(row[:2] + vals) + r" \\" in lines, (scenario, row)
    assert r"\multicolumn{8}{l}{\textit{noisy20 (uniform noise 20\%, balanced)}} \\" in lines
    assert "% note: half-finished sweep: analysed 10 of 11 cells; missing: lt10/mwn (1 failed)" \
        in lines


class _Tables(HTMLParser):
    """Table rows of summary.html as cell texts, bold cells wrapped in ** like the markdown."""

    def __init__(self):
        super().__init__()
        self.tables, self.row, self.cell, self.in_head = [], None, None, False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "thead":
            self.in_head = True
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th"):
            self.cell = ""
        elif tag == "b" and self.cell is not None:
            self.cell += "**"

    def handle_endtag(self, tag):
        if tag == "thead":
            self.in_head = False
        elif tag == "b" and self.cell is not None:
            self.cell += "**"
        elif tag in ("td", "th"):
            self.row.append(self.cell)
            self.cell = None
        elif tag == "tr" and not self.in_head:
            self.tables[-1].append(self.row)

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def test_html_tables_print_the_same_numbers_and_show_the_plots(analysed):
    text = (analysed / "summary.html").read_text()
    parser = _Tables()
    parser.feed(text)
    expected = [expected_rows("clean"), expected_diff_rows("clean"), expected_rows("lt10"),
                expected_diff_rows("lt10"), expected_rows("noisy20")]
    assert parser.tables == expected
    for png in ("tradeoff.png", "classwise_clean.png", "vs_noise_rate.png",
                "caat_directions_clean.png", "caat_directions_lt10.png",
                "caat_directions_noisy20.png"):
        assert f"<img src='{png}'" in text


def test_classwise_csv_is_the_mean_of_the_selected_runs_lists(analysed):
    table = pd.read_csv(analysed / "classwise.csv")
    assert len(table) == len(CELLS) * 2 * NUM_CLASSES
    for (scenario, method), (_, runs) in CELLS.items():
        for kind in ("natural", "robust"):
            lists = [class_lists(m)[f"test_class_{kind}_acc"] for m in runs.values()]
            got = table[(table["scenario"] == scenario) & (table["method"] == method)
                        & (table["kind"] == kind)].sort_values("class")
            assert list(got["class"]) == list(range(NUM_CLASSES))
            for c in range(NUM_CLASSES):
                want = sum(exact(values[c]) for values in lists) / len(lists)
                assert got["mean"].iloc[c] == pytest.approx(float(want), abs=1e-9)
            assert set(got["n"]) == {len(runs)}


def test_selected_runs_are_the_hand_picked_ones(analysed):
    sel = pd.read_csv(analysed / "selected_runs.csv")
    got = {(r.scenario, r.method, r.seed, r.source) for r in sel.itertuples()}
    want = {(s, m, seed, source) for (s, m), (source, runs) in CELLS.items() for seed in runs}
    assert got == want and len(sel) == len(want)
    # The clean tuning runs with 99% everywhere were passed over for confirmation runs.
    assert (sel["test_natural_acc"] < 0.95).all()


def test_plots_are_written_and_not_empty(analysed):
    import matplotlib.image as mpimg

    pngs = sorted(p.name for p in analysed.glob("*.png"))
    assert pngs == ["caat_directions_clean.png", "caat_directions_lt10.png",
                    "caat_directions_noisy20.png", "classwise_clean.png", "classwise_lt10.png",
                    "classwise_noisy20.png", "tradeoff.png", "vs_imbalance_ratio.png",
                    "vs_noise_rate.png"]
    for name in pngs:
        path = analysed / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = mpimg.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 600
        # Not a blank canvas: a plot has many distinct colours.
        assert len({tuple(px) for px in image[::7, ::7].reshape(-1, image.shape[2])}) > 20


# ----------------------------------------------------------------- CAAT direction diagnostics


@pytest.fixture(scope="module")
def caat_runs(store):
    """The toy sweep's selected runs, their direction histories and classwise.json lists."""
    sweep = load_sweep("toy", store)
    selected = select_runs(sweep.runs, sweep.metric, sweep.mode)
    return selected, load_directions(store, selected), load_classwise(store, selected["run_id"])


def chosen_directions():
    """(scenario, method) -> the diagnostics of the selected seeds, by hand (CELLS' seeds)."""
    return {cell: {seed: per_seed[seed] for seed in CELLS[cell][1]}
            for cell, per_seed in DIRECTIONS.items()}


def test_direction_loader_returns_exactly_the_selected_caat_runs_histories(caat_runs):
    selected, history, _ = caat_runs
    assert list(history.columns) == DIRECTION_COLUMNS
    want = sorted((scenario, method, seed, metric, epoch, value)
                  for (scenario, method), seeds in chosen_directions().items()
                  for seed, logged in seeds.items()
                  for metric, values in logged.items() if metric in DIRECTION_METRICS
                  for epoch, value in enumerate(values, start=1))
    got = sorted(zip(history["scenario"], history["method"], history["seed"].astype(int),
                     history["metric"], history["epoch"], history["value"], strict=True))
    assert got == want
    # Each row belongs to the selected CAAT run of its seed; the decoy tuning run (0.99
    # everywhere) and metrics nobody asked for (meta_grad_norm) stay out.
    caat = selected[selected["method"].eq("caat")]
    assert (set(zip(history["run_id"], history["seed"], strict=True))
            == set(zip(caat["run_id"], caat["seed"], strict=True)))
    assert (history["value"] < 0.95).all()
    assert set(history["metric"]) == set(DIRECTION_METRICS)


def test_direction_means_over_seeds_are_the_hand_computed_ones(caat_runs):
    got = {(r.scenario, r.method, r.metric, r.epoch): (r.mean, r.n)
           for r in direction_means(caat_runs[1]).itertuples()}
    want = {}
    for (scenario, method), seeds in chosen_directions().items():
        for metric in DIRECTION_METRICS:
            runs = [logged[metric] for logged in seeds.values() if metric in logged]
            for e in range(len(runs[0]) if runs else 0):
                mean = sum(exact(values[e]) for values in runs) / len(runs)
                want[scenario, method, metric, e + 1] = (mean, len(runs))
    assert set(got) == set(want)
    for key, (mean, n) in want.items():
        assert got[key][0] == pytest.approx(float(mean), abs=1e-12), key
        assert got[key][1] == n, key
    # Two on paper: clean's share at epoch 3 is (.30 + .40 + .35) / 3; noisy20 has one run.
    assert got["clean", "caat", "frac_anti", 3][0] == pytest.approx(.35, abs=1e-12)
    assert got["noisy20", "caat", "anti_noisy_auc", 2] == (pytest.approx(.70, abs=1e-12), 1)
    assert ("clean", "caat", "frac_anti_noisy", 1) not in got  # no noise, no noisy share


def test_class_directions_are_the_means_of_the_selected_runs_histories(caat_runs):
    selected, _, classwise = caat_runs
    table = class_direction_table(selected, classwise)
    assert set(table["scenario"]) == {"clean", "lt10", "noisy20"}
    assert set(table["method"]) == {"caat"}
    lt10 = table[table["scenario"].eq("lt10")]
    seeds = sorted(CELLS["lt10", "caat"][1])
    by_epoch = class_means_by_epoch(lt10, "train_class_frac_anti")
    assert list(by_epoch.index) == [1, 2, 3]
    assert list(by_epoch.columns) == list(range(NUM_CLASSES))
    for epoch in (1, 2, 3):
        for c in range(NUM_CLASSES):
            # The class without samples (NaN) is left out of the mean, not counted as 0.
            values = [exact(class_frac_anti(s, epoch, c)) for s in seeds
                      if (s, epoch, c) != EMPTY_CLASS]
            assert by_epoch.at[epoch, c] == pytest.approx(float(sum(values) / len(values)),
                                                          abs=1e-12), (epoch, c)
    seed, epoch, cls = EMPTY_CLASS
    assert by_epoch.at[epoch, cls] == pytest.approx(
        (class_frac_anti(0, epoch, cls) + class_frac_anti(2, epoch, cls)) / 2, abs=1e-12)
    last = class_means_at_last(lt10, "train_class_mean_eps")
    assert list(last.index) == list(range(NUM_CLASSES))
    for c in range(NUM_CLASSES):
        values = [exact(class_mean_eps(s, 3, c)) for s in seeds if (s, 3, c) != EMPTY_CLASS]
        assert last[c] == pytest.approx(float(sum(values) / len(values)), abs=1e-12), c


def test_analyze_plots_caat_directions_per_cell_with_the_imbalance_panel(analysed):
    import matplotlib.image as mpimg

    shapes = {p.name.removeprefix("caat_directions_").removesuffix(".png"):
              mpimg.imread(p).shape[:2] for p in analysed.glob("caat_directions_*.png")}
    # One plot per CAAT cell with diagnostics (the non-CAAT cells get none).
    assert set(shapes) == {"clean", "lt10", "noisy20"}
    # The panels show in the layout: clean has the share alone; noisy20 the share and the
    # AUC side by side; lt10 (imbalance ratio 10) adds the per-class share and bound below.
    (h_clean, w_clean), (h_noisy, w_noisy), (h_lt10, w_lt10) = (
        shapes["clean"], shapes["noisy20"], shapes["lt10"])
    assert h_noisy == h_clean and w_noisy > 1.3 * w_clean
    assert h_lt10 > 1.6 * h_clean and w_lt10 == w_noisy


# ----------------------------------------------------------------------------- edge cases


def test_unknown_sweep_exits_2_listing_the_sweeps(store, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", "nope", "--out", str(out), "--tracking-uri", store]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("caat-sweep analyze: error: sweep 'nope': not in sqlite:///")
    assert err.endswith("sweeps there: early, empty, notrades, toy")
    assert not out.exists()


def test_missing_store_exits_2_and_creates_nothing(tmp_path, capsys):
    db = tmp_path / "missing.db"
    code = main(["analyze", "toy", "--out", str(tmp_path / "o"), "--tracking-uri",
                 f"sqlite:///{db}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"no MLflow store at {db}" in err
    assert not db.exists() and not (tmp_path / "o").exists()


def test_out_that_is_a_file_exits_2(store, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["analyze", "toy", "--out", str(tmp_path / "f"), "--tracking-uri", store]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_sweep_with_nothing_finished_says_so(store, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", "early", "--out", str(out), "--tracking-uri", store]) == 3
    err = capsys.readouterr().err.strip()
    assert err == ("caat-sweep analyze: nothing to analyse yet: 2 trials running, 0 completed, "
                   "0 pruned, 1 failed (first error: RuntimeError: CUDA out of memory "
                   "(simulated))")
    assert not out.exists()


def test_sweep_without_trials_says_so(store, tmp_path, capsys):
    assert main(["analyze", "empty", "--out", str(tmp_path / "o"), "--tracking-uri", store]) == 3
    assert capsys.readouterr().err.strip() == ("caat-sweep analyze: nothing to analyse yet: the "
                                               "sweep has no trials yet")


def test_sweep_without_trades_skips_the_paired_tests(store, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", "notrades", "--out", str(out), "--tracking-uri", store]) == 0
    err = capsys.readouterr().err
    assert "note: no TRADES runs in this sweep: paired tests skipped" in err
    tidy = pd.read_csv(out / "summary.csv")
    assert set(tidy["method"]) == {"erm", "caat"} and tidy["t"].isna().all()
    assert set(tidy["test_note"]) == {"no trades runs in this scenario"}
    text = (out / "summary.md").read_text()
    assert "Difference from TRADES (pp" not in text
    assert "- Difference from TRADES: ERM, CAAT: no trades runs in this scenario" in text
    # One scenario, noise and imbalance not varied: only the plots that make sense. Its CAAT
    # runs logged no direction diagnostics: no (empty) caat_directions plot either.
    assert sorted(p.name for p in out.glob("*.png")) == ["classwise_clean.png", "tradeoff.png"]


def test_a_real_process_analyses_and_fails_cleanly(store, tmp_path):
    out = tmp_path / "toy"
    proc = subprocess.run([sys.executable, "-m", "sweeper.cli", "analyze", "toy", "--out",
                           str(out), "--tracking-uri", store], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"{out}/summary.md" in proc.stdout and f"{out}/tradeoff.png" in proc.stdout
    assert "Traceback" not in proc.stderr and "Downloading" not in proc.stderr
    assert (out / "summary.csv").read_text().count("\n") == len(CELLS) * len(METRIC_KEYS) + 1

    proc = subprocess.run([sys.executable, "-m", "sweeper.cli", "analyze", "nope", "--out",
                           str(tmp_path / "x"), "--tracking-uri", store],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_unreachable_tracking_server_exits_2_quickly(tmp_path, capsys):
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    assert main(["analyze", "toy", "--out", str(tmp_path / "o"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot reach {uri}" in err
