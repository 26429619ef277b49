"""Shard claims: flock and heartbeat files, stale takeover by exactly one worker, lost claims, and
extract workers that share a run through heartbeat claims (filesystems without flock)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from conftest import cli
from test_extract import cache_files
from test_reliability import EXTRACT_ARGS, clean, fresh_run, only_cache, start  # noqa: F401

from pipeline.queue import ShardQueue

_ = clean  # the module-scoped fixture: one uninterrupted extract to compare with


def queue(tmp_path, mode="heartbeat", stale_s=60.0) -> ShardQueue:
    return ShardQueue(tmp_path / "claims", 4, lambda s: False, mode=mode, stale_s=stale_s, heartbeat_s=0.05)


def plant(q: ShardQueue, shard: int, host: str, pid: int, age_s: float) -> None:
    q.claims_dir.mkdir(parents=True, exist_ok=True)
    q.lock_path(shard).write_text(json.dumps({"owner": f"{host}:{pid}:x", "host": host, "pid": pid,
                                              "mode": "heartbeat", "since": 0,
                                              "heartbeat": time.time() - age_s}))


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
    a, b, c = queue(tmp_path), queue(tmp_path), queue(tmp_path)
    plant(a, 1, "otherhost", 4242, age_s=5)
    assert a.claim(1) is None  # fresh heartbeat on another host: left alone
    plant(a, 1, "otherhost", 4242, age_s=600)
    assert "stale" in a.holder(1)
    taken = [q.claim(1) for q in (a, b, c)]
    assert sum(t is not None for t in taken) == 1
    owner = json.loads(a.lock_path(1).read_text())["owner"]
    assert owner == next(t for t in taken if t is not None).owner


def test_owner_that_was_taken_over_notices_and_keeps_off(tmp_path):
    a, b = queue(tmp_path, stale_s=0.2), queue(tmp_path, stale_s=0.2)
    claim = a.claim(2)
    claim._stop.set()  # a stalled worker: no more heartbeats
    time.sleep(0.4)
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
        claim = q.claim(0)  # its heartbeat long stale: taken over
        assert claim is not None
        claim.release()
