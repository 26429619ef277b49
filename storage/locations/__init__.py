"""Storage locations: where a run, its inputs and its caches live. A string path is a local path
(`pathlib.Path`, the local disk or a shared filesystem) or a URL (`s3://bucket/key`, an
`ObjectPath` on object storage through fsspec). `location(path)` gives the operations that differ
between the two (`storage.locations.base.Location`); a new kind is one file and one line here."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Union

from storage.locations.base import Location, fenced  # noqa: F401 (fenced: for the stages)
from storage.locations.local import LocalLocation
from storage.locations.object_store import ObjectLocation, ObjectPath

StoragePath = Union[Path, ObjectPath]  # noqa: UP007 (a runtime alias)

try:  # what a storage call raises besides OSError: the S3 client's own errors
    from botocore.exceptions import BotoCoreError, ClientError

    STORAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, BotoCoreError, ClientError)
except ImportError:
    STORAGE_ERRORS = (OSError,)

LOCATIONS: dict[type, Location] = {
    Path: LocalLocation(),
    ObjectPath: ObjectLocation(),
}


def is_url(text: str) -> bool:
    """True for `scheme://...` (s3://, gs://, ...), not for local paths (file:// is local)."""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and scheme.isalnum() and len(scheme) > 1 and scheme != "file"


def as_path(path: str | Path | ObjectPath) -> StoragePath:
    """A path object for a local path or a URL (path objects are returned as they are)."""
    if isinstance(path, ObjectPath):
        return path
    text = str(path)
    if is_url(text):
        return ObjectPath(text)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return path if isinstance(path, Path) else Path(text)


def location(path: str | StoragePath) -> Location:
    """The storage operations of `path`'s kind (a string is read by `as_path` first)."""
    if isinstance(path, str):
        path = as_path(path)
    for kind, loc in LOCATIONS.items():
        if isinstance(path, kind):
            return loc
    raise TypeError(f"not a storage path: {path!r}")


def read_many(paths: list[str], limit: int | None = None) -> dict[str, bytes | OSError]:
    """`Location.read_many` of paths of any kinds (each kind's paths read its way), by path."""
    by_kind: dict[int, tuple[Location, list[str]]] = {}
    for p in paths:
        loc = location(p)
        by_kind.setdefault(id(loc), (loc, []))[1].append(p)
    out: dict[str, bytes | OSError] = {}
    for loc, part in by_kind.values():
        out.update(loc.read_many(part, limit))
    return out


def staged(folder: StoragePath) -> AbstractContextManager[Path]:
    """A local folder for files written with ordinary file APIs into `folder` (see `Location.staged`)."""
    return location(folder).staged(folder)
