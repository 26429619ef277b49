"""`audit`: before trusting a detector, what besides the generator separates real from fake in the
raw files, per source and split: container format, JPEG quality and chroma subsampling, width,
height, aspect ratio, bytes per pixel, colour mode, EXIF. Each property gets a separability score
(`stages.domain.confounds`); those at or above the threshold are flagged with what to do about them.

The facts come from the manifest (`shard` records them from each header); for manifests written
before that, or with `reread`, the headers are read again (never a full decode)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from stages.domain.confounds import ADVICE, CATEGORICAL, score_all
from stages.domain.image_facts import FACTS, read_facts
from stages.domain.pairing import source_groups
from stages.domain.sources import ReadContext, RunReader
from storage.run import Entry, Run

DEFAULT_THRESHOLD = 0.8
SCORE = ("balanced accuracy of the best single rule on the property alone (a threshold for numbers, "
         "a class per category); 0.5: the property tells nothing, 1.0: it alone separates real from fake")
HEADER_BYTES = 1 << 18  # enough for any header, its quantisation tables and EXIF


def file_facts(entry: Entry, reread: bool = False, images: RunReader | None = None,
               unread: list[dict] | None = None) -> dict:
    """An entry's header facts (and size), from the manifest or, failing that, from its header read
    through its input source (`images`: a file's first bytes; a parquet row's bytes, from the
    column recorded in the run's parquet.json, checked by its key). A header that cannot be read
    again keeps the manifest's facts and is added to `unread` with the reason."""
    facts = {k: getattr(entry, k) for k in FACTS}
    if reread or entry.format is None:
        try:
            head = (images or RunReader()).head(entry, HEADER_BYTES)
            facts = read_facts(head) or facts
        except (OSError, ValueError) as e:  # gone or changed since `shard` (ReadError is a ValueError)
            if unread is not None:
                unread.append({"path": entry.path, "reason": str(e) if str(e) else type(e).__name__})
    return {**facts, "size": entry.size}


def audit_split(entries: list[Entry], facts: list[dict], threshold: float) -> dict[str, dict]:
    """Per source of one split: counts, every property's score, and the flagged ones."""
    labels = np.array([e.label for e in entries])
    out = {}
    for src, mask in source_groups([e.source for e in entries], labels).items():
        real = [f for f, m, y in zip(facts, mask, labels, strict=True) if m and y == 0]
        fake = [f for f, m, y in zip(facts, mask, labels, strict=True) if m and y == 1]
        if not real or not fake:
            out[src] = {"n_real": len(real), "n_fake": len(fake), "properties": [],
                        "note": "one class only: nothing to compare"}
            continue
        scores = score_all(real, fake)
        out[src] = {"n_real": len(real), "n_fake": len(fake), "properties": scores,
                    "flagged": [s for s in scores if s["separability"] >= threshold]}
    return out


def run_audit(run_dir: Path, threshold: float = DEFAULT_THRESHOLD, reread: bool = False) -> dict:
    """The audit of a run's manifest: per source, the confounds (properties at or above
    `threshold`) of each split, and every property's score."""
    t0 = time.perf_counter()
    run = Run(run_dir)
    entries = run.entries()
    images = RunReader(ReadContext(run.root))
    unread: list[dict] = []
    facts = [file_facts(e, reread, images, unread) for e in entries]
    images.close()
    sources: dict[str, dict] = {}
    for split in sorted({e.split for e in entries}):
        idx = [i for i, e in enumerate(entries) if e.split == split]
        per_source = audit_split([entries[i] for i in idx], [facts[i] for i in idx], threshold)
        for src, result in per_source.items():
            entry = sources.setdefault(src, {"confounds": [], "splits": {}})
            entry["splits"][split] = {k: v for k, v in result.items() if k != "flagged"}
            entry["confounds"] += [{**s, "split": split} for s in result.get("flagged", [])]
    tried = sum(1 for e in entries if reread or e.format is None)
    return {"run": str(run.root), "threshold": threshold, "score": SCORE, "files": len(entries),
            "headers_read": tried - len(unread),
            **({"headers_unread": {"count": len(unread), "first": unread[0],
                                   "facts": "the manifest's, as shard recorded them"}} if unread else {}),
            "seconds": round(time.perf_counter() - t0, 3), "sources": sources}


def unread_line(a: dict) -> str | None:
    """The headers `audit` could not read again, in one line (None when none)."""
    u = a.get("headers_unread")
    if not u:
        return None
    return (f"audit: {u['count']} headers could not be read again (e.g. {u['first']['path']}: "
            f"{u['first']['reason']}); their facts are the manifest's, as shard recorded them")


def describe(c: dict) -> str:
    """A flagged property in a few words: the counts or medians behind it."""
    if c["property"] in CATEGORICAL:
        def top(d: dict) -> str:
            return ", ".join(f"{k} {n}" for k, n in list(d.items())[:3])
        return f"real {top(c['real'])}; fake {top(c['fake'])}"
    return f"median real {c['real'].get('median', 0):.4g} vs fake {c['fake'].get('median', 0):.4g}"


def format_audit(a: dict, short: bool = False) -> str:
    """The audit for the terminal: flagged properties per source and split, each with what to do;
    `short` (the end of `shard`) lists only the flagged ones."""
    flagged = [(src, c) for src, s in a["sources"].items() for c in s["confounds"]]
    n = len(a["sources"])
    head = (f"audit: {a['files']} files, {n} source{'s' if n != 1 else ''}; separability = {a['score']}; "
            f"flagged at >= {a['threshold']:.2f}")
    if short:
        if not flagged:
            return "\n".join([f"audit: no property besides the generator separates real from fake "
                              f"(>= {a['threshold']:.2f})"] + [line for line in (unread_line(a),) if line])
        head = f"audit: {len(flagged)} properties besides the generator separate real from fake:"
    lines = [head] + [line for line in (unread_line(a),) if line]
    for src, s in a["sources"].items():
        mine = s["confounds"]
        if not mine:
            if not short:
                lines.append(f"  {src}: nothing flagged")
            continue
        for c in mine:
            lines.append(f"  {src} ({c['split']}): {c['property']} {c['separability']:.2f} ({describe(c)})")
            if not short:
                lines.append(f"    -> {ADVICE[c['property']]}")
    if short and flagged:
        lines.append(f"  what to do about each: dnf-pipeline audit --run {a['run']}")
    return "\n".join(lines)
