"""Zip archives read in place, as DiffusionDB ships them (`part-000001.zip`: `<uuid>.png` / `.webp`
images and one `part-000001.json` mapping each image file name to its metadata) and as many
datasets are downloaded (a zip of image folders): a `.zip`, or a folder or prefix of them.

The address of an image is `file.zip#member` with the offset of its local header. Listing reads
the central directory and the JSON members only; `shard` then probes each zip in one task, its
members in the order of their bytes (large sequential reads); `extract` keeps one open archive per
zip and process and reads a member from its local header. A member that is not an image, is
damaged, encrypted or too large is a reject naming `file.zip#member`; a zip that cannot be opened
(truncated: its central directory is at the end) is a reject naming the zip."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable

from stages.domain.image_limits import DEFAULT_MAX_BYTES
from stages.domain.probing import probe_bytes
from stages.domain.sources.archive_folders import (
    NO_LABEL,
    Place,
    holds,
    is_sidecar,
    member_labels,
    read_metadata,
    refused,
    split_member,
    walk,
)
from stages.domain.sources.base import (
    Address,
    Candidate,
    Collected,
    EntryReader,
    InputSource,
    ReadContext,
    ReadError,
    SourceOptions,
    input_address,
)
from storage.archive_members import ArchiveError
from storage.locations import STORAGE_ERRORS, StoragePath
from storage.run import within_roots
from storage.zip_members import (
    PASS_READAHEAD,
    ZipMembers,
    close_zip,
    member_refusal,
    open_zip,
    read_member,
)


def list_zip(path: StoragePath, place: Place, opts: SourceOptions, found: Collected) -> list[Candidate]:
    """The image members of one zip (its central directory, and its JSON and other sidecar members
    read for their metadata), in the order of their bytes; a zip that cannot be opened is a reject."""
    address = input_address(path)
    try:
        zf = open_zip(path)
    except ArchiveError as e:
        return [refused(address, e.why, "zip")]
    try:
        infos = sorted((i for i in zf.infolist() if not i.is_dir()), key=lambda i: i.header_offset)
        sidecars, images, bad = {}, [], []
        for info in infos:
            if is_sidecar(info.filename) and member_refusal(info) is None \
                    and info.file_size <= DEFAULT_MAX_BYTES:
                try:
                    sidecars[info.filename] = read_member(zf, info, info.file_size)
                except ValueError as e:
                    why = f"metadata member unreadable: {e}"
                    bad.append(refused(f"{address}#{info.filename}", why, "zip"))
            elif not is_sidecar(info.filename):
                images.append(info)
    finally:
        close_zip(zf)
    names = Counter(i.filename for i in infos)  # a zip may hold one name twice: its metadata is ambiguous
    dups = frozenset(n for n, k in names.items() if k > 1)
    metadata = read_metadata([(i.filename, sidecars) for i in images], dups, own_dups=dups)
    out = []
    for info, md in zip(images, metadata, strict=True):
        label, source, split, refusal = member_labels(info.filename, place, md, opts)
        out.append(Candidate(f"{address}#{info.filename}", label, source, split, refusal.reason, kind="zip",
                             offset=info.header_offset, size=info.file_size, label_reason=refusal.label))
    return out + bad


class ZipReader(EntryReader):
    """Zip members through each zip's central directory: one open archive per zip and process."""

    def __init__(self, roots: tuple[str, ...] | None = None):
        self.roots = list(roots) if roots is not None else None
        self.members = ZipMembers()

    def read(self, address: Address) -> bytes:
        parts = split_member(address.path, ".zip")
        if parts is None or address.offset is None or address.size is None:
            raise ReadError("not a zip member's address with its offset (file.zip#member)")
        if self.roots is not None and not within_roots(parts[0], self.roots):
            raise ReadError("outside the run's input folders: the manifest path was edited (../?)")
        try:
            return self.members.read(parts[0], parts[1], address.offset, address.size)
        except ArchiveError as e:
            raise ReadError(e.why) from e
        except ValueError as e:  # the member itself: damaged, encrypted
            raise ReadError(str(e)) from e
        except STORAGE_ERRORS as e:
            raise ReadError(f"unreadable: {getattr(e, 'strerror', None) or e}") from e

    def close(self) -> None:
        self.members.close()


def _probe_member(zf, info, max_pixels: int, max_bytes: int) -> dict:
    """Read, hash and decode one member of an open zip."""
    refused = member_refusal(info) if info is not None else "no longer in the zip: it changed while shard ran"
    if refused is not None:
        return {"reason": refused}
    if info.file_size > max_bytes:
        return {"reason": f"too large: {info.file_size} bytes > --max-bytes {max_bytes}"}
    try:
        return probe_bytes(read_member(zf, info, max_bytes), max_pixels, max_bytes)
    except ValueError as e:
        return {"reason": str(e)}


class ZipArchives(InputSource):
    """A `.zip` of images, or a folder or prefix holding zips."""

    kind = "zip"
    no_label = NO_LABEL

    def recognises(self, inp: StoragePath) -> bool:
        return holds(inp, ".zip")

    def candidates(self, inp: StoragePath, opts: SourceOptions, found: Collected) -> list[Candidate]:
        return walk(inp, opts, found, {".zip": list_zip})

    def owns(self, address: str) -> bool:
        return False  # every entry records its kind

    def reader(self, ctx: ReadContext) -> EntryReader:
        return ZipReader(ctx.roots)

    def probe_group(self, address: Address, found: Collected) -> Hashable | None:
        parts = split_member(address.path, ".zip")
        return parts[0] if parts else None  # a zip is probed whole, in one task

    def probe(self, addresses: list[Address], group: Hashable | None, max_pixels: int,
              max_bytes: int) -> list[dict]:
        """The members of one zip, read in one pass in the order of their bytes."""
        parts = split_member(addresses[0].path, ".zip") if addresses else None
        if parts is None:
            return [{"reason": "not a zip member's address (file.zip#member)"} for _ in addresses]
        try:
            zf = open_zip(parts[0], PASS_READAHEAD)
        except ArchiveError as e:
            return [{"reason": e.why} for _ in addresses]
        try:
            by_offset = {i.header_offset: i for i in zf.infolist()}
            infos = [by_offset.get(a.offset) for a in addresses]
            return [_probe_member(zf, i if i is not None and a.path.endswith("#" + i.filename) else None,
                                  max_pixels, max_bytes) for a, i in zip(addresses, infos, strict=True)]
        except STORAGE_ERRORS as e:
            return [{"reason": f"unreadable: {getattr(e, 'strerror', None) or e}"} for _ in addresses]
        finally:
            close_zip(zf)
