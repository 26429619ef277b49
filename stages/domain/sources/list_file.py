"""A list file: a `.csv` (a header with `path`, `label`, optional `source`, `split`) or a `.jsonl`
(the same keys) naming image files relative to its folder. Its images are files: the files source
reads them (`Candidate.kind` "files"), so a list file's entries are recorded as a folder's are."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from stages.domain.layouts import SPLIT_NAMES, parse_label
from stages.domain.sources.base import (
    Candidate,
    Collected,
    EntryReader,
    InputSource,
    ReadContext,
    ShardError,
    SourceOptions,
)
from stages.domain.sources.files import FileReader
from storage.atomic import read_jsonl
from storage.locations import ObjectPath, StoragePath
from storage.run import within_roots

LIST_SUFFIXES = {".csv", ".jsonl"}


def read_list(path: Path) -> list[Candidate]:
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


class ListFile(InputSource):
    """A local `.csv` or `.jsonl` list of image files."""

    kind = "list"
    packable = True

    def recognises(self, inp: StoragePath) -> bool:
        # kind question allowed (not yet moved): list files are read with local file APIs, so on
        # object storage they are refused in `candidates`, with what to give instead
        if isinstance(inp, ObjectPath):
            return inp.suffix.lower() in LIST_SUFFIXES
        return inp.suffix.lower() in LIST_SUFFIXES and not inp.is_dir()

    def candidates(self, inp: StoragePath, opts: SourceOptions, found: Collected) -> list[Candidate]:
        if isinstance(inp, ObjectPath):  # kind question allowed: see `recognises`
            raise ShardError(f"{inp}: list files on object storage are not read; give a prefix of image "
                             f"files or parquet files")
        return read_list(inp)

    def root(self, inp: StoragePath) -> str:
        return os.path.abspath(inp.parent)  # the list's paths may not leave its folder

    def reader(self, ctx: ReadContext) -> EntryReader:
        return FileReader(ctx.roots)  # its candidates are files (kind "files"); never asked in practice
