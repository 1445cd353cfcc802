"""AutoAttack in the analysis (issue 12): its columns appear only when the selected runs carry
its metrics, the PGD - AutoAttack gap is a lower-is-better column, and a cell whose mean gap
exceeds 3 points raises the masking alarm at the end of summary.md / .html and on stderr.
Every expected number is computed by hand from analysis_store.AA_CONFIRM (AutoAttack) and
CONFIRM (the clean scenario's other metrics)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from analysis_store import AA_CONFIRM, autoattack_class_list, build_autoattack_store

from sweeper.analysis import MASKING_GAP, MASKING_TEXT, masking_alarms
from sweeper.cli import main

AA_KEYS = ("test_autoattack_acc", "test_worst_class_autoattack_acc", "test_pgd_autoattack_gap")
AA_HEADERS = ["AutoAttack", "worst-class AutoAttack", "PGD-AA gap"]
BASE_HEADERS = ["natural", "robust", "worst-class natural", "worst-class robust", "class std",
                "boundary error"]
# CAAT: AutoAttack 37% on average, gap 5 points, so PGD 42% on the same images.
ALARM = ("clean/caat: PGD 42.00% vs AutoAttack 37.00% on the same test images, a gap of "
         "5.00 points (mean of 3 runs)")
WARNING_SECTION = ["## Warning: possible gradient masking", "", MASKING_TEXT, "",
                   f"- {ALARM}", ""]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_autoattack_store(tmp_path_factory.mktemp("mlflow-aa"))


def ci_text(values) -> str:
    """'mean [low, high]' in % as the tables print it, from scipy's t-interval."""
    from scipy import stats

    x = np.asarray(values, float)
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    return f"{100 * x.mean():.2f} [{100 * low:.2f}, {100 * high:.2f}]"


def _analyze(store, name, out, capsys):
    assert main(["analyze", name, "--out", str(out), "--tracking-uri", store]) == 0
    return capsys.readouterr().err


def _header(md: str) -> list[str]:
    row = next(line for line in md.splitlines() if line.startswith("| method | n |"))
    return [c.strip() for c in row.strip("|").split("|")][2:]


def _row(md: str, label: str) -> list[str]:
    row = next(line for line in md.splitlines() if line.startswith(f"| {label} "))
    return [c.strip() for c in row.strip("|").split("|")][2:]


def test_autoattack_columns_and_the_alarm(store, tmp_path, capsys):
    out = tmp_path / "aa"
    err = _analyze(store, "aa", out, capsys)
    tidy = pd.read_csv(out / "summary.csv")
    for method, seeds in AA_CONFIRM.items():
        for key in AA_KEYS:
            row = tidy[tidy["method"].eq(method) & tidy["metric"].eq(key)].iloc[0]
            values = [s[key] for s in seeds]
            assert row["mean"] == pytest.approx(np.mean(values))
            assert row["std"] == pytest.approx(np.std(values, ddof=1)) and row["n"] == 3
    # ERM's runs did not run AutoAttack: no value, n = 0, shown as n/a.
    erm = tidy[tidy["method"].eq("erm") & tidy["metric"].isin(AA_KEYS)]
    assert len(erm) == 3 and erm["mean"].isna().all() and (erm["n"] == 0).all()

    md = (out / "summary.md").read_text()
    assert _header(md) == BASE_HEADERS + AA_HEADERS
    assert _row(md, "ERM")[-3:] == ["n/a"] * 3
    # The gap is lower-is-better: TRADES's 1 point is the column's best, in bold (its
    # t-interval reaches below 0: three seeds of a 1-point gap).
    assert _row(md, "TRADES")[-1] == "**1.00 [-1.48, 3.48]**"
    assert _row(md, "TRADES")[-1] == f"**{ci_text([s[AA_KEYS[2]] for s in AA_CONFIRM['trades']])}**"
    assert _row(md, "CAAT")[-3:] == [ci_text([s[k] for s in AA_CONFIRM["caat"]])
                                     for k in AA_KEYS]
    assert "PGD-AA gap: PGD's robust accuracy minus AutoAttack's" in md
    # Differences from TRADES in the AutoAttack columns too, paired by seed: AutoAttack's
    # differences are -4 points on every seed (no test, no interval); the worst class's are
    # -5, -4, -3 (mean -4, sd 1, t = -4 sqrt 3 with 2 df: p = 1 - |t| / sqrt(2 + t^2)).
    diff = next(line for line in md.splitlines() if line.startswith("| CAAT | 3 |"))
    tests = pd.read_csv(out / "summary.csv").set_index(["method", "metric"])
    holm = tests.at[("caat", AA_KEYS[1]), "p_holm"]
    assert diff.endswith(f"| -4.00 | -4.00 [-6.48, -1.52] (p=0.020, Holm {holm:.3f}) "
                         "| +4.00 |")
    t = -4 * 3 ** 0.5
    assert tests.at[("caat", AA_KEYS[1]), "p"] == pytest.approx(1 - abs(t) / (2 + t * t) ** .5)
    assert tests.at[("caat", AA_KEYS[1]), "diff_ci_low"] == pytest.approx(
        -0.04 - 4.302652729911275 * 0.01 / 3 ** 0.5)
    assert "- ERM: no AutoAttack metrics in its runs or the trades runs: AutoAttack not " \
           "compared" in md
    assert "have 0" not in md

    # The alarm: CAAT (gap 5 points) only, not TRADES (1 point); the last section of the md.
    assert md.split("\n")[-len(WARNING_SECTION):] == WARNING_SECTION
    assert "clean/trades:" not in md
    html = (out / "summary.html").read_text()
    assert html.index("Warning: possible gradient masking") > html.rindex("<img")
    assert f"<li>{ALARM}</li>" in html
    assert f"% warning: {ALARM}" in (out / "summary.tex").read_text()
    assert f"warning: possible gradient masking: {MASKING_TEXT}\n" in err
    assert f"warning: {ALARM}\n" in err and "clean/trades" not in err

    selected = pd.read_csv(out / "selected_runs.csv")
    assert set(AA_KEYS) <= set(selected.columns)


def test_autoattack_class_wise_means(store, tmp_path, capsys):
    out = tmp_path / "aa"
    _analyze(store, "aa", out, capsys)
    classwise = pd.read_csv(out / "classwise.csv")
    aa = classwise[classwise["kind"].eq("autoattack")]
    assert set(aa["method"]) == set(AA_CONFIRM)
    for method, seeds in AA_CONFIRM.items():
        expected = np.mean([autoattack_class_list(s) for s in seeds], axis=0)
        got = aa[aa["method"].eq(method)].sort_values("class")["mean"].to_numpy()
        np.testing.assert_allclose(got, expected)
    assert (out / "classwise_clean.png").stat().st_size > 0


def test_a_sweep_without_autoattack_has_no_columns_and_no_alarm(store, tmp_path, capsys):
    out = tmp_path / "noaa"
    err = _analyze(store, "noaa", out, capsys)
    md = (out / "summary.md").read_text()
    assert _header(md) == BASE_HEADERS
    # Only the checklist speaks of AutoAttack: it was not run, so masking is not checked.
    checklist, tables = md.split("Test-set metrics in %", 1)
    assert "[not met] AutoAttack version and images: not run" in checklist
    assert "[unknown] PGD-AutoAttack gap: no AutoAttack results" in checklist
    assert "AutoAttack" not in tables and "masking" not in tables and "warning" not in err
    tidy = pd.read_csv(out / "summary.csv")
    assert not tidy["metric"].isin(AA_KEYS).any()
    assert len(tidy) == 3 * len(BASE_HEADERS)
    assert "autoattack" not in set(pd.read_csv(out / "classwise.csv")["kind"])
    page = (out / "summary.html").read_text()
    assert "AutoAttack" not in page.split("</ul>", 1)[1]  # after the checklist


@pytest.mark.parametrize("gap, fires", [(0.05, True), (0.01, False), (MASKING_GAP, False),
                                        (float("nan"), False)])
def test_masking_alarm_fires_above_the_threshold_only(gap, fires):
    tidy = pd.DataFrame([
        {"scenario": "s", "method": "caat", "metric": "test_autoattack_acc", "mean": 0.4,
         "n": 1},
        {"scenario": "s", "method": "caat", "metric": "test_pgd_autoattack_gap", "mean": gap,
         "n": 1}])
    alarms = masking_alarms(tidy)
    assert bool(alarms) == fires
    if fires:
        assert alarms == ["s/caat: PGD 45.00% vs AutoAttack 40.00% on the same test images, "
                          "a gap of 5.00 points (1 run)"]

