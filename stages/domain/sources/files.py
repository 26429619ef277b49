"""Image files: a folder (labels, sources and splits from its folder names by the layout rules of
`stages.domain.layouts`), a prefix of objects on object storage (the same, from its key's folders),
or one image file or object. The address is the file's absolute path or the object's URL."""

from __future__ import annotations

from collections.abc import Hashable
from functools import partial

from stages.domain.layouts import infer_from_layout
from stages.domain.probing import probe_files
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
)
from storage.locations import StoragePath, as_path, location, read_many
from storage.run import Entry, within_roots


def walk_folder(root: StoragePath, layout: str = "auto") -> list[Candidate]:
    """Every file below the folder or prefix `root`, with its layout labels: one listing
    (`Location.walk_files`, in path order), symlinked folders listed (not followed) so that the
    probe reports them instead of skipping them silently."""
    loc = location(root)
    root_name = root.resolve().name
    out = []
    for f, _ in loc.walk_files(root):
        rel_dirs = list(f.relative_to(root).parts[:-1])
        label, source, split = infer_from_layout(rel_dirs, root_name, layout)
        out.append(Candidate(loc.address(f), label, source, split))
    return out


class FileReader(EntryReader):
    """Whole files and objects; an address outside the run's input folders is refused."""

    def __init__(self, roots: tuple[str, ...] | None = None):
        self.roots = list(roots) if roots is not None else None

    def _inside(self, address: Address) -> None:
        if self.roots is not None and not within_roots(address.path, self.roots):
            raise ReadError("outside the run's input folders: the manifest path was edited (../?)")

    def read(self, address: Address) -> bytes:
        self._inside(address)
        return _got(lambda: as_path(address.path).read_bytes())

    def read_many(self, addresses: list[Address]) -> list[bytes | ReadError]:
        """Each location's way (`Location.read_many`: objects fetched concurrently, files one by one)."""
        fetched = read_many([a.path for a in addresses if self._allowed(a)])
        out: list[bytes | ReadError] = []
        for a in addresses:
            try:
                self._inside(a)
                out.append(_got(partial(_raise_or, fetched[a.path])))
            except ReadError as e:
                out.append(e)
        return out

    def _allowed(self, address: Address) -> bool:
        return self.roots is None or within_roots(address.path, self.roots)

    def head(self, entry: Entry, n: int) -> bytes:
        """The first `n` bytes (one ranged read), the whole file when it is shorter; unchecked."""
        self._inside(Address(entry.path))
        path = as_path(entry.path)

        def first() -> bytes:
            f = location(path).open_reader(path)
            try:
                return f.read(0, min(n, f.size))
            finally:
                f.close()
        return _got(first)


def _raise_or(got: bytes | BaseException) -> bytes:
    if isinstance(got, BaseException):
        raise got
    return got


def _got(read) -> bytes:
    """`read()`, its OSError said as a reject reason."""
    try:
        return read()
    except FileNotFoundError as e:
        raise ReadError("missing: the file was removed after `shard`") from e
    except OSError as e:
        raise ReadError(f"unreadable: {e.strerror or e}") from e


class Files(InputSource):
    """A folder or prefix of image files (layout rules), or one image file or object."""

    kind = "files"
    packable = True

    def recognises(self, inp: StoragePath) -> bool:
        return True  # the last resort: anything no other source took is a folder or a file

    def candidates(self, inp: StoragePath, opts: SourceOptions, found: Collected) -> list[Candidate]:
        if inp.is_dir():
            return walk_folder(inp, opts.layout)
        if not location(inp).exists(inp):
            raise ShardError(f"{inp}: no such file or folder")
        parent = inp.parent
        lab, src, spl = infer_from_layout([p for p in parent.parts[-4:] if "://" not in p], parent.name,
                                          opts.layout)
        return [Candidate(location(inp).address(inp), lab, src or parent.name, spl)]

    def owns(self, address: str) -> bool:
        return True  # asked last: an address no other source claims is a file's

    def reader(self, ctx: ReadContext) -> EntryReader:
        return FileReader(ctx.roots)

    def probe(self, addresses: list[Address], group: Hashable | None, max_pixels: int,
              max_bytes: int) -> list[dict]:
        """Sizes checked before a file is read (a huge file is never read), objects fetched
        concurrently in groups."""
        return probe_files([a.path for a in addresses], max_pixels, max_bytes)
