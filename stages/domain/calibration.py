"""Metrics a deployment needs beyond ranking: the true-positive rate at a fixed false-positive rate,
the equal error rate, calibration (expected calibration error, Brier score), a decision threshold
chosen on validation data, and temperature scaling. One function per definition (scikit-learn's
style); every probability is P(generated)."""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def tpr_at_fpr(labels: np.ndarray, probs: np.ndarray, fpr: float) -> float | None:
    """Share of fakes flagged at the threshold set on the reals: the threshold t is the
    (floor(fpr * n_real) + 1)-th highest real score, so at most `fpr` of the reals score above it;
    a fake counts as flagged when its score is above t. None without both classes."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    real, fake = np.sort(probs[labels == 0])[::-1], probs[labels == 1]
    if not len(real) or not len(fake):
        return None
    t = real[min(int(np.floor(fpr * len(real))), len(real) - 1)]
    return float(np.mean(fake > t))


def equal_error_rate(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """The rate at which false positives and false negatives are equal: over the thresholds of
    the ROC curve (scikit-learn's `roc_curve`), the point where |FPR - FNR| is smallest, reported
    as the mean of the two there. None without both classes."""
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return None
    fpr, tpr, _ = roc_curve(labels, probs)
    fnr = 1 - tpr
    i = int(np.argmin(np.abs(fpr - fnr)))
    return float((fpr[i] + fnr[i]) / 2)


def calibration_bins(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Equal-width bins of [0, 1] (the last one closed): count, mean score and share of fakes."""
    labels, probs = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        m = which == b
        out.append({"lo": b / bins, "hi": (b + 1) / bins, "n": int(m.sum()),
                    "mean_prob": float(probs[m].mean()) if m.any() else None,
                    "fake_share": float(labels[m].mean()) if m.any() else None})
    return out


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """ECE: over `bins` equal-width bins of the score, the count-weighted mean of |share of fakes
    - mean score| in each bin. None for an empty sample."""
    n = len(labels)
    if not n:
        return None
    return float(sum(b["n"] / n * abs(b["fake_share"] - b["mean_prob"])
                     for b in calibration_bins(labels, probs, bins) if b["n"]))


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean squared difference between the score and the label (0 real, 1 fake)."""
    if not len(labels):
        return None
    return float(np.mean((np.asarray(probs, dtype=np.float64) - np.asarray(labels, dtype=np.float64)) ** 2))


def balanced_threshold(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """The threshold t (fake when score > t) that maximises balanced accuracy, (real acc + fake
    acc) / 2, over t in {0} and the distinct scores; among equal ones, the closest to 0.5. None
    without both classes."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    real, fake = np.sort(probs[labels == 0]), np.sort(probs[labels == 1])
    if not len(real) or not len(fake):
        return None
    candidates = np.unique(np.concatenate([[0.0], probs]))
    real_acc = np.searchsorted(real, candidates, side="right") / len(real)  # real score <= t
    fake_acc = 1 - np.searchsorted(fake, candidates, side="right") / len(fake)  # fake score > t
    balanced = (real_acc + fake_acc) / 2
    best = np.flatnonzero(balanced >= balanced.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def accuracy_at(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    """acc, real acc and fake acc when a score above `threshold` means generated."""
    labels = np.asarray(labels)
    pred = (np.asarray(probs) > threshold).astype(int)
    real, fake = labels == 0, labels == 1
    return {"acc": float(np.mean(pred == labels)) if len(labels) else None,
            "real_acc": float(np.mean(pred[real] == 0)) if real.any() else None,
            "fake_acc": float(np.mean(pred[fake] == 1)) if fake.any() else None}


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """Temperature T minimising the log loss of sigmoid(logit / T) (golden-section search over
    log T in [-4, 4]); probabilities are clipped to [1e-7, 1 - 1e-7] first."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    logit = np.log(p / (1 - p))

    def loss(log_t: float) -> float:
        q = np.clip(1 / (1 + np.exp(-logit / np.exp(log_t))), 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    lo, hi = -4.0, 4.0
    g = (np.sqrt(5) - 1) / 2
    for _ in range(80):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if loss(a) < loss(b):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T), with p clipped as in `fit_temperature`."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    return 1 / (1 + np.exp(-np.log(p / (1 - p)) / temperature))


def deployment_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """TPR at 1 % and 5 % FPR, EER, ECE and Brier score of one sample."""
    return {"tpr_at_fpr_1": tpr_at_fpr(labels, probs, 0.01), "tpr_at_fpr_5": tpr_at_fpr(labels, probs, 0.05),
            "eer": equal_error_rate(labels, probs), "ece": expected_calibration_error(labels, probs),
            "brier": brier_score(labels, probs)}
