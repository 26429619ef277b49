"""The run's packed tars (`shard --pack`): a read-side source. It recognises no input (it is made
from the run's own files) and is recorded in no manifest entry; `extract` reads a shard's images
from its tar when there is one (by key: members are `<key><suffix>`), else through each entry's own
source. Its reader is the one opened per shard by `open_pack`."""

from __future__ import annotations

import tarfile

from stages.domain.sources.base import (
    Address,
    Candidate,
    Collected,
    EntryReader,
    InputSource,
    ReadContext,
    ReadError,
    SourceOptions,
    check_key,
)
from storage.locations import StoragePath
from storage.packed_images import PackReader, pack_path
from storage.run import Entry


class PackedReader(EntryReader):
    """The images of one packed shard, by key (a ranged read at each member's offset)."""

    def __init__(self, pack: PackReader):
        self.pack = pack
        self.changed = f"damaged in {pack.path}: its sha256 no longer matches the key"

    def __contains__(self, entry: Entry) -> bool:
        return entry.key in self.pack

    def read(self, address: Address) -> bytes:
        """The bytes of the member named by `address.path`, a manifest key."""
        try:
            return self.pack.read(address.path)
        except (OSError, KeyError) as e:
            raise ReadError(f"unreadable in {self.pack.path}: {e}") from e

    def checked(self, entry: Entry) -> bytes:
        return check_key(self.read(Address(entry.key)), entry.key, self.changed)


def open_pack(run_root: StoragePath, shard_id: int, entries: list[Entry], log=print) -> PackedReader | None:
    """The shard's packed tar (`shard --pack`) when there is one. A damaged one (a truncated copy,
    a full disk) is said, and the images it lacks are read from the original files instead."""
    packed = pack_path(run_root, shard_id)
    if not packed.exists():
        return None
    try:
        pack = PackReader(packed)
    except (tarfile.TarError, OSError) as e:
        log(f"shard {shard_id:05d}: {packed} is damaged ({e}); reading the original files instead "
            f"(delete it and run `shard --pack` again to rewrite it)")
        return None
    missing = sum(e.key not in pack for e in entries)
    if missing:
        log(f"shard {shard_id:05d}: {packed} is damaged (truncated?): it lacks {missing} of the shard's "
            f"{len(entries)} images, which are read from the original files instead")
    return PackedReader(pack)


class PackedTars(InputSource):
    """RUN/packed/NNNNN.tar: read side only (see the module's docstring)."""

    kind = "packed"

    def recognises(self, inp: StoragePath) -> bool:
        return False  # the run's own copy, never an input

    def candidates(self, inp: StoragePath, opts: SourceOptions, found: Collected) -> list[Candidate]:
        raise NotImplementedError("the run's packed tars are read, never listed")

    def reader(self, ctx: ReadContext) -> EntryReader:
        raise NotImplementedError("opened per shard: stages.domain.sources.packed.open_pack")
