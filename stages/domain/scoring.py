"""One row of a report: the metrics papers print (at 0.5), their bootstrap intervals, the
deployment metrics, and the accuracies at a chosen threshold; and the mean over sources."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.domain.bootstrap import bootstrap_samples, interval
from stages.domain.calibration import accuracy_at, deployment_metrics
from stages.domain.metrics import binary_metrics

MEAN_METRICS = ("acc", "ap", "auc", "real_acc", "fake_acc")


@dataclass(frozen=True)
class Scoring:
    """How rows are scored: bootstrap resamples (0: no intervals) and their seed, and the
    threshold chosen on validation data, as a logit (None: only the 0.5 columns)."""

    bootstrap: int = 1000
    seed: int = 0
    threshold: float | None = None


def score(labels: np.ndarray, logits: np.ndarray, how: Scoring) -> tuple[dict, dict[str, np.ndarray]]:
    """(the row, its bootstrap samples per metric for the mean over sources), from the detector's
    logits: accuracies at logit 0 (probability 0.5) and at the chosen threshold."""
    row = binary_metrics(labels, logits, threshold=0.0)
    row.update(deployment_metrics(labels, logits))
    samples: dict[str, np.ndarray] = {}
    if how.bootstrap and len(labels):
        samples = bootstrap_samples(labels, logits, how.bootstrap, how.seed, threshold=0.0)
        row["ci"] = {k: interval(v) for k, v in samples.items()}
    if how.threshold is not None:
        row["at_threshold"] = accuracy_at(labels, logits, how.threshold)
    return row, samples


def mean_over_sources(rows: dict[str, dict], samples: dict[str, dict[str, np.ndarray]]) -> dict:
    """The mean of each metric over the sources that have it, and (with bootstrap samples) the
    interval of that mean: per resample the mean over sources, each source resampled on its own."""
    mean: dict = {}
    for k in MEAN_METRICS:
        values = [r[k] for r in rows.values() if r.get(k) is not None]
        if values:
            mean[k] = float(np.mean(values))
    ci = {}
    for k in mean:  # the interval when every source that has the metric has its resamples
        have = [samples.get(s, {}).get(k) for s in rows if rows[s].get(k) is not None]
        if all(v is not None for v in have):
            ci[k] = interval(np.mean(have, axis=0))
    if ci:
        mean["ci"] = ci
    return mean
