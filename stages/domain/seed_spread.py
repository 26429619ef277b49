"""Seeds as an axis: the spread of a report's cells over detectors trained with different seeds
(mean and sample standard deviation, ddof = 1, over the seeds that have the cell)."""

from __future__ import annotations

import numpy as np

SEEDS_FILE = "seeds.json"  # in RUN/train/NAME/: the seeds `train --seeds` was given, read back by eval
SPREAD_METRICS = ("acc", "ap", "auc", "real_acc", "fake_acc", "tpr_at_fpr_1", "eer", "ece")


def spread(values: list[float]) -> dict:
    """{"mean", "std" (ddof 1; 0 for one seed), "values"}."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "values": [float(v) for v in arr]}


def seed_spread(reports: dict[str, dict]) -> dict:
    """Per source (and overall, and the mean over sources): metric -> spread over the seeds'
    reports (seed name -> report.json)."""
    rows: dict[str, dict[str, list[float]]] = {}
    for rep in reports.values():
        named = {**rep["sources"], "**mean over sources**": rep["mean_over_sources"],
                 "**overall**": rep["overall"]}
        for src, row in named.items():
            for k in SPREAD_METRICS:
                if row.get(k) is not None:
                    rows.setdefault(src, {}).setdefault(k, []).append(row[k])
    return {src: {k: spread(v) for k, v in cells.items()} for src, cells in rows.items()}


def seed_markdown(per_source: dict, seeds: list[str], title: str, rule: str) -> str:
    """AUC per seed, then mean +- std of AUC, AP, acc, fake acc and TPR at 1 % FPR (percent)."""
    metrics = (("auc", "AUC"), ("ap", "AP"), ("acc", "acc"), ("fake_acc", "fake acc"),
               ("tpr_at_fpr_1", "TPR @ 1 % FPR"))
    head = ["source", *[f"AUC {s}" for s in seeds], *[f"{name} mean ± std" for _, name in metrics]]
    lines = [f"# {title}", "", f"{len(seeds)} seeds; checkpoint of each: {rule}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for src, cells in per_source.items():
        auc = cells.get("auc", {}).get("values", [])
        row = [src, *[f"{100 * v:.1f}" for v in auc], *["-"] * (len(seeds) - len(auc))]
        for k, _ in metrics:
            c = cells.get(k)
            row.append(f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}" if c else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Metrics in percent; std: sample standard deviation over seeds (ddof 1). Each seed's "
              "full report, with bootstrap intervals over images, is in its own folder."]
    return "\n".join(lines) + "\n"
