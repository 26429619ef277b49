"""`eval`: predictions for every sample of a split and the per-source report papers print.

Each source (generator / test set) gets accuracy at 0.5, AP, ROC AUC, real and fake accuracy.
A source holding only generated images (DiffusionForensics `<set>/<generator>`) is scored against
the real images of its set (`<set>/real`, or every real image of the split when there is no set),
as the field reports per-generator AP.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from pipeline.device import resolve_device
from stages.domain.calibration import (
    apply_temperature,
    balanced_logit_threshold,
    brier_score,
    expected_calibration_error,
    fit_temperature,
)
from stages.domain.detector import CheckpointError, Detector, head_of, predict_logits
from stages.domain.feature_kinds import FEATURE_KINDS, feature_kind
from stages.domain.gallery import section_sheet, tile
from stages.domain.metrics import logits_of, ranks, sigmoid
from stages.domain.pairing import source_groups
from stages.domain.plots import curves_png, reliability_png, robustness_png
from stages.domain.scoring import Scoring, mean_over_sources, score
from stages.domain.seed_spread import SEEDS_FILE, seed_markdown, seed_spread
from stages.domain.sources import ReadContext, RunReader
from storage.atomic import readable, write_bytes_atomic, write_json_atomic
from storage.cache_config import CacheConfig, describe_differences
from storage.cache_folder import CacheError, FeatureCache
from storage.caches import find_cache, perturbed_siblings
from storage.feature_dataset import CacheIndex, cache_index
from storage.locations import as_path, staged
from storage.run import Entry, Run

METRIC_COLUMNS = ("n_real", "n_fake", "acc", "ap", "auc", "real_acc", "fake_acc")


# what a checkpoint without a recorded feature config is, by its head: the released detectors of that
# shape (DNF's reference ResNet50, UnivFD's linear probe); another kind is for the user to say
BARE_KINDS = {"resnet50": ("dnf", "the DNF reference detector's"),
              "linear": ("clip", "UnivFD's linear probe's")}


def check_checkpoint_kind(said: str | None) -> None:
    """A kind named by `--checkpoint-kind` must be a registered one (listed in the error)."""
    if said is not None and said not in FEATURE_KINDS:
        raise CacheError(f"--checkpoint-kind {said!r}: not a feature kind; one of {', '.join(FEATURE_KINDS)}")


def check_bare_checkpoint(checkpoint: Path, head: tuple[str, int], cache_config: CacheConfig,
                          cache_root: Path, said: str | None = None) -> str:
    """A checkpoint that records no feature kind: its kind is the one the user says (`said`), else
    the one whose released detectors have its head; refused (naming both) on a cache of another kind,
    when its head cannot take the cache's rows, or on another encoding than the kind's default (the
    one its released detectors were trained on)."""
    check_checkpoint_kind(said)
    kind = cache_config.feature.kind
    name, width = head
    default, whose = BARE_KINDS[name]
    taken = said or default
    if taken != kind:
        how = (f"said to be trained on {said!r} features" if said else
               f"a {name} head of {whose} shape, so taken as a {default!r} detector")
        raise CacheError(f"{checkpoint}: no recorded feature kind ({how}), but {cache_root} holds "
                         f"{kind!r} features. Evaluate it on a {taken!r} cache (--feature-id), or, if it "
                         f"was trained on {kind!r} features, say so (--checkpoint-kind {kind})")
    size = cache_config.spatial or cache_config.feature.size
    takes = cache_config.channels * size * size if name == "linear" else cache_config.channels
    if name not in feature_kind(kind).heads or width != takes:
        raise CacheError(f"{checkpoint}: its {name} head takes {width} "
                         f"{'values' if name == 'linear' else 'channels'}, but the {kind!r} rows of "
                         f"{cache_root} are {cache_config.channels} x {size} x {size}")
    enc, expected = cache_config.feature.encoding, feature_kind(kind).default_encoding
    if enc != expected:  # a bare checkpoint records no encoding either: its kind's default is assumed
        raise CacheError(f"{checkpoint} is a reference-format checkpoint (no feature config recorded, so "
                         f"taken as trained on the {expected!r} encoding of {kind!r} features) but "
                         f"{cache_root} holds {enc!r} features; evaluate it on a cache extracted with "
                         f"--encoding {expected}")
    note = feature_kind(kind).bare_checkpoint_note
    if said and said != default:
        return (f"no feature config recorded; trained on {said!r} features as the user said "
                f"({expected} encoding assumed)")
    if note:  # e.g. UnivFD's released fc_weights.pth: a bare linear probe
        return note
    return "reference checkpoint: no feature config recorded; assumes the reference encoding"


def check_feature_match(checkpoint: Path, meta: dict, cache_config: CacheConfig, cache_root: Path,
                        model: nn.Module | None = None, said: str | None = None) -> str:
    """Refuse a cache of other features than the checkpoint's; a note for reference checkpoints
    (`model`: the checkpoint's network, whose head tells what a bare checkpoint can be)."""
    if "feature" not in meta:
        head = head_of(model) if model is not None else ("resnet50", 3)
        return check_bare_checkpoint(checkpoint, head, cache_config, cache_root, said)
    check_checkpoint_kind(said)
    recorded = meta["feature"].get("kind", "dnf")
    if said and said != recorded:
        raise CacheError(f"{checkpoint} records that it was trained on {recorded!r} features; "
                         f"--checkpoint-kind {said} contradicts it")
    diff = describe_differences(meta["feature"], cache_config.feature.to_json())
    if diff:
        raise CacheError(f"{checkpoint} was trained on other features than {cache_root} holds:\n  "
                         + "\n  ".join(d.replace("(cache)", "(checkpoint)").replace("(now)", "(cache)")
                                       for d in diff))
    return "feature config matches the checkpoint"


def report(labels: np.ndarray, logits: np.ndarray, sources: list[str], how: Scoring = Scoring()) -> dict:
    """Per-source and overall rows (metrics, intervals, deployment metrics), and the mean over the
    sources that hold generated images, from the detector's logits."""
    groups = source_groups(sources, labels)
    scored = {src: score(labels[m], logits[m], how) for src, m in groups.items()}
    rows = {src: r for src, (r, _) in scored.items()}
    generators = {src: r for src, r in rows.items() if r["n_fake"]}
    mean = mean_over_sources(generators, {src: scored[src][1] for src in generators})
    return {"sources": rows, "overall": score(labels, logits, how)[0], "mean_over_sources": mean}


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if isinstance(v, float) else str(v)


def cell(row: dict, key: str) -> str:
    """`99.3 [98.1, 99.9]`: the value in percent with its bootstrap interval when there is one."""
    v = row.get(key)
    ci = (row.get("ci") or {}).get(key)
    if v is None or ci is None:
        return _fmt(v)
    return f"{100 * v:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def report_markdown(rep: dict, title: str) -> str:
    """The report as tables: a row per source, then the mean over sources and overall; then the
    deployment metrics (TPR at fixed FPR, EER, calibration, the validation threshold)."""
    head = ["source", "real", "fake", "acc", "AP", "AUC", "real acc", "fake acc"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for src, r in rep["sources"].items():
        lines.append("| " + " | ".join([src] + [cell(r, k) for k in METRIC_COLUMNS]) + " |")
    o, m = rep["overall"], rep["mean_over_sources"]
    lines.append("| **mean over sources** | | | " + " | ".join(cell(m, k) for k in METRIC_COLUMNS[2:]) + " |")
    lines.append("| **overall** | " + " | ".join(cell(o, k) for k in METRIC_COLUMNS) + " |")
    boot = rep.get("bootstrap") or {}
    ci_note = (f"[brackets]: 95 % bootstrap interval ({boot['resamples']} resamples stratified by class, "
               f"seed {boot['seed']}); " if boot.get("resamples") else "")
    lines += ["", "Metrics in percent: accuracy at threshold 0.5; AP = average precision; " + ci_note
              + "sources with only generated images are scored with the real images of their set."]
    return "\n".join(lines) + "\n" + deployment_markdown(rep)


def deployment_markdown(rep: dict) -> str:
    """TPR at 1 % / 5 % FPR (threshold set on the reals), EER, ECE, Brier, and the accuracies at the
    threshold chosen on validation data."""
    t = rep.get("threshold")
    head = ["source", "TPR @ 1 % FPR", "TPR @ 5 % FPR", "EER", "ECE", "Brier"]
    if t:
        head += [f"acc @ {t['value']:.3f}", f"real acc @ {t['value']:.3f}", f"fake acc @ {t['value']:.3f}"]
    lines = ["", "## Deployment", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in [*rep["sources"].items(), ("**overall**", rep["overall"])]:
        cells = [_fmt(r.get(k)) for k in ("tpr_at_fpr_1", "tpr_at_fpr_5", "eer", "ece")]
        cells.append("-" if r.get("brier") is None else f"{r['brier']:.4f}")
        if t:
            cells += [_fmt(r["at_threshold"][k]) for k in ("acc", "real_acc", "fake_acc")]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    lines += ["", "TPR @ x % FPR: share of fakes flagged at the threshold that flags x % of the reals; EER: "
              "equal error rate; ECE: expected calibration error over 15 equal-width bins; Brier: mean "
              "squared error of the probability."]
    if t:
        temp = rep.get("temperature")
        lines.append(f"Threshold {t['value']:.4f} (logit {t['logit']:.4g}): {t['from']} (the one that "
                     f"maximises balanced accuracy)."
                     + (f" Temperature {temp['value']:.3f} fitted on {t['split']}: ECE "
                        f"{_fmt(temp['ece'])}, Brier {temp['brier']:.4f} overall "
                        f"after scaling." if temp and temp["value"] is not None else "")
                     + (f" {temp['note'][0].upper()}{temp['note'][1:]}."
                        if temp and temp["value"] is None else ""))
    return "\n".join(lines) + "\n"


PREDICTION_COLUMNS = ["key", "path", "source", "label", "probability", "logit"]


def scores_of(checkpoint: Path, detector: Detector, cache: FeatureCache, index: CacheIndex, split: str,
              batch_size: int, workers: int) -> np.ndarray:
    """The detector's logits for `index`; NaN scores (a broken detector) are an error naming the
    checkpoint; +-inf are certain scores and kept (they rank above / below every finite one)."""
    logits = predict_logits(detector, cache, index, batch_size, workers)
    bad = np.flatnonzero(np.isnan(logits))
    if len(bad):
        raise CheckpointError(f"{checkpoint}: {len(bad)} of {len(logits)} scores on split {split!r} of "
                              f"{cache.root} are NaN (not a number; first key {index.keys[bad[0]]}): the "
                              f"detector's weights or its forward pass are broken; no report written")
    return logits


def write_predictions(csv_path: Path, index: CacheIndex, paths: dict[str, str], logits: np.ndarray) -> None:
    """predictions.csv: per image its key, path, source, label, P(generated) and the logit it came
    from, both at full precision (repr: the float64 read back is the same number)."""
    lines = [PREDICTION_COLUMNS]
    lines += [[k, paths.get(k, ""), s, int(y), repr(float(p)), repr(float(z))]
              for k, s, y, p, z in zip(index.keys, index.sources, index.labels, sigmoid(logits), logits,
                                       strict=True)]
    tmp = csv_path.with_suffix(".csv.tmp")
    # surrogateescape: file names with non-UTF-8 bytes are written back as their original bytes
    with open(tmp, "w", newline="", errors="surrogateescape") as f:
        csv.writer(f).writerows(lines)
    tmp.replace(csv_path)


def predict_to_csv(checkpoint: Path, detector: Detector, cache: FeatureCache, split: str,
                   paths: dict[str, str], batch_size: int, workers: int,
                   csv_path: Path) -> tuple[CacheIndex, np.ndarray]:
    """Predict every cached sample of `split`, write the CSV; return (the rows, the logits, as
    written exactly)."""
    index = cache_index(cache, split)
    if len(index) == 0:
        raise CacheError(f"{cache.root}: no cached samples in split {split!r}")
    logits = scores_of(checkpoint, detector, cache, index, split, batch_size, workers)
    write_predictions(csv_path, index, paths, logits)
    return index, logits


QUALITY_BANDS = ((0, 70, "<= 70"), (71, 85, "71-85"), (86, 95, "86-95"), (96, 100, "96-100"))


def format_breakdown(index: CacheIndex, logits: np.ndarray, entries: dict[str, Entry],
                     how: Scoring = Scoring()) -> dict:
    """Metrics by the original file's format, and for JPEGs by quality band: a detector that learned
    the format instead of the generator shows here (real JPEGs right, real PNGs wrong, ...)."""
    found = [entries.get(k) for k in index.keys]
    fmt = np.array([(e.format if e and e.format else "unknown") for e in found])
    quality = np.array([e.quality if e and e.quality is not None else -1 for e in found])
    by_format = {f: score(index.labels[fmt == f], logits[fmt == f], how)[0] for f in sorted(set(fmt))}
    by_quality = {}
    for low, high, name in QUALITY_BANDS:
        m = (fmt == "JPEG") & (quality >= low) & (quality <= high)
        if m.any():
            by_quality[name] = score(index.labels[m], logits[m], how)[0]
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
        md += "".join("| " + " | ".join([name] + [cell(r, k) for k in METRIC_COLUMNS]) + " |\n"
                      for name, r in rep[key].items())
    return md


def worst_errors(index: CacheIndex, scores: np.ndarray, n: int, logits: bool = False) -> list[dict]:
    """The `n` most confident mistakes of each source, each image once: false positives (real,
    highest score) under the real image's own source, false negatives (generated, lowest score)
    under their generator. Scores are probabilities (called generated above 0.5) or, with
    `logits`, logits (above 0). (A real image is paired with several generators in the report;
    here it is shown once.)"""
    threshold = 0.0 if logits else 0.5
    sources = np.asarray(index.sources, dtype=object)
    out = []
    for src in sorted(set(index.sources)):
        rows = np.flatnonzero(sources == src)
        fp = sorted((i for i in rows if index.labels[i] == 0 and scores[i] > threshold),
                    key=lambda i: -scores[i])
        fn = sorted((i for i in rows if index.labels[i] == 1 and scores[i] <= threshold),
                    key=lambda i: scores[i])
        out += [{"source": src, "kind": kind, "key": index.keys[i], "row": int(index.rows[i]),
                 "probability": float(sigmoid(scores[i]) if logits else scores[i]),
                 **({"logit": float(scores[i])} if logits else {})}
                for kind, picked in (("false positive", fp[:n]), ("false negative", fn[:n])) for i in picked]
    return out


def gallery_png(errors: list[dict], cache: FeatureCache, entries: dict[str, Entry], out: Path,
                images: RunReader) -> Path:
    """gallery.png: a section per source and kind of mistake, a tile per image: the image (read
    through its input source, checked by its key), its DNF, probability and file name."""
    reader = cache.row_reader()
    sections: dict[str, list] = {}
    for e in errors:
        what = "reals flagged as generated" if e["kind"] == "false positive" else "generated images missed"
        title = f"{e['source']}: {what}"
        entry = entries.get(e["key"])
        sections.setdefault(title, []).append(
            tile(entry if entry is not None else "", reader[e["row"]],
                 [f"{e['kind']} p={e['probability']:.3f}", Path(entry.path if entry else "?").name], images))
    reader.close()
    return section_sheet(sections, out)


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


def protocols_markdown(rep: dict) -> str:
    """Per source, the AUC (with its interval) on the original images and on every perturbed sibling
    cache: the bias-aligned protocols (`jpeg:96@fake`, `jpeg:96`, ...) side by side."""
    specs = list(rep["perturbations"])
    head = ["source", "original", *specs]
    lines = ["", "## Protocols (AUC, %)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for src in [*rep["sources"], "overall"]:
        clean = rep["overall"] if src == "overall" else rep["sources"][src]
        row = [f"**{src}**" if src == "overall" else src, cell(clean, "auc")]
        for spec in specs:
            p = rep["perturbations"][spec]
            r = p["overall"] if src == "overall" else p["sources"].get(src)
            row.append(cell(r, "auc") if r else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "`jpeg:Q@fake`: only the generated images recompressed, so both classes are JPEGs (a "
              "detector of the file format loses its cue there); `jpeg:Q`: every image recompressed."]
    return "\n".join(lines) + "\n"


def robustness_markdown(rep: dict) -> str:
    """Sources x (clean, each perturbation): accuracy / AP in percent."""
    specs = list(rep["perturbations"])
    head = ["source", "clean", *specs]
    lines = ["", "## Robustness (acc / AP, %)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pair(r):
        return f"{cell(r, 'acc')} / {cell(r, 'ap')}"
    for src in [*rep["sources"], "overall"]:
        clean = rep["overall"] if src == "overall" else rep["sources"][src]
        row = [f"**{src}**" if src == "overall" else src, pair(clean)]
        for spec in specs:
            p = rep["perturbations"][spec]
            r = p["overall"] if src == "overall" else p["sources"].get(src)
            row.append(pair(r) if r else "-")
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
        md += protocols_markdown(rep) + robustness_markdown(rep)
    md += "".join(f"\n![{k}]({v})\n" for k, v in rep["plots"].items())
    write_bytes_atomic(out / "report.md", readable(md).encode())  # names with non-UTF-8 bytes as \xNN


@dataclass(frozen=True)
class EvalOptions:
    """How `eval` scores: bootstrap resamples and seed, the split a threshold (and optionally a
    temperature) is chosen on, and the gallery size."""

    bootstrap: int = 1000
    seed: int = 0
    calibrate_on: str | None = None
    temperature: bool = False
    gallery: int = 4
    pick: str = "best"  # with a folder of seeds: each seed's best.pt (best val accuracy) or last.pt
    # the feature kind a checkpoint without a recorded one was trained on (None: by its head, the
    # released detectors': a ResNet50 is DNF's reference, a linear probe UnivFD's)
    checkpoint_kind: str | None = None


def choose_threshold(checkpoint: Path, detector: Detector, cache: FeatureCache, opts: EvalOptions,
                     batch_size: int, workers: int
                     ) -> tuple[dict | None, tuple[np.ndarray, np.ndarray] | None]:
    """The decision threshold (maximal balanced accuracy) from `--calibrate-on SPLIT`, else the one
    the checkpoint recorded on val at training time, else None; and the calibration split's
    (labels, logits) when it was predicted. The threshold is a logit (`logit`, what scores) and
    its probability (`value`, for reading)."""
    if opts.calibrate_on:
        index = cache_index(cache, opts.calibrate_on)
        if len(index) == 0 or len(np.unique(index.labels)) < 2:
            raise CacheError(f"--calibrate-on {opts.calibrate_on}: {cache.root} has no cached real and "
                             f"fake images in that split")
        logits = scores_of(checkpoint, detector, cache, index, opts.calibrate_on, batch_size, workers)
        t = balanced_logit_threshold(index.labels, logits)
        return ({"value": float(sigmoid(t)), "logit": t, "split": opts.calibrate_on,
                 "from": f"chosen on the {opts.calibrate_on} split by eval --calibrate-on"},
                (index.labels, logits))
    if opts.temperature:
        raise CacheError("--temperature is fitted on the --calibrate-on split: name one (e.g. val)")
    return recorded_threshold(detector.meta), None


def recorded_threshold(meta: dict) -> dict | None:
    """The threshold a checkpoint recorded on val at training time: the logit it was chosen on
    (`val_threshold_logit`), or for a checkpoint of before, the logit of its recorded probability
    (`val_threshold`; lossy where the probability saturated)."""
    logit, prob = meta.get("val_threshold_logit"), meta.get("val_threshold")
    if logit is not None:
        t = float(logit)
    elif prob is not None:
        t = float(logits_of(float(prob)))
    else:
        return None
    return {"value": float(sigmoid(t)), "logit": t, "split": "val",
            "from": "chosen on val at training time (recorded in the checkpoint)"}


def temperature_report(calib: tuple[np.ndarray, np.ndarray], labels: np.ndarray, logits: np.ndarray,
                       split: str) -> dict:
    """Temperature scaling fitted on the calibration split's logits, and the calibration it gives here;
    none (with a note why) when the calibration split has no finite logit of each class."""
    t = fit_temperature(*calib)
    if t is None:
        n_inf = int(np.sum(np.isinf(calib[1])))
        return {"value": None, "split": split, "ece": None, "brier": None,
                "note": f"no temperature fitted: {n_inf} of the {len(calib[1])} logits on {split} are "
                        f"infinite and the finite ones do not hold both classes (infinite logits say "
                        f"nothing of T)"}
    scaled = apply_temperature(logits, t)
    return {"value": t, "split": split, "ece": expected_calibration_error(labels, scaled),
            "brier": brier_score(labels, scaled)}


def run_eval(run_dir: Path, checkpoint: Path, split: str = "test", name: str | None = None,
             feature_id: str | None = None, batch_size: int = 64, workers: int = 2,
             device: str = "auto", gallery: int = 4, opts: EvalOptions | None = None) -> dict:
    """Predict every cached sample of `split` (and of its perturbed variants, when extracted),
    write predictions*.csv, report.json and report.md (with intervals, deployment metrics,
    per-format tables, plots and, for `gallery` > 0, the most confident mistakes)."""
    opts = opts or EvalOptions(gallery=gallery)
    run = Run(run_dir)
    run.info()
    detector = Detector.from_checkpoint(checkpoint, resolve_device(device))
    meta = detector.meta
    cache = find_cache(run.cache_root, feature_id or meta.get("feature_id"))
    config = cache.config()
    note = check_feature_match(checkpoint, meta, config, cache.root, detector.model, opts.checkpoint_kind)
    entries = {e.key: e for e in run.entries()}
    paths = {k: e.path for k, e in entries.items()}
    name = name or f"{as_path(checkpoint).parent.name}-{split}"
    final = run.root / "eval" / name
    with staged(final) as out:  # on object storage: written locally, uploaded at the end
        threshold, calib = choose_threshold(checkpoint, detector, cache, opts, batch_size, workers)
        how = Scoring(opts.bootstrap, opts.seed, threshold["logit"] if threshold else None)
        index, logits = predict_to_csv(checkpoint, detector, cache, split, paths, batch_size, workers,
                                       out / "predictions.csv")
        labels, sources = index.labels, index.sources
        rep = report(labels, logits, sources, how)
        rep.update(format_breakdown(index, logits, entries, how))
        rep["perturbations"] = {}
        for sibling in perturbed_siblings(run.cache_root, config.feature, cache.backend):
            spec = sibling.config().feature.perturb
            csv_path = out / f"predictions_{spec.replace(':', '_').replace('@', '_')}.csv"
            sib_index, sib_logits = predict_to_csv(checkpoint, detector, sibling, split, paths, batch_size,
                                                   workers, csv_path)
            rep["perturbations"][spec] = report(sib_index.labels, sib_logits, sib_index.sources, how)
            rep["perturbations"][spec]["predictions"] = [csv_path.name]
        rep.update({"checkpoint": str(checkpoint), "split": split, "feature_id": config.feature_id,
                    "note": note, "threshold": threshold, "predictions": ["predictions.csv"],
                    "scores": {"from": "logits", "infinite": int(np.sum(np.isinf(logits)))},
                    "bootstrap": {"resamples": opts.bootstrap, "seed": opts.seed, "level": 0.95}})
        if opts.temperature and calib is not None:
            rep["temperature"] = temperature_report(calib, labels, logits, threshold["split"])
        trained_on = (meta.get("train") or {}).get("options", {}).get("sources") or []
        if trained_on:
            rep["cross_generator"] = cross_generator(rep, trained_on)
        rep["plots"] = write_plots(rep, index, logits, out)
        if opts.gallery:
            rep["gallery"] = worst_errors(index, logits, opts.gallery, logits=True)
            rep["plots"]["gallery"] = gallery_png(rep["gallery"], cache, entries, out / "gallery.png",
                                                  RunReader(ReadContext(run.root))).name
        write_report(out, rep, f"{name}: {as_path(checkpoint).name} on {split} ({config.feature_id})")
    return {"out": str(final), **{k: rep["overall"][k] for k in ("n", "acc", "ap", "auc")}, "note": note,
            "perturbations": list(rep["perturbations"])}


def write_plots(rep: dict, index: CacheIndex, logits: np.ndarray, out: Path) -> dict:
    """curves.png (ROC, PR per source: from the logits' ranks), reliability.png (their float64
    sigmoid), and robustness.png with perturbations."""
    groups = source_groups(index.sources, index.labels)
    order, probs = ranks(logits), sigmoid(logits)
    plots = {"curves": curves_png({s: (index.labels[m], order[m]) for s, m in groups.items()},
                                  out / "curves.png").name,
             "reliability": reliability_png({"overall": (index.labels, probs),
                                             **{s: (index.labels[m], probs[m]) for s, m in groups.items()}},
                                            out / "reliability.png").name}
    if rep["perturbations"]:
        plots["robustness"] = robustness_png(rep["overall"]["acc"], rep["perturbations"],
                                             out / "robustness.png").name
    return plots


CHECKPOINT_RULES = {"best": "best.pt (the epoch of best validation accuracy)",
                    "last": "last.pt (the last epoch)"}


def seed_checkpoints(folder: Path, pick: str) -> dict[str, Path]:
    """seed-K -> its checkpoint, for a folder made by `train --seeds`: the seeds it records in
    seeds.json (a folder listing only for folders made before it was written)."""
    if pick not in CHECKPOINT_RULES:
        raise CacheError(f"--pick {pick!r}: best or last")
    recorded = as_path(folder) / SEEDS_FILE
    if recorded.exists():
        seeds = json.loads(recorded.read_bytes())["seeds"]
        missing = [s for s in seeds if not (as_path(folder) / f"seed-{s}" / f"{pick}.pt").exists()]
        if missing:
            raise CacheError(f"{folder}: trained with --seeds {','.join(map(str, seeds))}, but seed(s) "
                             f"{','.join(map(str, missing))} have no {pick}.pt; finish them (train --seeds "
                             f"... --resume) or evaluate the seeds' checkpoints one by one")
        return {f"seed-{s}": as_path(folder) / f"seed-{s}" / f"{pick}.pt" for s in seeds}
    found = sorted((p for p in as_path(folder).glob("seed-*") if (p / f"{pick}.pt").exists()),
                   key=lambda p: int(p.name.split("-", 1)[1]) if p.name.split("-", 1)[1].isdigit() else 0)
    if not found:
        raise CacheError(f"{folder}: no seed-K/{pick}.pt inside; pass a checkpoint file, or a folder "
                         f"made by `train --seeds`")
    return {p.name: p / f"{pick}.pt" for p in found}


def run_eval_seeds(run_dir: Path, folder: Path, split: str = "test", name: str | None = None,
                   feature_id: str | None = None, batch_size: int = 64, workers: int = 2,
                   device: str = "auto", opts: EvalOptions | None = None) -> dict:
    """Evaluate each seed's checkpoint of a `train --seeds` folder into `eval/NAME/seed-K/`, then
    write `eval/NAME/report.json` and `report.md`: each cell's mean and std over the seeds."""
    opts = opts or EvalOptions()
    name = name or f"{as_path(folder).name}-{split}"
    reports = {}
    for seed, ckpt in seed_checkpoints(folder, opts.pick).items():
        summary = run_eval(run_dir, ckpt, split, f"{name}/{seed}", feature_id, batch_size, workers, device,
                           opts.gallery, opts)
        reports[seed] = json.loads((as_path(summary["out"]) / "report.json").read_text())
    out = Run(run_dir).root / "eval" / name
    per_source = seed_spread(reports)
    rule = CHECKPOINT_RULES[opts.pick]
    write_json_atomic(out / "report.json", {"seeds": list(reports), "checkpoint_rule": rule, "split": split,
                                            "folder": str(folder), "spread": per_source,
                                            "predictions": [f"{seed}/predictions.csv" for seed in reports]})
    title = f"{name}: {as_path(folder).name} over seeds on {split}"
    md = seed_markdown(per_source, list(reports), title, rule)
    write_bytes_atomic(out / "report.md", readable(md).encode())
    overall = per_source["**overall**"]
    return {"out": str(out), "seeds": len(reports), "auc_mean": overall["auc"]["mean"],
            "auc_std": overall["auc"]["std"]}
