"""95 % bootstrap intervals of a detector's metrics, vectorised over resamples.

Definition (`bootstrap_metrics`): B resamples, each drawn with replacement *within each class*
(as many reals and fakes as the sample has: stratified, so every resample has both classes); a
metric's interval is the 2.5th and 97.5th percentile of its B values (numpy's linear percentile).
Resample b draws its reals, then its fakes, as index arrays from one `numpy.random.default_rng(seed)`
(a chunk of resamples at a time, chunks sized by the number of rows), so two detectors scored on the
same images draw the same resamples. A resample never copies images: it is a vector of counts over
the sorted distinct scores, so AUC and AP of all B resamples come from cumulative sums, in the same
definitions as scikit-learn (`roc_auc_score` with ties counted half, `average_precision_score` as
the sum over distinct thresholds of recall steps times precision).
"""

from __future__ import annotations

import numpy as np

METRICS = ("acc", "ap", "auc", "real_acc", "fake_acc")
CHUNK_CELLS = 4_000_000  # resamples x rows per chunk (bounds memory at ~100 MB)


def resample_counts(rng: np.random.Generator, codes: np.ndarray, n_codes: int, n_boot: int) -> np.ndarray:
    """(n_boot, n_codes) counts: each row, len(codes) draws with replacement from `codes`."""
    if len(codes) == 0:
        return np.zeros((n_boot, n_codes), dtype=np.int64)
    picks = codes[rng.integers(0, len(codes), size=(n_boot, len(codes)))]
    flat = picks + (np.arange(n_boot)[:, None] * n_codes)
    return np.bincount(flat.ravel(), minlength=n_boot * n_codes).reshape(n_boot, n_codes)


def ranking_metrics(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUC and AP of each row of counts over distinct scores in ascending order."""
    n_pos, n_neg = pos.sum(1).astype(float), neg.sum(1).astype(float)
    below = np.cumsum(neg, 1) - neg  # negatives strictly below each score
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(1) / (n_pos * n_neg)
        tp = np.cumsum(pos[:, ::-1], 1)  # descending thresholds: predicted fake at score >= s
        fp = np.cumsum(neg[:, ::-1], 1)
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        ap = (pos[:, ::-1] * precision).sum(1) / n_pos
    return auc, ap


def bootstrap_samples(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000,
                      seed: int = 0, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Each metric's value on each of `n_boot` stratified resamples (metrics a sample cannot have,
    such as AUC without reals, are left out); accuracies at `threshold` (0.5 for probabilities, 0
    for logits; +-inf logits are ordinary scores here)."""
    labels = np.asarray(labels).astype(int)
    rng = np.random.default_rng(seed)
    scores, codes = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    codes = codes.reshape(-1)
    n_codes = len(scores)
    real_codes, fake_codes = codes[labels == 0], codes[labels == 1]
    above = scores > threshold  # predicted fake, per distinct score
    out: dict[str, list[np.ndarray]] = {k: [] for k in METRICS}
    # chunks depend on the sample's size only: two detectors scored on the same images draw the
    # same resamples (a paired bootstrap, as `compare` needs)
    chunk = max(1, CHUNK_CELLS // max(len(labels), 1))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        neg = resample_counts(rng, real_codes, n_codes, b)
        pos = resample_counts(rng, fake_codes, n_codes, b)
        n_real, n_fake = len(real_codes), len(fake_codes)
        correct_real = neg[:, ~above].sum(1)
        correct_fake = pos[:, above].sum(1)
        out["acc"].append((correct_real + correct_fake) / (n_real + n_fake))
        if n_real:
            out["real_acc"].append(correct_real / n_real)
        if n_fake:
            out["fake_acc"].append(correct_fake / n_fake)
        if n_real and n_fake:
            auc, ap = ranking_metrics(pos, neg)
            out["auc"].append(auc)
            out["ap"].append(ap)
    return {k: np.concatenate(v) for k, v in out.items() if v}


def interval(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """[lo, hi]: the percentile interval of bootstrap values."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return [float(lo), float(hi)]


def bootstrap_metrics(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95, threshold: float = 0.5) -> dict[str, list[float]]:
    """95 % (by default) stratified bootstrap intervals of acc, AP, AUC, real and fake accuracy."""
    samples = bootstrap_samples(labels, scores, n_boot, seed, threshold)
    return {k: interval(v, level) for k, v in samples.items()}
