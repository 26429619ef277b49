"""WebDataset tars read in place, as img2dataset writes them (LAION, DataComp, CC12M): a folder (or
prefix) of `00000.tar`, `00001.tar`, ... whose samples are `KEY.jpg` (or .png, .webp, ...) beside
`KEY.json` / `KEY.txt` / `KEY.cls`, with img2dataset's `00000.parquet` and `00000_stats.json`
beside each tar (its metadata: never inputs, never rejects); or one `.tar`.

The address of an image is `file.tar#member` with the offset of its bytes in the tar. Listing reads
each tar once, in large sequential reads, keeping of each image member its name, offset and size
and of each sample its metadata members (`KEY.json`, `.txt`, `.cls`: consecutive members of one key,
as WebDataset groups them, a repeated name starting a new sample); `shard` then hashes and decodes
the images in one probe task per tar (on `--workers` processes, checkpointed per tar), reading
them by their offsets in one pass; `extract` reads a member by its offset, one ranged read each, as
packed tars are read. A member that is not an image, is truncated or too large is a reject naming
`file.tar#member`; a damaged, truncated or unreadable tar is a reject naming the tar (its members
before the damage are kept); a compressed tar (`.tar.gz`, `.tgz`) is a reject saying so."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable

from stages.domain.image_limits import DEFAULT_MAX_BYTES
from stages.domain.probing import probe_bytes
from stages.domain.sources.archive_folders import (
    COMPRESSED_TARS,
    NO_LABEL,
    Lister,
    Place,
    is_sidecar,
    member_labels,
    read_metadata,
    refused,
    split_key,
    split_member,
    walk,
)
from stages.domain.sources.archive_folders import holds as _holds
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
from storage.archive_members import ArchiveError, Member
from storage.locations import STORAGE_ERRORS, StoragePath
from storage.run import within_roots
from storage.tar_members import TarMembers, iter_tar, read_spans


class TarReader(EntryReader):
    """Tar members by offset, one ranged read each; a tar outside the run's input folders is refused."""

    def __init__(self, roots: tuple[str, ...] | None = None):
        self.roots = list(roots) if roots is not None else None
        self.members = TarMembers()

    def read(self, address: Address) -> bytes:
        parts = split_member(address.path, ".tar")
        if parts is None or address.offset is None or address.size is None:
            raise ReadError("not a tar member's address with its offset (file.tar#member)")
        if self.roots is not None and not within_roots(parts[0], self.roots):
            raise ReadError("outside the run's input folders: the manifest path was edited (../?)")
        try:
            return self.members.read(parts[0], address.offset, address.size)
        except FileNotFoundError as e:
            raise ReadError(f"missing: the tar {parts[0]} was removed after `shard`") from e
        except ArchiveError as e:
            raise ReadError(e.why) from e
        except STORAGE_ERRORS as e:
            raise ReadError(f"unreadable: {getattr(e, 'strerror', None) or e}") from e

    def close(self) -> None:
        self.members.close()


class WebDatasetTars(InputSource):
    """A `.tar` of WebDataset samples, or a folder or prefix holding such tars."""

    kind = "webdataset"
    no_label = NO_LABEL

    def recognises(self, inp: StoragePath) -> bool:
        return _holds(inp, ".tar", *COMPRESSED_TARS)

    def listers(self) -> dict[str, Lister]:
        """What a folder of tars may also hold: zips are listed by the zip source."""
        from stages.domain.sources.zip_archive import list_zip

        return {".tar": self.list_tar, ".zip": list_zip}

    def candidates(self, inp: StoragePath, opts: SourceOptions, found: Collected) -> list[Candidate]:
        return walk(inp, opts, found, self.listers())

    def list_tar(self, tar: StoragePath, place: Place, opts: SourceOptions, found: Collected,
                 ) -> list[Candidate]:
        """The image members of one tar (name, offset, size), each labelled by the metadata members
        of its own sample; a tar damaged part-way is a reject naming it, its members before the
        damage kept."""
        address = input_address(tar)
        images: list[tuple[Member, dict[str, bytes]]] = []  # no bytes kept: the probe reads them
        key, sample, seen = None, {}, set()  # the current sample: its key, metadata, member names
        damaged = None
        try:
            for m in iter_tar(tar, DEFAULT_MAX_BYTES, wanted=is_sidecar):
                if split_key(m.name)[0] != key or m.name in seen:  # WebDataset's grouping
                    key, sample, seen = split_key(m.name)[0], {}, set()
                seen.add(m.name)
                if is_sidecar(m.name) and m.data is not None:
                    sample[m.name] = m.data
                else:
                    images.append((m, sample))
        except ArchiveError as e:
            damaged = refused(address, e.why, self.kind)
        names = Counter(m.name for m, _ in images)
        metadata = read_metadata([(m.name, side) for m, side in images],
                                 dups=frozenset(n for n, k in names.items() if k > 1))
        out = []
        for (m, _), md in zip(images, metadata, strict=True):
            label, source, split, refusal = member_labels(m.name, place, md, opts)
            out.append(Candidate(f"{address}#{m.name}", label, source, split, m.refused or refusal.reason,
                                 kind=self.kind, offset=m.offset, size=m.size, label_reason=refusal.label))
        return out + ([damaged] if damaged is not None else [])

    def owns(self, address: str) -> bool:
        return False  # every entry records its kind

    def reader(self, ctx: ReadContext) -> EntryReader:
        return TarReader(ctx.roots)

    def probe_group(self, address: Address, found: Collected) -> Hashable | None:
        parts = split_member(address.path, ".tar")
        return parts[0] if parts else None  # a tar is probed whole, in one task

    def probe(self, addresses: list[Address], group: Hashable | None, max_pixels: int,
              max_bytes: int) -> list[dict]:
        """The image members of one tar, read by their offsets in one pass (in archive order: large
        sequential reads), hashed and decoded."""
        parts = split_member(addresses[0].path, ".tar") if addresses else None
        if parts is None or any(a.offset is None or a.size is None for a in addresses):
            return [{"reason": "not a tar member's address with its offset (file.tar#member)"}
                    for _ in addresses]
        out: list[dict] = [{"reason": f"too large: {a.size} bytes > --max-bytes {max_bytes}"}
                           for a in addresses]  # probe_bytes' reason, without the read
        todo = [i for i, a in enumerate(addresses) if a.size <= max_bytes]
        try:
            spans = read_spans(parts[0], [(addresses[i].offset, addresses[i].size) for i in todo])
            for i, got in zip(todo, spans, strict=True):
                out[i] = {"reason": got} if isinstance(got, str) else probe_bytes(got, max_pixels, max_bytes)
        except ArchiveError as e:  # the tar cannot be opened: every member is refused so
            for i in todo:
                out[i] = {"reason": e.why}
        return out
