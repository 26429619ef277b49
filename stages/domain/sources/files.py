"""Image files: a folder (labels, sources and splits from its folder names by the layout rules of
`stages.domain.layouts`), a prefix of objects on object storage (the same, from its key's folders),
or one image file or object. The address is the file's absolute path or the object's URL."""

from __future__ import annotations

import os
from collections.abc import Hashable
from functools import partial
from pathlib import Path

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
from storage.locations import ObjectPath, StoragePath, as_path, is_url, location
from storage.locations.object_store import read_objects
from storage.run import Entry, within_roots


def walk_folder(root: Path, layout: str = "auto") -> list[Candidate]:
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


def walk_objects(root: ObjectPath, layout: str = "auto") -> list[Candidate]:
    """Every object below the prefix `root` (one listing, in key order), with its layout labels:
    a folder of images on object storage."""
    out = []
    for obj, _ in root.walk_files():
        rel_dirs = list(obj.relative_to(root).parts[:-1])
        label, source, split = infer_from_layout(rel_dirs, root.name, layout)
        out.append(Candidate(str(obj), label, source, split))
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
        """Objects on object storage fetched concurrently (their latency overlapped), files one by one."""
        urls = [a.path for a in addresses if is_url(a.path) and self._allowed(a)]
        fetched = read_objects(urls) if len(urls) > 1 else {}
        out: list[bytes | ReadError] = []
        for a in addresses:
            try:
                self._inside(a)
                got = fetched.get(a.path)
                out.append(self.read(a) if got is None else _got(partial(_raise_or, got)))
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
        if isinstance(inp, ObjectPath):
            if inp.is_dir():
                return walk_objects(inp, opts.layout)
            if not inp.exists():
                raise ShardError(f"{inp}: no such object or prefix")
            lab, src, spl = infer_from_layout([inp.parent.name], inp.parent.name, opts.layout)
            return [Candidate(str(inp), lab, src or inp.parent.name, spl)]
        if inp.is_dir():
            return walk_folder(inp, opts.layout)
        lab, src, spl = infer_from_layout(list(inp.parent.parts[-4:]), inp.parent.name, opts.layout)
        return [Candidate(os.path.abspath(inp), lab, src or inp.parent.name, spl)]

    def owns(self, address: str) -> bool:
        return True  # asked last: an address no other source claims is a file's

    def reader(self, ctx: ReadContext) -> EntryReader:
        return FileReader(ctx.roots)

    def probe(self, addresses: list[Address], group: Hashable | None, max_pixels: int,
              max_bytes: int) -> list[dict]:
        """Sizes checked before a file is read (a huge file is never read), objects fetched
        concurrently in groups."""
        return probe_files([a.path for a in addresses], max_pixels, max_bytes)
