"""The metrics papers of this field report for a binary real/fake detector.

Scores are the detector's own: logits (log-odds of "generated", float64; +-inf are certain scores)
wherever eval and compare compute metrics, so nothing is lost to a saturated float32 sigmoid or to
rounded text. Ranking metrics (AP, AUC) depend only on the order of the scores and are computed on
their dense ranks (the same ordering, ties kept, infinities included); accuracy is at a threshold on
the same scale: 0 for logits (= probability 0.5), 0.5 for probabilities.
"""

from __future__ import annotations

import numpy as np


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """P(generated) in float64 from logits (exact at +-inf: 1 and 0)."""
    from scipy.special import expit

    return expit(np.asarray(logits, dtype=np.float64))


def logits_of(probs: np.ndarray) -> np.ndarray:
    """Logits from probabilities (older predictions.csv files): 0 and 1 become -inf and +inf, so
    the order of the scores and which side of 0.5 they lie on are kept exactly."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def ranks(scores: np.ndarray) -> np.ndarray:
    """Dense ranks of the scores (equal scores share a rank): the same order without infinities.
    NaN has no place in an order (np.unique would rank it above +inf): a ValueError, since every
    stage refuses NaN scores with a message naming their file before scoring."""
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} NaN scores reached the metrics unchecked")
    codes = np.unique(scores, return_inverse=True)[1]
    return codes.reshape(-1).astype(np.float64)


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy at `threshold` (a score above it is called generated: 0.5 for probabilities, 0 for
    logits), AP and ROC AUC (scikit-learn, on the ranks of the scores), real and fake accuracy,
    with counts."""
    from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    pred = (scores > threshold).astype(int)
    both = len(np.unique(labels)) == 2
    real, fake = labels == 0, labels == 1
    order = ranks(scores) if both else scores
    return {
        "n": int(len(labels)), "n_real": int(real.sum()), "n_fake": int(fake.sum()),
        "acc": float(accuracy_score(labels, pred)) if len(labels) else None,
        "ap": float(average_precision_score(labels, order)) if both else None,
        "auc": float(roc_auc_score(labels, order)) if both else None,
        "real_acc": float(accuracy_score(labels[real], pred[real])) if real.any() else None,
        "fake_acc": float(accuracy_score(labels[fake], pred[fake])) if fake.any() else None,
    }
