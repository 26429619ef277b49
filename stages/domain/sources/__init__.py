"""The input sources, one line each (see `base.InputSource`). Order matters: an input goes to the
first source that recognises it, so a more specific source comes before a general one (a folder of
`.tar` shards is the WebDataset source's, not the files source's, and img2dataset's `00000.parquet`
beside a tar is its metadata, not a parquet dataset); the files source, which takes anything, is last.
Reading goes through `RunReader`, which picks each entry's source by its recorded kind (or, in
manifests written before kinds were recorded, by its address)."""

from __future__ import annotations

from stages.domain.sources.base import (
    Address,
    Candidate,
    Collected,
    EntryReader,
    InputSource,
    ReadContext,
    ReadError,
    ShardError,
    SourceOptions,
    entry_address,
    unit_runs,
)
from stages.domain.sources.files import Files
from stages.domain.sources.list_file import ListFile
from stages.domain.sources.packed import PackedReader, PackedTars
from stages.domain.sources.parquet_rows import ParquetRows
from stages.domain.sources.webdataset_tar import WebDatasetTars
from stages.domain.sources.zip_archive import ZipArchives
from storage.locations import StoragePath
from storage.run import Entry

SOURCES: tuple[InputSource, ...] = (
    ListFile(),  # .csv / .jsonl lists of files
    WebDatasetTars(),  # a .tar of WebDataset samples, or a folder or prefix holding tars (img2dataset's)
    ZipArchives(),  # a .zip of images, or a folder or prefix holding zips (DiffusionDB's)
    ParquetRows(),  # a .parquet file, or a folder or prefix holding a parquet dataset
    PackedTars(),  # the run's own RUN/packed/*.tar (read side only: recognises no input)
    Files(),  # a folder or prefix of image files, or one file: last, it takes anything
)

__all__ = ["SOURCES", "Address", "Candidate", "Collected", "EntryReader", "InputSource", "ReadContext",
           "ReadError", "RunReader", "ShardError", "SourceOptions", "kind_of", "recognise", "source"]


def source(kind: str) -> InputSource:
    """The registered source of this kind."""
    for s in SOURCES:
        if s.kind == kind:
            return s
    raise KeyError(f"no input source of kind {kind!r} (registered: {', '.join(s.kind for s in SOURCES)})")


def recognise(inp: StoragePath) -> InputSource:
    """The first registered source that takes the input."""
    return next(s for s in SOURCES if s.recognises(inp))


def kind_of(entry: Entry | Candidate) -> str:
    """The source kind that reads an entry: the one recorded, else the first whose address syntax
    it is (entries of manifests written before kinds were recorded read as they always did)."""
    kind = getattr(entry, "kind", None)
    if kind:
        return kind
    return next(s.kind for s in SOURCES if s.owns(entry.path))


def recorded_kind(candidate: Candidate) -> str | None:
    """What a manifest entry records as its kind: None where its address alone tells it (so files'
    and parquet rows' entries are written as they always were)."""
    inferred = next(s.kind for s in SOURCES if s.owns(candidate.path))
    return None if inferred == candidate.kind else candidate.kind


class RunReader:
    """Reads any entry of a run through its source: one reader per kind, opened on first use; a
    shard's packed tar (`pack`) first when it holds the image. Picklable for DataLoader workers."""

    def __init__(self, ctx: ReadContext | None = None, pack: PackedReader | None = None):
        self.ctx = ctx or ReadContext()
        self.pack = pack
        self.readers: dict[str, EntryReader] = {}

    def reader(self, entry: Entry) -> EntryReader:
        """The reader of the entry's source (the packed tar when it holds the image)."""
        if self.pack is not None and entry in self.pack:
            return self.pack
        kind = kind_of(entry)
        if kind not in self.readers:
            self.readers[kind] = source(kind).reader(self.ctx)
        return self.readers[kind]

    def read(self, entry: Entry) -> bytes:
        """The entry's bytes, checked against its key; ReadError (the reject reason) when they
        cannot be read or no longer match."""
        return self.reader(entry).checked(entry)

    def read_many(self, entries: list[Entry]) -> list[bytes | ReadError]:
        """`read` of each entry, a batch per source where the store rewards it (concurrent GETs)."""
        out: list[bytes | ReadError | None] = [None] * len(entries)
        by_reader: dict[int, tuple[EntryReader, list[int]]] = {}
        for i, e in enumerate(entries):
            r = self.reader(e)
            by_reader.setdefault(id(r), (r, []))[1].append(i)
        for r, idx in by_reader.values():
            if isinstance(r, PackedReader) or len(idx) == 1:
                got = [_try(r.checked, entries[i]) for i in idx]
            else:
                got = [_keyed(data, entries[i], r) for i, data in
                       zip(idx, r.read_many([entry_address(entries[i]) for i in idx]), strict=True)]
            for i, g in zip(idx, got, strict=True):
                out[i] = g
        return out  # type: ignore[return-value]

    def head(self, entry: Entry, n: int) -> bytes:
        """At least the header of the entry's image (see EntryReader.head)."""
        return self.reader(entry).head(entry, n)

    def units(self, entries: list[Entry], batch_size: int) -> list[list[int]] | None:
        """The entries (by position) cut into units a loader worker reads whole (`unit_runs`), or
        None when no store unit holds several of them (then plain batches are as good)."""
        groups = [None if self.pack is not None and e in self.pack else self.reader(e).group(entry_address(e))
                  for e in entries]
        if all(g is None for g in groups):
            return None
        return unit_runs(groups, batch_size)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


def _try(read, entry: Entry) -> bytes | ReadError:
    try:
        return read(entry)
    except ReadError as e:
        return e


def _keyed(data: bytes | ReadError, entry: Entry, reader: EntryReader) -> bytes | ReadError:
    """Bytes read in a batch, checked against the entry's key as `checked` does."""
    if isinstance(data, ReadError):
        return data
    from stages.domain.sources.base import check_key

    try:
        return check_key(data, entry.key, reader.changed)
    except ReadError as e:
        return e
