"""`extract`'s shard writer: finished shards written on a background thread, one at a time, each
fenced by its claim (`pipeline.queue`), so a worker whose claim was taken over does not replace the
taker's shard."""

from __future__ import annotations

import threading
from dataclasses import replace

from pipeline.queue import Claim
from storage.cache_config import DoneMarker
from storage.cache_folder import CacheError, FeatureCache, shard_checksum
from storage.locations import STORAGE_ERRORS, fenced


class ClaimLost(Exception):
    """Raised by a shard write's fence (`storage.locations.fenced`): the claim is no longer this
    worker's, so the write stops before its file appears."""


class ShardWriter:
    """Writes finished shards on a background thread, one at a time, so the model never waits
    on the disk; the shard's claim is released only after its done marker is written.

    The claim is checked before the write, at the last step of each file the write makes appear
    (the fence: before the rename, the PUT, the upload's completion), and before the done marker.
    What no check can stop: a worker stalled between its fence and the rename or PUT itself. Its
    bytes may then replace those of the worker that took its claim over; it finds that out after
    its write, and removes the other's done marker when the stored data no longer match it."""

    def __init__(self, cache: FeatureCache, log=print):
        self.cache = cache
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.lost: list[int] = []  # shards whose claim another worker took over: theirs to finish
        self.log = log

    def _gone(self, shard_id: int, claim: Claim) -> str | None:
        """Why this worker may no longer write the shard (its claim refreshed and taken over, or a
        done marker there: a done shard is never rewritten), or None while it may."""
        claim.refresh()
        if claim.lost:  # another worker took the shard over while this one was stalled
            return "the claim was taken over by another worker after this one's heartbeat went stale"
        if self.cache.is_done(shard_id):
            return "another worker marked it done meanwhile"
        return None

    def _still_mine(self, shard_id: int, claim: Claim) -> bool:
        """Whether this worker may still write the shard, before it writes anything of it."""
        why = self._gone(shard_id, claim)
        if why is None:
            return True
        self.lost.append(shard_id)  # left to the other worker; this one goes on
        self.log(f"shard {shard_id:05d}: {why}; this worker writes nothing of it and moves on")
        return False

    def _fence(self, shard_id: int, claim: Claim) -> None:
        """The check at the last step of each file of the shard's write."""
        why = self._gone(shard_id, claim)
        if why is not None:
            raise ClaimLost(why)

    def _write(self, shard_id: int, start: int, arrays: tuple, marker: DoneMarker, claim: Claim) -> None:
        try:
            if not self._still_mine(shard_id, claim):
                return
            try:
                with fenced(lambda: self._fence(shard_id, claim)):
                    index = self.cache.write_shard(start, *arrays)
            except ClaimLost as e:
                self.lost.append(shard_id)
                self.log(f"shard {shard_id:05d}: {e}; this worker stopped its write before its data "
                         f"file appeared (files identical across workers, labels and keys, may have "
                         f"been rewritten) and moves on")
                return
            marker = replace(marker, checksum=shard_checksum(arrays[0], arrays[1], arrays[4]), index=index)
            why = self._gone(shard_id, claim)
            if why is None:
                self.cache.mark_done(marker)
            else:
                self.lost.append(shard_id)
                self._after_a_lost_write(shard_id, why, marker.checksum)
        except STORAGE_ERRORS as e:  # a full disk, or object storage refusing after its retries
            why = getattr(e, "strerror", None) or e
            self.error = CacheError(
                f"shard {shard_id:05d}: writing to {self.cache.root} failed: {why}. "
                f"Shards finished before are kept and this one is not marked done; "
                f"free space (or fix the folder) and run `extract` again to resume")
        except BaseException as e:  # surfaced in the main thread by wait()
            self.error = e
        finally:
            claim.release()

    def _after_a_lost_write(self, shard_id: int, why: str, mine: str) -> None:
        """This worker wrote the shard's data, then found its claim lost (`why`): its bytes may have
        replaced those the taker marks done. When the stored data no longer match the done marker
        there, the marker is removed (the shard is pending again, recomputed by the next extract)
        instead of being left to fail `verify`; without a marker yet, the taker's own write comes
        later or has come before, which `verify` tells."""
        head = f"shard {shard_id:05d}: {why}; this worker found that out only after it wrote its data"
        there = self.cache.done_marker(shard_id)
        if there is None:
            self.log(f"{head}; the other worker has not marked it done yet (if its data were written "
                     f"before this worker's, `verify` will find them not matching its done marker: "
                     f"`extract --redo {shard_id}` recomputes it); moves on")
            return
        try:
            dnf, label, keys = self.cache.read_rows(*there.rows)
            stored = shard_checksum(dnf, label, keys)
        except Exception as e:  # noqa: BLE001 (unreadable now: as broken as a mismatch)
            stored = f"unreadable ({type(e).__name__})"
        if stored == there.checksum:
            self.log(f"{head}; the stored data match the other worker's done marker "
                     f"({'the same bytes' if stored == mine else 'its write came last'}); moves on")
            return
        if self.cache.done_marker(shard_id) == there:  # not rewritten meanwhile (not atomic: a
            self.cache.done_path(shard_id).unlink(missing_ok=True)  # narrow window, no CAS delete)
            self.log(f"{head}, which replaced the data the other worker marked done: that done marker "
                     f"no longer matched the stored data and was removed, so the shard is pending "
                     f"again and the next `extract` recomputes it; moves on")
        else:
            self.log(f"{head}; the shard's done marker changed while this worker checked it: run "
                     f"`verify`; moves on")

    def submit(self, shard_id: int, start: int, arrays: tuple, marker: DoneMarker, claim: Claim) -> None:
        self.wait()
        self.thread = threading.Thread(target=self._write, args=(shard_id, start, arrays, marker, claim),
                                       name=f"write-shard-{shard_id}", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        """Block until the shard in flight is written; raise its error, if any."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
