"""The metrics papers of this field report for a binary real/fake detector."""

from __future__ import annotations

import numpy as np


def binary_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Accuracy at 0.5, AP, ROC AUC, real and fake accuracy (scikit-learn), with counts."""
    from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

    labels = np.asarray(labels).astype(int)
    pred = (np.asarray(probs) > 0.5).astype(int)
    both = len(np.unique(labels)) == 2
    real, fake = labels == 0, labels == 1
    return {
        "n": int(len(labels)), "n_real": int(real.sum()), "n_fake": int(fake.sum()),
        "acc": float(accuracy_score(labels, pred)) if len(labels) else None,
        "ap": float(average_precision_score(labels, probs)) if both else None,
        "auc": float(roc_auc_score(labels, probs)) if both else None,
        "real_acc": float(accuracy_score(labels[real], pred[real])) if real.any() else None,
        "fake_acc": float(accuracy_score(labels[fake], pred[fake])) if fake.any() else None,
    }
