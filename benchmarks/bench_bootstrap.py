"""What the bootstrap intervals add to an eval: seconds of `bootstrap_metrics` (1,000 stratified
resamples) and of the whole per-source report with and without intervals, at 10,000 and 100,000
rows (`make bench-bootstrap`). Prints medians of 3 runs side by side."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.domain.bootstrap import bootstrap_metrics  # noqa: E402
from stages.domain.scoring import Scoring  # noqa: E402
from stages.evaluate import report  # noqa: E402


def sample(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n logits of a decent detector (what `report` and predictions.csv's logit column hold), 4
    generators each with its own reals."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = rng.normal(size=n) + 1.5 * (2 * y - 1)
    return y, p, [f"gen_{i % 4}" for i in range(n)]


def median_seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    print("rows | bootstrap_metrics, overall | report without intervals | report with intervals | added")
    for n in (10_000, 100_000):
        y, p, src = sample(n)
        alone = median_seconds(lambda y=y, p=p: bootstrap_metrics(y, p, 1000, threshold=0.0))
        without = median_seconds(lambda y=y, p=p, src=src: report(y, p, src, Scoring(bootstrap=0)))
        with_ci = median_seconds(lambda y=y, p=p, src=src: report(y, p, src, Scoring(bootstrap=1000)))
        print(f"{n:,} | {alone:.2f} s | {without:.2f} s | {with_ci:.2f} s | {with_ci - without:.2f} s")


if __name__ == "__main__":
    main()
