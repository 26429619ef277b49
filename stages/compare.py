"""`compare`: two eval reports side by side, with the change of every cell (B - A), and the paired
differences of AUC and AP with bootstrap intervals over the same images (and over seeds when a side
was evaluated over several), so a reader sees which changes are within noise."""

from __future__ import annotations

import csv
import json
from pathlib import Path, PurePosixPath

import numpy as np

from stages.domain.bootstrap import bootstrap_samples, interval
from stages.domain.metrics import binary_metrics, logits_of
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


def _n(row: dict | None) -> str:
    return "-" if not row or row.get("n") is None else str(row["n"])


def table(rows: list[tuple[str, dict | None, dict | None]]) -> list[str]:
    """The side-by-side rows: per row the images each side scored, then per metric A, B, B - A."""
    head = ["source", "n A", "n B"] + [f"{m} {side}" for m in METRICS for side in ("A", "B", "delta")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, ra, rb in rows:
        cells = [_n(ra), _n(rb)]
        for m in METRICS:
            va, vb = (ra or {}).get(m), (rb or {}).get(m)
            cells += [_pct(va), _pct(vb), _delta(va, vb)]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines


def side_by_side(a_dir: Path, b_dir: Path, a: dict, b: dict) -> str:
    """A table per metric group: rows are sources (and overall, and each perturbation's overall),
    each with the number of images behind it, from the two reports."""
    rows: list[tuple[str, dict | None, dict | None]] = []
    for src in sorted(set(a["sources"]) | set(b["sources"])):
        rows.append((src, a["sources"].get(src), b["sources"].get(src)))
    rows.append(("**overall**", a["overall"], b["overall"]))
    for spec in sorted(set(a.get("perturbations", {})) & set(b.get("perturbations", {}))):
        rows.append((f"**overall, {spec}**", a["perturbations"][spec]["overall"],
                     b["perturbations"][spec]["overall"]))
    return "\n".join([f"A = {a_dir}", f"B = {b_dir}", "", *table(rows)]) + "\n"


def common_side_by_side(a_dir: Path, b_dir: Path, same: bool = False) -> str:
    """The table on the images both sides scored, recomputed from their logits (paired with reals
    as in `eval`; the mean over seeds for a side with several). When A and B scored different images
    (e.g. before and after `shard --append`), a warning with the counts first; with `same` (two
    evaluations over seeds of the same images), a line saying the cells are means over seeds."""
    keys, y, sources, pa, pb, (n_a, n_b) = common_images(a_dir, b_dir)
    groups = {**source_groups(sources, y), "**overall**": np.ones(len(keys), dtype=bool)}

    def row(p: np.ndarray, m: np.ndarray) -> dict:
        per_seed = [binary_metrics(y[m], s, threshold=0.0) for s in p[:, m]]
        out = {k: (None if per_seed[0][k] is None else float(np.mean([r[k] for r in per_seed])))
               for k in METRICS}
        return {**out, "n": int(m.sum())}
    rows = [(src, row(pa, m), row(pb, m)) for src, m in groups.items()]
    if same:
        head = (f"Each cell is the mean over a side's seeds (A: {len(pa)}, B: {len(pb)}), recomputed from "
                f"the recorded predictions of the same {len(keys)} images.")
        return "\n".join([f"A = {a_dir}", f"B = {b_dir}", "", head, "", *table(rows)]) + "\n"
    warn = (f"**Different images**: A scored {n_a} images, B scored {n_b}, {len(keys)} of them both. "
            f"The table compares those {len(keys)} images only (paired, recomputed from the predictions); "
            f"each report's own figures cover all of its images, so their difference mixes the "
            f"detectors with the change of images. Perturbation rows are left out.")
    return "\n".join([f"A = {a_dir}", f"B = {b_dir}", "", warn, "", *table(rows)]) + "\n"


def same_labels(a_dir: Path, b_dir: Path, meta_a: dict[str, tuple[int, str]],
                meta_b: dict[str, tuple[int, str]], keys: list[str] | set[str]) -> None:
    """The images both sides scored must carry the same label in both (each run recorded its own);
    an error naming the folders and the first such key otherwise."""
    relabelled = sorted(k for k in keys if meta_a[k][0] != meta_b[k][0])
    if relabelled:
        raise UserError(f"{a_dir} and {b_dir} give {len(relabelled)} of the images both scored another label "
                        f"(first key {relabelled[0]}): their runs label the images differently")


def same_images(a_dir: Path, a: dict, b_dir: Path, b: dict) -> bool:
    """Whether both evaluations scored the same images (by key, from their recorded predictions);
    images both scored with another label in each are an error (whatever is compared next)."""
    meta_a, meta_b = read_predictions(a_dir, a)[0], read_predictions(b_dir, b)[0]
    same_labels(a_dir, b_dir, meta_a, meta_b, set(meta_a) & set(meta_b))
    return set(meta_a) == set(meta_b)


def prediction_files(folder: Path, rep: dict) -> list[Path]:
    """The prediction files a report was made from, as report.json records them (`predictions`);
    for a report written before that field, its recorded seeds' seed-K/predictions.csv (an
    evaluation over seeds) or its predictions.csv. Never a listing of the folder: a folder may
    hold files of an earlier evaluation under the same name."""
    if "predictions" in rep:
        names = list(rep["predictions"])
    elif "spread" in rep:
        names = [f"{seed}/predictions.csv" for seed in rep.get("seeds", [])]
    else:
        names = ["predictions.csv"]
    files = []
    for name in names:
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise UserError(f"{Path(folder) / 'report.json'}: prediction file {name!r} lies outside "
                            f"the folder")
        files.append(Path(folder) / rel)
    if not files:
        raise UserError(f"{Path(folder) / 'report.json'}: records no prediction files")
    for path in files:
        if not path.exists():
            raise UserError(f"{path}: recorded in {Path(folder) / 'report.json'} but missing; run `eval` "
                            f"again")
    return files


def read_logits(path: Path) -> list[dict]:
    """The rows of a predictions.csv, each with its float64 `logit`: the column itself, or for a
    file written before it, the logit of its (rounded) probability. A NaN score is an error."""
    with open(path, newline="", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    if rows and "logit" not in rows[0]:
        for r, z in zip(rows, logits_of(np.array([float(r["probability"]) for r in rows])), strict=True):
            r["logit"] = z
    for i, r in enumerate(rows):
        r["logit"] = float(r["logit"])
        if np.isnan(r["logit"]):
            raise UserError(f"{path}: row {i + 2} (key {r['key']}) has a NaN score")
    return rows


def read_predictions(folder: Path, rep: dict | None = None) -> tuple[dict[str, tuple[int, str]],
                                                                    list[dict[str, float]]]:
    """(key -> (label, source), and one key -> logit map per seed) of an eval folder, from the
    prediction files its report records."""
    rep = load_report(folder) if rep is None else rep
    meta, scores = {}, []
    for path in prediction_files(folder, rep):
        rows = read_logits(path)
        meta.update({r["key"]: (int(r["label"]), r["source"]) for r in rows})
        scores.append({r["key"]: r["logit"] for r in rows})
    return meta, scores


def side_samples(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Per metric, the values of one side on each resample of the images: each seed scored on the
    same resample (the same draws), and the seeds themselves resampled (mean over a draw of S
    seeds with replacement)."""
    per_seed = [bootstrap_samples(y, row, n_boot, seed, threshold=0.0) for row in p]
    pick = np.random.default_rng([seed, 1]).integers(0, len(p), size=(n_boot, len(p)))
    return {k: np.stack([s[k] for s in per_seed])[pick, np.arange(n_boot)[:, None]].mean(1) for k in PAIRED}


def common_images(a_dir: Path, b_dir: Path) -> tuple[list[str], np.ndarray, list[str], np.ndarray, np.ndarray,
                                                        tuple[int, int]]:
    """The images both sides scored (every seed of each): keys, labels, sources, (seeds x images)
    logits of A and of B, and how many images each side scored."""
    meta_a, scores_a = read_predictions(a_dir)
    meta_b, scores_b = read_predictions(b_dir)
    keys = sorted(set(meta_a) & set.intersection(*(set(p) for p in scores_a + scores_b)))
    if not keys:
        raise UserError(f"{a_dir} and {b_dir} share no scored image: compare evaluations of the same split")
    same_labels(a_dir, b_dir, meta_a, meta_b, keys)
    y = np.array([meta_a[k][0] for k in keys])
    sources = [meta_a[k][1] for k in keys]
    pa = np.array([[p[k] for k in keys] for p in scores_a])
    pb = np.array([[p[k] for k in keys] for p in scores_b])
    return keys, y, sources, pa, pb, (len(meta_a), len(meta_b))


def paired_differences(a_dir: Path, b_dir: Path, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per source (paired as in `eval`) and overall: B - A of AUC and AP (mean over seeds), the
    95 % paired bootstrap interval, and whether it contains 0 ("within noise"), over the images
    both sides scored, from their logits."""
    keys, y, sources, pa, pb, _ = common_images(a_dir, b_dir)
    groups = {**source_groups(sources, y), "overall": np.ones(len(keys), dtype=bool)}
    out = {}
    for src, m in groups.items():
        if len(np.unique(y[m])) < 2:
            continue
        sa, sb = side_samples(y[m], pa[:, m], n_boot, seed), side_samples(y[m], pb[:, m], n_boot, seed)
        row = {}
        for k in PAIRED:
            point = (np.mean([binary_metrics(y[m], p, threshold=0.0)[k] for p in pb[:, m]])
                     - np.mean([binary_metrics(y[m], p, threshold=0.0)[k] for p in pa[:, m]]))
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
    if not same_images(a_dir, a, b_dir, b):
        md = common_side_by_side(a_dir, b_dir)
    elif "spread" in a or "spread" in b:  # evaluations over seeds: their per-seed folders hold the rows
        md = common_side_by_side(a_dir, b_dir, same=True)
    else:
        md = side_by_side(a_dir, b_dir, a, b)
    if n_boot:
        md += paired_markdown(paired_differences(a_dir, b_dir, n_boot, seed))
    return readable(md)
