"""Which classes collapse, per method and seed: test natural accuracy by class.

Reads the trials of `noise_imbalance_table.py` / `caat_ablation.py` (RESULTS/<scenario>/
<variant>/seed<k>/metrics.json) and prints, per scenario, one row per variant and seed with
every class's natural test accuracy (%), the classes below `--below` marked, and per
variant the seed spread of natural and worst-class natural accuracy. For the question
whether FRL's class multipliers (which CAAT shares) collapse classes under label noise.

    python benchmarks/class_collapse.py --out results/noise_imbalance --scenario pair-0.4 \
        --variants trades frl frl_class_bound caat caat_class_bound
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# Fashion-MNIST's classes, for the reader (other datasets print class numbers).
FASHION = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Boot"]


def rows(root: Path, scenario: str, variant: str) -> list[tuple[str, list[float], float]]:
    out = []
    for path in sorted((root / scenario / variant).glob("seed*/metrics.json")):
        m = json.loads(path.read_text())
        out.append((path.parent.name, [100 * a for a in m["class_natural_acc"]],
                    100 * m["natural_acc"]))
    return out


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}" if values else "-"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def report(root: Path, scenario: str, variants: list[str], below: float) -> str:
    lines = [f"{scenario}: test natural accuracy by class (%), * below {below:g}%", ""]
    found = [v for v in variants if rows(root, scenario, v)]
    if not found:
        return f"{scenario}: no trials of {', '.join(variants)} under {root}"
    n = len(rows(root, scenario, found[0])[0][1])
    names = FASHION if n == len(FASHION) else [str(c) for c in range(n)]
    lines.append("| variant | seed | " + " | ".join(names) + " | natural |")
    lines.append("|---|---|" + "---|" * (n + 1))
    summary = []
    for variant in found:
        got = rows(root, scenario, variant)
        for seed, accs, nat in got:
            cells = [f"{a:.0f}{'*' if a < below else ''}" for a in accs]
            lines.append(f"| {variant} | {seed} | " + " | ".join(cells) + f" | {nat:.1f} |")
        collapsed = sum(a < below for _, accs, _ in got for a in accs)
        summary.append(f"- {variant}: natural {spread([r[2] for r in got])}, worst class "
                       f"{spread([min(r[1]) for r in got])}, classes below {below:g}%: "
                       f"{collapsed} over {len(got)} seeds")
    return "\n".join([*lines, "", *summary])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/noise_imbalance")
    parser.add_argument("--scenario", default="pair-0.4")
    parser.add_argument("--variants", nargs="+",
                        default=["trades", "frl", "frl_class_bound", "caat", "caat_class_bound"])
    parser.add_argument("--below", type=float, default=10.0,
                        help="a class under this natural accuracy (%%) counts as collapsed")
    args = parser.parse_args()
    print(report(Path(args.out), args.scenario, args.variants, args.below))


if __name__ == "__main__":
    main()
