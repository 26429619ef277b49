"""`eval`: predictions for every sample of a split and the per-source report papers print.

Each source (generator / test set) gets accuracy at 0.5, AP, ROC AUC, real and fake accuracy.
A source holding only generated images (DiffusionForensics `<set>/<generator>`) is scored against
the real images of its set (`<set>/real`, or every real image of the split when there is no set),
as the field reports per-generator AP.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.device import resolve_device
from stages.domain.detector import Detector, predict
from stages.domain.gallery import sheet, tile
from stages.domain.metrics import binary_metrics
from stages.domain.pairing import source_groups
from stages.domain.plots import curves_png, robustness_png
from storage.atomic import write_bytes_atomic, write_json_atomic
from storage.cache_config import CacheConfig, describe_differences
from storage.cache_folder import CacheError, FeatureCache
from storage.caches import find_cache, perturbed_siblings
from storage.feature_dataset import CacheIndex, cache_index
from storage.run import Entry, Run

METRIC_COLUMNS = ("n_real", "n_fake", "acc", "ap", "auc", "real_acc", "fake_acc")


def check_feature_match(checkpoint: Path, meta: dict, cache_config: CacheConfig, cache_root: Path) -> str:
    """Refuse a cache of other features than the checkpoint's; a note for reference checkpoints."""
    if "feature" not in meta:
        enc = cache_config.feature.encoding
        if enc != "reference":
            raise CacheError(f"{checkpoint} is a reference-format checkpoint (trained on the reference "
                             f"encoding) but {cache_root} holds {enc!r} features")
        return "reference checkpoint: no feature config recorded; assumes the reference encoding"
    diff = describe_differences(meta["feature"], cache_config.feature.to_json())
    if diff:
        raise CacheError(f"{checkpoint} was trained on other features than {cache_root} holds:\n  "
                         + "\n  ".join(d.replace("(cache)", "(checkpoint)").replace("(now)", "(cache)")
                                       for d in diff))
    return "feature config matches the checkpoint"


def report(labels: np.ndarray, probs: np.ndarray, sources: list[str]) -> dict:
    """Per-source and overall metrics."""
    groups = source_groups(sources, labels)
    rows = {src: binary_metrics(labels[m], probs[m]) for src, m in groups.items()}
    per_generator = {src: r for src, r in rows.items() if r["n_fake"]}
    mean = {k: float(np.mean([r[k] for r in per_generator.values() if r[k] is not None]))
            for k in ("acc", "ap") if any(r[k] is not None for r in per_generator.values())}
    return {"sources": rows, "overall": binary_metrics(labels, probs), "mean_over_sources": mean}


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if isinstance(v, float) else str(v)


def report_markdown(rep: dict, title: str) -> str:
    """The report as a table: a row per source, then the mean over sources and overall."""
    head = ["source", "real", "fake", "acc", "AP", "AUC", "real acc", "fake acc"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for src, r in rep["sources"].items():
        lines.append("| " + " | ".join([src] + [_fmt(r[k]) for k in METRIC_COLUMNS]) + " |")
    o, m = rep["overall"], rep["mean_over_sources"]
    lines.append("| **mean over sources** | | | " + _fmt(m.get("acc")) + " | " + _fmt(m.get("ap"))
                 + " | | | |")
    lines.append("| **overall** | " + " | ".join(_fmt(o[k]) for k in METRIC_COLUMNS) + " |")
    lines += ["", "Metrics in percent: accuracy at threshold 0.5; AP = average precision; "
              "sources with only generated images are scored with the real images of their set."]
    return "\n".join(lines) + "\n"


def predict_to_csv(detector: Detector, cache: FeatureCache, split: str, paths: dict[str, str],
                   batch_size: int, workers: int, csv_path: Path) -> tuple[CacheIndex, np.ndarray]:
    """Predict every cached sample of `split`, write the CSV; return (the rows, probabilities as
    written) so metrics can be recomputed from the file."""
    index = cache_index(cache, split)
    if len(index) == 0:
        raise CacheError(f"{cache.root}: no cached samples in split {split!r}")
    probs = predict(detector, cache, index, batch_size, workers)
    lines = [["key", "path", "source", "label", "probability"]]
    lines += [[k, paths.get(k, ""), s, int(y), f"{p:.6f}"]
              for k, s, y, p in zip(index.keys, index.sources, index.labels, probs, strict=True)]
    tmp = csv_path.with_suffix(".csv.tmp")
    # surrogateescape: file names with non-UTF-8 bytes are written back as their original bytes
    with open(tmp, "w", newline="", errors="surrogateescape") as f:
        csv.writer(f).writerows(lines)
    tmp.replace(csv_path)
    return index, np.array([float(r[4]) for r in lines[1:]])


QUALITY_BANDS = ((0, 70, "<= 70"), (71, 85, "71-85"), (86, 95, "86-95"), (96, 100, "96-100"))


def format_breakdown(index: CacheIndex, probs: np.ndarray, entries: dict[str, Entry]) -> dict:
    """Metrics by the original file's format, and for JPEGs by quality band: a detector that learned
    the format instead of the generator shows here (real JPEGs right, real PNGs wrong, ...)."""
    found = [entries.get(k) for k in index.keys]
    fmt = np.array([(e.format if e and e.format else "unknown") for e in found])
    quality = np.array([e.quality if e and e.quality is not None else -1 for e in found])
    by_format = {f: binary_metrics(index.labels[fmt == f], probs[fmt == f]) for f in sorted(set(fmt))}
    by_quality = {}
    for low, high, name in QUALITY_BANDS:
        m = (fmt == "JPEG") & (quality >= low) & (quality <= high)
        if m.any():
            by_quality[name] = binary_metrics(index.labels[m], probs[m])
    return {"by_format": by_format, "by_jpeg_quality": by_quality}


def breakdown_markdown(rep: dict) -> str:
    """The per-format and per-JPEG-quality tables."""
    head = ["", "real", "fake", "acc", "AP", "AUC", "real acc", "fake acc"]
    md = ""
    for key, title in (("by_format", "By original file format"), ("by_jpeg_quality", "By JPEG quality")):
        if not rep[key]:
            continue
        md += f"\n## {title}\n\n| " + " | ".join([title.split()[-1], *head[1:]]) + " |\n"
        md += "|" + "---|" * len(head) + "\n"
        md += "".join("| " + " | ".join([name] + [_fmt(r[k]) for k in METRIC_COLUMNS]) + " |\n"
                      for name, r in rep[key].items())
    return md


def worst_errors(index: CacheIndex, probs: np.ndarray, n: int) -> list[dict]:
    """Per source, the `n` most confident false positives (real, highest probability) and false
    negatives (generated, lowest probability), scored as in the report."""
    out = []
    for src, mask in source_groups(index.sources, index.labels).items():
        rows = np.flatnonzero(mask)
        fp = sorted((i for i in rows if index.labels[i] == 0 and probs[i] > 0.5), key=lambda i: -probs[i])
        fn = sorted((i for i in rows if index.labels[i] == 1 and probs[i] <= 0.5), key=lambda i: probs[i])
        out += [{"source": src, "kind": kind, "key": index.keys[i], "row": int(index.rows[i]),
                 "probability": round(float(probs[i]), 6)}
                for kind, picked in (("false positive", fp[:n]), ("false negative", fn[:n])) for i in picked]
    return out


def gallery_png(errors: list[dict], cache: FeatureCache, paths: dict[str, str], out: Path) -> Path:
    """gallery.png: a tile per error: the image, its DNF, source, probability and path."""
    reader = cache.row_reader()
    tiles = [tile(paths.get(e["key"], ""), reader[e["row"]],
                  [f"{e['kind']} p={e['probability']:.3f}", e["source"], Path(paths.get(e["key"], "?")).name])
             for e in errors]
    reader.close()
    return sheet(tiles, out)


def cross_generator(rep: dict, trained_on: list[str]) -> dict:
    """Sources seen in training vs unseen ones, with mean accuracy and AP over each group."""
    generators = [s for s, r in rep["sources"].items() if r["n_fake"]]  # real-only sources are no generator
    seen = [s for s in generators if s in trained_on]
    unseen = [s for s in generators if s not in trained_on]

    def mean(names: list[str], key: str) -> float | None:
        values = [rep["sources"][s][key] for s in names if rep["sources"][s][key] is not None]
        return float(np.mean(values)) if values else None
    return {"trained_on": trained_on, "seen": seen, "unseen": unseen,
            "seen_mean": {k: mean(seen, k) for k in ("acc", "ap")},
            "unseen_mean": {k: mean(unseen, k) for k in ("acc", "ap")}}


def cross_generator_markdown(cg: dict) -> str:
    return ("\n## Cross-generator (trained on " + ", ".join(cg["trained_on"]) + ")\n\n"
            "| group | sources | mean acc | mean AP |\n|---|---|---|---|\n"
            + "".join(f"| {g} | {', '.join(cg[g]) or '-'} | {_fmt(cg[g + '_mean']['acc'])} | "
                      f"{_fmt(cg[g + '_mean']['ap'])} |\n" for g in ("seen", "unseen")))


def robustness_markdown(rep: dict) -> str:
    """Sources x (clean, each perturbation): accuracy / AP in percent."""
    specs = list(rep["perturbations"])
    head = ["source", "clean", *specs]
    lines = ["", "## Robustness (acc / AP, %)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(r):
        return f"{_fmt(r['acc'])} / {_fmt(r['ap'])}"
    for src in [*rep["sources"], "overall"]:
        clean = rep["overall"] if src == "overall" else rep["sources"][src]
        row = [f"**{src}**" if src == "overall" else src, cell(clean)]
        for spec in specs:
            p = rep["perturbations"][spec]
            r = p["overall"] if src == "overall" else p["sources"].get(src)
            row.append(cell(r) if r else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, rep: dict, title: str) -> None:
    """report.json and report.md (the tables, then the plots) into `out`."""
    write_json_atomic(out / "report.json", rep)
    md = report_markdown(rep, title)
    if "cross_generator" in rep:
        md += cross_generator_markdown(rep["cross_generator"])
    md += breakdown_markdown(rep)
    if rep["perturbations"]:
        md += robustness_markdown(rep)
    md += "".join(f"\n![{k}]({v})\n" for k, v in rep["plots"].items())
    write_bytes_atomic(out / "report.md", md.encode())


def run_eval(run_dir: Path, checkpoint: Path, split: str = "test", name: str | None = None,
             feature_id: str | None = None, batch_size: int = 64, workers: int = 2,
             device: str = "auto", gallery: int = 4) -> dict:
    """Predict every cached sample of `split` (and of its perturbed variants, when extracted),
    write predictions*.csv, report.json and report.md (with per-format tables, plots and, for
    `gallery` > 0, the most confident mistakes of each source)."""
    run = Run(run_dir)
    run.info()
    detector = Detector.from_checkpoint(checkpoint, resolve_device(device))
    meta = detector.meta
    cache = find_cache(run.cache_root, feature_id or meta.get("feature_id"))
    config = cache.config()
    note = check_feature_match(checkpoint, meta, config, cache.root)
    entries = {e.key: e for e in run.entries()}
    paths = {k: e.path for k, e in entries.items()}
    name = name or f"{Path(checkpoint).parent.name}-{split}"
    out = run.root / "eval" / name
    out.mkdir(parents=True, exist_ok=True)
    index, probs = predict_to_csv(detector, cache, split, paths, batch_size, workers, out / "predictions.csv")
    labels, sources = index.labels, index.sources
    rep = report(labels, probs, sources)
    rep.update(format_breakdown(index, probs, entries))
    rep["perturbations"] = {}
    for sibling in perturbed_siblings(run.cache_root, config.feature, cache.backend):
        spec = sibling.config().feature.perturb
        csv_path = out / f"predictions_{spec.replace(':', '_')}.csv"
        sib_index, sib_probs = predict_to_csv(detector, sibling, split, paths, batch_size, workers, csv_path)
        rep["perturbations"][spec] = report(sib_index.labels, sib_probs, sib_index.sources)
    rep.update({"checkpoint": str(checkpoint), "split": split, "feature_id": config.feature_id, "note": note})
    trained_on = (meta.get("train") or {}).get("options", {}).get("sources") or []
    if trained_on:
        rep["cross_generator"] = cross_generator(rep, trained_on)
    groups = source_groups(sources, labels)
    rep["plots"] = {"curves": curves_png({s: (labels[m], probs[m]) for s, m in groups.items()},
                                         out / "curves.png").name}
    if rep["perturbations"]:
        rep["plots"]["robustness"] = robustness_png(rep["overall"]["acc"], rep["perturbations"],
                                                    out / "robustness.png").name
    if gallery:
        rep["gallery"] = worst_errors(index, probs, gallery)
        rep["plots"]["gallery"] = gallery_png(rep["gallery"], cache, paths, out / "gallery.png").name
    write_report(out, rep, f"{name}: {Path(checkpoint).name} on {split} ({config.feature_id})")
    return {"out": str(out), **{k: rep["overall"][k] for k in ("n", "acc", "ap", "auc")}, "note": note,
            "perturbations": list(rep["perturbations"])}
