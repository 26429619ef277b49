"""`compare`: two eval reports side by side, with the change of every cell (B - A), and the paired
differences of AUC and AP with bootstrap intervals over the same images (and over seeds when a side
was evaluated over several), so a reader sees which changes are within noise."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from stages.domain.bootstrap import bootstrap_samples, interval
from stages.domain.metrics import binary_metrics
from stages.domain.pairing import source_groups
from storage.atomic import readable
from storage.errors import UserError

METRICS = ("acc", "ap", "auc")
PAIRED = ("auc", "ap")


def load_report(folder: Path) -> dict:
    """An eval folder's report.json."""
    path = Path(folder) / "report.json"
    if not path.exists():
        raise UserError(f"{path}: no eval report there; run `dnf-pipeline eval` first")
    return json.loads(path.read_text())


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _delta(a, b) -> str:
    return "-" if a is None or b is None else f"{100 * (b - a):+.1f}"


def side_by_side(a_dir: Path, b_dir: Path, a: dict, b: dict) -> str:
    """A table per metric group: rows are sources (and overall, and each perturbation's overall)."""
    rows: list[tuple[str, dict | None, dict | None]] = []
    for src in sorted(set(a["sources"]) | set(b["sources"])):
        rows.append((src, a["sources"].get(src), b["sources"].get(src)))
    rows.append(("**overall**", a["overall"], b["overall"]))
    for spec in sorted(set(a.get("perturbations", {})) & set(b.get("perturbations", {}))):
        rows.append((f"**overall, {spec}**", a["perturbations"][spec]["overall"],
                     b["perturbations"][spec]["overall"]))
    head = ["source"] + [f"{m} {side}" for m in METRICS for side in ("A", "B", "delta")]
    lines = [f"A = {a_dir}", f"B = {b_dir}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, ra, rb in rows:
        cells = []
        for m in METRICS:
            va, vb = (ra or {}).get(m), (rb or {}).get(m)
            cells += [_pct(va), _pct(vb), _delta(va, vb)]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines) + "\n"


def read_predictions(folder: Path) -> tuple[dict[str, tuple[int, str]], list[dict[str, float]]]:
    """(key -> (label, source), and one key -> probability map per seed) of an eval folder: its
    predictions.csv, or each seed-K/predictions.csv of an evaluation over seeds."""
    files = sorted(Path(folder).glob("seed-*/predictions.csv")) or [Path(folder) / "predictions.csv"]
    if not files[0].exists():
        raise UserError(f"{folder}: no predictions.csv (nor seed-K/predictions.csv) there; run `eval` first")
    meta, probs = {}, []
    for path in files:
        with open(path, newline="", errors="surrogateescape") as f:
            rows = list(csv.DictReader(f))
        meta.update({r["key"]: (int(r["label"]), r["source"]) for r in rows})
        probs.append({r["key"]: float(r["probability"]) for r in rows})
    return meta, probs


def side_samples(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Per metric, the values of one side on each resample of the images: each seed scored on the
    same resample (the same draws), and the seeds themselves resampled (mean over a draw of S
    seeds with replacement)."""
    per_seed = [bootstrap_samples(y, row, n_boot, seed) for row in p]
    pick = np.random.default_rng([seed, 1]).integers(0, len(p), size=(n_boot, len(p)))
    return {k: np.stack([s[k] for s in per_seed])[pick, np.arange(n_boot)[:, None]].mean(1) for k in PAIRED}


def paired_differences(a_dir: Path, b_dir: Path, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per source (paired as in `eval`) and overall: B - A of AUC and AP (mean over seeds), the
    95 % paired bootstrap interval, and whether it contains 0 ("within noise")."""
    meta_a, probs_a = read_predictions(a_dir)
    _, probs_b = read_predictions(b_dir)
    keys = sorted(set(meta_a) & set.intersection(*(set(p) for p in probs_a + probs_b)))
    if not keys:
        raise UserError(f"{a_dir} and {b_dir} share no scored image: compare evaluations of the same split")
    y = np.array([meta_a[k][0] for k in keys])
    sources = [meta_a[k][1] for k in keys]
    pa = np.array([[p[k] for k in keys] for p in probs_a])
    pb = np.array([[p[k] for k in keys] for p in probs_b])
    groups = {**source_groups(sources, y), "overall": np.ones(len(keys), dtype=bool)}
    out = {}
    for src, m in groups.items():
        if len(np.unique(y[m])) < 2:
            continue
        sa, sb = side_samples(y[m], pa[:, m], n_boot, seed), side_samples(y[m], pb[:, m], n_boot, seed)
        row = {}
        for k in PAIRED:
            point = (np.mean([binary_metrics(y[m], p)[k] for p in pb[:, m]])
                     - np.mean([binary_metrics(y[m], p)[k] for p in pa[:, m]]))
            lo, hi = interval(sb[k] - sa[k])
            row[k] = {"delta": float(point), "ci": [lo, hi], "within_noise": bool(lo <= 0 <= hi)}
        out[src] = row
    return {"images": len(keys), "seeds": [len(pa), len(pb)], "resamples": n_boot, "sources": out}


def paired_markdown(diff: dict) -> str:
    """The paired differences as a table, each with its verdict."""
    lines = ["", f"## Paired differences, B - A ({diff['images']} images scored by both; seeds "
             f"{diff['seeds'][0]} vs {diff['seeds'][1]}; {diff['resamples']} paired bootstrap resamples)", "",
             "| source | AUC delta [95 % CI] | | AP delta [95 % CI] | |", "|---|---|---|---|---|"]
    for src, row in diff["sources"].items():
        cells = []
        for k in PAIRED:
            d = row[k]
            verdict = "within noise" if d["within_noise"] else ("B better" if d["delta"] > 0 else "A better")
            cells += [f"{100 * d['delta']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]", verdict]
        lines.append("| " + " | ".join([f"**{src}**" if src == "overall" else src, *cells]) + " |")
    lines += ["", "A difference is within noise when its interval contains 0: the same images resampled "
              "(stratified by class) for both detectors, and their seeds resampled when they have several."]
    return "\n".join(lines) + "\n"


def compare_markdown(a_dir: Path, b_dir: Path, n_boot: int = 1000, seed: int = 0) -> str:
    """The side-by-side table, then (when both folders hold predictions) the paired differences."""
    a, b = load_report(a_dir), load_report(b_dir)
    if "spread" in a or "spread" in b:  # evaluations over seeds: their per-seed folders hold the rows
        md = f"A = {a_dir}\nB = {b_dir}\n"
    else:
        md = side_by_side(a_dir, b_dir, a, b)
    if n_boot:
        md += paired_markdown(paired_differences(a_dir, b_dir, n_boot, seed))
    return readable(md)
