"""Images stored in a column of parquet files (Hugging Face datasets), read in place.

A manifest entry of such an image has the path `<file.parquet>#<row>` (the row within the file);
`shard` records every file it read in `RUN/parquet.json`: its size, the sha256 of its footer, the
rows of each row group and the image column, so `extract` finds a row's row group without opening
the file's metadata, and refuses a file that changed since. Parquet's unit of reading is the row
group: `RowGroupReader` reads one row group's image column at a time (no other column) and keeps
the last one, so consecutive rows cost one read.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import re
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from storage.atomic import read_json, write_json_atomic
from storage.errors import UserError
from storage.locations import StoragePath, as_path, location

ADDRESS = re.compile(r"^(?P<file>.+\.parquet)#(?P<row>\d+)$", re.IGNORECASE)
MAGIC = b"PAR1"


class ParquetError(UserError, ValueError):
    """A parquet file that cannot be read, or that changed since `shard`."""


def address(file: str, row: int) -> str:
    """The manifest path of row `row` of a parquet file."""
    return f"{file}#{row}"


def split_address(path: str) -> tuple[str, int] | None:
    """(file, row) of a parquet address, None for the path of a plain file."""
    m = ADDRESS.match(path)
    return (m["file"], int(m["row"])) if m else None


def path_order(path: str) -> tuple[str, int]:
    """Sort key: a parquet file's rows in row order (`f#9` before `f#10`), plain files by path."""
    parts = split_address(path)
    return parts if parts else (path, -1)


def footer_signature(file: str) -> tuple[int, str]:
    """(size, sha256 of the footer) of a parquet file, read without pyarrow: the footer holds the
    schema and every row group's offsets, so a rewritten file has another one."""
    path = as_path(file)
    try:
        f = location(path).open_reader(path)  # two ranged reads on object storage
        try:
            size = f.size
            if size < 12:
                raise ParquetError(f"{file}: not a parquet file ({size} bytes)")
            tail = f.read(size - 8, 8)
            length = int.from_bytes(tail[:4], "little")
            if tail[4:] != MAGIC or length + 12 > size:
                raise ParquetError(f"{file}: not a parquet file, or truncated (no footer at its end)")
            footer = f.read(size - 8 - length, length)
        finally:
            f.close()
    except OSError as e:
        raise ParquetError(f"{file}: unreadable: {e.strerror or e}") from e
    return size, hashlib.sha256(footer).hexdigest()


@dataclass(frozen=True)
class ParquetSource:
    """One parquet file as `shard` read it."""

    file: str
    size: int
    footer_sha256: str
    row_groups: tuple[int, ...]  # rows in each row group, in order
    column: str  # the image bytes: `image.bytes` (a datasets Image struct) or a binary column

    def row_group_of(self, row: int) -> tuple[int, int]:
        """(row group, its first row) of a row of the file."""
        starts = self._starts  # computed once per source, not per row
        rg = bisect.bisect_right(starts, row) - 1
        if rg < 0 or rg >= len(self.row_groups) or row >= starts[rg] + self.row_groups[rg]:
            raise ParquetError(f"{self.file}#{row}: the file has {sum(self.row_groups)} rows")
        return rg, starts[rg]

    @functools.cached_property
    def _starts(self) -> list[int]:
        return self.starts()

    def starts(self) -> list[int]:
        """The first row of each row group."""
        out, total = [], 0
        for n in self.row_groups:
            out.append(total)
            total += n
        return out

    def check_unchanged(self) -> None:
        """Raise ParquetError naming the file when its size or footer differs from `shard`'s."""
        size, footer = footer_signature(self.file)
        if (size, footer) != (self.size, self.footer_sha256):
            raise ParquetError(
                f"{self.file}: changed since `shard` (size {self.size} -> {size} bytes"
                f"{', footer differs' if footer != self.footer_sha256 else ''}); its rows in the manifest "
                f"may now be other images. Restore it, or shard it again into a new --run folder")

    def to_json(self) -> dict:
        return {**asdict(self), "row_groups": list(self.row_groups)}

    @classmethod
    def from_json(cls, d: dict) -> ParquetSource:
        return cls(**{**d, "row_groups": tuple(d["row_groups"])})


def index_path(run_root: StoragePath | str) -> StoragePath:
    """`RUN/parquet.json`: the parquet files of the run's manifest."""
    return as_path(run_root) / "parquet.json"


def read_index(run_root: Path) -> dict[str, ParquetSource]:
    """The run's parquet files by path ({} for a run of plain files)."""
    path = index_path(run_root)
    if not path.exists():
        return {}
    return {f: ParquetSource.from_json(d) for f, d in read_json(path)["files"].items()}


def check_index_append(run_root: Path, sources: dict[str, ParquetSource], in_use: set[str]) -> None:
    """Raise ParquetError when a file the run's parquet.json records and its manifest has rows of
    (`in_use`) is read again with another image column or with other contents: its entry would be
    replaced, and those rows would read other bytes."""
    old = read_index(run_root)
    for f in sorted(set(old) & set(sources) & in_use):
        was, now = old[f], sources[f]
        if was.column != now.column:
            raise ParquetError(
                f"{f}: the run read its images from column {was.column!r}, this append from {now.column!r}; "
                f"parquet.json holds one column per file, so the run's rows of it would read other "
                f"images. Append with --image-column {was.column.removesuffix('.bytes')!r}, or shard the "
                f"other column into a new --run folder")
        if (was.size, was.footer_sha256) != (now.size, now.footer_sha256):
            footer = ", footer differs" if was.footer_sha256 != now.footer_sha256 else ""
            raise ParquetError(f"{f}: changed since the run read it (size {was.size} -> {now.size} bytes"
                               f"{footer}); its rows in the run may now be other images. Restore it, or "
                               f"shard it into a new --run folder")


def write_index(run_root: Path, sources: dict[str, ParquetSource]) -> None:
    """Write (or grow, on an append, after `check_index_append`) `RUN/parquet.json`; written before
    the manifest's run.json."""
    merged = {**read_index(run_root), **sources}
    write_json_atomic(index_path(run_root),
                      {"files": {f: merged[f].to_json() for f in sorted(merged)}})


def open_parquet(file: str | StoragePath) -> Any:
    """`pyarrow.parquet.ParquetFile` of a local file, or of an object read through fsspec (the
    footer, then each column chunk asked for, by ranged reads)."""
    import pyarrow.parquet as pq  # imported here: only processes that read parquet load pyarrow

    path = as_path(file)
    return pq.ParquetFile(location(path).file_for_ranged_reads(path))


def read_column(file: str, row_group: int, column: str) -> list[bytes | None]:
    """One row group's image bytes (None where null), reading that column only."""
    try:
        table = open_parquet(file).read_row_group(row_group, columns=[column], use_threads=False)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError are among these
        raise ParquetError(f"{file}: row group {row_group} unreadable: {e}") from e
    col = table.column(0)
    for name in column.split(".")[1:]:  # `image.bytes`: the struct's field
        col = col.combine_chunks().field(name)
    return col.to_pylist()


class RowGroupReader:
    """Image bytes of parquet rows by address; the last row group read is kept."""

    def __init__(self, sources: dict[str, ParquetSource]):
        self.sources = sources
        self._held: tuple[str, int] | None = None
        self._rows: list[bytes | None] = []
        self.bytes_read = 0  # image bytes read from the files (a row group's whole column each time)

    def read(self, path: str) -> bytes | None:
        """The bytes of the row at `path` (`file#row`), None when the cell is null."""
        parts = split_address(path)
        if parts is None or parts[0] not in self.sources:
            raise ParquetError(f"{path}: not a row of the run's parquet files")
        src = self.sources[parts[0]]
        rg, first = src.row_group_of(parts[1])
        if self._held != (src.file, rg):
            self._rows = read_column(src.file, rg, src.column)
            self._held = (src.file, rg)
            self.bytes_read += sum(len(b) for b in self._rows if b)
        return self._rows[parts[1] - first]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_held": None, "_rows": []}


def read_units(paths: list[str], sources: dict[str, ParquetSource], batch_size: int) -> list[list[int]]:
    """A shard's rows (by index) cut into units that one loader worker reads whole (`unit_runs`,
    a row group being the group; plain files have none)."""
    groups = []
    for path in paths:
        parts = split_address(path)
        groups.append((parts[0], sources[parts[0]].row_group_of(parts[1])[0])
                      if parts is not None and parts[0] in sources else None)
    return unit_runs(groups, batch_size)


def unit_runs(groups: list[Hashable | None], batch_size: int) -> list[list[int]]:
    """Positions cut into units that one loader worker reads whole: consecutive runs of one group
    (no group: runs of `batch_size`), merged while a unit stays within `batch_size`. A unit's batches
    are its `batch_size` chunks: they do not depend on the number of workers, so neither do the
    stored bytes."""
    segments: list[list[int]] = []
    last: object = object()
    for i, group in enumerate(groups):
        if segments and group == last and (group is not None or len(segments[-1]) < batch_size):
            segments[-1].append(i)
        else:
            segments.append([i])
        last = group
    units: list[list[int]] = []
    for seg in segments:
        if units and len(units[-1]) + len(seg) <= batch_size:
            units[-1] += seg
        else:
            units.append(list(seg))
    return units
