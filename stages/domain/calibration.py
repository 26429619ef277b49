"""Metrics a deployment needs beyond ranking: the true-positive rate at a fixed false-positive rate,
the equal error rate, calibration (expected calibration error, Brier score), a decision threshold
chosen on validation data, and temperature scaling. One function per definition (scikit-learn's
style); every probability is P(generated), every logit its log-odds."""

from __future__ import annotations

import numpy as np

from stages.domain.metrics import sigmoid

ECE_BINS = 15


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float | None:
    """The highest share of fakes flagged (score > t) at a threshold t that flags at most `fpr` of
    the reals: t is the (k + 1)-th highest real score, k = floor(fpr * n_real) (the lowest such
    threshold). Any monotone score (logits, +-inf included). None without both classes."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    real, fake = np.sort(scores[labels == 0])[::-1], scores[labels == 1]
    if not len(real) or not len(fake):
        return None
    k = int(np.floor(fpr * len(real) + 1e-9))  # 1e-9: 0.07 * 100 must be 7, not 6.99...
    t = real[min(k, len(real) - 1)]
    return float(np.mean(fake > t))


def equal_error_rate(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The equal error rate over every threshold: for t in the distinct scores and +inf (a sample is
    called generated when its score >= t; these are all the ways to split the sorted scores),
    FPR(t) = share of reals called generated, FNR(t) = share of fakes called real. EER is
    (FPR + FNR) / 2 at the t where |FPR - FNR| is smallest (compared exactly, in integer counts);
    FPR - FNR falls strictly with t, so at most two thresholds are equally close, and then EER is
    the mean of their two values. Any monotone score (logits, +-inf included). None without both
    classes. (Not scikit-learn's `roc_curve`, whose default drops the ROC's collinear points, where
    FPR = FNR usually lies.)"""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    real, fake = np.sort(scores[labels == 0]), np.sort(scores[labels == 1])
    n_real, n_fake = len(real), len(fake)
    if not n_real or not n_fake:
        return None
    t = np.append(np.unique(scores), np.inf)
    fp = n_real - np.searchsorted(real, t, side="left")  # reals with score >= t
    fn = np.searchsorted(fake, t, side="left")  # fakes with score < t
    gap = np.abs(fp.astype(np.int64) * n_fake - fn.astype(np.int64) * n_real)
    best = gap == gap.min()
    return float(np.mean((fp[best] / n_real + fn[best] / n_fake) / 2))


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


def balanced_logit_threshold(labels: np.ndarray, logits: np.ndarray) -> float | None:
    """As `balanced_threshold`, on logits: t (generated when logit > t) over the distinct logits,
    maximising balanced accuracy; among equal ones the closest to 0 (probability 0.5). None
    without both classes."""
    labels, logits = np.asarray(labels), np.asarray(logits, dtype=np.float64)
    real, fake = np.sort(logits[labels == 0]), np.sort(logits[labels == 1])
    if not len(real) or not len(fake):
        return None
    candidates = np.unique(logits)
    real_acc = np.searchsorted(real, candidates, side="right") / len(real)
    fake_acc = 1 - np.searchsorted(fake, candidates, side="right") / len(fake)
    balanced = (real_acc + fake_acc) / 2
    best = np.flatnonzero(balanced >= balanced.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best]))]])


def _log_loss(y: np.ndarray, z: np.ndarray) -> float:
    """Mean binary cross-entropy of logits z, computed stably (log(1 + e^x) as logaddexp)."""
    return float(np.mean(np.where(y == 1, np.logaddexp(0, -z), np.logaddexp(0, z))))


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float | None:
    """Temperature T minimising the log loss of sigmoid(logit / T) (golden-section search over
    log T in [-4, 4]), on the detector's logits as they are (no clipping); infinite logits carry
    no information on T and are left out. None when the finite logits left do not hold both
    classes: nothing to fit (the search would end at an arbitrary end of its range)."""
    y, z = np.asarray(labels, dtype=np.float64), np.asarray(logits, dtype=np.float64)
    finite = np.isfinite(z)
    y, z = y[finite], z[finite]
    if len(np.unique(y)) < 2:
        return None
    lo, hi = -4.0, 4.0
    g = (np.sqrt(5) - 1) / 2
    for _ in range(80):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if _log_loss(y, z / np.exp(a)) < _log_loss(y, z / np.exp(b)):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit / T) in float64."""
    return sigmoid(np.asarray(logits, dtype=np.float64) / temperature)


def deployment_metrics(labels: np.ndarray, logits: np.ndarray) -> dict:
    """TPR at 1 % and 5 % FPR and EER from the logits' order; ECE and Brier score from their
    float64 sigmoid."""
    probs = sigmoid(logits)
    return {"tpr_at_fpr_1": tpr_at_fpr(labels, logits, 0.01),
            "tpr_at_fpr_5": tpr_at_fpr(labels, logits, 0.05),
            "eer": equal_error_rate(labels, logits), "ece": expected_calibration_error(labels, probs),
            "brier": brier_score(labels, probs)}
