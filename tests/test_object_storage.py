"""Runs on object storage, against a real S3 server on loopback (moto's server mode, started here):
the whole flow with every path an s3:// URL, byte-identical to a local run; a kill -9 at chosen
writes and a rerun; two workers on one run; injected 503s and lost answers; no credentials in
anything written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import test_claims
from conftest import ROOT, cli, image_bytes, make_dataset, make_openfake
from s3_server import ACCESS_KEY, SECRET_KEY, FaultPlan, FaultProxy, MotoServer

SHARD = 4
EXTRACT = ("--size", 32, "--device", "cpu", "--workers", 0, "--batch-size", 4)


@pytest.fixture(scope="module")
def s3():
    server = MotoServer()
    proxy = FaultProxy(server.port)
    server.proxy = proxy
    yield server
    proxy.stop()
    server.stop()


@pytest.fixture()
def bucket(s3):
    """A fresh bucket (emptied afterwards: moto keeps objects in memory)."""
    name = f"t{uuid.uuid4().hex[:16]}"
    client = s3.client()
    client.create_bucket(Bucket=name)
    s3.proxy.plan = FaultPlan()
    yield name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


@pytest.fixture(scope="module")
def reference(module_tmp, tiny_model):
    """A dataset and its local run: the bytes every object-storage run must reproduce."""
    root = module_tmp("objref")
    data = make_dataset(root / "data", per_class=4)
    run = root / "run"
    cli("shard", data, "--run", run, "--shard-size", SHARD)
    cli("extract", "--run", run, "--model", tiny_model, *EXTRACT)
    return data, run, local_checksums(run)


def local_checksums(run: Path) -> dict[int, str]:
    (cache,) = [p for p in (run / "cache").iterdir() if (p / "config.json").exists()]
    return {int(p.stem): json.loads(p.read_text())["checksum"] for p in (cache / "done").glob("*.json")}


def objects(s3, bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = s3.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def s3_checksums(s3, bucket: str, run_prefix: str = "runs/r1") -> dict[int, str]:
    return {int(k.rsplit("/", 1)[1].split(".")[0]): json.loads(v)["checksum"]
            for k, v in objects(s3, bucket, f"{run_prefix}/cache/").items() if "/done/" in k}


def upload(s3, bucket: str, folder: Path, prefix: str) -> None:
    client = s3.client()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{f.relative_to(folder).as_posix()}",
                              Body=f.read_bytes())


def s3_cli(s3, *args, via_proxy: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    return cli(*args, check=check, env=s3.env(s3.proxy.url if via_proxy else None))


def sharded(s3, bucket: str, reference, via_proxy: bool = False) -> str:
    data, _, _ = reference
    upload(s3, bucket, data, "data")
    run = f"s3://{bucket}/runs/r1"
    s3_cli(s3, "shard", f"s3://{bucket}/data", "--run", run, "--shard-size", SHARD, via_proxy=via_proxy)
    return run


def test_whole_flow_on_s3_gives_the_local_bytes_and_writes_no_credentials(s3, bucket, reference,
                                                                          tiny_model, tmp_path):
    _, local_run, expected = reference
    s3.client().put_object(Bucket=bucket, Key="data/train/progan/1_fake/broken.png", Body=b"not an image")
    run = sharded(s3, bucket, reference)
    stored = objects(s3, bucket, "runs/r1/rejects.jsonl")
    rejects = [json.loads(line) for line in stored["runs/r1/rejects.jsonl"].splitlines()]
    assert [r["path"] for r in rejects] == [f"s3://{bucket}/data/train/progan/1_fake/broken.png"]
    assert "not an image" in rejects[0]["reason"]
    outs = [s3_cli(s3, "extract", "--run", run, "--model", tiny_model, *EXTRACT)]
    assert s3_checksums(s3, bucket) == expected
    stored = objects(s3, bucket, "runs/r1/")
    local_info = json.loads((local_run / "run.json").read_text())
    assert json.loads(stored["runs/r1/run.json"])["images"] == local_info["images"]
    outs.append(s3_cli(s3, "train", "--run", run, "--epochs", 1, "--batch-size", 4, "--workers", 0,
                       "--device", "cpu", "--head", "linear"))
    outs.append(s3_cli(s3, "eval", "--run", run, "--checkpoint", f"{run}/train/default/best.pt",
                       "--workers", 0, "--device", "cpu", "--bootstrap", 50))
    outs.append(s3_cli(s3, "verify", "--run", run))
    stored = objects(s3, bucket, "runs/r1/")
    report = json.loads(stored["runs/r1/eval/default-test/report.json"])
    assert report["overall"]["n"] == 8 and "runs/r1/eval/default-test/predictions.csv" in stored
    assert {"runs/r1/train/default/best.pt", "runs/r1/train/default/last.pt"} <= set(stored)
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert not [k for k, v in stored.items() if secret.encode() in v]
        assert not [o for o in outs if secret in o.stdout + o.stderr]


def test_credentials_in_a_url_are_refused_without_echoing_them(s3, bucket):
    out = s3_cli(s3, "shard", f"s3://{ACCESS_KEY}:{SECRET_KEY}@{bucket}/data", "--run", "/nonexistent",
                 check=False)
    assert out.returncode == 2 and "credentials do not belong in a URL" in out.stderr
    assert SECRET_KEY not in out.stdout + out.stderr


# all in make test-long (about 40 s each): make test keeps the local kills at every write (test_crash_points)
# and the whole flow on S3
@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [3, 11, 24])
def test_extract_killed_at_a_write_resumes_to_the_local_bytes(s3, bucket, reference, tiny_model, kill_at):
    """kill -9 when the extract's n-th write request reaches the server (it never arrives): no done
    marker without its data, and a rerun ends with the local run's checksums."""
    _, _, expected = reference
    run = sharded(s3, bucket, reference)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **s3.env(s3.proxy.url)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "extract", "--run", run, "--model",
                             str(tiny_model), *map(str, EXTRACT)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    s3.proxy.plan = FaultPlan(kill_at=kill_at, kill_pid=proc.pid)
    proc.communicate(timeout=300)
    assert proc.returncode == -9, f"the extract finished before its write number {kill_at}"
    done = s3_checksums(s3, bucket)
    assert len(done) < len(expected)
    stored = objects(s3, bucket, "runs/r1/cache/")
    for shard in done:  # every done marker has its data
        assert [k for k in stored if k.endswith(f"/dnf/c/{shard}/0/0/0")]
    s3.proxy.plan = FaultPlan()
    s3_cli(s3, "extract", "--run", run, "--model", tiny_model, *EXTRACT, via_proxy=True)
    assert s3_checksums(s3, bucket) == expected
    s3_cli(s3, "verify", "--run", run)


@pytest.mark.slow  # about 45 s: in make test-long; make test keeps two local workers and the claims' S3 tests
def test_two_workers_on_one_s3_run_do_each_shard_once_through_faults(s3, bucket, reference, tiny_model):
    """Two extract processes on one run while every 13th request fails with a 503 and every 17th
    write happens but its answer is lost: each shard is marked done once (one conditional create
    succeeded), by one of them, and the bytes are the local run's."""
    _, _, expected = reference
    run = sharded(s3, bucket, reference)
    s3.proxy.plan = FaultPlan(fail_every=13, lose_every=17)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **s3.env(s3.proxy.url)}
    args = [sys.executable, str(ROOT / "cli.py"), "extract", "--run", run, "--model", str(tiny_model),
            *map(str, EXTRACT), "--json"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    summaries = [json.loads(o[0][o[0].index("{"):]) for o in outs]
    assert sum(s["shards_done_now"] for s in summaries) == len(expected)
    created = [path for method, path, status, conditional in s3.proxy.plan.log
               if method == "PUT" and "/done/" in path and conditional and status == 200]
    assert sorted(created) == sorted(set(created)) and len(created) == len(expected)
    s3.proxy.plan = FaultPlan()
    assert s3_checksums(s3, bucket) == expected
    s3_cli(s3, "verify", "--run", run)


@pytest.mark.slow
def test_injected_faults_and_lost_answers_change_no_byte(s3, bucket, reference, tiny_model):
    """Every 5th request fails with a 503 and every 7th write happens but its answer is lost (the
    client retries a PUT that was done: a conditional create then meets its own object)."""
    _, _, expected = reference
    data, _, _ = reference
    upload(s3, bucket, data, "data")
    run = f"s3://{bucket}/runs/r1"
    s3.proxy.plan = FaultPlan(fail_every=5, lose_every=7)
    s3_cli(s3, "shard", f"s3://{bucket}/data", "--run", run, "--shard-size", SHARD, via_proxy=True)
    s3_cli(s3, "extract", "--run", run, "--model", tiny_model, *EXTRACT, via_proxy=True)
    plan = s3.proxy.plan
    assert plan.requests > 50 and any(status == 412 for _, _, status, _ in plan.log)
    s3.proxy.plan = FaultPlan()
    assert s3_checksums(s3, bucket) == expected
    s3_cli(s3, "verify", "--run", run)


@pytest.mark.slow  # make test-long: the same location layer as the flow tests, other writers
def test_parquet_dataset_on_s3_is_read_in_place_as_locally(s3, bucket, tiny_model, tmp_path):
    """OpenFake's layout (README configs, parquet files) under an s3:// prefix: the same manifest
    rows and feature bytes as the same files on a local disk."""
    data = make_openfake(tmp_path / "openfake", rows=32, files=1, row_group_size=6)
    local = tmp_path / "local"
    cli("shard", data, "--run", local, "--shard-size", 8)
    cli("extract", "--run", local, "--model", tiny_model, *EXTRACT)
    upload(s3, bucket, data, "openfake")
    run = f"s3://{bucket}/runs/r1"
    s3_cli(s3, "shard", f"s3://{bucket}/openfake", "--run", run, "--shard-size", 8)
    s3_cli(s3, "extract", "--run", run, "--model", tiny_model, *EXTRACT)
    stored = objects(s3, bucket, "runs/r1/")
    rows = [json.loads(line) for k in sorted(stored) if "/shards/" in k for line in stored[k].splitlines()]
    local_rows = [json.loads(line) for f in sorted((local / "shards").glob("*.jsonl"))
                  for line in f.read_text().splitlines()]
    assert [(r["key"], r["label"], r["split"], r["source"]) for r in rows] == \
        [(r["key"], r["label"], r["split"], r["source"]) for r in local_rows]
    assert all(r["path"].startswith(f"s3://{bucket}/openfake/data/") for r in rows)
    assert s3_checksums(s3, bucket) == local_checksums(local)


@pytest.fixture()
def in_process(s3, bucket, monkeypatch):
    """This process's clients pointed at the server (the pipeline's own code, no subprocess)."""
    from storage.locations import as_path, object_store

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    object_store._FILESYSTEMS.clear()
    yield as_path(f"s3://{bucket}")
    object_store._FILESYSTEMS.clear()


@pytest.mark.parametrize("check", [test_claims.test_heartbeat_claim_is_exclusive_and_refreshed,
                                   test_claims.test_stale_claim_is_taken_over_by_exactly_one_worker,
                                   test_claims.test_owner_that_was_taken_over_notices_and_keeps_off],
                         ids=lambda f: f.__name__.removeprefix("test_"))
def test_claims_on_s3_follow_the_heartbeat_protocol(in_process, check):
    """The claim tests of the local heartbeat mode, with the claims on S3 (conditional creates)."""
    check(in_process)


def test_claims_on_s3_refuse_flock(in_process):
    from pipeline.queue import ShardQueue
    from storage.errors import OptionError

    with pytest.raises(OptionError, match="object storage"):
        ShardQueue(in_process / "claims", 4, lambda s: False, mode="flock")
    assert ShardQueue(in_process / "claims", 4, lambda s: False).mode == "heartbeat"


@pytest.mark.slow  # make test-long: the same location layer as the flow tests, other writers
def test_packed_tars_and_a_webdataset_cache_on_s3(s3, bucket, reference, tiny_model):
    """`shard --pack` writes the tars to S3, extract reads the images from them (no GET of an image
    object), into a WebDataset cache on S3 (tars through fsspec files) with the local checksums,
    and train streams it."""
    data, _, expected = reference
    upload(s3, bucket, data, "data")
    run = f"s3://{bucket}/runs/r1"
    s3_cli(s3, "shard", f"s3://{bucket}/data", "--run", run, "--shard-size", SHARD, "--pack")
    packed = [k for k in objects(s3, bucket, "runs/r1/packed/")]
    assert len(packed) == len(expected)
    s3.proxy.plan = FaultPlan()
    s3_cli(s3, "extract", "--run", run, "--model", tiny_model, *EXTRACT, "--backend", "webdataset",
           via_proxy=True)
    assert not [p for m, p, _, _ in s3.proxy.plan.log if m == "GET" and "/data/" in p]
    stored = objects(s3, bucket, "runs/r1/cache/")
    assert len([k for k in stored if k.endswith(".tar")]) == len(expected)
    assert s3_checksums(s3, bucket) == expected
    s3_cli(s3, "train", "--run", run, "--epochs", 1, "--batch-size", 4, "--workers", 1, "--device", "cpu",
           "--head", "linear", "--shuffle-buffer", 8)
    assert "runs/r1/train/default/best.pt" in objects(s3, bucket, "runs/r1/train/")


# Every printable ASCII character but the separator `/` (S3's "safe" ones, those "that might need
# special handling" and those "to avoid"), then non-ASCII UTF-8: S3 takes any UTF-8 key.
KEY_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "/") + "éü日本語ß€"


def test_object_keys_with_every_character_s3_allows_go_through_shard_and_extract(in_process, tiny_model,
                                                                                tmp_path):
    """File names and prefixes holding glob characters (`[ ] * ? { } !`), spaces, `%`, `#`, quotes
    and UTF-8: every image is indexed, read back and cached, none 'missing'; the run's own prefix
    holds them too (its listings, globs and deletes must not expand them)."""
    from stages.extract import ExtractOptions, run_extract
    from stages.shard import run_shard
    from stages.verify import run_verify

    bucket = in_process
    names = [KEY_CHARS[i:i + 12] for i in range(0, len(KEY_CHARS), 12)]  # a few characters per name
    names += ["[ab]", "a*", "?", "{a,b}", "x%20y", "%", "#frag", " lead and trail ", "[!x]", "**"]
    prefix = "da[ta] {x}*?"
    client_keys = []
    for i, name in enumerate(names):
        label = ("0_real", "1_fake")[i % 2]
        data = image_bytes(700 + i)  # noise: distinct bytes for every seed
        key = f"{prefix}/train/progan/{label}/{name}.png"
        (bucket / key).write_bytes(data)
        client_keys.append(key)
    # decoys that a glob of the names above would also match: they must not be read instead
    (bucket / f"{prefix}/train/progan/0_real/b.png").write_bytes(b"decoy, not an image")
    run = bucket / "runs/r[1] {a}*"
    summary = run_shard([str(bucket / prefix)], str(run), shard_size=8)
    rows = [json.loads(line) for p in sorted((run / "shards").glob("*.jsonl"))
            for line in p.read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(str(bucket / k) for k in client_keys), summary
    result = run_extract(str(run), ExtractOptions(model=tiny_model, size=32, workers=0, batch_size=4,
                                                  device="cpu"))
    assert result["rejected"] == 0 and result["images"] == len(names), result
    report = run_verify(str(run))
    assert report["ok"] and report["caches"][0]["shards_checked"] == summary["num_shards"], report


def test_listing_globbing_and_deleting_a_prefix_take_its_key_literally(in_process):
    """A prefix named `p[1]` is not the pattern `p[1]` (which matches `p1`): `glob` lists under it
    alone, `rmtree` deletes it alone (fsspec's `rm` would delete `p1`, another run's objects)."""
    bucket = in_process
    for key in ("p[1]/a.json", "p[1]/b.txt", "p[1]/sub/c.json", "p1/a.json", "p*x/a.json", "pyx/a.json"):
        (bucket / key).write_bytes(key.encode())
    assert [p.name for p in (bucket / "p[1]").glob("*.json")] == ["a.json"]
    assert [p.key.split("/", 1)[1] for p in (bucket / "p[1]").rglob("*.json")] == ["p[1]/a.json",
                                                                                  "p[1]/sub/c.json"]
    assert [p.name for p in (bucket / "p*x").glob("*")] == ["a.json"]
    (bucket / "p[1]").rmtree()
    (bucket / "p*x").rmtree()
    left = sorted(p.key.split("/", 1)[1] for p, _ in bucket.walk_files())
    assert left == ["p1/a.json", "pyx/a.json"]


def test_shard_into_a_bucket_that_does_not_exist_stops_before_any_image_work(in_process, monkeypatch):
    """The output bucket is checked up front: a clear error naming the URL, no image read or decoded
    (it used to decode the first 1,024 images, then end in a traceback at the first checkpoint)."""
    import stages.shard
    from storage.errors import UserError

    bucket = in_process
    (bucket / "data/train/progan/0_real/a.png").write_bytes(image_bytes(1))
    (bucket / "data/train/progan/1_fake/b.png").write_bytes(image_bytes(2))

    def no_image_work(*args, **kwargs):
        raise AssertionError("an image was probed before the output location was checked")

    monkeypatch.setattr("stages.domain.probe_tasks._probe_batch", no_image_work)  # reads and decodes a batch
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:12]}/runs/r1"
    with pytest.raises(UserError, match=f"{missing}.*(does not exist|no such bucket)"):
        stages.shard.run_shard([str(bucket / "data")], missing, shard_size=4)


def test_a_store_that_ignores_conditional_writes_is_refused_before_any_claim(s3, bucket, monkeypatch):
    """A server that drops If-None-Match (several S3-compatible ones ignore it) would let two workers
    create one claim, one lock, one done marker: the first exclusive create of a process probes the
    store (a create of one probe object twice: the second must fail) and refuses with the bucket's
    URL and what to do, no credentials; the same store honouring the header is used as before."""
    from pipeline.queue import ShardQueue
    from storage.cache_folder import object_lock
    from storage.locations import as_path, object_store
    from storage.locations.object_store import StoreError

    def through_proxy(plan: FaultPlan) -> None:
        s3.proxy.plan = plan
        object_store._FILESYSTEMS.clear()
        object_store._CONDITIONAL_OK.clear()

    for k, v in s3.env(s3.proxy.url).items():
        monkeypatch.setenv(k, v)
    through_proxy(FaultPlan(drop_conditional=True))
    run = as_path(f"s3://{bucket}/runs/r1")
    queue = ShardQueue(run / "cache/f.claims", 4, lambda s: False)
    with pytest.raises(StoreError, match=rf"s3://{bucket}\b.*If-None-Match.*--claims") as refused:
        queue.claim(0)
    with pytest.raises(StoreError, match=rf"s3://{bucket}\b"):
        with object_lock(run / "cache/f.lock"):
            pass
    assert ACCESS_KEY not in str(refused.value) and SECRET_KEY not in str(refused.value)
    assert objects(s3, bucket) == {}  # no claim, no lock, no probe left behind
    through_proxy(FaultPlan())
    claim = queue.claim(0)
    assert claim is not None and ShardQueue(run / "cache/f.claims", 4, lambda s: False).claim(0) is None
    claim.release()
    object_store._FILESYSTEMS.clear()


def test_zarr_deletes_under_a_prefix_with_pattern_characters_take_it_literally(in_process):
    """zarr's own deletes (an all-fill chunk, `open_group(mode="w")` after a crash) go through the
    store: under a run named `r[1]` they must leave run `r1`'s objects alone."""
    import zarr

    from storage.zarr_cache import zarr_store

    bucket = in_process
    for key in ("r1/features.zarr/zarr.json", "r1/features.zarr/label/c/0", "r[1]/features.zarr/label/c/0"):
        (bucket / key).write_bytes(b"{}")
    store = zarr_store(bucket / "r[1]/features.zarr")
    zarr.open_group(store, mode="w")  # clears the store first
    group = zarr.open_group(zarr_store(bucket / "r[1]/features.zarr"), mode="a")
    arr = group.create_array("label", shape=(4,), chunks=(1,), dtype="int8", fill_value=-1)
    arr[0] = 1
    arr[0] = -1  # all fill: zarr deletes the chunk
    left = sorted(p.key.split("/", 1)[1] for p, _ in bucket.walk_files())
    assert "r1/features.zarr/zarr.json" in left and "r1/features.zarr/label/c/0" in left, left
    assert "r[1]/features.zarr/label/c/0" not in left, left


@pytest.fixture()
def proxied(s3, bucket, monkeypatch):
    """This process's clients pointed at the fault proxy; `set_plan(plan)` changes what it does (and
    forgets what this process learnt of the stores: buckets seen, conditional writes probed)."""
    from storage.locations import object_store

    def set_plan(plan: FaultPlan) -> None:
        s3.proxy.plan = plan
        object_store._FILESYSTEMS.clear()
        object_store._CONDITIONAL_OK.clear()
        object_store._BUCKETS_SEEN.clear()

    for k, v in s3.env(s3.proxy.url).items():
        monkeypatch.setenv(k, v)
    set_plan(FaultPlan())
    yield set_plan
    set_plan(FaultPlan())


def test_a_store_that_answers_501_to_conditional_writes_is_refused_with_the_claims_choices(proxied,
                                                                                          bucket):
    """A server that rejects If-None-Match outright (501 NotImplemented) gets the same refusal as
    one that ignores it: the store, the --claims choices, a UserError (no traceback)."""
    from s3_server import s3_error

    from storage.atomic import create_exclusive
    from storage.locations.object_store import StoreError

    proxied(FaultPlan(answer=lambda m, p, h: s3_error(501, "NotImplemented", "A header you provided "
                                                      "implies functionality that is not implemented")
                      if m == "PUT" and "if-none-match" in h else None))
    with pytest.raises(StoreError, match=rf"s3://{bucket}\b.*(501|not implemented).*--claims"):
        create_exclusive(f"s3://{bucket}/run/cache/x.claims/00000.lock", b"record")


def test_a_409_conditional_request_conflict_is_retried(s3, proxied, bucket):
    """AWS answers 409 ConditionalRequestConflict to a conditional PUT racing another on the same
    key and says to retry: the create is retried (then it succeeds, or finds the object there)."""
    from s3_server import s3_error

    from storage.atomic import create_exclusive

    conflicts = []

    def conflict_twice(method, path, headers):
        if method == "PUT" and path.split("?")[0].endswith("00000.lock") and len(conflicts) < 2:
            conflicts.append(path)
            return s3_error(409, "ConditionalRequestConflict", "A conflicting operation occurred. If "
                            "using PutObject you can retry the request.")
        return None

    proxied(FaultPlan(answer=conflict_twice))
    lock = f"s3://{bucket}/run/cache/x.claims/00000.lock"
    assert create_exclusive(lock, b"record-A")
    assert len(conflicts) == 2
    assert not create_exclusive(lock, b"record-B")  # still exclusive
    assert objects(s3, bucket)["run/cache/x.claims/00000.lock"] == b"record-A"


def test_a_bucket_that_denies_access_is_one_line_naming_the_url(s3, proxied, bucket, tmp_path):
    """A bucket that exists but answers 403 (credentials without access to it): reading an input
    there, writing a run there, probing it: a UserError naming the URL and 'access denied', never
    a PermissionError traceback, and no credentials in the message."""
    from s3_server import s3_error

    from stages.shard import run_shard
    from storage.atomic import create_exclusive
    from storage.errors import UserError

    upload(s3, bucket, make_dataset(tmp_path / "data", per_class=1, splits=("train",)), "d")
    proxied(FaultPlan(answer=lambda m, p, h: s3_error(403, "AccessDenied", "Access Denied")
                      if p.lstrip("/").split("/")[0].split("?")[0] == bucket else None))
    calls = {
        "shard input": lambda: run_shard([f"s3://{bucket}/d"], tmp_path / "run", shard_size=4),
        "shard --run": lambda: run_shard([str(tmp_path / "data")], f"s3://{bucket}/run", shard_size=4),
        "claim": lambda: create_exclusive(f"s3://{bucket}/run/cache/x.claims/00000.lock", b"r"),
    }
    for what, call in calls.items():
        with pytest.raises(UserError, match=rf"s3://{bucket}\b.*access denied") as denied:
            call()
        assert SECRET_KEY not in str(denied.value) and ACCESS_KEY not in str(denied.value), what


def test_a_missing_bucket_is_named_by_the_url_asked_for_and_probes_stay_beside_it(s3, proxied, bucket):
    """An exclusive create in a bucket that does not exist names the object asked for (the lock of
    a --cache-dir), not the probe object; the probe is made beside that object under its name,
    never loose at the bucket's root."""
    from storage.atomic import create_exclusive
    from storage.locations.object_store import StoreError

    missing = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    with pytest.raises(StoreError, match=rf"s3://{missing}/cache/f\.lock: the bucket") as refused:
        create_exclusive(f"s3://{missing}/cache/f.lock", b"lock")
    assert "probe" not in str(refused.value)
    assert create_exclusive(f"s3://{bucket}/cache.lock", b"lock")  # a lock at the bucket's root
    probes = {p for m, p, _, _ in s3.proxy.plan.log if m == "PUT" and "probe" in p}
    assert probes and all(p.startswith(f"/{bucket}/cache.lock.") for p in probes), probes
    assert list(objects(s3, bucket)) == ["cache.lock"]


def test_credentials_that_cannot_delete_are_refused_up_front_naming_the_permission(s3, proxied, bucket):
    """Claims and locks are released by deleting them: credentials without s3:DeleteObject are
    refused at the probe, naming the permission and the probe object left behind, before any
    claim or lock is made (they used to end in a traceback at the lock's release)."""
    from s3_server import s3_error

    from storage.atomic import create_exclusive
    from storage.locations.object_store import StoreError

    proxied(FaultPlan(answer=lambda m, p, h: s3_error(403, "AccessDenied", "Access Denied")
                      if m == "DELETE" or (m == "POST" and "delete" in p) else None))
    with pytest.raises(StoreError, match=r"DeleteObject.*conditional-write-probe") as refused:
        create_exclusive(f"s3://{bucket}/run/cache/x.claims/00000.lock", b"record")
    assert f"s3://{bucket}" in str(refused.value)
    left = list(objects(s3, bucket))  # the probe (named in the message) and no claim
    assert len(left) == 1 and left[0].startswith("run/cache/x.claims/00000.lock.conditional-write-probe-")
    assert left[0] in str(refused.value)


def test_keys_with_dot_segments_double_slashes_and_version_id_are_kept_exactly(s3, in_process):
    """S3 keys are names, not paths: `a//b`, `./c`, `d/./e`, `f/../g` and `l?versionId=3` are other
    objects than `a/b`, `c`, `d/e`, `g`, `l`; each is listed, read and written under its own key
    (they used to be normalised away or cut at `?versionId=`: an image lost, or another one read)."""
    from storage.locations import as_path
    from storage.locations.object_store import read_objects

    bucket = in_process
    odd = ["a//b.png", "./c.png", "d/./e.png", "f/../g.png", "l?versionId=3.png", "m/../../n.png"]
    decoys = ["a/b.png", "c.png", "d/e.png", "g.png", "l", "n.png"]
    client = s3.client()
    name = str(bucket).removeprefix("s3://")
    for k in odd + decoys:
        client.put_object(Bucket=name, Key=k, Body=f"bytes of {k}".encode())
    urls = [f"{bucket}/{k}" for k in odd]
    assert {str(p) for p, _ in bucket.walk_files()} >= set(urls)
    got = read_objects(urls)
    assert [got[u] for u in urls] == [f"bytes of {k}".encode() for k in odd]
    for k, u in zip(odd, urls, strict=True):
        assert as_path(u).read_bytes() == f"bytes of {k}".encode(), k
        as_path(u).write_bytes(b"rewritten")
        assert client.get_object(Bucket=name, Key=k)["Body"].read() == b"rewritten", k
    assert all(client.get_object(Bucket=name, Key=k)["Body"].read() == f"bytes of {k}".encode()
               for k in decoys)


def test_a_fenced_write_on_object_storage_is_stopped_before_its_put(s3, in_process):
    """On object storage the fence comes before the PUT (and before an upload's completion): a
    check that raises leaves the object as it was."""
    from storage.locations import fenced, location

    target = in_process / "cache/f/shard.bin"
    target.write_bytes(b"the taker's")

    def check():
        raise LookupError("claim lost")

    for write in (lambda: location(target).write_whole(target, b"mine"),
                  lambda: location(target).write_streamed(target, lambda f: f.write(b"mine"))):
        with fenced(check), pytest.raises(LookupError):
            write()
    assert objects(s3, str(in_process).removeprefix("s3://")) == {"cache/f/shard.bin": b"the taker's"}
