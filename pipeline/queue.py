"""The shard work queue: which shards are pending, and a claim per shard so that several
extract processes on one run (one host or many sharing a filesystem) never work on one shard.

A claim is the file `claims/<shard>.lock` holding a JSON record (owner, host, pid, since,
heartbeat) that a background thread refreshes every `HEARTBEAT_S` seconds. Two ways to hold it:

- `flock` (the default where the filesystem supports it): an exclusive lock on the file, which the
  kernel drops when its process dies (even by SIGKILL), so a dead worker's shard is free at once;
- `heartbeat` (for filesystems without working `flock`, chosen by `--claims heartbeat` or when
  flock fails, and always on object storage): the file is created exclusively (a conditional PUT,
  `If-None-Match: *`, on object storage); a claim whose owner is a dead process of this host,
  boot and PID namespace (`storage.lock_holder`: a pid of another container means nothing
  here), or whose heartbeat is older than `stale_s` (on the storage's clock: the record's mtime,
  never another host's clock), is taken over by exactly one worker (it
  creates a takeover marker for that owner exclusively first). An owner that finds its claim
  taken over marks it lost and does not mark the shard done.

A half-written shard without a done marker is simply redone, so a takeover never loses work.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.atomic import create_exclusive, write_bytes_atomic
from storage.errors import OptionError
from storage.locations import STORAGE_ERRORS, StoragePath, as_path, location
from storage.lock_holder import holder_fields, holder_gone

HEARTBEAT_S = 10.0
STALE_S = 120.0
CLAIM_MODES = ("auto", "flock", "heartbeat")
CLOCK_CHECK_S = 300.0  # how often a queue measures the storage clock's offset from its own
TAKEN = b"taken by "  # a takeover marker's bytes once its taker has decided to go on
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _record(owner: str, since: float, mode: str) -> bytes:
    return json.dumps({"owner": owner, **holder_fields(), "mode": mode,
                       "since": since, "heartbeat": time.time()}).encode() + b"\n"


def read_record(path: StoragePath) -> dict | None:
    """The claim record in `path`, with `written`: when it was written on the storage's clock (the
    file's mtime, the object's LastModified); an unreadable one gets that as its heartbeat."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        rec = json.loads(text)
        if isinstance(rec, dict) and "heartbeat" in rec:
            return {**rec, "written": mtime}
    except ValueError:
        pass
    return {"owner": f"unreadable:{mtime}", "host": "?", "pid": 0, "heartbeat": mtime, "written": mtime}


class Claim:
    """This process's hold on one shard, kept alive by a heartbeat thread until released."""

    def __init__(self, queue: ShardQueue, shard_id: int, fd: int | None, owner: str,
                 takeover: Path | None = None, replaced: str | None = None):
        self.queue, self.shard_id, self._fd, self.owner = queue, shard_id, fd, owner
        self._takeover, self.lost = takeover, False
        self._replaced = replaced  # the owner this claim was taken from (its last beat may land late)
        self._since = time.time()
        self._lock = threading.Lock()  # a beat never writes through a descriptor release has closed
        self._released = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"claim-{shard_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.queue.heartbeat_s):
            try:
                self.refresh()
            except STORAGE_ERRORS:  # a filesystem or object-store hiccup (network, expired
                pass  # credentials): the next beat tries again; a claim left stale is taken over

    def refresh(self) -> None:
        """Write a fresh heartbeat; in heartbeat mode, notice when another worker took over."""
        with self._lock:
            if not self._released:
                self._refresh()

    def _refresh(self) -> None:
        data = _record(self.owner, self._since, "flock" if self._fd is not None else "heartbeat")
        if self._fd is not None:  # flock: rewrite in place, the lock stays on this inode
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))
            return
        path = self.queue.lock_path(self.shard_id)
        rec = read_record(path)
        marker = self.queue.takeover_path(self.shard_id, self.owner)
        # a record of the owner this claim was taken from: that owner's beat begun before the
        # takeover landed after it (the owner sees the taker's decision and gives up): rewritten
        mine = rec is not None and rec.get("owner") in (self.owner, self._replaced or self.owner)
        if not mine or marker.exists():
            self._lose()
            return
        write_bytes_atomic(path, data)
        if marker.exists() and not self._taker_backed_off(marker):
            self._lose()

    def _taker_backed_off(self, marker: StoragePath) -> bool:
        """After a beat, a taker's marker is there: it judged the beat before this one stale and
        now decides on the record it reads again. This beat landed before that read (the taker
        backs off: deletes its marker) or after (the taker goes on: its marker says `taken`
        before it writes its record). Wait for the decision, so that exactly one of the two
        goes on; a taker stalled longer than stale_s counts as going on."""
        deadline = time.monotonic() + max(self.queue.stale_s, 1.0)
        pause = 0.02
        while time.monotonic() < deadline:
            try:
                if marker.read_bytes().startswith(TAKEN):
                    return False
            except FileNotFoundError:
                rec = read_record(self.queue.lock_path(self.shard_id))
                return rec is not None and rec.get("owner") == self.owner
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
        return False

    def _lose(self) -> None:
        self.lost = True
        self._stop.set()

    def release(self) -> None:
        """Stop the heartbeat and give the shard up (a claim taken over meanwhile is left alone)."""
        with self._lock:
            self._released = True
            self._stop.set()
            self._give_up()

    def _give_up(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            return
        path = self.queue.lock_path(self.shard_id)
        rec = read_record(path)
        if rec is not None and rec.get("owner") == self.owner and not self.lost:
            path.unlink(missing_ok=True)
        if self._takeover is not None:
            self._takeover.unlink(missing_ok=True)
            self._takeover = None


class ShardQueue:
    """Hands out pending shards, each to one worker at a time."""

    def __init__(self, claims_dir: StoragePath | str, num_shards: int, is_done: Callable[[int], bool],
                 mode: str = "auto", stale_s: float | None = None, heartbeat_s: float = HEARTBEAT_S):
        if mode not in CLAIM_MODES:
            raise OptionError(f"--claims {mode}: one of {', '.join(CLAIM_MODES)}")
        self.claims_dir = as_path(claims_dir)
        where = location(self.claims_dir)
        if not where.has_flock:
            if mode == "flock":
                raise OptionError(f"--claims flock: {self.claims_dir} is {where.described}, which has no "
                                  f"flock; use --claims heartbeat (or auto)")
            mode = "heartbeat"
        self.num_shards = num_shards
        self.is_done = is_done
        if stale_s is None:  # DNF_CLAIM_STALE_S: seconds without a heartbeat before a takeover
            stale_s = float(os.environ.get("DNF_CLAIM_STALE_S", STALE_S))
        self.mode, self.stale_s, self.heartbeat_s = mode, stale_s, heartbeat_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._clock: tuple[float, float] | None = None  # (storage clock - this clock, when measured)

    def lock_path(self, shard_id: int) -> StoragePath:
        return self.claims_dir / f"{shard_id:05d}.lock"

    def takeover_path(self, shard_id: int, owner: str) -> StoragePath:
        """The marker whose exclusive creation makes one worker the taker of `owner`'s claim."""
        return self.claims_dir / f"{shard_id:05d}.takeover-{hashlib.sha256(owner.encode()).hexdigest()[:16]}"

    def pending(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.is_done(s)]

    def claim(self, shard_id: int) -> Claim | None:
        """The shard's claim, or None when another worker holds it."""
        self.claims_dir.mkdir(parents=True, exist_ok=True)
        if self.mode != "heartbeat":
            fd = os.open(self.lock_path(shard_id), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError as e:
                os.close(fd)
                if e.errno not in _NO_FLOCK or self.mode == "flock":
                    raise
                self.mode = "heartbeat"  # this filesystem has no flock
                return self._claim_heartbeat(shard_id)
            self.mode = "flock"
            data = _record(self.owner, time.time(), "flock")
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            return Claim(self, shard_id, fd, self.owner)
        return self._claim_heartbeat(shard_id)

    def _claim_heartbeat(self, shard_id: int) -> Claim | None:
        if not create_exclusive(self.lock_path(shard_id), _record(self.owner, time.time(), "heartbeat")):
            return self._take_over(shard_id)
        return Claim(self, shard_id, None, self.owner)

    def _storage_now(self) -> float:
        """Now on the storage's clock: this host's clock plus its offset from the storage's, measured
        (every CLOCK_CHECK_S) as the mtime of an object written now: so every host judges a
        claim's age on one clock, whatever the skew between hosts."""
        if self._clock is None or time.monotonic() - self._clock[1] > CLOCK_CHECK_S:
            probe = self.claims_dir / f".clock-{hashlib.sha256(self.owner.encode()).hexdigest()[:16]}"
            before = time.time()
            write_bytes_atomic(probe, b"clock\n")
            after = time.time()
            try:
                written = probe.stat().st_mtime
            finally:
                probe.unlink(missing_ok=True)
            self._clock = (written - (before + after) / 2, time.monotonic())
        return time.time() + self._clock[0]

    def age(self, rec: dict) -> float:
        """Seconds since the record's last beat, on the storage's clock (not the writer's)."""
        return self._storage_now() - float(rec.get("written", rec.get("heartbeat", 0)))

    def is_stale(self, rec: dict) -> bool:
        """A claim record whose heartbeat is too old, or whose process on this host is gone."""
        return holder_gone(rec) or self.age(rec) > self.stale_s

    def _take_over(self, shard_id: int) -> Claim | None:
        path = self.lock_path(shard_id)
        rec = read_record(path)
        if rec is None:  # released just now: try again from the start
            return self._claim_heartbeat(shard_id) if not path.exists() else None
        if not self.is_stale(rec):
            return None
        # one taker per stale owner: whoever creates this marker first
        marker = self.takeover_path(shard_id, str(rec.get("owner")))
        if not create_exclusive(marker, self.owner.encode()):
            return None
        # the record as judged stale, after the marker: an owner that beat since (and so saw no
        # marker) goes on, and so does another taker's record: this worker backs off
        if read_record(path) != rec:
            marker.unlink(missing_ok=True)
            return None
        # the decision, before the record: an owner whose beat lands now waits for it and gives up
        write_bytes_atomic(marker, TAKEN + self.owner.encode())
        write_bytes_atomic(path, _record(self.owner, time.time(), "heartbeat"))
        return Claim(self, shard_id, None, self.owner, takeover=marker, replaced=str(rec.get("owner")))

    @contextmanager
    def try_claim(self, shard_id: int) -> Iterator[bool]:
        """Yield True while this worker holds the shard's claim, False if another one does."""
        claim = self.claim(shard_id)
        try:
            yield claim is not None
        finally:
            if claim is not None:
                claim.release()

    def holder(self, shard_id: int) -> str | None:
        """'host pid N (heartbeat S s ago)' of the worker on the shard now, or None when nobody is."""
        path = self.lock_path(shard_id)
        rec = read_record(path)
        if rec is None:
            return None
        if rec.get("mode") == "flock":  # the file outlives the claim: the lock tells
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None
            except BlockingIOError:
                pass
            finally:
                os.close(fd)
        try:
            age = self.age(rec)
        except STORAGE_ERRORS:  # the storage's clock not readable (read-only credentials): this one's
            age = time.time() - float(rec.get("written", 0))
        stale = ", stale: will be taken over" if rec.get("mode") != "flock" and self.is_stale(rec) else ""
        return f"{rec.get('host')} pid {rec.get('pid')} (heartbeat {age:.0f} s ago{stale})"
