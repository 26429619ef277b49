"""Object storage (S3 and S3-compatible servers; gcs, azure and other fsspec protocols by the same
code) through fsspec: `ObjectPath`, a URL with the pathlib subset the stages use, and
`ObjectLocation`, whose whole-object PUTs are atomic and whose exclusive creation is a conditional
PUT (`If-None-Match: *`).

Credentials and the endpoint come from where the client library looks (for S3: the AWS environment
variables and config files, `AWS_ENDPOINT_URL`); a URL never carries them, so none reach a file, a
log or a message. Each process opens its own filesystem (s3fs is not fork-safe), without a listing
cache (it could hide a done marker another worker just created). Network errors, 5xx answers and
throttling are retried with backoff by the client (botocore's `standard` retry mode)."""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import posixpath
import re
import tempfile
import time
import uuid
from collections import namedtuple
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import fsspec

from storage.errors import OptionError, UserError
from storage.locations.base import Location, RangeReader, TooLarge, check_fence

RETRY_ATTEMPTS = 10  # botocore's standard mode: exponential backoff with jitter, up to ~20 s apart
_FILESYSTEMS: dict[tuple[int, str], Any] = {}
_BUCKETS_SEEN: set[tuple[int, str]] = set()  # (pid, bucket URL) of the buckets found to exist
_CONDITIONAL_OK: set[tuple[int, str]] = set()  # (pid, bucket URL) of the stores that honour If-None-Match
CLAIM_CHOICES = ("auto", "flock", "heartbeat")  # pipeline.queue.CLAIM_MODES, named in a refusal
ObjectStat = namedtuple("ObjectStat", "st_size st_mtime")


class StoreError(UserError, RuntimeError):
    """Object storage that cannot hold what is asked of it (a bucket that does not exist, a
    server that ignores conditional writes); the message names the bucket's URL."""


class AccessDenied(StoreError, PermissionError):
    """A request the store refused (403) for these credentials; the message names the URL. Still a
    PermissionError, so code that handles storage errors (OSError) handles it as before."""


def server_error(e: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status behind an error of the client ('' and 0 when unknown)."""
    for err in (e, e.__cause__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return (str((response.get("Error") or {}).get("Code") or ""),
                    int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0))
    return "", 0


def denied(url: object, e: PermissionError) -> AccessDenied:
    """The one-line error of a request refused with 403 (no credentials in it: the server's
    message names none, and the URL holds none)."""
    if isinstance(e, AccessDenied):
        return e
    code = server_error(e)[0] or "AccessDenied"
    return AccessDenied(f"{url}: access denied ({code}) with these credentials: they need read (and "
                        f"for outputs write and delete) permission on this bucket and prefix")


def _said_denied(method: Callable) -> Callable:
    """`method` of an ObjectPath (or reader) whose 403 answer becomes `AccessDenied` naming its URL."""
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except PermissionError as e:
            raise denied(getattr(self, "path", self), e) from None
    return wrapper


def check_bucket(path: ObjectPath) -> None:
    """Refuse, naming the URL, a path whose bucket does not exist (asked once per process and
    bucket; access denied to the bucket's HEAD (credentials without s3:ListBucket) is left to the
    requests that follow, which say it if they are denied too)."""
    bucket = f"{path.protocol}://{path.key.split('/', 1)[0]}"
    if (os.getpid(), bucket) in _BUCKETS_SEEN:
        return
    try:
        path.fs.info(path.key.split("/", 1)[0])
    except FileNotFoundError:
        raise StoreError(f"{path}: the bucket {bucket} does not exist (or is not visible with these "
                         f"credentials); create it, or give a URL in an existing bucket") from None
    except Exception:  # noqa: BLE001 (access denied to HEAD, a server without it: the requests tell)
        pass
    _BUCKETS_SEEN.add((os.getpid(), bucket))


def storage_options(protocol: str) -> dict:
    """The options every filesystem of `protocol` is opened with (no credentials: the client finds
    them in the environment)."""
    options: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
    if protocol in ("s3", "s3a"):
        options["config_kwargs"] = {"retries": {"max_attempts": RETRY_ATTEMPTS, "mode": "standard"}}
        if os.environ.get("AWS_ENDPOINT_URL"):
            options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    return options


@functools.cache
def _literal_keys(cls: type) -> type:
    """`cls` (s3fs's filesystem) taking every key as it is: s3fs cuts a key at `?versionId=` (a
    version of the object, in its URL syntax), but `?` is a key character like any other and this
    project never names versions."""
    class LiteralKeys(cls):  # type: ignore[valid-type, misc]
        def split_path(self, path: str) -> tuple[str, str, None]:
            trail = path[len(path.rstrip("/")):]
            path = self._strip_protocol(path).lstrip("/")
            if "/" not in path:
                return path, "", None
            bucket, key = self._find_bucket_key(path)
            return bucket, key + trail, None

    LiteralKeys.__name__ = LiteralKeys.__qualname__ = f"LiteralKeys{cls.__name__}"
    return LiteralKeys


def filesystem(protocol: str) -> Any:
    """This process's fsspec filesystem of `protocol` (a forked worker opens its own)."""
    key = (os.getpid(), protocol)
    if key not in _FILESYSTEMS:
        cls = fsspec.get_filesystem_class(protocol)
        if protocol in ("s3", "s3a"):
            cls = _literal_keys(cls)
        _FILESYSTEMS[key] = cls(**storage_options(protocol))
    return _FILESYSTEMS[key]


def _one_request(protocol: str) -> dict:
    """Options that make a whole-object read one GET (s3fs would first ask the size, a HEAD, to
    split a large object into concurrent ranged GETs)."""
    return {"max_concurrency": 1} if protocol in ("s3", "s3a") else {}


def read_objects(urls: list[str]) -> dict[str, bytes | BaseException]:
    """Whole objects by URL, fetched concurrently (one GET each, overlapped on the client's event
    loop: what hides object storage's latency per request); a failed read gives its exception."""
    out: dict[str, bytes | BaseException] = {}
    by_protocol: dict[str, list[ObjectPath]] = {}
    for url in urls:
        path = ObjectPath(url)
        by_protocol.setdefault(path.protocol, []).append(path)
    for protocol, paths in by_protocol.items():
        # cat_ranges, not cat: `cat` glob-expands a key holding `[`, `*` or `?` (S3 allows them)
        got = filesystem(protocol).cat_ranges([p.key for p in paths], None, None, on_error="return",
                                              **_one_request(protocol))
        for p, value in zip(paths, got, strict=True):
            if isinstance(value, PermissionError):
                value = denied(p, value)
            out[str(p)] = value if isinstance(value, (bytes, BaseException)) else bytes(value)
    return out


def _is_pattern(key: str) -> bool:
    """Whether fsspec's calls that expand paths (`rm`, `cat`, `glob`, `expand_path`) would take
    `key` as a glob pattern rather than a name."""
    return any(c in key for c in "*?[")


class ObjectPath:
    """An object or a prefix on object storage, named by its URL (`s3://bucket/key`)."""

    def __init__(self, url: str):
        protocol, _, rest = str(url).partition("://")
        bucket = rest.split("/", 1)[0]
        if "@" in bucket or ":" in bucket:
            raise OptionError(f"{protocol}://{rest.split('@')[-1]}: credentials do not belong in a URL; "
                              f"set them in the environment (AWS_ACCESS_KEY_ID, ...) or a profile")
        self.protocol = protocol
        # the key exactly as given (a key is a name: `a//b`, `./c`, `d/../e` are other objects than
        # `a/b`, `c`, `e`), less the slashes that end a prefix
        self.key = rest.strip("/")

    # -- pathlib's names ---------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __lt__(self, other: ObjectPath) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, part: str) -> ObjectPath:
        return ObjectPath(f"{self.protocol}://{self.key}/{part}")

    def joinpath(self, *parts: str) -> ObjectPath:
        out = self
        for p in parts:
            out = out / p
        return out

    @property
    def fs(self) -> Any:
        return filesystem(self.protocol)

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0] if not self.name.startswith(".") else self.name

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parts(self) -> tuple[str, ...]:
        return (f"{self.protocol}://", *self.key.split("/"))

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(f"{self.protocol}://{posixpath.dirname(self.key)}")

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> ObjectPath:
        return self.parent / (posixpath.splitext(self.name)[0] + suffix)

    def relative_to(self, other: ObjectPath | str) -> PurePosixPath:
        base = str(other).rstrip("/") + "/"
        if not str(self).startswith(base):
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(str(self)[len(base):])

    def resolve(self) -> ObjectPath:
        return self

    absolute = expanduser = resolve

    def is_absolute(self) -> bool:
        return True

    # -- reading -----------------------------------------------------------------------------
    @_said_denied
    def exists(self) -> bool:
        return self.fs.exists(self.key)

    @_said_denied
    def is_file(self) -> bool:
        return self.fs.isfile(self.key)

    @_said_denied
    def is_dir(self) -> bool:
        return self.fs.isdir(self.key)

    @_said_denied
    def stat(self) -> ObjectStat:
        info = self.fs.info(self.key)
        modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
        return ObjectStat(int(info.get("size") or 0),
                          modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0))

    @_said_denied
    def read_bytes(self) -> bytes:
        """The whole object in one GET."""
        return self.fs.cat_file(self.key, **_one_request(self.protocol))

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    @_said_denied
    def open(self, mode: str = "rb", **kwargs: Any) -> Any:
        return self.fs.open(self.key, mode, **kwargs)

    @_said_denied
    def iterdir(self) -> list[ObjectPath]:
        if not self.fs.isdir(self.key):
            raise FileNotFoundError(str(self))
        return [ObjectPath(f"{self.protocol}://{k}") for k in sorted(self.fs.ls(self.key, detail=False))
                if k.strip("/") != self.key]

    @_said_denied
    def glob(self, pattern: str) -> list[ObjectPath]:
        """Objects and prefixes under this one whose relative path matches `pattern` (pathlib's
        syntax: `*`, `?`, `[...]`, `**`). Only the pattern is a pattern: this prefix is matched
        literally, whatever characters its key holds (fsspec's glob would expand them too)."""
        deep = "**" in pattern
        depth = None if deep else pattern.count("/") + 1
        try:
            found = self.fs.find(self.key, maxdepth=depth, withdirs=True)
        except FileNotFoundError:
            return []
        base = self.key + "/"
        regex = re.compile(fsspec.utils.glob_translate(pattern))
        rels = {k[len(base):].rstrip("/") for k in found if k.startswith(base)}
        return [ObjectPath(f"{self.protocol}://{base}{r}") for r in sorted(rels) if r and regex.fullmatch(r)]

    def rglob(self, pattern: str) -> list[ObjectPath]:
        return self.glob(f"**/{pattern}")

    @_said_denied
    def walk_files(self) -> list[tuple[ObjectPath, int]]:
        """Every object under this prefix with its size, in key order (one listing)."""
        found = self.fs.find(self.key, detail=True)
        return [(ObjectPath(f"{self.protocol}://{k}"), int(v.get("size") or 0))
                for k, v in sorted(found.items()) if v.get("type", "file") == "file"]

    # -- writing -----------------------------------------------------------------------------
    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """An object store has no folders: only checks that the bucket exists (what an output
        folder is made for is written next; a missing bucket is said before any work)."""
        check_bucket(self)

    @_said_denied
    def write_bytes(self, data: bytes) -> int:
        try:
            self.fs.pipe_file(self.key, bytes(data))
        except FileNotFoundError:  # a PUT finds no object missing, only a bucket
            check_bucket(self)
            raise
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    @_said_denied
    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    @_said_denied
    def rmtree(self) -> None:
        """Delete every object under this prefix."""
        keys = [p.key for p, _ in self.walk_files()]
        plain = [k for k in keys if not _is_pattern(k)]
        if plain:  # one bulk delete
            self.fs.rm(plain)
        for key in keys:  # fsspec's rm would expand a key holding `[`, `*` or `?`: one by one
            if _is_pattern(key):
                self.fs.rm_file(key)


class ObjectReader(RangeReader):
    """An object read by ranged GETs (its size asked once)."""

    def __init__(self, path: ObjectPath):
        self.path = path
        self.size = path.stat().st_size

    @_said_denied
    def read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        return self.path.fs.cat_file(self.path.key, start=offset, end=offset + size)


CONFLICT_RETRIES = 8  # 409 ConditionalRequestConflict: retried with backoff (0.1 s doubling, ~25 s in all)


def _refuse_unconditional(path: ObjectPath, what: str) -> StoreError:
    """The refusal of a store that does not honour conditional creates (`what` says how it showed)."""
    bucket = f"{path.protocol}://{path.key.split('/', 1)[0]}"
    return StoreError(
        f"{bucket}: this object store {what}. Several workers on one run rely on conditional writes "
        f"(If-None-Match: *) to claim each shard once (--claims {', '.join(CLAIM_CHOICES)}: on object "
        f"storage every choice does; flock needs a filesystem). Use a server that supports them (AWS "
        f"S3 does), or put the run on a local or shared filesystem.")


def _put_if_absent(path: ObjectPath, data: bytes) -> bool:
    """One conditional PUT (`If-None-Match: *`): True when it created the object, False when the
    server refused because the key exists (412). A 409 (ConditionalRequestConflict: another
    conditional write of the key raced this one; AWS says to retry) is retried with backoff; a
    501 (the header not implemented) is the refusal of a store without conditional writes."""
    for attempt in range(CONFLICT_RETRIES + 1):
        try:
            path.fs.pipe_file(path.key, bytes(data), mode="create")
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:  # a PUT finds no object missing, only a bucket
            check_bucket(path)
            raise
        except PermissionError as e:
            raise denied(path, e) from None
        except OSError as e:
            code, status = server_error(e)
            if code == "ConditionalRequestConflict" or status == 409:
                if attempt < CONFLICT_RETRIES:
                    time.sleep(min(0.1 * 2 ** attempt, 5.0))
                    continue
                raise StoreError(f"{path}: the store answered 409 ({code or 'Conflict'}) to every one of "
                                 f"{CONFLICT_RETRIES + 1} conditional creates (another writer keeps "
                                 f"racing for this key, or the store misreads the request); run again "
                                 f"later") from None
            if code == "NotImplemented" or status == 501 or e.errno == errno.ENOSYS:
                raise _refuse_unconditional(path, f"answered 501 ({code or 'NotImplemented'}) to a "
                                                  f"conditional create of {path}") from None
            if "412" not in str(e) and "Precondition" not in str(e):  # a 412 named otherwise
                raise
            return False
    raise AssertionError("unreachable")


def check_conditional_writes(path: ObjectPath) -> None:
    """Refuse a store that ignores conditional creates before relying on them (once per process
    and bucket): a probe object beside `path` (named after it) is created twice, and the second
    must fail; it is then deleted, which claims and locks need too (credentials that may create
    but not delete are refused here, before any claim or lock is left that cannot be released)."""
    bucket = f"{path.protocol}://{path.key.split('/', 1)[0]}"
    if (os.getpid(), bucket) in _CONDITIONAL_OK:
        return
    check_bucket(path)  # a missing bucket is said with the URL asked for, not the probe's
    probe = path.with_name(f"{path.name}.conditional-write-probe-{uuid.uuid4().hex[:12]}")
    try:
        _put_if_absent(probe, b"1")  # False only when a retry of a lost answer met this very PUT
        honoured = not _put_if_absent(probe, b"2")
    except BaseException as e:
        with contextlib.suppress(Exception):  # the error that stopped the probe is the one to say
            probe.unlink(missing_ok=True)
        if isinstance(e, AccessDenied):  # said of the object asked for, not of the probe beside it
            raise AccessDenied(str(e).replace(str(probe), str(path), 1)) from None
        raise
    else:
        try:
            probe.unlink(missing_ok=True)
        except PermissionError:
            raise StoreError(
                f"{bucket}: these credentials may create objects but not delete them (s3:DeleteObject "
                f"denied for the probe object {probe}, left behind: delete it when you can). A "
                f"claim or lock is released by deleting it: grant s3:DeleteObject on this prefix, "
                f"or put the run on a local or shared filesystem.") from None
    if not honoured:
        raise _refuse_unconditional(path, f"ignores conditional writes (If-None-Match: *): a second "
                                          f"create of the probe object {probe} succeeded")
    _CONDITIONAL_OK.add((os.getpid(), bucket))


class ObjectLocation(Location):
    """Objects through fsspec: a PUT is atomic, so a whole write needs no temporary name."""

    has_flock = False
    described = "on object storage"

    def write_whole(self, path: ObjectPath, data: bytes) -> None:
        check_fence()
        path.write_bytes(data)

    def write_streamed(self, path: ObjectPath, fill: Callable[[BinaryIO], None]) -> None:
        f = path.open("wb")  # an upload that appears whole when closed, never before
        try:
            fill(f)
            check_fence()
        except BaseException:
            if hasattr(f, "discard"):
                f.discard()  # abort the upload: no partial object
                f.closed = True  # discarded: nothing for close() (on garbage collection) to upload
            raise
        f.close()

    def create_exclusive(self, path: ObjectPath, data: bytes) -> bool:
        check_conditional_writes(path)
        if _put_if_absent(path, data):
            return True
        # A retried PUT whose first answer was lost meets its own object: the same bytes are ours.
        for _ in range(3):
            try:
                return path.read_bytes() == bytes(data)
            except FileNotFoundError:  # deleted since (a released claim): not ours either way
                time.sleep(0.05)
        return False

    @contextmanager
    def staged(self, folder: ObjectPath) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="dnf-staged-") as tmp:
            yield Path(tmp)
            for file in sorted(Path(tmp).rglob("*")):
                if file.is_file():
                    (folder / file.relative_to(tmp).as_posix()).write_bytes(file.read_bytes())

    def open_reader(self, path: ObjectPath) -> ObjectReader:
        return ObjectReader(path)

    def read_range(self, path: ObjectPath, offset: int, size: int) -> bytes:
        try:
            return path.fs.cat_file(path.key, start=offset, end=offset + size)
        except PermissionError as e:
            raise denied(path, e) from None

    def size(self, path: ObjectPath) -> int:
        return path.stat().st_size

    def mtime(self, path: ObjectPath) -> float:
        return path.stat().st_mtime

    def walk_files(self, folder: ObjectPath) -> list[tuple[ObjectPath, int]]:
        return folder.walk_files()

    def exists(self, path: ObjectPath) -> bool:
        return path.exists()

    def absolute(self, path: ObjectPath) -> ObjectPath:
        return path

    def relative(self, folder: ObjectPath, text: str) -> str | None:
        scheme, sep, _ = text.partition("://")
        if not sep or scheme != folder.protocol:
            return None
        key = ObjectPath(text).key
        return posixpath.relpath("/" + key, "/" + folder.key)

    def read_many(self, paths: list[str], limit: int | None = None) -> dict[str, bytes | OSError]:
        out: dict[str, bytes | OSError] = {}
        for p, got in read_objects(paths).items():
            if isinstance(got, bytes) and limit is not None and len(got) > limit:
                got = TooLarge(p, len(got))
            elif isinstance(got, BaseException) and not isinstance(got, OSError):
                got = OSError(errno.EIO, str(got), p)  # the client's own error, said as a read error
            out[p] = got
        return out

    def remove_tree(self, folder: ObjectPath) -> None:
        folder.rmtree()

    def remove_empty_folder(self, folder: ObjectPath) -> None:
        pass  # a prefix without objects does not exist

    def write_marker(self, path: ObjectPath, data: bytes) -> bool:
        return self.create_exclusive(path, data)

    def lock(self, path: ObjectPath) -> AbstractContextManager[None]:
        return self.creation_lock(path)

    def zarr_store(self, path: ObjectPath) -> Any:
        from storage.locations.zarr_keys import LiteralKeyStore  # loads zarr: only where it is used

        # fsspec's instance cache is per process and thread: one client each
        options = {k: v for k, v in storage_options(path.protocol).items() if k != "skip_instance_cache"}
        return LiteralKeyStore.from_url(str(path), storage_options=options)

    def sync_tree(self, path: ObjectPath) -> None:
        pass  # a PUT that returned is durable

    def remove_stale(self, folder: ObjectPath, patterns: list[str]) -> None:
        pass  # no temporaries: every object is written by one PUT

    def file_for_ranged_reads(self, path: ObjectPath) -> Any:
        return path.open("rb")

    def file_for_whole_read(self, path: ObjectPath) -> io.BytesIO:
        return io.BytesIO(path.read_bytes())
