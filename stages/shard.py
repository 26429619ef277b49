"""`shard`: index image folders and list files into deterministic manifest shards.

Every input file ends up in exactly one place: a manifest shard (keyed by the sha256 of its bytes),
`duplicates.jsonl` (same bytes as a kept image) or `rejects.jsonl` (with the reason).
Original bytes are only read and hashed, never re-encoded.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from PIL import Image, UnidentifiedImageError

import pipeline
from stages.domain.image_limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from storage.atomic import read_jsonl
from storage.errors import UserError
from storage.packed_images import pack_path, write_pack
from storage.run import Entry, Run, RunError, RunInfo, within_roots

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
REAL_NAMES = {"0_real", "real", "nature"}
FAKE_NAMES = {"1_fake", "fake", "ai"}
LIST_SUFFIXES = {".csv", ".jsonl"}


class ShardError(UserError, RuntimeError):
    """Inputs that cannot be sharded as a whole (missing input, conflicting labels)."""


@dataclass(frozen=True)
class Candidate:
    """A file found in the inputs, with what its location or list row says about it."""

    path: str
    label: int | None
    source: str | None
    split: str | None
    reason: str | None = None  # set when the candidate is refused before it is read


def parse_label(value: object) -> int | None:
    """`0`, `1`, `real`, `fake`, `0_real`, `1_fake` (any case) to 0 / 1; anything else to None."""
    text = str(value).strip().lower()
    if text in {"0"} | REAL_NAMES:
        return 0
    if text in {"1"} | FAKE_NAMES:
        return 1
    return None


def infer_from_layout(rel_dirs: list[str], root_name: str) -> tuple[int | None, str | None, str | None]:
    """Label, source and split from the folders between an input root and a file.

    CNNDetection: `{train,val,test}/<set>/.../{0_real,1_fake}/` gives source `<set>`.
    DiffusionForensics: `{train,val,test}/<set>/{real,<generator>}/` gives `<set>/real` for real
    images and `<set>/<generator>` for generated ones. A `real`/`fake` folder right under the root
    takes the root's name as source.
    """
    lowered = [d.lower() for d in rel_dirs]
    split_idx = next((i for i, d in enumerate(lowered) if d in SPLIT_NAMES), None)
    split = SPLIT_NAMES[lowered[split_idx]] if split_idx is not None else None
    after = rel_dirs[split_idx + 1:] if split_idx is not None else rel_dirs
    low_after = [d.lower() for d in after]
    marker = next((j for j, d in enumerate(low_after) if d in REAL_NAMES | FAKE_NAMES), None)
    if marker is not None:
        label = 0 if low_after[marker] in REAL_NAMES else 1
        if marker == 0:
            source = root_name
        elif marker == 1 and split is not None and low_after[1] == "real":
            source = f"{after[0]}/real"  # DiffusionForensics real folder
        else:
            source = after[0]
        return label, source, split
    if split is not None and len(after) >= 2:  # DiffusionForensics generator folder
        return 1, f"{after[0]}/{after[1]}", split
    return None, None, split


def _walk_folder(root: Path) -> list[Candidate]:
    """Every file below `root` (sorted, symlinked folders not followed), with its layout labels."""
    out = []
    root_name = root.resolve().name
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        rel_dirs = list(Path(dirpath).relative_to(root).parts)
        label, source, split = infer_from_layout(rel_dirs, root_name)
        for name in sorted(filenames):
            out.append(Candidate(os.path.abspath(os.path.join(dirpath, name)), label, source, split))
        # Folders named like images (x.jpg/) or symlinks to folders are files the user may expect
        # to be taken: report them instead of silently skipping.
        for name in list(dirnames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                out.append(Candidate(os.path.abspath(full), label, source, split))
    return out


def _read_list(path: Path) -> list[Candidate]:
    """Rows of a `.csv` (header with `path`, `label`, optional `source`, `split`) or `.jsonl` list."""
    base = path.parent
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        try:
            rows = read_jsonl(path)
        except ValueError as e:
            raise ShardError(str(e)) from e
    out = []
    for n, row in enumerate(rows, 1):
        if not row.get("path"):
            raise ShardError(f"{path}: row {n} has no 'path' (columns: path, label, source, split)")
        p = Path(str(row["path"]))
        p = os.path.normpath(p if p.is_absolute() else base / p)
        label = parse_label(row["label"]) if row.get("label") not in (None, "") else None
        split = row.get("split") or None
        outside = None if within_roots(p, [os.path.abspath(base)]) else \
            f"outside the list file's folder {os.path.abspath(base)} (paths may not leave it)"
        out.append(Candidate(os.path.abspath(p), label, row.get("source") or path.stem,
                             SPLIT_NAMES.get(str(split).lower(), split) if split else None, outside))
    return out


def collect(inputs: list[Path], label: str | None = None, source: str | None = None,
            split: str | None = None) -> list[Candidate]:
    """Candidates from folders, list files and single files, with the options' overrides applied."""
    forced_label = None
    if label is not None:
        forced_label = parse_label(label)
        if forced_label is None:
            raise ShardError(f"--label {label!r}: expected real or fake")
    found: list[Candidate] = []
    for inp in inputs:
        inp = Path(inp)
        if not os.path.lexists(inp):
            raise ShardError(f"{inp}: no such file or folder")
        if inp.is_dir():
            found += _walk_folder(inp)
        elif inp.suffix.lower() in LIST_SUFFIXES:
            found += _read_list(inp)
        else:
            lab, src, spl = infer_from_layout(list(inp.parent.parts[-4:]), inp.parent.name)
            found.append(Candidate(os.path.abspath(inp), lab, src or inp.parent.name, spl))
    return [
        Candidate(
            c.path,
            forced_label if forced_label is not None else c.label,
            source or c.source or "unknown",
            split or c.split or "train",
            c.reason,
        )
        for c in found
    ]


def input_roots(inputs: list[Path]) -> list[str]:
    """The folders (or single files) the run may read: a list file's folder, a folder itself."""
    roots = []
    for inp in map(Path, inputs):
        if inp.is_file() and inp.suffix.lower() in LIST_SUFFIXES:
            roots.append(os.path.abspath(inp.parent))
        else:
            roots.append(os.path.abspath(inp))
    return sorted(set(roots))


def probe_file(path: str, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Read, hash and fully decode one file: `{"key", "size"}` or `{"reason"}`."""
    try:
        if os.path.isdir(path):
            return {"reason": "is a folder, not an image file"}
        size = os.path.getsize(path)
        if size == 0:
            return {"reason": "empty file (0 bytes)"}
        if size > max_bytes:
            return {"reason": f"too large: {size} bytes > --max-bytes {max_bytes}"}
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return {"reason": f"unreadable: {e.strerror or e}"}
    key = hashlib.sha256(data).hexdigest()
    reason = check_image_bytes(data, max_pixels)
    if reason:
        return {"reason": reason, "key": key}
    return {"key": key, "size": len(data)}


def check_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """None when `data` decodes completely as an image within the pixel limit, else the reason."""
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, checked before any pixel is decoded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    return f"too large: {w}x{h} pixels > --max-pixels {max_pixels}"
                if w < 1 or h < 1:
                    return f"empty image: {w}x{h} pixels"
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # fast, still reads all data
                im.load()
    except UnidentifiedImageError:
        return "not an image: no image format recognised"
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return f"truncated or corrupt image: {e}"
    return None


def _probe_star(args: tuple[str, int, int]) -> dict:
    return probe_file(*args)


def build_manifest(candidates: list[Candidate], workers: int, max_pixels: int,
                   max_bytes: int) -> tuple[list[Entry], list[dict], list[dict]]:
    """Probe every candidate; return (entries sorted by key, rejects, duplicates)."""
    jobs = [(c.path, max_pixels, max_bytes) for c in candidates if c.reason is None]
    if workers > 1 and len(jobs) > 64:
        with get_context("spawn").Pool(workers) as pool:
            results = pool.map(_probe_star, jobs, chunksize=32)
    else:
        results = [_probe_star(j) for j in jobs]
    results_iter = iter(results)
    results = [{"reason": c.reason} if c.reason else next(results_iter) for c in candidates]
    rejects, by_key = [], {}
    for c, r in zip(candidates, results, strict=True):
        if "reason" in r:
            rejects.append({"path": c.path, "reason": r["reason"], "stage": "shard"})
            continue
        if c.label is None:
            rejects.append({
                "path": c.path, "stage": "shard",
                "reason": "no label: the folders name no real/fake class (0_real, 1_fake, real, "
                          "<generator> under a split) and no --label was given",
            })
            continue
        by_key.setdefault(r["key"], []).append(
            Entry(r["key"], c.path, c.label, c.source, c.split, r["size"]))
    entries, duplicates = [], []
    for key in sorted(by_key):
        group = sorted(by_key[key], key=lambda e: e.path)
        labels = {e.label for e in group}
        if len(labels) > 1:
            paths = ", ".join(f"{e.path} ({'fake' if e.label else 'real'})" for e in group)
            raise ShardError(f"the same image (sha256 {key[:16]}...) is labelled both real and fake: "
                             f"{paths}; remove one copy or fix its folder")
        kept = group[0]
        entries.append(kept)
        for dup in group[1:]:
            duplicates.append({"key": key, "path": dup.path, "split": dup.split,
                               "kept": kept.path, "kept_split": kept.split})
    rejects.sort(key=lambda r: r["path"])
    return entries, rejects, duplicates


def pack_shards(run: Run, shards: list[list[Entry]]) -> dict:
    """Write RUN/packed/NNNNN.tar for every shard that has none yet (complete tars are kept)."""
    written, total = 0, 0
    for i, shard in enumerate(shards):
        path = pack_path(run.root, i)
        if not path.exists():
            try:
                write_pack(path, shard)
            except (OSError, ValueError) as e:
                raise ShardError(f"packing shard {i:05d} into {path} failed: {e}; the shards packed "
                                 f"before are kept, run `shard --pack` again to go on") from e
            written += 1
        total += path.stat().st_size
    return {"packed_now": written, "packed_shards": len(shards), "packed_mib": round(total / 2**20, 2)}


def run_shard(inputs: list[Path], run_dir: Path, shard_size: int = 1024, label: str | None = None,
              source: str | None = None, split: str | None = None, workers: int = 1,
              max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
              pack: bool = False) -> dict:
    """Index `inputs` into `run_dir`; return a summary. Rerunning with the same inputs is a no-op
    (with `pack`, it writes the packed tars still missing)."""
    if shard_size < 1:
        raise ShardError(f"--shard-size must be at least 1 (got {shard_size})")
    candidates = collect(inputs, label=label, source=source, split=split)
    entries, rejects, duplicates = build_manifest(candidates, workers, max_pixels, max_bytes)
    shards = [entries[i:i + shard_size] for i in range(0, len(entries), shard_size)]
    info = RunInfo(
        tool="dnf-pipeline", version=pipeline.__version__,
        inputs=tuple(sorted(os.path.abspath(p) for p in inputs)), roots=tuple(input_roots(inputs)),
        options={"label": label, "source": source, "split": split, "max_pixels": max_pixels,
                 "max_bytes": max_bytes},
        shard_size=shard_size, num_shards=len(shards), images=len(entries), files=len(candidates),
        rejects=len(rejects), duplicates=len(duplicates))
    run = Run(run_dir)
    if run.run_json.exists():
        old = run.info()
        same = old.num_shards == len(shards) and all(
            run.shard_path(i).exists() and run.shard_entries(i) == s for i, s in enumerate(shards))
        if not same:
            raise RunError(
                f"{run.root} already holds a manifest of other inputs ({old.images} images in "
                f"{old.num_shards} shards, now {len(entries)} in {len(shards)}); its caches "
                f"index those rows. Use a new --run folder.")
    run.write_manifest(shards, rejects, duplicates, info)
    packed = pack_shards(run, shards) if pack else {}
    counts = Counter((e.split, "fake" if e.label else "real", e.source) for e in entries)
    return {**info.to_json(), **packed, "counts": [
        {"split": sp, "label": lab, "source": src, "images": n}
        for (sp, lab, src), n in sorted(counts.items())]}
