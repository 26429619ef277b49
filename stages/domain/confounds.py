"""How well one file property alone separates real from fake images: the balanced accuracy of the
best single rule on it, a threshold for numbers (either direction) or a class per category. 0.5
means the property tells nothing; 1.0 means it alone separates the classes. Balanced accuracy
(the mean of real and fake accuracy) is used so that a trivial rule scores 0.5 whatever the
class ratio."""

from __future__ import annotations

from collections import Counter

import numpy as np

NUMERIC = ("quality", "width", "height", "aspect", "bytes_per_pixel")
CATEGORICAL = ("format", "subsampling", "mode", "exif")
JPEG_ONLY = ("quality", "subsampling")
ADVICE = {
    "format": "evaluate on a format-aligned variant: `extract --perturb jpeg:95` re-encodes real and "
              "fake alike (the field's format-aligned protocol) and `eval` reports it beside the clean table",
    "quality": "re-encode both sides alike (`extract --perturb jpeg:Q`) and compare with the clean table",
    "subsampling": "re-encode both sides alike (`extract --perturb jpeg:Q`), which also equalises "
                   "chroma subsampling",
    "bytes_per_pixel": "file size per pixel differs: with JPEGs that is compression (re-encode both sides "
                       "alike, `extract --perturb jpeg:Q`); with lossless PNGs it is how much detail the "
                       "images hold (smooth generated images compress better), which the pixels carry too: "
                       "check the per-format table and a `--perturb jpeg:Q` variant",
    "width": "sizes differ: extract with `--geometry crop` (the central size x size window at native "
             "resolution for both classes, no rescaling of images at least that large), or report "
             "results per size (e.g. shard each size group as its own --source); `--perturb resize` "
             "scales both classes by one factor, which keeps the difference",
    "height": "sizes differ: extract with `--geometry crop` (the central size x size window at native "
              "resolution for both classes, no rescaling of images at least that large), or report "
              "results per size (e.g. shard each size group as its own --source); `--perturb resize` "
              "scales both classes by one factor, which keeps the difference",
    "aspect": "aspect ratios differ: centre-crop both sides to one aspect before training",
    "mode": "colour modes differ (e.g. RGBA or grey vs RGB): convert both sides alike before training",
    "exif": "EXIF presence differs: it does not reach the detector, but marks the files; strip or keep it "
            "on both sides alike when files leave the pipeline",
}


def numeric_separability(real: np.ndarray, fake: np.ndarray) -> tuple[float, float | None]:
    """(best balanced accuracy, its threshold) over thresholds between sorted values."""
    if not len(real) or not len(fake):
        return 0.5, None
    values = np.concatenate([real, fake]).astype(np.float64)
    is_fake = np.concatenate([np.zeros(len(real)), np.ones(len(fake))])
    order = np.argsort(values, kind="stable")
    values, is_fake = values[order], is_fake[order]
    last_of_value = np.r_[values[1:] != values[:-1], True]  # cut only between distinct values
    fake_below = np.cumsum(is_fake)[last_of_value]
    real_below = np.cumsum(1 - is_fake)[last_of_value]
    # rule "fake when > t": real accuracy = real_below / n_real, fake accuracy = 1 - fake_below / n_fake
    acc = 0.5 * (real_below / len(real) + 1 - fake_below / len(fake))
    best = np.maximum(acc, 1 - acc)  # or the rule the other way round
    i = int(np.argmax(best))
    return float(best[i]), float(values[last_of_value][i])


def categorical_separability(real: list, fake: list) -> float:
    """Best balanced accuracy of a rule giving each category the class it is more common in."""
    if not real or not fake:
        return 0.5
    r, f = Counter(real), Counter(fake)
    return float(0.5 * sum(max(r[c] / len(real), f[c] / len(fake)) for c in set(r) | set(f)))


def property_values(facts: list[dict], prop: str) -> list:
    """One property of each file (None where it does not apply, e.g. the quality of a PNG)."""
    if prop == "aspect":
        return [f["width"] / f["height"] if f.get("width") and f.get("height") else None for f in facts]
    if prop == "bytes_per_pixel":
        return [f["size"] / (f["width"] * f["height"]) if f.get("width") and f.get("height") else None
                for f in facts]
    return [f.get(prop) for f in facts]


def score_property(real: list[dict], fake: list[dict], prop: str) -> dict:
    """Separability of one property between the real and the fake files, with the counts behind it."""
    rv = [v for v in property_values(real, prop) if v is not None]
    fv = [v for v in property_values(fake, prop) if v is not None]
    out: dict = {"property": prop, "n_real": len(rv), "n_fake": len(fv)}
    if prop in CATEGORICAL:
        out["separability"] = round(categorical_separability(rv, fv), 4)
        out["real"] = {str(k): n for k, n in Counter(rv).most_common()}
        out["fake"] = {str(k): n for k, n in Counter(fv).most_common()}
    else:
        score, threshold = numeric_separability(np.asarray(rv, float), np.asarray(fv, float))
        out["separability"] = round(score, 4)
        out["threshold"] = threshold
        for side, vals in (("real", rv), ("fake", fv)):
            out[side] = ({"median": float(np.median(vals)), "min": float(np.min(vals)),
                          "max": float(np.max(vals))} if vals else {})
    return out


def score_all(real: list[dict], fake: list[dict]) -> list[dict]:
    """Every property's score, most separating first."""
    scores = [score_property(real, fake, p) for p in CATEGORICAL + NUMERIC]
    return sorted(scores, key=lambda s: (-s["separability"], s["property"]))
