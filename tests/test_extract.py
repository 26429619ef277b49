"""`extract`: DNF values, cache layout, rejects at extract time, config refusal, kill and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import ROOT, cli, image_bytes, make_dataset, write
from PIL import Image
from torchvision.utils import save_image

from stages.domain.images import decode_rgb, preprocess
from stages.domain.noise_model import load_noise_model
from stages.extract import ExtractOptions, run_extract
from stages.shard import run_shard
from storage.cache_folder import CacheError
from storage.run import Run
from storage.zarr_cache import ZarrCache

SIZE = 32


def cache_files(cache: Path) -> dict[str, bytes]:
    """Every file of a cache folder (data, markers, config) by relative path."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def extract(run: Path, model: Path, **kw) -> dict:
    opts = dict(model=model, size=SIZE, batch_size=4, workers=0, device="cpu") | kw
    return run_extract(run, ExtractOptions(**opts))


def test_end_to_end_values_match_reference(tmp_path, tiny_model):
    data = make_dataset(tmp_path / "data", per_class=3)
    write(data / "test/progan/0_real/corrupt.jpg", image_bytes(77, fmt="JPEG")[:300])
    write(data / "test/progan/1_fake/readme.png", b"<html>not an image</html>")
    shard_summary = run_shard([data], tmp_path / "run", shard_size=5)
    # batch 1 as below: on the CPU the batch size can move eps in the last float bits
    summary = extract(tmp_path / "run", tiny_model, batch_size=1)
    run = Run(tmp_path / "run")
    entries = run.entries()
    assert summary["images"] == len(entries) == 18 and summary["rejected"] == 0
    # every input file is accounted for: cached, rejected (with a reason) or a duplicate
    assert shard_summary["files"] == 20 == summary["images"] + len(run.rejects()) + len(run.duplicates())
    assert {r["path"].rsplit("/", 1)[-1] for r in run.rejects()} == {"corrupt.jpg", "readme.png"}
    group = zarr.open_group(summary["cache"] + "/features.zarr", mode="r")  # plain zarr reads it
    assert group["dnf"].shape == (18, 3, SIZE, SIZE) and group["dnf"].dtype == np.uint8
    assert [k.tobytes().hex() for k in group["key"][:]] == [e.key for e in entries]  # sha256 bytes (format 2)
    assert list(group["label"][:]) == [e.label for e in entries]
    # one zarr shard object per manifest shard
    assert len(list(Path(summary["cache"], "features.zarr", "dnf", "c").iterdir())) == 4
    # the reference: decode -> resize -> model(x, 0) -> torchvision save_image -> PNG
    model = load_noise_model(tiny_model, torch.device("cpu"))
    for row in (0, 7, 17):
        e = entries[row]
        x = preprocess(decode_rgb(Path(e.path).read_bytes()), SIZE)[None]
        eps = model.predict(x, 0)[0]
        save_image(eps, tmp_path / "ref.png")
        ref = np.asarray(Image.open(tmp_path / "ref.png")).transpose(2, 0, 1)
        assert np.array_equal(group["dnf"][row], ref), row


def test_raw_encoding_and_config_refusal(tmp_path, tiny_model):
    data = make_dataset(tmp_path / "data", per_class=2, splits=("train",))
    run_shard([data], tmp_path / "run")
    raw = extract(tmp_path / "run", tiny_model, encoding="raw")
    ref = extract(tmp_path / "run", tiny_model)
    assert raw["cache"] != ref["cache"]  # each config gets its own cache
    dnf = zarr.open_group(raw["cache"] + "/features.zarr", mode="r")["dnf"][:]
    assert dnf.dtype == np.float16 and float(np.abs(dnf).max()) > 0
    # forcing another config into an existing cache is refused, naming what differs
    with pytest.raises(CacheError, match="timestep: 0 \\(cache\\) vs 5 \\(now\\)"):
        extract(tmp_path / "run", tiny_model, timestep=5, cache_dir=Path(ref["cache"]))
    proc = cli("extract", "--run", tmp_path / "run", "--model", tiny_model, "--size", 16,
               "--cache-dir", ref["cache"], "--device", "cpu", check=False)
    assert proc.returncode == 2 and "size: 32 (cache) vs 16 (now)" in proc.stderr


def test_files_that_break_after_shard_are_rejected_not_fatal(tmp_path, tiny_model):
    data = tmp_path / "data"
    for i in range(6):
        write(data / f"train/a/0_real/{i}.png", image_bytes(i))
    run_shard([data], tmp_path / "run", shard_size=4)
    (data / "train/a/0_real/1.png").write_bytes(image_bytes(100))  # changed
    (data / "train/a/0_real/2.png").unlink()  # removed
    summary = extract(tmp_path / "run", tiny_model)
    assert summary["images"] == 4 and summary["rejected"] == 2
    cache = ZarrCache(summary["cache"])
    reasons = sorted(r["reason"].split(":")[0] for s in (0, 1) for r in cache.done_marker(s).rejected)
    assert reasons == ["changed since `shard`", "missing"]
    labels = cache.open_read()["label"][:]
    assert (labels == -1).sum() == 2
    # accounted for: every manifest row is cached or rejected
    markers = [cache.done_marker(s) for s in (0, 1)]
    assert sum(m.cached + len(m.rejected) for m in markers) == 6


def _wait_for(path: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(list(path.glob("*.json"))) >= count:
            return
        if proc.poll() is not None:
            return
        time.sleep(0.01)


def test_kill_and_resume_gives_identical_cache(tmp_path, tiny_model):
    data = make_dataset(tmp_path / "data", per_class=12, size=(64, 64))
    run_shard([data], tmp_path / "run", shard_size=6)
    run_shard([data], tmp_path / "clean", shard_size=6)
    args = ["extract", "--model", tiny_model, "--size", SIZE, "--batch-size", 2, "--workers", 0,
            "--device", "cpu"]
    cli(*args, "--run", tmp_path / "clean")
    clean_cache = next(p for p in (tmp_path / "clean" / "cache").iterdir() if p.is_dir()
                       and not p.name.endswith(".claims"))
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args), "--run",
                             tmp_path / "run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(tmp_path / "run" / "cache" / clean_cache.name / "done", 3, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list((tmp_path / "run" / "cache" / clean_cache.name / "done").glob("*.json")))
    assert 3 <= done_at_kill < 12, "the process must be killed mid-run"
    resumed = cli(*args, "--run", tmp_path / "run", "--json")
    assert f'"shards_done_before": {done_at_kill}' in resumed.stdout
    assert cache_files(tmp_path / "run" / "cache" / clean_cache.name) == cache_files(clean_cache)
    status = cli("status", "--run", tmp_path / "run").stdout
    assert "12/12 shards done" in status and "72 images cached" in status


@pytest.mark.parametrize("encoding", ["reference", "raw"])
def test_direct_shard_reader_equals_zarr(tmp_path, tiny_model, encoding):
    from storage.zarr_cache import ShardChunkReader

    data = make_dataset(tmp_path / "data", per_class=3, splits=("train",))
    run_shard([data], tmp_path / "run", shard_size=4)  # 6 images: the last shard is partial
    os.remove(Run(tmp_path / "run").shard_entries(1)[1].path)  # a rejected row keeps the fill value
    summary = extract(tmp_path / "run", tiny_model, encoding=encoding)
    assert summary["rejected"] == 1
    array = zarr.open_array(summary["cache"] + "/features.zarr/dnf", mode="r")
    reader = ShardChunkReader(Path(summary["cache"]) / "features.zarr" / "dnf")
    for row in range(array.shape[0]):
        got = reader[row]
        assert got.dtype == array.dtype and np.array_equal(got, array[row]), row


def test_resume_reuses_the_recorded_batch_size(tmp_path, tiny_model):
    data = make_dataset(tmp_path / "data", per_class=2, splits=("train",))
    run_shard([data], tmp_path / "run", shard_size=2)
    first = extract(tmp_path / "run", tiny_model, batch_size=3, redo=())
    again = extract(tmp_path / "run", tiny_model, batch_size=0, redo=(0,))  # automatic: the recorded 3
    assert first["batch_size"] == again["batch_size"] == 3
    assert ZarrCache(first["cache"]).config().about["batch_size"] == 3
