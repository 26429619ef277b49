"""The field's datasets: layouts with their exact folder names, `--dry-run`, runs that grow with
`--append` (only new shards computed, old ones untouched), a SIGKILLed `shard` that resumes to the
same manifest, and models by hub id from a local Hugging Face cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import ROOT, cli, image_bytes, write

from stages.domain.layouts import infer_from_layout
from stages.domain.noise_model import ModelError, resolve_model
from stages.shard import run_shard
from stages.status import run_status
from stages.verify import run_verify
from storage.caches import find_cache
from storage.feature_dataset import cache_index
from storage.run import Run

EXTRACT = ["extract", "--size", 32, "--batch-size", 2, "--workers", 0, "--device", "cpu"]


@pytest.mark.parametrize("path, layout, expected", [
    # GenImage, from its root and from one generator's folder
    ("stable_diffusion_v_1_4/imagenet_ai_0419_sdv4/train/ai", "auto", (1, "stable_diffusion_v_1_4", "train")),
    ("stable_diffusion_v_1_4/imagenet_ai_0419_sdv4/train/nature", "auto",
     (0, "stable_diffusion_v_1_4", "train")),
    ("ADM/imagenet_ai_0508_adm/val/nature", "auto", (0, "ADM", "val")),
    ("imagenet_ai_0508_adm/val/ai", "auto", (1, "ROOT", "val")),
    # UniversalFakeDetect's diffusion set: each generator with its own reals
    ("guided/1_fake", "ufd", (1, "imagenet/guided", "test")),
    ("ldm_200_cfg/1_fake", "ufd", (1, "laion/ldm_200_cfg", "test")),
    ("glide_100_27/1_fake", "ufd", (1, "laion/glide_100_27", "test")),
    ("imagenet/0_real", "ufd", (0, "imagenet/real", "test")),
    ("laion/0_real", "ufd", (0, "laion/real", "test")),
    # AIGCDetectBenchmark / NPR, Chameleon, Synthbuster
    ("progan/0_real", "auto", (0, "progan", None)),
    ("stylegan/car/1_fake", "auto", (1, "stylegan", None)),
    ("Chameleon/test/1_fake", "auto", (1, "Chameleon", "test")),
    ("test/0_real", "auto", (0, "ROOT", "test")),
    ("midjourney-v5", "synthbuster", (1, "midjourney-v5", "test")),
    # CNNDetection and DiffusionForensics as before
    ("train/progan/car/0_real", "auto", (0, "progan", "train")),
    ("test/lsun_bedroom/adm", "auto", (1, "lsun_bedroom/adm", "test")),
])
def test_layouts_of_the_field(path, layout, expected):
    assert infer_from_layout(path.split("/"), "ROOT", layout) == expected


def make_genimage(root: Path) -> Path:
    seed = 0
    for gen, inner in (("stable_diffusion_v_1_4", "imagenet_ai_0419_sdv4"), ("ADM", "imagenet_ai_0508_adm")):
        for split in ("train", "val"):
            for cls, ext in (("ai", "png"), ("nature", "JPEG")):
                for i in range(2):
                    seed += 1
                    fmt = "PNG" if ext == "png" else "JPEG"
                    write(root / gen / inner / split / cls / f"{i}.{ext}", image_bytes(seed, fmt=fmt))
    return root


def test_genimage_gives_one_source_per_generator_with_its_reals(tmp_path):
    data = make_genimage(tmp_path / "GenImage")
    dry = run_shard([data], tmp_path / "run", layout="auto", split_map=["val=test"], dry_run=True)
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    rows = {(r["split"], r["source"], r["label"]): r for r in dry["table"]}
    assert set(rows) == {(sp, g, lab) for sp in ("train", "test") for g in ("ADM", "stable_diffusion_v_1_4")
                         for lab in ("real", "fake")}
    assert rows[("test", "ADM", "real")]["files"] == 2
    assert "/ADM/imagenet_ai_0508_adm/val/nature/" in rows[("test", "ADM", "real")]["example"]
    summary = run_shard([data], tmp_path / "run", split_map=["val=test"])
    counts = {(c["split"], c["source"], c["label"]): c["images"] for c in summary["counts"]}
    assert counts == {k: 2 for k in rows}
    proc = cli("shard", data, "--run", tmp_path / "run2", "--split-map", "val=test", "--dry-run")
    assert "test real ADM: 2 (e.g. " in proc.stdout and not (tmp_path / "run2").exists()


def test_synthbuster_with_reals_appended(tmp_path):
    for gen in ("dalle2", "midjourney-v5"):
        for i in range(3):
            write(tmp_path / "synthbuster" / gen / f"r{i}.png", image_bytes(100 + i + 10 * len(gen)))
    for i in range(4):
        write(tmp_path / "RAISE" / f"raise_{i}.png", image_bytes(200 + i))
    run_shard([tmp_path / "synthbuster"], tmp_path / "run", layout="synthbuster", shard_size=4)
    summary = run_shard([tmp_path / "RAISE"], tmp_path / "run", label="real", source="raise", split="test",
                        append=True, shard_size=4)
    counts = {(c["source"], c["label"]): c["images"] for c in summary["counts"]}
    assert counts == {("raise", "real"): 4}
    entries = Run(tmp_path / "run").entries()
    assert {(e.source, e.label, e.split) for e in entries} == {
        ("dalle2", 1, "test"), ("midjourney-v5", 1, "test"), ("raise", 0, "test")}


def snapshot(cache_root: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every done marker and data file (zarr.json metadata aside)."""
    out = {}
    for p in sorted(cache_root.rglob("*")):
        if p.is_file() and p.name != "zarr.json" and p.name != "config.json":
            out[str(p.relative_to(cache_root))] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def dataset(root: Path, seeds: range, source: str, split: str = "train") -> Path:
    for s in seeds:
        write(root / split / source / "0_real" / f"{s}.png", image_bytes(s))
        write(root / split / source / "1_fake" / f"{s}.png", image_bytes(s + 1000))
    return root


@pytest.mark.parametrize("backend", ["zarr", pytest.param("webdataset", marks=pytest.mark.slow)])
def test_append_grows_a_run_and_computes_only_new_shards(tmp_path, tiny_model, backend):
    run = tmp_path / "run"
    first = dataset(tmp_path / "a", range(5), "progan")
    run_shard([first], run, shard_size=4)  # 10 images: shards of 4, 4, 2 (the last partial)
    cli(*EXTRACT, "--model", tiny_model, "--run", run, "--backend", backend)
    cache = find_cache(run / "cache")
    before = snapshot(cache.root)
    second = dataset(tmp_path / "b", range(20, 23), "newgan", split="test")
    write(second / "test/newgan/1_fake/copy.png", (first / "train/progan/0_real/1.png").read_bytes())
    summary = run_shard([second], run, shard_size=4, append=True)
    assert summary["appended_now"] == 6 and summary["num_shards"] == 5 and summary["conflicts"] == 1
    conflict = [r for r in Run(run).rejects() if r["path"].endswith("copy.png")]
    assert "progan/0_real/1.png (real)" in conflict[0]["reason"]
    again = run_shard([second], run, shard_size=4, append=True)  # the same append again: a no-op
    assert again["appended_now"] == 0 and again["num_shards"] == 5
    out = json.loads(cli(*EXTRACT, "--model", tiny_model, "--run", run, "--backend", backend,
                         "--json").stdout)
    assert out["shards_done_before"] == 3 and out["shards_done_now"] == 2 and out["images"] == 6
    after = snapshot(cache.root)
    assert {k: v for k, v in after.items() if k in before} == before  # old shards untouched
    status = run_status(run)
    assert status["images"] == 16 and status["caches"][0]["images_cached"] == 16
    assert run_verify(run)["ok"]
    cache = find_cache(run / "cache")
    assert len(cache_index(cache, "test")) == 6 and len(cache_index(cache, "train")) == 10
    if backend == "zarr":
        group = zarr.open_group(str(cache.root / "features.zarr"), mode="r")
        assert group["label"].shape == (18,)  # rows 10, 11 after the partial shard stay unused
        assert list(group["label"][10:12]) == [-1, -1] and (group["label"][12:] >= 0).all()
        assert np.array_equal(group["dnf"][12:13], cache.read_rows(12, 16)[0][:1])
    # the same sequence of appends gives the same shards
    run_shard([first], tmp_path / "run2", shard_size=4)
    run_shard([second], tmp_path / "run2", shard_size=4, append=True)
    for f in sorted((run / "shards").iterdir()):
        assert f.read_bytes() == (tmp_path / "run2" / "shards" / f.name).read_bytes()
    # train and eval see every row
    cli("train", "--run", run, "--epochs", 1, "--batch-size", 4, "--workers", 0, "--device", "cpu",
        "--val-from", "train:0.3")
    rep = json.loads(cli("eval", "--run", run, "--checkpoint", run / "train/default/best.pt", "--workers", 0,
                         "--device", "cpu") and (run / "eval/default-test/report.json").read_text())
    assert rep["overall"]["n"] == 6 and "newgan" in rep["sources"]


def test_a_killed_shard_resumes_to_the_same_manifest(tmp_path):
    data = dataset(tmp_path / "data", range(150), "progan")
    run_shard([data], tmp_path / "clean", shard_size=64)
    env = {**os.environ, "DNF_SHARD_BATCH": "10", "PYTHONUNBUFFERED": "1"}
    landed = 0
    for attempt in range(6):
        run = tmp_path / f"run{attempt}"
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "shard", str(data), "--run", str(run),
                                 "--shard-size", "64", "--workers", "1"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        progress = run / ".shard-progress"
        t0 = time.time()
        while time.time() - t0 < 60 and proc.poll() is None:
            if progress.exists() and sum(1 for _ in progress.rglob("*.jsonl")) >= 3:
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if not (run / "run.json").exists():
                landed += 1
                done = sum(1 for _ in progress.rglob("*.jsonl"))
                assert 0 < done < 30
        resumed = cli("shard", data, "--run", run, "--shard-size", 64, "--workers", 1, env=env)
        assert resumed.returncode == 0
        for f in sorted((tmp_path / "clean").iterdir()):
            if f.is_file():
                assert f.read_bytes() == (run / f.name).read_bytes(), f.name
        for f in sorted((tmp_path / "clean" / "shards").iterdir()):
            assert f.read_bytes() == (run / "shards" / f.name).read_bytes()
        assert not (run / ".shard-progress").exists()
        if landed:
            break
    assert landed, "no kill landed while shard was probing"


def hub_tree(cache: Path, repo: str, model: Path, rev: str = "0123abcd") -> Path:
    """A Hugging Face cache entry as huggingface_hub lays it out."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model, folder / "snapshots" / rev)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(rev)
    return folder / "snapshots" / rev


def test_models_by_hub_id_from_the_local_cache(tmp_path, tiny_model, monkeypatch):
    snapshot_dir = hub_tree(tmp_path / "hub", "org/tiny-ddpm", tiny_model)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("org/tiny-ddpm") == snapshot_dir
    assert resolve_model(tiny_model) == tiny_model  # a local folder stays itself
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    (tmp_path / "hub").rename(tmp_path / "hub-moved")
    hub_tree(tmp_path / "hub", "org/tiny-ddpm", tiny_model)
    assert resolve_model("org/tiny-ddpm").parents[1] == tmp_path / "hub" / "models--org--tiny-ddpm"
    with pytest.raises(ModelError, match=r"org/missing: .* Hugging Face cache .*hub .*models--org--missing"):
        resolve_model("org/missing")
    # end to end: extract with a hub id, offline
    data = dataset(tmp_path / "data", range(2), "progan")
    run_shard([data], tmp_path / "run")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = json.loads(cli(*EXTRACT, "--model", "org/tiny-ddpm", "--run", tmp_path / "run", "--json",
                         env=env).stdout)
    assert out["images"] == 4
    proc = cli(*EXTRACT, "--model", "org/other", "--run", tmp_path / "run", env=env, check=False)
    assert proc.returncode == 2 and "--download" in proc.stderr and "Traceback" not in proc.stderr
