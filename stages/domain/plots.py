"""Figures of an eval report, as PNG files: ROC and precision-recall curves per source, and
accuracy against perturbation strength."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.domain.calibration import calibration_bins
from storage.atomic import readable


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_png(groups: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> Path:
    """ROC (left) and precision-recall (right) per source; groups: source -> (labels, probs)."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _pyplot()
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4.5))
    for src, (y, p) in groups.items():
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        prec, rec, _ = precision_recall_curve(y, p)
        roc_ax.plot(fpr, tpr, label=readable(src))
        pr_ax.plot(rec, prec, label=readable(src))
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall")
    for ax in (roc_ax, pr_ax):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, loc="lower right" if ax is roc_ax else "lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def robustness_png(clean_acc: float, perturbations: dict[str, dict], out: Path) -> Path:
    """Overall accuracy against perturbation strength, one panel per kind (jpeg, blur, resize)."""
    plt = _pyplot()
    kinds: dict[str, list[tuple[float, float]]] = {}
    for spec, rep in perturbations.items():
        spec, _, only = spec.partition("@")
        kind, _, value = spec.partition(":")
        kinds.setdefault(f"{kind}@{only}" if only else kind, []).append((float(value), rep["overall"]["acc"]))
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4 * max(1, len(kinds)), 3.5), squeeze=False)
    labels = {"jpeg": "JPEG quality", "blur": "blur sigma", "resize": "resize factor"}
    for ax, (kind, points) in zip(axes[0], sorted(kinds.items()), strict=False):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, [100 * y for y in ys], marker="o", label=kind)
        ax.axhline(100 * clean_acc, color="grey", linestyle=":", label="clean")
        ax.set(xlabel=labels.get(kind, kind), ylabel="accuracy (%)", ylim=(0, 101))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def reliability_png(groups: dict[str, tuple[np.ndarray, np.ndarray]], out: Path, bins: int = 15) -> Path:
    """Reliability diagram: per equal-width bin of the probability, the share of generated images
    against the mean probability (the diagonal is perfect calibration); groups: name -> (labels,
    probs), the first drawn thicker."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    for k, (name, (y, p)) in enumerate(groups.items()):
        points = [(b["mean_prob"], b["fake_share"]) for b in calibration_bins(y, p, bins) if b["n"]]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=2.5 if k == 0 else 1, label=readable(name))
    ax.set(xlabel="mean predicted probability (generated)", ylabel="share of generated images",
           title=f"reliability ({bins} bins)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
