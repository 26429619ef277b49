"""The WebDataset cache backend: extract into tars, read them with the webdataset library, convert
between backends losslessly, verify, stream-train (exact resume, torchrun), kill and resume."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import ROOT, cli
from test_extract import cache_files
from test_reliability import EXTRACT_ARGS, clean, fresh_run, only_cache, start  # noqa: F401

_ = clean


def wds_cache(run: Path) -> Path:
    return next(p for p in (run / "cache").iterdir() if p.name.endswith("-wds") and p.is_dir())


@pytest.fixture(scope="module")
def wds_run(clean, module_tmp, tiny_model) -> Path:  # noqa: F811
    """The clean run's images extracted straight into a WebDataset cache."""
    run = fresh_run(clean, module_tmp("wds"))
    cli(*EXTRACT_ARGS, "--model", tiny_model, "--run", run, "--backend", "webdataset")
    return run


def test_tars_are_plain_webdataset_shards(wds_run, clean):  # noqa: F811
    cache = wds_cache(wds_run)
    tars = sorted((cache / "wds").glob("*.tar"))
    assert [t.name for t in tars] == [f"{i:05d}.tar" for i in range(12)]
    assert not list((cache / "wds").glob(".*"))  # no temporary files left
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode())
    zarr_cache = only_cache(clean["run"])
    import zarr

    group = zarr.open_group(zarr_cache / "features.zarr", mode="r")
    assert len(samples) == int((group["label"][:] >= 0).sum())
    for s in samples[::5]:
        meta = s["json"]
        assert s["__key__"] == meta["key"] and s["cls"] == meta["label"]
        assert np.array_equal(s["dnf.npy"], group["dnf"][meta["row"]])
        names = group["split"].attrs["names"]  # format 2: splits as codes, their names in the attributes
        assert meta["split"] == names[group["split"][meta["row"]]]


def test_convert_both_ways_is_lossless(wds_run, clean, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(clean["run"], run)
    zarr_cache = only_cache(run)
    out = json.loads(cli("convert-cache", "--run", run, "--to", "webdataset", "--json").stdout)
    assert out["shards_converted"] == 12
    # the same bytes as extracting into the WebDataset backend directly
    assert cache_files(Path(out["target"])) == cache_files(wds_cache(wds_run))
    again = json.loads(cli("convert-cache", "--run", run, "--to", "webdataset", "--json").stdout)
    assert again["shards_converted"] == 0 and again["shards_already_there"] == 12  # resumable
    # and back: the Zarr cache rebuilt from the tars equals the original, file for file
    back = json.loads(cli("convert-cache", "--run", run, "--to", "zarr", "--out", tmp_path / "back",
                          "--json").stdout)
    assert back["source"] == out["target"]
    assert cache_files(tmp_path / "back") == cache_files(zarr_cache)


def test_verify_finds_a_damaged_tar(wds_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(wds_run, run)
    assert cli("verify", "--run", run).returncode == 0
    tar = wds_cache(run) / "wds" / "00003.tar"
    data = bytearray(tar.read_bytes())
    data[1024 + 200] ^= 0xFF  # inside the first .dnf.npy's array bytes
    tar.write_bytes(bytes(data))
    proc = cli("verify", "--run", run, check=False)
    assert proc.returncode == 1 and "shard 00003" in proc.stdout and "--redo 3" in proc.stdout


def test_kill_and_resume_gives_the_same_tars(wds_run, clean, tmp_path, tiny_model):  # noqa: F811
    run = fresh_run(clean, tmp_path)
    proc = start(*EXTRACT_ARGS, "--model", tiny_model, "--run", run, "--backend", "webdataset")
    t0 = time.time()
    while time.time() - t0 < 120 and proc.poll() is None:
        done = list((run / "cache").glob("*-wds/done/*.json")) if (run / "cache").exists() else []
        if len(done) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cli(*EXTRACT_ARGS, "--model", tiny_model, "--run", run, "--backend", "webdataset")
    assert cache_files(wds_cache(run)) == cache_files(wds_cache(wds_run))


TRAIN = ["--batch-size", "4", "--workers", "0", "--device", "cpu", "--shuffle-buffer", "8"]


def test_streamed_training_resumes_exactly_and_evaluates(wds_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(wds_run, run)
    cli("train", "--run", run, "--name", "whole", "--epochs", "2", *TRAIN)
    epochs = [json.loads(s) for s in (run / "train/whole/metrics.jsonl").read_text().splitlines()]
    assert [e["train_samples"] for e in epochs] == [24, 24]  # the whole train split, streamed
    cli("train", "--run", run, "--name", "split", "--epochs", "1", *TRAIN)
    cli("train", "--run", run, "--name", "split", "--epochs", "2", *TRAIN, "--resume")
    a = torch.load(run / "train/whole/last.pt", weights_only=True)["model"]
    b = torch.load(run / "train/split/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    cli("eval", "--run", run, "--checkpoint", run / "train/whole/best.pt", "--name", "wds")
    rep = json.loads((run / "eval/wds/report.json").read_text())
    assert rep["overall"]["n"] == 24
    proc = cli("train", "--run", run, "--name", "bal", "--balance", *TRAIN, check=False)
    assert proc.returncode == 2 and "random access" in proc.stderr


@pytest.mark.slow  # about 23 s: in make test-long; make test keeps torchrun ranks sharing extract's queue
def test_torchrun_streams_disjoint_tars_per_rank(wds_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(wds_run, run)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", "29533",
                           str(ROOT / "cli.py"), "train", "--run-dir", str(run), "--name", "ddp",
                           "--epochs", "1", *TRAIN], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(s) for s in (run / "train/ddp/metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["ranks"] == 2
    # each rank streams its own tars: together at most the train split, in whole global batches
    assert 0 < lines[0]["train_samples"] <= 24 and lines[0]["train_samples"] % 4 == 0


def test_a_killed_writers_temporary_tar_is_cleared(wds_run, tmp_path, tiny_model):
    run = tmp_path / "run"
    shutil.copytree(wds_run, run)
    cache = wds_cache(run)
    before = cache_files(cache)
    (cache / "done" / "00002.json").unlink()  # as if killed while writing shard 2
    (cache / "wds" / ".00002.tar.4242.tmp").write_bytes(b"half a tar")
    cli(*EXTRACT_ARGS, "--model", tiny_model, "--run", run, "--backend", "webdataset")
    assert cache_files(cache) == before
