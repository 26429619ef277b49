"""Faults survived: kills at random moments, stop signals, a full disk, concurrent workers, a
training run killed mid-epoch, tampered caches and manifests. `make test` runs the short form;
`make test-long` also the slow ones (20 random kills)."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zarr.storage
from conftest import ROOT, cli, image_bytes, make_dataset, write
from test_extract import cache_files

from stages.extract import ExtractOptions, run_extract
from stages.shard import run_shard
from stages.verify import run_verify
from storage.cache_folder import CacheError
from storage.run import Run

SIZE = 32
EXTRACT_ARGS = ["extract", "--size", SIZE, "--batch-size", 2, "--workers", 0, "--device", "cpu"]


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def only_cache(run: Path) -> Path:
    return next(p for p in (run / "cache").iterdir() if (p / "config.json").exists())


def wait_for_files(folder: Path, pattern: str, count: int, proc: subprocess.Popen,
                   timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if folder.exists() and len(list(folder.glob(pattern))) >= count:
            return
        time.sleep(0.01)


@pytest.fixture(scope="module")
def clean(module_tmp, tiny_model) -> dict:
    """A dataset, its manifest, and the cache of one uninterrupted extract (with its wall time)."""
    tmp = module_tmp("clean")
    data = make_dataset(tmp / "data", per_class=12, size=(64, 64))
    run_shard([data], tmp / "run", shard_size=6)
    t0 = time.time()
    cli(*EXTRACT_ARGS, "--model", tiny_model, "--run", tmp / "run")
    return {"data": data, "run": tmp / "run", "seconds": time.time() - t0,
            "files": cache_files(only_cache(tmp / "run"))}


def fresh_run(clean: dict, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run_shard([clean["data"]], run, shard_size=6)
    return run


def accounted(run: Path) -> None:
    """Every manifest row is in the cache or listed as rejected; verify finds nothing wrong."""
    cache = only_cache(run)
    markers = [json.loads(p.read_text()) for p in sorted((cache / "done").glob("*.json"))]
    assert sum(m["cached"] + len(m["rejected"]) for m in markers) == Run(run).info().images
    assert run_verify(run)["ok"]


def random_kills(clean: dict, tmp_path: Path, model: Path, kills: int, seed: int) -> int:
    """Kill extract with SIGKILL at random moments until `kills` kills have landed mid-run, each
    followed by a resume; when a resumed run finishes before its kill, that run is checked and a
    fresh one starts. Every finished run must equal the clean cache."""
    rng = random.Random(seed)
    landed, rounds = 0, 0
    while landed < kills and rounds < kills:
        run = fresh_run(clean, tmp_path / f"round{rounds}")
        rounds += 1
        while landed < kills:
            done = len(list((run / "cache").glob("*/done/*.json"))) if (run / "cache").exists() else 0
            left = 1 - done / 12
            proc = start(*EXTRACT_ARGS, "--model", model, "--run", run)
            time.sleep(rng.uniform(0.3, 1.0) * clean["seconds"] * max(left, 0.6))
            if proc.poll() is not None:  # finished before the kill: check this run, start another
                proc.wait()
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            landed += 1
        cli(*EXTRACT_ARGS, "--model", model, "--run", run)
        assert cache_files(only_cache(run)) == clean["files"]
        accounted(run)
    return landed


def test_sigkill_at_random_moments(clean, tmp_path, tiny_model):
    assert random_kills(clean, tmp_path, tiny_model, kills=3, seed=1) == 3


@pytest.mark.slow
def test_sigkill_at_random_moments_long(clean, tmp_path, tiny_model):
    assert random_kills(clean, tmp_path, tiny_model, kills=20, seed=2) == 20


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_stops_cleanly_after_a_batch(clean, tmp_path, tiny_model, sig):
    run = fresh_run(clean, tmp_path)
    proc = start(*EXTRACT_ARGS, "--model", tiny_model, "--run", run)
    wait_for_files(run / "cache", "*/done/*.json", 1, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"stopped by {sig.name}" in err and "run the same command to resume" in err
    done = len(list(only_cache(run).glob("done/*.json")))
    assert 1 <= done < 12
    assert run_verify(run)["ok"]  # nothing half-written is marked done
    cli(*EXTRACT_ARGS, "--model", tiny_model, "--run", run)
    assert cache_files(only_cache(run)) == clean["files"]


def test_full_disk_is_a_clear_error_and_resumes(clean, tmp_path, tiny_model, monkeypatch):
    run = fresh_run(clean, tmp_path)
    real_set = zarr.storage.LocalStore.set
    calls = {"n": 0}

    async def failing_set(self, key, value):
        calls["n"] += 1
        if "dnf/c/3/" in key:  # the fourth shard's data: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
        return await real_set(self, key, value)

    import storage.zarr_cache

    real_write = storage.zarr_cache.write_row_shard

    def failing_write(layout, shard, rows):  # the DNF shard is written directly, not through zarr
        if shard == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(layout.shard_path(shard)))
        return real_write(layout, shard, rows)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    monkeypatch.setattr(storage.zarr_cache, "write_row_shard", failing_write)
    opts = ExtractOptions(model=tiny_model, size=SIZE, batch_size=2, workers=0, device="cpu")
    with pytest.raises(CacheError, match="shard 00003: writing to .* No space left on device.*not "
                                         "marked done"):
        run_extract(run, opts)
    done = sorted(p.stem for p in only_cache(run).glob("done/*.json"))
    assert done == ["00000", "00001", "00002"]
    assert run_verify(run)["ok"]
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)  # space is back
    monkeypatch.setattr(storage.zarr_cache, "write_row_shard", real_write)
    run_extract(run, opts)
    assert cache_files(only_cache(run)) == clean["files"]


def _can_mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    return ok


def test_real_full_filesystem(clean, tmp_path, tiny_model):
    small = tmp_path / "small"
    if not _can_mount_tmpfs(small):
        pytest.skip("mounting a tiny tmpfs needs root and mount rights; the injected ENOSPC test covers it")
    try:
        run = fresh_run(clean, tmp_path)
        args = [*EXTRACT_ARGS, "--model", tiny_model, "--run", run, "--cache-dir", small / "cache"]
        proc = cli(*args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "No space left on device" in proc.stderr and "Traceback" not in proc.stderr
        subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True)
        cli(*args)
        assert cache_files(small / "cache") == clean["files"]
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_two_workers_at_once_make_the_same_cache(clean, tmp_path, tiny_model):
    run = fresh_run(clean, tmp_path)
    procs = [start(*EXTRACT_ARGS, "--model", tiny_model, "--run", run, "--json") for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    done_now = [json.loads(out)["shards_done_now"] for out, _ in outs]
    assert sum(done_now) == 12
    assert cache_files(only_cache(run)) == clean["files"]


def test_verify_reports_tampering(clean, tmp_path, tiny_model):
    run = fresh_run(clean, tmp_path)
    cli(*EXTRACT_ARGS, "--model", tiny_model, "--run", run)
    cache = only_cache(run)
    shard1 = cache / "features.zarr/dnf/c/1/0/0/0"
    data = bytearray(shard1.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard1.write_bytes(bytes(data))
    (cache / "features.zarr/dnf/c/2/0/0/0").unlink()
    proc = cli("verify", "--run", run, check=False)
    assert proc.returncode == 1
    assert "shard 00001:" in proc.stdout and "shard 00002: marked done but its data is missing" in proc.stdout
    assert "--redo 1" in proc.stdout and "--redo 2" in proc.stdout
    cli(*EXTRACT_ARGS, "--model", tiny_model, "--run", run, "--redo", 1, "--redo", 2)
    assert cli("verify", "--run", run).returncode == 0
    assert cache_files(cache) == clean["files"]


def test_manifest_paths_cannot_escape(tmp_path, tiny_model):
    data = tmp_path / "lists"
    write(data / "imgs/a.png", image_bytes(1))
    write(tmp_path / "outside.png", image_bytes(2))
    (data / "list.csv").write_text("path,label\nimgs/a.png,real\n../outside.png,fake\n")
    run_shard([data / "list.csv"], tmp_path / "run")
    run = Run(tmp_path / "run")
    assert [r["reason"].split(" (")[0] for r in run.rejects()] == ["outside the list file's folder " +
                                                                    str(data)]
    # a manifest edited to point outside the inputs is refused at extract
    shard = run.shard_path(0)
    row = json.loads(shard.read_text())
    row["path"] = str(data / "imgs" / ".." / ".." / "outside.png")
    shard.write_text(json.dumps(row) + "\n")
    summary = run_extract(tmp_path / "run", ExtractOptions(model=tiny_model, size=SIZE, workers=0,
                                                           device="cpu"))
    marker = json.loads((Path(summary["cache"]) / "done/00000.json").read_text())
    assert marker["rejected"][0]["reason"].startswith("outside the run's input folders")


def test_training_killed_mid_epoch_resumes_exactly(clean, tmp_path):
    args = ["train", "--run", clean["run"], "--epochs", 3, "--batch-size", 4, "--workers", 0,
            "--device", "cpu"]
    cli(*args, "--name", "whole")
    proc = start(*args, "--name", "killed")
    metrics = clean["run"] / "train/killed"
    wait_for_files(metrics, "last.pt", 1, proc)
    time.sleep(0.5)  # into the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epochs_before = len((metrics / "metrics.jsonl").read_text().splitlines())
    assert epochs_before < 3, "the training must be killed before it ends"
    cli(*args, "--name", "killed", "--resume")
    a = torch.load(clean["run"] / "train/whole/last.pt", weights_only=True)
    b = torch.load(metrics / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["train"]["state"] == b["train"]["state"]


def test_torchrun_workers_share_the_queue(clean, tmp_path, tiny_model):
    """`torchrun --nproc-per-node 2 cli.py extract ...`: two ranks, one cache, same bytes."""
    run = fresh_run(clean, tmp_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", "29517",
                           str(ROOT / "cli.py"), *map(str, EXTRACT_ARGS), "--model", str(tiny_model),
                           "--run-dir", str(run), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = [json.loads(block) for block in proc.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert sorted(s["worker"] for s in summaries) == ["1/2", "2/2"]
    assert sum(s["shards_done_now"] for s in summaries) == 12
    assert cache_files(only_cache(run)) == clean["files"]


def test_slurm_array_identity(monkeypatch):
    from pipeline.distributed import my_order, worker_identity

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert worker_identity() == (1, 3)
    assert worker_identity(2, 3) == (2, 3)
    assert my_order(list(range(6)), 1, 3) == [2, 3, 4, 5, 0, 1]
    with pytest.raises(ValueError, match="go together"):
        worker_identity(1, None)
