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

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import pipeline
from stages.domain.image_limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from stages.domain.layouts import LAYOUTS, SPLIT_NAMES, parse_label
from stages.domain.parquet_layouts import ColumnOptions, resolve_dataset
from stages.domain.probe_tasks import probe_all
from stages.domain.sources import (
    Candidate,
    Collected,
    ShardError,
    SourceOptions,
    kind_of,
    recognise,
    recorded_kind,
)
from stages.domain.sources import source as source_of
from stages.domain.sources.base import entry_address, input_address
from storage.locations import as_path, is_url, location
from storage.packed_images import pack_path, write_pack
from storage.parquet_images import check_index_append, path_order, split_address, write_index
from storage.run import Append, Entry, Run, RunError, RunInfo

__all__ = ["Candidate", "Collected", "ShardError", "collect", "run_shard"]


def parse_split_map(pairs: list[str] | None) -> dict[str, str]:
    """`--split-map val=test` (repeatable) to {"val": "test"}."""
    out = {}
    for pair in pairs or []:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ShardError(f"--split-map {pair!r}: expected FROM=TO, e.g. val=test")
        out[SPLIT_NAMES.get(old.strip().lower(), old.strip())] = new.strip()
    return out


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


def collect(inputs: list[Path], label: str | None = None, source: str | None = None,
            split: str | None = None, layout: str = "auto",
            split_map: dict[str, str] | None = None, columns: ColumnOptions | None = None,
            found: Collected | None = None, options: SourceOptions | None = None) -> list[Candidate]:
    """Candidates of every input, from the first registered source that recognises it
    (`stages.domain.sources`), with the options' overrides applied; files refused whole and parquet
    files read go into `found`."""
    found = found if found is not None else Collected()
    opts = options or SourceOptions(layout, columns or ColumnOptions())
    forced_label = None
    if label is not None:
        forced_label = parse_label(label)
        if forced_label is None:
            raise ShardError(f"--label {label!r}: expected real or fake")
    if opts.layout not in LAYOUTS:
        raise ShardError(f"--layout {opts.layout!r}: one of {', '.join(LAYOUTS)}")
    found_c: list[Candidate] = []
    for inp in inputs:
        inp = as_path(inp)
        if not location(inp).exists(inp):
            raise ShardError(f"{inp}: no such file or folder")
        found_c += recognise(inp).candidates(inp, opts, found)
    split_map = split_map or {}
    return [
        replace(c, label=forced_label if forced_label is not None else c.label,
                label_reason=None if forced_label is not None else c.label_reason,  # --label: not needed
                reason=c.reason if forced_label is not None else c.refusal,  # one reason, as before kinds
                source=source or c.source or "unknown",
                split=split or split_map.get(c.split or "train", c.split or "train"))
        for c in found_c
    ]


def input_roots(inputs: list[Path]) -> list[str]:
    """The folders (or single files) the run may read: a list file's folder, a folder itself."""
    return sorted({recognise(as_path(inp)).root(as_path(inp)) for inp in inputs})


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
    """Files by key, then the images of sources with an order of their own in that order (a parquet
    file's rows: files by name, rows in order), so that `extract` reads each store unit once."""
    order = source_of(kind_of(entry)).order(entry_address(entry))
    return (0, entry.key, 0) if order is None else (1, *order)


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
            rejects.append({"path": c.path, "stage": "shard", "reason": source_of(c.kind).no_label})
        else:
            entry = Entry(r["key"], c.path, c.label, c.source, c.split, r["size"], **r.get("facts", {}),
                          kind=recorded_kind(c), offset=c.offset)
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
    label_field: str | None = None  # a JSON sidecar's / metadata's field naming the label
    source_field: str | None = None  # ... naming the source

    def recorded(self) -> dict:
        """run.json's `options` (layout, split map, sidecar fields and parquet columns only where
        given, as older runs have none)."""
        d = {"label": self.label, "source": self.source, "split": self.split,
             "max_pixels": self.max_pixels, "max_bytes": self.max_bytes}
        if self.layout != "auto":
            d["layout"] = self.layout
        if self.split_map:
            d["split_map"] = list(self.split_map)
        for name in ("label_field", "source_field"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return {**d, **self.columns.recorded()}

    def sources(self) -> SourceOptions:
        """The options every input source may use."""
        return SourceOptions(self.layout, self.columns, self.label_field, self.source_field)


def progress_dir(run: Run, inputs: list[str], opts: ShardOptions, append: bool) -> Path:
    """Where the probe checkpoints of this shard command live until its manifest is written."""
    token = json.dumps([inputs, opts.recorded(), append], sort_keys=True)
    return run.root / ".shard-progress" / hashlib.sha256(token.encode()).hexdigest()[:16]


def clear_progress(checkpoints: Path) -> None:
    """Remove a finished shard command's probe checkpoints (and their folder once empty)."""
    loc = location(checkpoints)
    loc.remove_tree(checkpoints)
    loc.remove_empty_folder(checkpoints.parent)


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
              download: bool = False, label_field: str | None = None,
              source_field: str | None = None) -> dict:
    """Index `inputs` into `run_dir` (or, with `append`, after its existing shards); return a
    summary. Rerunning with the same inputs is a no-op (with `pack`, it writes the packed tars
    still missing); a killed run continues from its probe checkpoints."""
    if shard_size < 1:
        raise ShardError(f"--shard-size must be at least 1 (got {shard_size})")
    opts = ShardOptions(shard_size, label, source, split, layout, tuple(split_map or ()), max_pixels,
                        max_bytes, columns or ColumnOptions(), label_field, source_field)
    inputs = [as_path(p) if is_url(str(p))  # kind question allowed: a URL, or text that may be a hub id
              else resolve_dataset(Path(p), download) for p in inputs]
    found = Collected()
    candidates = collect(inputs, label, source, split, layout, parse_split_map(split_map), opts.columns,
                         found, opts.sources())
    note = unsplit_note(found, split, parse_split_map(split_map))
    if dry_run:
        return {"dry_run": True, "files": len(candidates), "table": layout_table(candidates),
                "parquet": found.inferred, "refused": found.rejects, **note}
    unpackable = sorted({c.kind for c in candidates if not source_of(c.kind).packable})
    if pack and unpackable:
        raise ShardError(f"--pack: {', '.join(unpackable)} inputs are read in place, a store unit at a time "
                         f"(already large sequential reads); pack folders of image files only")
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
    probed = iter(probe_all([c for c in candidates if c.refusal is None], workers, max_pixels,
                            max_bytes, checkpoints, found))
    results = [{"reason": c.refusal} if c.refusal else next(probed) for c in candidates]
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
