"""`shard`: index image folders and list files into deterministic manifest shards.

Every input file ends up in exactly one place: a manifest shard (keyed by the sha256 of its bytes),
`duplicates.jsonl` (same bytes as a kept image) or `rejects.jsonl` (with the reason; the same bytes
under a real and a fake label are both rejected, each naming the other). Original bytes are only
read and hashed, never re-encoded.

Probing (read, hash, full decode) is the slow part: it runs in worker processes over batches of
files, and each finished batch is checkpointed under `RUN/.shard-progress/`, so a killed `shard`
continues where it stopped and ends with the same manifest. `--append` adds new inputs as new shards
after the existing ones, which stay untouched (as do the caches made of them).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

from PIL import Image, UnidentifiedImageError

import pipeline
from pipeline.progress import Progress
from stages.domain.image_facts import header_facts
from stages.domain.image_limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from stages.domain.layouts import LAYOUTS, SPLIT_NAMES, infer_from_layout, parse_label
from stages.domain.parquet_layouts import (
    ColumnOptions,
    Columns,
    ParquetInputError,
    Row,
    dataset_files,
    describe_label,
    infer_columns,
    is_parquet_dataset,
    path_only_rows,
    read_rows,
    resolve_dataset,
    source_folder,
)
from storage.atomic import read_jsonl, write_jsonl_atomic
from storage.errors import UserError
from storage.locations import ObjectPath, as_path, is_url
from storage.locations.object_store import read_objects
from storage.packed_images import pack_path, write_pack
from storage.parquet_images import (
    ParquetError,
    ParquetSource,
    address,
    check_index_append,
    footer_signature,
    open_parquet,
    path_order,
    read_column,
    split_address,
    write_index,
)
from storage.run import Append, Entry, Run, RunError, RunInfo, within_roots

LIST_SUFFIXES = {".csv", ".jsonl"}
PROBE_BATCH = 1024  # files per probe task and per checkpoint file (DNF_SHARD_BATCH overrides)


NO_LABEL_FOLDER = ("no label: the folders name no real/fake class (0_real, 1_fake, real, nature, ai, "
                   "<generator> under a split) and no --label or --layout was given")
NO_LABEL_PARQUET = ("no label: the parquet file has no label column (label, labels, is_fake, fake, class, "
                    "target); name it with --label-column, or give --label")


class ShardError(UserError, RuntimeError):
    """Inputs that cannot be sharded as a whole (missing input, conflicting labels)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A file found in the inputs, with what its location or list row says about it."""

    path: str
    label: int | None
    source: str | None
    split: str | None
    reason: str | None = None  # set when the candidate is refused before it is read


def _walk_folder(root: Path, layout: str = "auto") -> list[Candidate]:
    """Every file below `root` (sorted, symlinked folders not followed), with its layout labels."""
    out = []
    root_name = root.resolve().name
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        rel_dirs = list(Path(dirpath).relative_to(root).parts)
        label, source, split = infer_from_layout(rel_dirs, root_name, layout)
        for name in sorted(filenames):
            out.append(Candidate(os.path.abspath(os.path.join(dirpath, name)), label, source, split))
        # Folders named like images (x.jpg/) or symlinks to folders are files the user may expect
        # to be taken: report them instead of silently skipping.
        for name in list(dirnames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                out.append(Candidate(os.path.abspath(full), label, source, split))
    return out


def _walk_objects(root: ObjectPath, layout: str = "auto") -> list[Candidate]:
    """Every object below the prefix `root` (one listing, in key order), with its layout labels:
    a folder of images on object storage."""
    out = []
    for obj, _ in root.walk_files():
        rel_dirs = list(obj.relative_to(root).parts[:-1])
        label, source, split = infer_from_layout(rel_dirs, root.name, layout)
        out.append(Candidate(str(obj), label, source, split))
    return out


def input_address(inp: str | Path | ObjectPath) -> str:
    """An input as the run records it: a URL as it is, a local path made absolute."""
    return str(as_path(inp)) if is_url(str(inp)) or isinstance(inp, ObjectPath) else os.path.abspath(inp)


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


def parse_split_map(pairs: list[str] | None) -> dict[str, str]:
    """`--split-map val=test` (repeatable) to {"val": "test"}."""
    out = {}
    for pair in pairs or []:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ShardError(f"--split-map {pair!r}: expected FROM=TO, e.g. val=test")
        out[SPLIT_NAMES.get(old.strip().lower(), old.strip())] = new.strip()
    return out


def _parquet_input(inp: Path, columns: ColumnOptions, found: Collected) -> list[Candidate]:
    """A candidate per row of a parquet file or dataset folder; its files are added to `found`, the
    files the dataset's conventions leave out to its rejects, and files in no split to its notes."""
    import pyarrow as pa

    listing = dataset_files(inp, columns.config)
    found.rejects += [{"path": str(p), "stage": "shard", "reason": why} for p, why in listing.left_out]
    if not listing.files:
        left = listing.left_out
        raise ShardError(f"{inp}: no .parquet files" + (f" to read ({len(left)} left out, e.g. {left[0][0]}: "
                                                        f"{left[0][1]})" if left else ""))
    out = []
    for file, file_split in listing.files:
        try:
            size, footer = footer_signature(str(file))
            meta = open_parquet(str(file)).metadata
            cols = infer_columns(meta.schema.to_arrow_schema(), columns, file)
            rows = list(read_rows(file, cols, columns))
            path_only = path_only_rows(file, cols)
        except (ParquetError, ParquetInputError) as e:  # one bad file is a reject, the others are read
            found.rejects.append({"path": str(file), "reason": str(e), "stage": "shard"})
            continue
        except (OSError, pa.ArrowException) as e:  # pyarrow's refusal of a damaged file; a bug still raises
            found.rejects.append({"path": str(file), "stage": "shard",
                                  "reason": f"not a readable parquet file: {e}"})
            continue
        found.parquet[str(file)] = ParquetSource(str(file), size, footer, tuple(
            meta.row_group(i).num_rows for i in range(meta.num_row_groups)), cols.image)
        unsplit = file_split is None and cols.split is None
        if unsplit:
            found.unsplit.append(str(file))
        found.inferred.append({"file": str(file), "rows": meta.num_rows,
                               "split": "train" if unsplit else file_split,
                               "splits_from": listing.how, "columns": cols.describe()})
        for r in rows:
            split = r.split or file_split
            out.append(Candidate(address(str(file), r.row), r.label, r.source or source_folder(file),
                                 SPLIT_NAMES.get(split.lower(), split) if split else None,
                                 _row_refusal(r, cols, path_only.get(r.row))))
    return out


def _row_refusal(r: Row, cols: Columns, path_only: str | None) -> str | None:
    """Why a parquet row is refused before its bytes are read (None: it is read)."""
    if path_only is not None:
        return (f"the Image cell has a path ({path_only!r}) but no bytes: the image is elsewhere, on the "
                f"machine that wrote the file; write the dataset with its images embedded (push_to_hub "
                f"does; to_parquet of images loaded from paths does not)")
    if r.label is None and r.raw_label is not None:
        named = "the value or its class name" if cols.class_names else "the value"
        return (f"label {describe_label(r.raw_label, cols)} is neither real nor fake (name its values with "
                f"--real-values / --fake-values: {named})")
    return None


def unsplit_note(found: Collected, split: str | None, split_map: dict[str, str]) -> dict:
    """`{"note": ...}` saying that parquet files no name gave a split are `train` (nothing when
    --split or --split-map train=... chose, or when every file has a split): a default that changes a
    result is printed."""
    if split or "train" in split_map or not found.unsplit:
        return {}
    n = len(found.unsplit)
    return {"note": f"{n} parquet file{'s' if n != 1 else ''} (e.g. {found.unsplit[0]}) in no split: no "
                    f"README configs, no split folder or file name (train/validation/test as Hugging Face "
                    f"names them), no split column; {'their' if n != 1 else 'its'} rows are in train. Give "
                    f"--split (or --split-map train=test) to choose"}


@dataclass
class Collected:
    """What `collect` found besides the candidates: parquet files read, and files refused whole."""

    parquet: dict[str, ParquetSource] = field(default_factory=dict)
    inferred: list[dict] = field(default_factory=list)  # per parquet file: columns, split, rows
    unsplit: list[str] = field(default_factory=list)  # parquet files no name or column gave a split
    rejects: list[dict] = field(default_factory=list)


def collect(inputs: list[Path], label: str | None = None, source: str | None = None,
            split: str | None = None, layout: str = "auto",
            split_map: dict[str, str] | None = None, columns: ColumnOptions | None = None,
            found: Collected | None = None) -> list[Candidate]:
    """Candidates from folders, list files, parquet datasets and single files, with the options'
    overrides applied; parquet files read go into `found`."""
    found = found if found is not None else Collected()
    forced_label = None
    if label is not None:
        forced_label = parse_label(label)
        if forced_label is None:
            raise ShardError(f"--label {label!r}: expected real or fake")
    if layout not in LAYOUTS:
        raise ShardError(f"--layout {layout!r}: one of {', '.join(LAYOUTS)}")
    found_c: list[Candidate] = []
    for inp in inputs:
        inp = as_path(inp)
        if isinstance(inp, ObjectPath):
            found_c += _object_input(inp, layout, columns or ColumnOptions(), found)
            continue
        if not os.path.lexists(inp):
            raise ShardError(f"{inp}: no such file or folder")
        if inp.suffix.lower() == ".parquet" or (inp.is_dir() and is_parquet_dataset(inp)):
            found_c += _parquet_input(inp, columns or ColumnOptions(), found)
        elif inp.is_dir():
            found_c += _walk_folder(inp, layout)
        elif inp.suffix.lower() in LIST_SUFFIXES:
            found_c += _read_list(inp)
        else:
            lab, src, spl = infer_from_layout(list(inp.parent.parts[-4:]), inp.parent.name, layout)
            found_c.append(Candidate(os.path.abspath(inp), lab, src or inp.parent.name, spl))
    split_map = split_map or {}
    return [
        Candidate(
            c.path,
            forced_label if forced_label is not None else c.label,
            source or c.source or "unknown",
            split or split_map.get(c.split or "train", c.split or "train"),
            c.reason,
        )
        for c in found_c
    ]


def _object_input(inp: ObjectPath, layout: str, columns: ColumnOptions, found: Collected) -> list[Candidate]:
    """Candidates of an input on object storage: a prefix of images, or one image object."""
    if inp.suffix.lower() in LIST_SUFFIXES:
        raise ShardError(f"{inp}: list files on object storage are not read; give a prefix of image "
                         f"files or parquet files")
    if inp.suffix.lower() == ".parquet" or (inp.is_dir() and is_parquet_dataset(inp)):
        return _parquet_input(inp, columns, found)
    if inp.is_dir():
        return _walk_objects(inp, layout)
    if not inp.exists():
        raise ShardError(f"{inp}: no such object or prefix")
    lab, src, spl = infer_from_layout([inp.parent.name], inp.parent.name, layout)
    return [Candidate(str(inp), lab, src or inp.parent.name, spl)]


def input_roots(inputs: list[Path]) -> list[str]:
    """The folders (or single files) the run may read: a list file's folder, a folder itself."""
    roots = []
    for inp in inputs:
        if is_url(str(inp)) or isinstance(inp, ObjectPath):
            roots.append(input_address(inp))
            continue
        inp = Path(inp)
        if inp.is_file() and inp.suffix.lower() in LIST_SUFFIXES:
            roots.append(os.path.abspath(inp.parent))
        else:
            roots.append(os.path.abspath(inp))
    return sorted(set(roots))


def probe_file(path: str, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Read, hash and fully decode one file: `{"key", "size", "facts"}` or `{"reason"}`."""
    if is_url(path):
        return _probe_object(path, max_pixels, max_bytes)
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
    return probe_bytes(data, max_pixels, max_bytes)


OBJECTS_AT_ONCE = 64  # objects fetched concurrently by one probe task: latency overlapped, memory bounded


def _probe_objects(paths: list[str], max_pixels: int, max_bytes: int) -> list[dict]:
    """`probe_file` of each path, the objects on object storage fetched concurrently in groups."""
    out = []
    for k in range(0, len(paths), OBJECTS_AT_ONCE):
        part = paths[k:k + OBJECTS_AT_ONCE]
        got = read_objects([p for p in part if is_url(p)])
        out += [_probe_object(p, max_pixels, max_bytes, got[p]) if is_url(p) else
                probe_file(p, max_pixels, max_bytes) for p in part]
    return out


def _probe_object(url: str, max_pixels: int, max_bytes: int, fetched: bytes | BaseException | None = None,
                  ) -> dict:
    """`probe_file` of an object on object storage (read whole: one GET), or of its bytes fetched."""
    try:
        if isinstance(fetched, BaseException):
            raise fetched
        data = fetched if fetched is not None else as_path(url).read_bytes()
    except FileNotFoundError:
        return {"reason": "missing: no such object"}
    except OSError as e:
        return {"reason": f"unreadable: {e.strerror or e}"}
    if not data:
        return {"reason": "empty file (0 bytes)"}
    return probe_bytes(data, max_pixels, max_bytes)


def probe_bytes(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Hash and fully decode an image's bytes (a file's, a parquet cell's)."""
    if not data:
        return {"reason": "empty image bytes (0 bytes or null)"}
    if len(data) > max_bytes:
        return {"reason": f"too large: {len(data)} bytes > --max-bytes {max_bytes}"}
    key = hashlib.sha256(data).hexdigest()
    reason, facts = check_image_bytes(data, max_pixels)
    if reason:
        return {"reason": reason, "key": key}
    return {"key": key, "size": len(data), "facts": facts}


def check_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str | None, dict]:
    """(None, the header's facts) when `data` decodes completely as an image within the pixel
    limit, else (the reason, {})."""
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, checked before any pixel is decoded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    return f"too large: {w}x{h} pixels > --max-pixels {max_pixels}", {}
                if w < 1 or h < 1:
                    return f"empty image: {w}x{h} pixels", {}
                facts = header_facts(im)
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # fast, still reads all data
                im.load()
    except UnidentifiedImageError:
        return "not an image: no image format recognised", {}
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return f"truncated or corrupt image: {e}", {}
    return None, facts



def _probe_batch(args: tuple) -> tuple[int, list[dict]]:
    b, paths, max_pixels, max_bytes, group = args
    if group is None:
        if any(is_url(p) for p in paths):
            return b, _probe_objects(paths, max_pixels, max_bytes)
        return b, [probe_file(p, max_pixels, max_bytes) for p in paths]
    source, row_group, first = group  # one row group of a parquet file: its image column read once
    try:
        cells = read_column(source.file, row_group, source.column)
    except ParquetError as e:
        return b, [{"reason": str(e)} for _ in paths]
    return b, [probe_bytes(cells[split_address(p)[1] - first], max_pixels, max_bytes) for p in paths]


def probe_batches(paths: list[str], size: int, parquet: dict[str, ParquetSource]) -> list[tuple]:
    """(paths, row group or None) batches: up to `size` consecutive files, or the rows of one row
    group of a parquet file (so each row group is read once)."""
    out: list[tuple] = []
    for p in paths:
        parts = split_address(p)
        group = None
        if parts is not None and parts[0] in parquet:
            src = parquet[parts[0]]
            rg, first = src.row_group_of(parts[1])
            group = (src, rg, first)
        last = out[-1] if out else None
        if last is not None and ((group is None and last[1] is None and len(last[0]) < size)
                                 or (group is not None and last[1] == group)):
            last[0].append(p)
        else:
            out.append(([p], group))
    return out


def probe_all(paths: list[str], workers: int, max_pixels: int, max_bytes: int,
              checkpoints: Path, parquet: dict[str, ParquetSource] | None = None) -> list[dict]:
    """`probe_file` of every path (or `probe_bytes` of every parquet row), in order, on `workers`
    processes. Each finished batch is written to `checkpoints/NNNNNN.jsonl` (atomically), and
    batches found there are not probed again."""
    size = int(os.environ.get("DNF_SHARD_BATCH", PROBE_BATCH))
    batches = probe_batches(paths, size, parquet or {})
    results: list[list[dict] | None] = [None] * len(batches)
    progress = Progress(len(paths), "shard: probing", unit="file")
    for b, (batch, _) in enumerate(batches):
        rows = read_jsonl(checkpoints / f"{b:06d}.jsonl")
        if [r.pop("path") for r in rows] == batch:
            results[b] = rows
            progress.update(len(batch))
    todo = [(b, batches[b][0], max_pixels, max_bytes, batches[b][1]) for b in range(len(batches))
            if results[b] is None]
    if todo:
        checkpoints.mkdir(parents=True, exist_ok=True)

    def done(b: int, rows: list[dict]) -> None:
        write_jsonl_atomic(checkpoints / f"{b:06d}.jsonl",
                           [{"path": p, **r} for p, r in zip(batches[b][0], rows, strict=True)])
        results[b] = rows
        progress.update(len(rows))

    if workers > 1 and sum(len(t[1]) for t in todo) > 64:
        with get_context("spawn").Pool(workers) as pool:
            for b, rows in pool.imap_unordered(_probe_batch, todo):
                done(b, rows)
    else:
        for task in todo:
            done(*_probe_batch(task))
    progress.close()
    return [r for rows in results for r in rows]


def conflict_rejects(key: str, group: list[Entry], old: Entry | None) -> list[dict]:
    """Every new copy of an image labelled both real and fake, each naming the copies with the
    other label (and the run's copy, when the image is already in the run)."""
    everyone = group + ([old] if old is not None else [])
    out = []
    for e in group:
        others = ", ".join(f"{o.path} ({'fake' if o.label else 'real'})" for o in everyone
                           if o.label != e.label)
        out.append({"path": e.path, "key": key, "stage": "shard",
                    "reason": f"conflict: the same image (sha256 {key[:16]}...) is labelled "
                              f"{'fake' if e.label else 'real'} here and the other way at {others}; "
                              f"remove one copy or fix its folder"})
    return out


def manifest_order(entry: Entry) -> tuple:
    """Files by key, then parquet rows in the files' order (files by name, rows in order), so
    that `extract` reads each row group once in all."""
    parts = split_address(entry.path)
    return (0, entry.key, 0) if parts is None else (1, *parts)


def build_manifest(candidates: list[Candidate], results: list[dict], existing: dict[str, Entry] | None = None,
                   ) -> tuple[list[Entry], list[dict], list[dict], int]:
    """(entries in `manifest_order`, rejects, duplicates, conflicting images) of probed
    candidates; `existing` maps the keys already in the run (an append) to their entries."""
    existing = existing or {}
    rejects, by_key = [], {}
    for c, r in zip(candidates, results, strict=True):
        if "reason" in r:
            rejects.append({"path": c.path, "reason": r["reason"], "stage": "shard"})
        elif c.label is None:
            rejects.append({"path": c.path, "stage": "shard", "reason": NO_LABEL_PARQUET
                            if split_address(c.path) else NO_LABEL_FOLDER})
        else:
            entry = Entry(r["key"], c.path, c.label, c.source, c.split, r["size"], **r.get("facts", {}))
            by_key.setdefault(r["key"], []).append(entry)
    entries, duplicates, conflicts = [], [], 0
    for key in sorted(by_key):
        group = sorted(by_key[key], key=lambda e: path_order(e.path))
        old = existing.get(key)
        if len({e.label for e in group} | ({old.label} if old else set())) > 1:
            rejects += conflict_rejects(key, group, old)
            conflicts += 1
            continue
        kept = old or group[0]
        if old is None:
            entries.append(kept)
        for dup in group[0 if old else 1:]:
            duplicates.append({"key": key, "path": dup.path, "split": dup.split,
                               "kept": kept.path, "kept_split": kept.split})
    rejects.sort(key=lambda r: path_order(r["path"]))
    entries.sort(key=manifest_order)
    return entries, rejects, duplicates, conflicts


def pack_shards(run: Run, shards: list[list[Entry]], first_shard: int = 0) -> dict:
    """Write RUN/packed/NNNNN.tar for every shard that has none yet (complete tars are kept)."""
    written, total = 0, 0
    for i, shard in enumerate(shards, first_shard):
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


def layout_table(candidates: list[Candidate]) -> list[dict]:
    """Split x source x label with counts and one example path per row (`--dry-run`)."""
    rows: dict[tuple, dict] = {}
    for c in candidates:
        label = "-" if c.label is None else ("fake" if c.label else "real")
        row = rows.setdefault((c.split, c.source, label), {"split": c.split, "source": c.source,
                                                          "label": label, "files": 0, "example": c.path})
        row["files"] += 1
    return [rows[k] for k in sorted(rows)]


@dataclass(frozen=True)
class ShardOptions:
    """What `shard` reads and how it labels it; all but `workers` and `pack` are recorded."""

    shard_size: int = 1024
    label: str | None = None
    source: str | None = None
    split: str | None = None
    layout: str = "auto"
    split_map: tuple[str, ...] = ()
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    columns: ColumnOptions = ColumnOptions()  # parquet inputs' columns and label values

    def recorded(self) -> dict:
        """run.json's `options` (layout, split map and parquet columns only where given, as older
        runs have none)."""
        d = {"label": self.label, "source": self.source, "split": self.split,
             "max_pixels": self.max_pixels, "max_bytes": self.max_bytes}
        if self.layout != "auto":
            d["layout"] = self.layout
        if self.split_map:
            d["split_map"] = list(self.split_map)
        return {**d, **self.columns.recorded()}


def progress_dir(run: Run, inputs: list[str], opts: ShardOptions, append: bool) -> Path:
    """Where the probe checkpoints of this shard command live until its manifest is written."""
    token = json.dumps([inputs, opts.recorded(), append], sort_keys=True)
    return run.root / ".shard-progress" / hashlib.sha256(token.encode()).hexdigest()[:16]


def clear_progress(checkpoints: Path) -> None:
    """Remove a finished shard command's probe checkpoints (and their folder once empty)."""
    if isinstance(checkpoints, ObjectPath):
        checkpoints.rmtree()  # a prefix: nothing is left once its objects are gone
        return
    shutil.rmtree(checkpoints, ignore_errors=True)
    if checkpoints.parent.exists() and not any(checkpoints.parent.iterdir()):
        checkpoints.parent.rmdir()


def shard_summary(info: RunInfo, entries: list[Entry], conflicts: int, extra: dict) -> dict:
    counts = Counter((e.split, "fake" if e.label else "real", e.source) for e in entries)
    return {**info.to_json(), "conflicts": conflicts, **extra, "counts": [
        {"split": sp, "label": lab, "source": src, "images": n}
        for (sp, lab, src), n in sorted(counts.items())]}


def appended_info(old: RunInfo, inputs: list[str], opts: ShardOptions, n_shards: int, n_entries: int,
                  files: int, rejects: int, duplicates: int, roots: list[str]) -> RunInfo:
    """run.json after an append: totals grown, the append recorded after the earlier ones."""
    record = Append(tuple(inputs), opts.recorded(), old.num_shards, n_shards, n_entries, files, rejects,
                    duplicates)
    return replace(old, num_shards=old.num_shards + n_shards, images=old.images + n_entries,
                   files=old.files + files, rejects=old.rejects + rejects,
                   duplicates=old.duplicates + duplicates, roots=tuple(sorted(set(old.roots) | set(roots))),
                   appends=(*old.appends, record))


def check_same_manifest(run: Run, shards: list[list[Entry]], n_entries: int) -> None:
    """A plain `shard` into a sharded run must find the same first shards; else it is refused."""
    old = run.info()
    base = old.segments()[0][1]
    same = base == len(shards) and all(
        run.shard_path(i).exists() and run.shard_entries(i) == s for i, s in enumerate(shards))
    if not same:
        raise RunError(
            f"{run.root} already holds a manifest of other inputs ({old.images} images in "
            f"{old.num_shards} shards, now {n_entries} in {len(shards)}); its caches index those "
            f"rows. Use a new --run folder, or --append to add these inputs as new shards.")


def write_append(run: Run, inputs: list[Path], opts: ShardOptions, candidates: list[Candidate],
                 manifest: tuple) -> RunInfo:
    """New shards after the run's last one, rejects and duplicates added, run.json last."""
    entries, rejects, duplicates, _ = manifest
    old = run.info()
    if opts.shard_size != old.shard_size:
        raise ShardError(f"--shard-size {opts.shard_size}: {run.root} has shards of {old.shard_size}")
    shards = [entries[i:i + opts.shard_size] for i in range(0, len(entries), opts.shard_size)]
    info = appended_info(old, sorted(input_address(p) for p in inputs), opts, len(shards), len(entries),
                         len(candidates), len(rejects), len(duplicates), input_roots(inputs))
    # the lists as run.json counts them (an append killed before run.json left its lines there);
    # an append of rejects and duplicates only is recorded too, so its rejects are listed
    run.write_manifest(shards, run.rejects()[:old.rejects] + rejects,
                       run.duplicates()[:old.duplicates] + duplicates, info, first_shard=old.num_shards)
    return info


def write_first(run: Run, inputs: list[Path], opts: ShardOptions, candidates: list[Candidate],
                manifest: tuple) -> RunInfo:
    """The run's manifest; an existing one must be the same (then nothing is written)."""
    entries, rejects, duplicates, _ = manifest
    shards = [entries[i:i + opts.shard_size] for i in range(0, len(entries), opts.shard_size)]
    if run.run_json.exists():
        check_same_manifest(run, shards, len(entries))
        return run.info()
    info = RunInfo(
        tool="dnf-pipeline", version=pipeline.__version__,
        inputs=tuple(sorted(input_address(p) for p in inputs)), roots=tuple(input_roots(inputs)),
        options=opts.recorded(), shard_size=opts.shard_size, num_shards=len(shards), images=len(entries),
        files=len(candidates), rejects=len(rejects), duplicates=len(duplicates))
    run.write_manifest(shards, rejects, duplicates, info)
    return info


def run_shard(inputs: list[Path], run_dir: Path, shard_size: int = 1024, label: str | None = None,
              source: str | None = None, split: str | None = None, workers: int = 1,
              max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
              pack: bool = False, layout: str = "auto", split_map: list[str] | None = None,
              append: bool = False, dry_run: bool = False, columns: ColumnOptions | None = None,
              download: bool = False) -> dict:
    """Index `inputs` into `run_dir` (or, with `append`, after its existing shards); return a
    summary. Rerunning with the same inputs is a no-op (with `pack`, it writes the packed tars
    still missing); a killed run continues from its probe checkpoints."""
    if shard_size < 1:
        raise ShardError(f"--shard-size must be at least 1 (got {shard_size})")
    opts = ShardOptions(shard_size, label, source, split, layout, tuple(split_map or ()), max_pixels,
                        max_bytes, columns or ColumnOptions())
    inputs = [as_path(p) if is_url(str(p)) else resolve_dataset(Path(p), download)  # ids: the hub cache
              for p in inputs]
    found = Collected()
    candidates = collect(inputs, label, source, split, layout, parse_split_map(split_map), opts.columns,
                         found)
    note = unsplit_note(found, split, parse_split_map(split_map))
    if dry_run:
        return {"dry_run": True, "files": len(candidates), "table": layout_table(candidates),
                "parquet": found.inferred, "refused": found.rejects, **note}
    if pack and found.parquet:
        raise ShardError("--pack: parquet inputs are read in place, a row group at a time (already large "
                         "sequential reads); pack folders of image files only")
    run = Run(run_dir)
    append = append and run.run_json.exists()
    if append and found.parquet:
        in_use = {parts[0] for e in run.entries() if (parts := split_address(e.path))}
        check_index_append(run.root, found.parquet, in_use)  # before the probe: refused at once
    abs_inputs = sorted(input_address(p) for p in inputs)
    checkpoints = progress_dir(run, abs_inputs, opts, append)
    done_before = [a for a in (run.info().appends if append else ())
                   if a.inputs == tuple(abs_inputs) and a.options == opts.recorded()]
    if done_before:
        clear_progress(checkpoints)  # a run killed after its run.json left them
        extra: dict = {"appended_now": 0, "note": "these inputs were appended before"}
        if pack:  # an earlier plain append: pack its shards now
            a = done_before[0]
            shards = range(a.first_shard, a.first_shard + a.num_shards)
            extra.update(pack_shards(run, [run.shard_entries(i) for i in shards], a.first_shard))
        return shard_summary(run.info(), [], 0, extra)
    first = run.info().num_shards if append else 0
    probed = iter(probe_all([c.path for c in candidates if c.reason is None], workers, max_pixels,
                            max_bytes, checkpoints, found.parquet))
    results = [{"reason": c.reason} if c.reason else next(probed) for c in candidates]
    entries, rejects, duplicates, conflicts = build_manifest(
        candidates, results, {e.key: e for e in run.entries()} if append else None)
    rejects = sorted(found.rejects + rejects, key=lambda r: path_order(r["path"]))
    if found.parquet and not (run.run_json.exists() and not append):
        write_index(run.root, found.parquet)  # before run.json, which is written last
    info = (write_append if append else write_first)(run, inputs, opts, candidates,
                                                     (entries, rejects, duplicates, conflicts))
    clear_progress(checkpoints)
    extra: dict = {**({"appended_now": len(entries)} if append else {}), **note}
    if pack:
        extra.update(pack_shards(run, [entries[i:i + shard_size] for i in range(0, len(entries), shard_size)],
                                 first))
    return shard_summary(info, entries, conflicts, extra)
