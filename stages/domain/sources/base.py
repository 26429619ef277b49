"""The input-source interface: one class per kind of input (folders of files, list files, parquet
rows, WebDataset tars, zip archives, the run's packed tars), registered by one line in
`stages.domain.sources.SOURCES`.

A source answers three questions:
- `recognises(inp)`: is this input (a local path or a URL, as a storage path) mine? The registry asks
  the sources in order and the first that says yes takes it, so a more specific source comes first.
- `candidates(inp, opts, found)`: the images in it, each a `Candidate` (its address, what its
  location, list row or metadata says: label, source, split; or the reason it is refused before any
  byte is read). Files refused whole (an unreadable parquet file, a tar that is no tar) go to
  `found.rejects`.
- `reader(ctx)`: an `EntryReader` that reads an image's bytes by its recorded address: one at a time
  (`read`), and a batch at a time where the store rewards it (`read_many`: concurrent GETs of objects;
  `group`: the unit the store reads whole, a parquet row group, one archive).

Sources never ask which kind of storage a path is: they read through `storage.locations`, so every
source works on a local path and on `s3://` alike. A manifest entry records the source kind that
reads it (`Entry.kind`) where its address alone does not tell it; old manifests (no kind) read
unchanged, their kind inferred from the address (`owns`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from stages.domain.parquet_layouts import ColumnOptions
from storage.errors import UserError
from storage.locations import ObjectPath, StoragePath, as_path, location
from storage.parquet_images import ParquetSource, unit_runs  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from storage.run import Entry


class ShardError(UserError, RuntimeError):
    """Inputs that cannot be sharded as a whole (missing input, conflicting labels)."""


class ReadError(UserError, ValueError):
    """An image's bytes that cannot be read, or no longer match its key; the message is the reject
    reason (the caller names the address). Light on purpose: `shard`'s probe workers import no torch."""


@dataclass(frozen=True)
class SourceOptions:
    """The options any source may use when it lists its images; a source ignores those it has no use
    for (a folder has no JSON sidecar, so `label_field` means nothing to it)."""

    layout: str = "auto"  # how folder names give label, source and split (stages.domain.layouts)
    columns: ColumnOptions = ColumnOptions()  # parquet: image, label, source, split columns and values
    label_field: str | None = None  # a JSON sidecar's / metadata's field that names the label
    source_field: str | None = None  # a JSON sidecar's / metadata's field that names the source


@dataclass(frozen=True, slots=True)
class Address:
    """Where an image's bytes are: `path` (a file, an object, `file.parquet#row`, `shard.tar#member`),
    and, for a member of a container read by a ranged read, the offset and length of its bytes."""

    path: str
    offset: int | None = None  # the first byte of the image within the file at `path`
    size: int | None = None  # its length in bytes (with `offset`)


@dataclass(frozen=True, slots=True)
class Candidate:
    """An image found in the inputs, with what its location, list row or metadata says about it."""

    path: str  # its address, as the manifest records it
    label: int | None
    source: str | None
    split: str | None
    reason: str | None = None  # set when the candidate is refused before it is read
    kind: str = "files"  # the source kind whose reader reads it
    offset: int | None = None  # see Address
    size: int | None = None
    label_reason: str | None = None  # set when only its label is refused (a forced --label clears it)

    @property
    def address(self) -> Address:
        return Address(self.path, self.offset, self.size)

    @property
    def refusal(self) -> str | None:
        """Why the candidate is refused before it is read (None: it is read)."""
        return self.reason or self.label_reason


@dataclass
class Collected:
    """What listing the inputs found besides the candidates: parquet files read, and files refused whole."""

    parquet: dict[str, ParquetSource] = field(default_factory=dict)
    inferred: list[dict] = field(default_factory=list)  # per parquet file: columns, split, rows
    unsplit: list[str] = field(default_factory=list)  # parquet files no name or column gave a split
    rejects: list[dict] = field(default_factory=list)  # {"path", "stage": "shard", "reason"}

    def refuse(self, path: str, reason: str) -> None:
        """A file of the inputs refused whole: a reject naming it and why."""
        self.rejects.append({"path": str(path), "stage": "shard", "reason": reason})


@dataclass(frozen=True)
class ReadContext:
    """What a reader may need of the run it reads for (nothing, while `shard` probes)."""

    run_root: StoragePath | None = None  # the run (its parquet.json, its packed tars)
    roots: tuple[str, ...] | None = None  # the run's input folders: an address outside one is refused
    recheck: bool = True  # check a container unchanged since `shard` before its first read
    # (extract checks them all once up front and says False)
    indexes: dict[str, Any] | None = None  # by kind, what `shard` recorded for a source's reads
    # (parquet: parquet.json's files) when the caller has it already; else read from `run_root`


class EntryReader(ABC):
    """Reads images' bytes by address for one source kind. Picklable: DataLoader workers get a copy
    (open files are reopened per process)."""

    #: the reject reason when the bytes read no longer hash to the manifest key
    changed: ClassVar[str] = "changed since `shard`: its sha256 no longer matches the manifest key"

    @abstractmethod
    def read(self, address: Address) -> bytes:
        """The bytes at `address`; ReadError with the reason (no path: the caller names it) when
        they cannot be read."""

    def read_many(self, addresses: list[Address]) -> list[bytes | ReadError]:
        """The bytes of several addresses, each a failure of its own; override where the store
        rewards a batch (concurrent GETs)."""
        out: list[bytes | ReadError] = []
        for a in addresses:
            try:
                out.append(self.read(a))
            except ReadError as e:
                out.append(e)
        return out

    def head(self, entry: Entry, n: int) -> bytes:
        """The first `n` bytes (or all) of the entry's image: enough for its header. The default
        reads it whole and checks its key; a file is read in part, unchecked."""
        return self.checked(entry)[:n]

    def group(self, address: Address) -> Hashable | None:
        """The unit of the store that holds `address` and that is best read whole (a parquet row
        group); None: none (images are read one by one)."""
        return None

    def checked(self, entry: Entry) -> bytes:
        """The entry's bytes, refused (ReadError) when they no longer hash to its key."""
        return check_key(self.read(entry_address(entry)), entry.key, self.changed)

    def close(self) -> None:  # noqa: B027 (optional: most readers hold nothing open)
        """Release what the reader holds open."""


class InputSource(ABC):
    """One kind of input: how it is recognised, listed, probed and read. Subclasses set `kind`
    (the name the manifest records) and implement `recognises`, `candidates` and `reader`."""

    kind: ClassVar[str]
    #: the reject reason of an image of this source with no label from anywhere
    no_label: ClassVar[str] = ("no label: the folders name no real/fake class (0_real, 1_fake, real, nature, "
                               "ai, <generator> under a split) and no --label or --layout was given")
    #: whether `shard --pack` may copy its images into packed tars (its addresses are plain files)
    packable: ClassVar[bool] = False

    @abstractmethod
    def recognises(self, inp: StoragePath) -> bool:
        """Whether `inp` (an existing local path, or a URL) is an input of this kind."""

    @abstractmethod
    def candidates(self, inp: StoragePath, opts: SourceOptions, found: Collected) -> list[Candidate]:
        """The images of `inp`, in a fixed order, labelled as far as the input says; files refused
        whole go to `found.rejects`. Raises ShardError when the input as a whole cannot be read."""

    @abstractmethod
    def reader(self, ctx: ReadContext) -> EntryReader:
        """A reader of this kind's addresses for the run in `ctx`."""

    def owns(self, address: str) -> bool:
        """Whether an address with no recorded kind (an old manifest) is this source's; the address
        syntax decides (`file.parquet#row`). The files source owns whatever no other source does."""
        return False

    def root(self, inp: StoragePath) -> str:
        """The folder (or file) of `inp` that the run may read: addresses outside every root are
        refused at read time (an edited manifest)."""
        return input_address(inp)

    def order(self, address: Address) -> tuple | None:
        """Where the image's entry goes in the manifest: None sorts it by key (files); a tuple
        sorts it after those, in the store's order (a parquet file's rows), so that `extract` reads
        each unit once."""
        return None

    def probe_group(self, address: Address, found: Collected) -> Hashable | None:
        """The unit `shard` probes whole, in one task (a parquet row group); None: plain batches.
        Passed to `probe` in a worker process, so it must pickle."""
        return None

    def probe(self, addresses: list[Address], group: Hashable | None, max_pixels: int,
              max_bytes: int) -> list[dict]:
        """Read, hash and fully decode each image: `{"key", "size", "facts"}` or `{"reason"}`, in
        order. The default reads through `reader` (a batch at a time) and checks the bytes."""
        from stages.domain.probing import probe_bytes

        out = []
        for got in self.reader(ReadContext()).read_many(addresses):
            out.append({"reason": str(got)} if isinstance(got, ReadError)
                       else probe_bytes(got, max_pixels, max_bytes))
        return out


def input_address(inp: str | Path | ObjectPath) -> str:
    """An input as the run records it: a URL as it is, a local path made absolute."""
    return location(inp).address(as_path(inp))


def entry_address(entry: Entry) -> Address:
    """A manifest entry's address (its offset and length when it records an offset)."""
    offset = getattr(entry, "offset", None)
    return Address(entry.path, offset, entry.size if offset is not None else None)


def check_key(data: bytes | None, key: str, changed: str) -> bytes:
    """`data` when it hashes to `key`; else ReadError(`changed`)."""
    import hashlib

    if not data or hashlib.sha256(data).hexdigest() != key:
        raise ReadError(changed)
    return data
