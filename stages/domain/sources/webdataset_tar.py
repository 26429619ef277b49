"""WebDataset tars read in place, as img2dataset writes them (LAION, DataComp, CC12M): a folder (or
prefix) of `00000.tar`, `00001.tar`, ... whose samples are `KEY.jpg` (or .png, .webp, ...) beside
`KEY.json` / `KEY.txt` / `KEY.cls`, with img2dataset's `00000.parquet` and `00000_stats.json`
beside each tar (its metadata: never inputs, never rejects); or one `.tar`.

The address of an image is `file.tar#member` with the offset of its bytes in the tar. `shard` reads
each tar once, in large sequential reads, and hashes and decodes each image member as it passes
(the members' labels come from the sidecars that follow them, so a tar is listed and probed in the
same pass); `extract` reads a member by its offset, one ranged read each, as packed tars are read.
A member that is not an image, is truncated or too large is a reject naming `file.tar#member`; a
damaged or truncated tar is a reject naming the tar (its members before the damage are kept)."""

from __future__ import annotations

from collections.abc import Hashable

from stages.domain.image_limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from stages.domain.probing import probe_bytes
from stages.domain.sources.archive_folders import (
    NO_LABEL,
    Lister,
    Place,
    is_sidecar,
    member_labels,
    read_metadata,
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
from storage.tar_members import TarMembers, iter_tar

# `shard` probes in the listing pass under these limits; a probe asked for other ones re-reads the
# members whose result they could change (those refused, and those over the limits asked for)
PASS_LIMITS = (DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES)


class ProbedTar:
    """The probe results of a tar's image members from the listing pass, by (address, offset):
    `shard`'s probe unit for the tar (equal by the tar alone), handed to its probe task."""

    __slots__ = ("tar", "results")

    def __init__(self, tar: str, results: dict[tuple[str, int], tuple[dict, bool]]):
        self.tar, self.results = tar, results  # result, and whether a re-read may change it

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProbedTar) and other.tar == self.tar

    def __hash__(self) -> int:
        return hash(self.tar)

    def __getstate__(self) -> tuple:
        return self.tar, self.results

    def __setstate__(self, state: tuple) -> None:
        self.tar, self.results = state


def _pass_probe(m: Member) -> tuple[dict, bool]:
    """A member's probe in the listing pass, and whether other limits could change it."""
    if m.refused is not None:
        return {"reason": m.refused}, False
    if m.data is None:
        return {"reason": f"too large: {m.size} bytes > --max-bytes {PASS_LIMITS[1]}"}, True
    return probe_bytes(m.data, *PASS_LIMITS), True


def _within(result: dict, max_pixels: int, max_bytes: int) -> bool:
    """Whether a probe that passed under the pass's limits passes under these too."""
    facts = result.get("facts") or {}
    pixels = (facts.get("width") or 0) * (facts.get("height") or 0)
    return result["size"] <= max_bytes and pixels <= max_pixels


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

    def __init__(self) -> None:
        self._probed: dict[str, ProbedTar] = {}  # this process's listing pass, by tar

    def recognises(self, inp: StoragePath) -> bool:
        return _holds(inp, ".tar")

    def listers(self) -> dict[str, Lister]:
        """What a folder of tars may also hold: zips are listed by the zip source."""
        from stages.domain.sources.zip_archive import list_zip

        return {".tar": self.list_tar, ".zip": list_zip}

    def candidates(self, inp: StoragePath, opts: SourceOptions, found: Collected) -> list[Candidate]:
        return walk(inp, opts, found, self.listers())

    def list_tar(self, tar: StoragePath, place: Place, opts: SourceOptions, found: Collected,
                 ) -> list[Candidate]:
        """The image members of one tar, read, hashed and decoded in one pass (results kept for the
        probe); a tar damaged part-way is a reject naming it, its members before the damage kept."""
        address = input_address(tar)
        images: list[tuple[Member, tuple[dict, bool]]] = []
        sidecars: dict[str, bytes] = {}
        try:
            for m in iter_tar(tar, PASS_LIMITS[1]):
                if is_sidecar(m.name) and m.data is not None:
                    sidecars[m.name] = m.data
                else:
                    images.append((m, _pass_probe(m)))
        except ArchiveError as e:
            found.refuse(address, e.why)
        metadata = read_metadata(sidecars, [m.name for m, _ in images])
        out, results = [], {}
        for m, probed in images:
            label, source, split, refusal = member_labels(m.name, place, metadata[m.name], opts)
            path = f"{address}#{m.name}"
            out.append(Candidate(path, label, source, split, refusal, kind=self.kind, offset=m.offset,
                                 size=m.size))
            results[(path, m.offset)] = probed
        self._probed[address] = ProbedTar(address, results)
        return out

    def owns(self, address: str) -> bool:
        return False  # every entry records its kind

    def reader(self, ctx: ReadContext) -> EntryReader:
        return TarReader(ctx.roots)

    def probe_group(self, address: Address, found: Collected) -> Hashable | None:
        parts = split_member(address.path, ".tar")
        return self._probed.get(parts[0]) if parts else None

    def probe(self, addresses: list[Address], group: Hashable | None, max_pixels: int,
              max_bytes: int) -> list[dict]:
        """The listing pass's results; a member whose result these limits could change is read
        again by its offset and probed under them."""
        results = group.results if isinstance(group, ProbedTar) else {}
        reader = TarReader()
        out = []
        for a in addresses:
            result, may_change = results.get((a.path, a.offset), ({}, True))
            if result and (not may_change or (max_pixels, max_bytes) == PASS_LIMITS
                           or ("reason" not in result and _within(result, max_pixels, max_bytes))):
                out.append(result)
                continue
            if a.size is not None and a.size > max_bytes:  # probe_bytes' reason, without the read
                out.append({"reason": f"too large: {a.size} bytes > --max-bytes {max_bytes}"})
                continue
            try:
                out.append(probe_bytes(reader.read(a), max_pixels, max_bytes))
            except ReadError as e:
                out.append({"reason": str(e)})
        reader.close()
        return out
