"""Shard claims: flock and heartbeat files, stale takeover by exactly one worker, lost claims, and
extract workers that share a run through heartbeat claims (filesystems without flock)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from conftest import cli, make_dataset
from test_extract import cache_files
from test_reliability import EXTRACT_ARGS, clean, fresh_run, only_cache, start  # noqa: F401

from pipeline.queue import ShardQueue

_ = clean  # the module-scoped fixture: one uninterrupted extract to compare with


def queue(tmp_path, mode="heartbeat", stale_s=60.0) -> ShardQueue:
    return ShardQueue(tmp_path / "claims", 4, lambda s: False, mode=mode, stale_s=stale_s, heartbeat_s=0.05)


def plant(q: ShardQueue, shard: int, host: str, pid: int, age_s: float) -> None:
    """Another worker's claim record, last written `age_s` ago (its mtime too, where it can be set:
    a claim's age is judged on the storage's clock; on object storage a test waits instead)."""
    q.claims_dir.mkdir(parents=True, exist_ok=True)
    path = q.lock_path(shard)
    path.write_text(json.dumps({"owner": f"{host}:{pid}:x", "host": host, "pid": pid, "mode": "heartbeat",
                                "since": 0, "heartbeat": time.time() - age_s}))
    backdate(path, age_s)


def backdate(path, age_s: float) -> None:
    """Set a local file's mtime `age_s` seconds back (object storage keeps its own times)."""
    import os
    from pathlib import Path

    if isinstance(path, Path):
        os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_heartbeat_claim_is_exclusive_and_refreshed(tmp_path):
    a, b = queue(tmp_path), queue(tmp_path)
    claim = a.claim(0)
    assert claim is not None and b.claim(0) is None
    first = json.loads(a.lock_path(0).read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads(a.lock_path(0).read_text())["heartbeat"] > first  # the thread beats
    assert "pid" in b.holder(0) and "stale" not in b.holder(0)
    claim.release()
    assert not a.lock_path(0).exists() and b.holder(0) is None
    assert b.claim(0) is not None


def test_stale_claim_is_taken_over_by_exactly_one_worker(tmp_path):
    a, b, c = queue(tmp_path, stale_s=2), queue(tmp_path, stale_s=2), queue(tmp_path, stale_s=2)
    plant(a, 1, "otherhost", 4242, age_s=0)
    assert a.claim(1) is None  # fresh heartbeat on another host: left alone
    time.sleep(3.1)  # stale by the storage's clock (S3's times have whole seconds)
    assert "stale" in a.holder(1)
    taken = [q.claim(1) for q in (a, b, c)]
    assert sum(t is not None for t in taken) == 1
    owner = json.loads(a.lock_path(1).read_text())["owner"]
    assert owner == next(t for t in taken if t is not None).owner


def test_owner_that_was_taken_over_notices_and_keeps_off(tmp_path):
    a, b = queue(tmp_path, stale_s=1), queue(tmp_path, stale_s=1)
    claim = a.claim(2)
    claim._stop.set()  # a stalled worker: no more heartbeats
    time.sleep(2.2)  # past stale_s on the storage's clock (S3's times have whole seconds)
    other = b.claim(2)
    assert other is not None
    claim.refresh()
    assert claim.lost
    claim.release()  # must not remove the new owner's claim
    assert json.loads(a.lock_path(2).read_text())["owner"] == other.owner


def test_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    code = ("import sys, time; sys.path.insert(0, '.'); from pipeline.queue import ShardQueue; "
            f"q = ShardQueue({str(tmp_path / 'claims')!r}, 4, lambda s: False, mode='heartbeat'); "
            "c = q.claim(3); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    q = queue(tmp_path, stale_s=3600)
    assert q.claim(3) is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert q.claim(3) is not None


def test_flock_claim_records_owner_and_frees_on_release(tmp_path):
    a, b = queue(tmp_path, mode="flock"), queue(tmp_path, mode="auto")
    claim = a.claim(0)
    assert b.claim(0) is None and "pid" in b.holder(0)
    claim.release()
    assert b.holder(0) is None  # the file stays; the lock is gone
    assert b.claim(0) is not None


def test_heartbeat_workers_take_over_and_make_the_same_cache(clean, tmp_path, tiny_model):  # noqa: F811
    run = fresh_run(clean, tmp_path)
    claims = run / "cache" / (only_cache(clean["run"]).name + ".claims")
    q = ShardQueue(claims, 12, lambda s: False, mode="heartbeat")
    plant(q, 4, "otherhost", 4242, age_s=3)  # alive elsewhere: left to its owner
    plant(q, 7, "deadhost", 4243, age_s=10_000)  # heartbeat long stale: taken over
    first = cli(*EXTRACT_ARGS, "--model", tiny_model, "--run", run, "--claims", "heartbeat", "--json")
    summary = json.loads(first.stdout)
    assert summary["shards_done_now"] == 11 and summary["shards_left_to_others"] == 1
    status = cli("status", "--run", run).stdout
    assert "shard 00004 in progress by otherhost pid 4242" in status
    q.lock_path(4).unlink()  # its owner finished elsewhere (here: gave up)
    # two workers at once on the rest, heartbeat claims only
    procs = [start(*EXTRACT_ARGS, "--model", tiny_model, "--run", run, "--claims", "heartbeat", "--json")
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(json.loads(o)["shards_done_now"] for o, _ in outs) == 1
    assert cache_files(only_cache(run)) == clean["files"]
    assert not list(claims.glob("*.lock")) and not list(claims.glob("*.takeover-*"))


def _unused_pid() -> int:
    """A pid no process of this namespace has (what a live worker's pid in another one looks like)."""
    import os

    for pid in range(4_000_000, 3_000_000, -7919):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise RuntimeError("no free pid found")


def test_live_claim_of_another_pid_namespace_on_the_same_host_name_is_left_alone(tmp_path):
    """Two containers with host networking (Kubernetes hostNetwork pods) share a host name but not a
    PID namespace: a fresh claim whose pid does not exist here is not a dead process's; only its
    heartbeat's age says it is stale. Records of an older version (no host identity) likewise."""
    import socket

    q = queue(tmp_path, stale_s=60)
    pid = _unused_pid()
    other = {"owner": f"{socket.gethostname()}:{pid}:ns2", "host": socket.gethostname(), "pid": pid,
             "mode": "heartbeat", "since": 0, "heartbeat": time.time()}
    for rec in ({**other, "hostid": "boot-of-this-host/pidns:4026532999"}, other):
        q.claims_dir.mkdir(parents=True, exist_ok=True)
        q.lock_path(0).write_text(json.dumps(rec))
        assert q.claim(0) is None, rec  # alive in its own namespace: not seized
        assert "stale" not in q.holder(0)
        q.lock_path(0).write_text(json.dumps({**rec, "heartbeat": time.time() - 600}))
        backdate(q.lock_path(0), 600)
        claim = q.claim(0)  # its heartbeat long stale: taken over
        assert claim is not None
        claim.release()


def test_a_stalled_worker_whose_claim_was_taken_never_rewrites_the_shard(tmp_path, tiny_model, monkeypatch):
    """Worker A computes a shard, then stalls (SIGSTOP: no heartbeats) past the stale time; worker B
    takes the claim over, writes the shard with other bytes (another batch size or GPU) and marks it
    done. When A resumes it checks its claim before writing anything: it writes no data and no
    marker, and `verify` finds B's data under B's checksum."""
    from dataclasses import replace

    import stages.extract as extract
    from stages.shard import run_shard
    from stages.verify import run_verify
    from storage.cache_folder import shard_checksum

    run_shard([make_dataset(tmp_path / "data", per_class=2, splits=("train",))], tmp_path / "run",
              shard_size=4)
    monkeypatch.setenv("DNF_CLAIM_STALE_S", "0.2")
    real_compute = extract.compute_shard
    writes_after_stall = []

    def compute_then_stall_and_be_taken_over(job, *args):
        arrays, marker = real_compute(job, *args)
        job.claim._stop.set()  # stopped: its heartbeat thread beats no more
        time.sleep(0.4)
        cache = job.claim.queue.is_done.__self__
        taker = ShardQueue(job.claim.queue.claims_dir, 1, cache.is_done, mode="heartbeat", stale_s=0.2)
        theirs = taker.claim(job.shard_id)
        assert theirs is not None, "the stale claim was not taken over"
        other = (arrays[0] + 1, *arrays[1:])  # B's bytes differ from A's
        index = cache.write_shard(job.start, *other)
        cache.mark_done(replace(marker, checksum=shard_checksum(other[0], other[1], other[4]), index=index))
        theirs.release()
        real_write = cache.write_shard
        cache.write_shard = lambda *a: (writes_after_stall.append(a), real_write(*a))[1]
        return arrays, marker

    monkeypatch.setattr(extract, "compute_shard", compute_then_stall_and_be_taken_over)
    result = extract.run_extract(tmp_path / "run", extract.ExtractOptions(
        model=tiny_model, size=32, workers=0, batch_size=4, device="cpu", claims="heartbeat"))
    assert not writes_after_stall, "the stalled worker rewrote the shard after its claim was taken"
    assert result["shards_done_now"] == 0 and result["shards_left_to_others"] == 1, result
    report = run_verify(tmp_path / "run")
    assert report["ok"], report


def _takeover_marker(q: ShardQueue, shard: int, owner: str):
    """The marker a taker of `owner`'s claim creates first (one taker per stale owner)."""
    import hashlib

    return q.claims_dir / f"{shard:05d}.takeover-{hashlib.sha256(owner.encode()).hexdigest()[:16]}"


def test_owner_that_beats_while_a_takeover_is_under_way_counts_its_claim_lost(tmp_path):
    """A stalled owner that resumes just as a taker has judged its heartbeat stale (the taker's
    marker is there, its record not yet written) must not go on as the holder: its beat would
    overwrite the taker's record and both would write the shard."""
    a = queue(tmp_path)
    claim = a.claim(0)
    claim._stop.set()
    _takeover_marker(a, 0, claim.owner).write_text("a taker's owner id")
    claim.refresh()
    assert claim.lost


def test_taker_backs_off_when_the_owner_beats_between_its_look_and_its_marker(tmp_path, monkeypatch):
    """The taker read a stale heartbeat, but the owner beat again before the taker's marker was
    there: the owner goes on (it saw no marker), so the taker must not take the claim."""
    import pipeline.queue as pq

    q = queue(tmp_path, stale_s=60)
    plant(q, 1, "otherhost", 4242, age_s=600)
    real = pq.create_exclusive

    def owner_beats_just_then(path, data):
        made = real(path, data)
        if ".takeover-" in str(path):
            plant(q, 1, "otherhost", 4242, age_s=0)  # the owner's fresh beat, same owner id
        return made

    monkeypatch.setattr(pq, "create_exclusive", owner_beats_just_then)
    assert q.claim(1) is None
    assert json.loads(q.lock_path(1).read_text())["host"] == "otherhost"
    assert not list(q.claims_dir.glob("*.takeover-*"))


def test_an_object_lock_of_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    """The cache-creation lock records its holder as claims do (host id included), so a lock whose
    holder died here is free at once instead of after its 120 s stale time."""
    from storage.cache_folder import object_lock

    lock = tmp_path / "cache.lock"
    code = ("import sys, time; sys.path.insert(0, '.'); from storage.cache_folder import object_lock\n"
            f"with object_lock(__import__('pathlib').Path({str(lock)!r})):\n"
            "    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    with object_lock(lock, stale_s=3600):
        assert time.monotonic() - t0 < 30
    assert not lock.exists()


def _interleave(monkeypatch, owner_waits_for: str):
    """Hooks that hold the owner's beat (thread 'owner') just before its write of the record until
    the taker has `owner_waits_for` ('marker': made its takeover marker; 'record': written its own
    record), and hold the taker just after its marker until the owner has written."""
    import threading

    import pipeline.queue as pq

    at_write, marker_made, taker_wrote, owner_wrote = (threading.Event() for _ in range(4))
    real_write, real_create = pq.write_bytes_atomic, pq.create_exclusive

    def create(path, data):
        made = real_create(path, data)
        if ".takeover-" in str(path):
            marker_made.set()
            if owner_waits_for == "marker":
                owner_wrote.wait(5)  # the taker re-reads the record after the owner's beat
        return made

    def write(path, data):
        if threading.current_thread().name == "owner" and str(path).endswith(".lock"):
            at_write.set()  # the owner's first check (no marker) is done
            (marker_made if owner_waits_for == "marker" else taker_wrote).wait(5)
            real_write(path, data)
            owner_wrote.set()
            return
        real_write(path, data)
        if str(path).endswith(".lock"):
            taker_wrote.set()

    monkeypatch.setattr(pq, "write_bytes_atomic", write)
    monkeypatch.setattr(pq, "create_exclusive", create)
    return at_write


def _race(tmp_path, monkeypatch, owner_waits_for: str):
    """An owner stalled past stale_s beats again just as a taker takes its claim over."""
    import threading

    q = queue(tmp_path, stale_s=0.3)
    q.heartbeat_s = 3600  # beats only when the test says
    owner = q.claim(0)
    time.sleep(0.5)  # the owner stalled past stale_s
    taker_q = queue(tmp_path, stale_s=0.3)
    at_write = _interleave(monkeypatch, owner_waits_for)
    beat = threading.Thread(target=owner.refresh, name="owner")
    beat.start()
    assert at_write.wait(5)
    taken = taker_q.claim(0)
    beat.join(10)
    return q, owner, taken


def test_owner_beat_after_the_takeover_marker_leaves_exactly_one_holder(tmp_path, monkeypatch):
    """Owner checks (no marker), taker makes its marker, owner writes its beat, taker re-reads (a
    new beat): the taker backs off; the owner, seeing the marker after its write, must then go
    on (both used to back off: nobody held the shard until stale_s passed)."""
    q, owner, taken = _race(tmp_path, monkeypatch, "marker")
    assert (taken is None) != owner.lost, (taken, owner.lost)
    holder = json.loads(q.lock_path(0).read_text())["owner"]
    assert holder == (owner.owner if taken is None else taken.owner)
    for c in (owner, taken):
        if c is not None and not c.lost:
            c.refresh()
            assert not c.lost  # the one left holds on at its next beat
            c.release()
    assert not q.lock_path(0).exists()


def test_owner_beat_landing_after_the_takers_record_leaves_the_taker_holding(tmp_path, monkeypatch):
    """Taker makes its marker, finds the record unchanged and writes its own; the owner's beat,
    begun before the marker, lands after it and overwrites it: the owner must count its claim
    lost, and the taker keep it (its next beat writes its record back)."""
    q, owner, taken = _race(tmp_path, monkeypatch, "record")
    assert taken is not None and owner.lost
    taken.refresh()
    assert not taken.lost
    assert json.loads(q.lock_path(0).read_text())["owner"] == taken.owner
    owner.release()
    assert q.lock_path(0).exists()  # the loser leaves the taker's claim alone
    taken.release()
    assert not q.lock_path(0).exists()


def test_clock_skew_between_hosts_never_seizes_a_live_claim(tmp_path):
    """A claim's age is judged on one clock, the storage's (the record's modification time against
    an object written now), not by comparing one host's clock with another's: a taker whose clock
    runs 300 s ahead, or an owner whose clock runs 300 s behind, seized live claims."""
    import types

    import pipeline.queue as pq

    def with_clock(skew_s: float, call):
        real = pq.time
        pq.time = types.SimpleNamespace(time=lambda: real.time() + skew_s, sleep=real.sleep,
                                        monotonic=real.monotonic)
        try:
            return call()
        finally:
            pq.time = real

    owner = queue(tmp_path, stale_s=60)
    claim = owner.claim(0)
    assert with_clock(300, lambda: queue(tmp_path, stale_s=60).claim(0)) is None  # taker ahead
    assert with_clock(300, lambda: "stale" not in queue(tmp_path, stale_s=60).holder(0))
    claim.refresh()
    assert not claim.lost
    claim.release()
    slow = with_clock(-300, lambda: queue(tmp_path, stale_s=60).claim(1))  # owner behind
    assert slow is not None
    with_clock(-300, slow.refresh)
    assert queue(tmp_path, stale_s=60).claim(1) is None
    slow.release()


def test_a_worker_stalled_inside_its_write_undoes_the_done_marker_its_bytes_broke(tmp_path, tiny_model,
                                                                                 monkeypatch, capsys):
    """Worker A passes its claim check, stalls at the start of its shard write (SIGSTOP, a slow
    PUT) past the stale time; B takes the claim over, writes the shard with other bytes and marks
    it done; A resumes and writes its bytes over B's. A must not leave that silently: it finds the
    stored data no longer match B's done marker, removes the marker (the shard is pending again,
    not bad) and says so; the next extract recomputes the shard and `verify` passes."""
    import threading

    import stages.extract as extract
    from stages.shard import run_shard
    from stages.verify import run_verify
    from storage.zarr_cache import ZarrCache

    run_shard([make_dataset(tmp_path / "data", per_class=2, splits=("train",))], tmp_path / "run",
              shard_size=4)
    monkeypatch.setenv("DNF_CLAIM_STALE_S", "0.2")
    real_compute, real_write = extract.compute_shard, ZarrCache.write_shard
    jobs = []

    def compute(job, *args):
        jobs.append(job)
        return real_compute(job, *args)

    def stall_then_write(cache, start, *arrays):
        if len(jobs) == 1 and not getattr(cache, "_stalled", False):
            cache._stalled = True
            jobs[0].claim._stop.set()  # stopped inside the write: no heartbeats
            time.sleep(0.4)
            done = []

            def worker_b():  # another process in truth: its own thread (no fence of A's)
                taker = ShardQueue(jobs[0].claim.queue.claims_dir, 1, cache.is_done, mode="heartbeat",
                                   stale_s=0.2).claim(0)
                assert taker is not None, "the stale claim was not taken over"
                theirs = (arrays[0] + 1, *arrays[1:])  # B's bytes differ from A's
                cache.mark_done(_b_marker(theirs, real_write(cache, start, *theirs)))
                taker.release()
                done.append(True)

            b = threading.Thread(target=worker_b)
            b.start()
            b.join()
            assert done, "worker B failed"
        return real_write(cache, start, *arrays)

    monkeypatch.setattr(extract, "compute_shard", compute)
    monkeypatch.setattr(ZarrCache, "write_shard", stall_then_write)
    # the stall lands after the write's last claim check, just before its rename (the window the
    # fence cannot close: test_zarr_format checks the fence itself): A's rename goes through
    import storage.locations.local
    monkeypatch.setattr(storage.locations.local, "check_fence", lambda: None)
    opts = extract.ExtractOptions(model=tiny_model, size=32, workers=0, batch_size=4, device="cpu",
                                  claims="heartbeat")
    result = extract.run_extract(tmp_path / "run", opts)
    said = capsys.readouterr()
    assert result["shards_done_now"] == 0, result
    assert "writes nothing of it" not in said.out + said.err
    assert "done marker" in said.out + said.err and "removed" in said.out + said.err, said
    report = run_verify(tmp_path / "run")
    assert report["ok"], report  # pending again, not bad
    monkeypatch.setattr(ZarrCache, "write_shard", real_write)
    assert extract.run_extract(tmp_path / "run", opts)["shards_done_now"] == 1
    report = run_verify(tmp_path / "run")
    assert report["ok"] and report["caches"][0]["shards_checked"] == 1, report


def _b_marker(arrays, index):
    """The done marker worker B writes for its bytes `arrays` of shard 0 (no row rejected)."""
    from storage.cache_config import DoneMarker
    from storage.cache_folder import shard_checksum

    n = len(arrays[0])
    return DoneMarker(shard=0, rows=(0, n), count=n, cached=n, rejected=(),
                      checksum=shard_checksum(arrays[0], arrays[1], arrays[4]), index=index)
