"""How often a nominal 95% interval over n seeds covers the true mean: the t-interval the
analysis uses (`sweeper.analysis._intervals.t_interval`) against a percentile bootstrap, on
normal seed-to-seed noise. The reason the analysis has no bootstrap.

    python benchmarks/interval_coverage.py [--n 3 5 10] [--draws 4000] [--resamples 1000]

Each draw: n values from N(0, 1); the t-interval of their mean, and the 2.5-97.5 percentiles
of the means of `--resamples` bootstrap resamples. Prints each method's coverage of 0.
"""

from __future__ import annotations

import argparse

import numpy as np

from sweeper.analysis._intervals import t_interval


def coverage(n: int, draws: int, resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """(t-interval coverage, percentile-bootstrap coverage) of the mean 0 over ``draws``."""
    t_hits = boot_hits = 0
    for _ in range(draws):
        x = rng.standard_normal(n)
        low, high = t_interval(x)
        t_hits += low <= 0.0 <= high
        means = x[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
        b_low, b_high = np.percentile(means, [2.5, 97.5])
        boot_hits += b_low <= 0.0 <= b_high
    return t_hits / draws, boot_hits / draws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"# nominal 95% intervals of a mean, N(0, 1) seeds; {args.draws} draws, "
          f"{args.resamples} bootstrap resamples, numpy seed {args.seed}")
    print(f"{'seeds':>5} {'t-interval':>11} {'bootstrap':>10}")
    for n in args.n:
        t_cov, boot_cov = coverage(n, args.draws, args.resamples, rng)
        print(f"{n:>5} {100 * t_cov:10.1f}% {100 * boot_cov:9.1f}%")


if __name__ == "__main__":
    main()
