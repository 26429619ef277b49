"""The nine defects of the hardening review (issue 28), one test each (each failed before its fix):
silent wrong results first (no val split, `<set>/{real,fake}` pairing), then the ones that stop a
run or lose output."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, image_bytes, make_dataset, write
from PIL import Image

from stages.domain.layouts import infer_from_layout
from stages.domain.pairing import source_groups
from stages.evaluate import run_eval
from stages.export_png import run_export_png
from stages.extract import ExtractOptions, ShardImages, ShardWriter, gpu_batch, run_extract
from stages.shard import run_shard
from stages.train import TrainError, TrainOptions, run_train
from storage.cache_config import DoneMarker
from storage.cache_folder import CacheError
from storage.caches import find_cache
from storage.feature_dataset import cache_index
from storage.run import Run

SIZE = 32


def extract(run: Path, model: Path, **kw) -> dict:
    return run_extract(run, ExtractOptions(model=model, size=SIZE, workers=0, device="cpu", **kw))


def train_opts(name: str, **kw) -> TrainOptions:
    return TrainOptions(name=name, **({"epochs": 1, "batch_size": 4, "workers": 0, "device": "cpu"} | kw))


# 1 -------------------------------------------------------------------------------------------------
def test_no_val_split_is_refused_and_val_from_holds_out_a_share_of_train(tmp_path, tiny_model):
    data = make_dataset(tmp_path / "data", per_class=8, splits=("train", "test"))
    run_shard([data], tmp_path / "run")
    extract(tmp_path / "run", tiny_model)
    with pytest.raises(TrainError, match="--val-from train:0.1"):
        run_train(tmp_path / "run", train_opts("noval"))
    with pytest.raises(TrainError, match="SPLIT:FRACTION"):
        run_train(tmp_path / "run", train_opts("bad", val_from="train:1.5"))
    summary = run_train(tmp_path / "run", train_opts("held", val_from="train:0.3", batch_size=64))
    assert summary["best_epoch"] == 1 and 0.0 <= summary["best_val_acc"] <= 1.0
    line = json.loads((tmp_path / "run/train/held/metrics.jsonl").read_text().splitlines()[0])
    # the held-out share, computed here independently: first 8 bytes of the sha256 as a fraction
    keys = [e.key for e in Run(tmp_path / "run").entries() if e.split == "train"]
    held = [k for k in keys if int(k[:16], 16) / 2**64 < 0.3]
    assert 0 < len(held) < len(keys)
    assert line["val_n"] == len(held)
    assert line["train_samples"] == len(keys) - len(held)


# 2 -------------------------------------------------------------------------------------------------
def test_a_sets_fakes_are_scored_against_that_sets_reals_only():
    assert infer_from_layout(["test", "setA", "fake"], "root") == (1, "setA/fake", "test")
    assert infer_from_layout(["test", "setA", "real"], "root") == (0, "setA/real", "test")
    sources = ["setA/real", "setA/fake", "setB/real", "setB/fake"] * 2
    labels = np.array([0, 1, 0, 1] * 2)
    groups = source_groups(sources, labels)
    assert groups["setA/fake"].tolist() == [True, True, False, False] * 2
    assert groups["setB/fake"].tolist() == [False, False, True, True] * 2


# 3 -------------------------------------------------------------------------------------------------
def test_names_that_are_not_utf8_are_kept_exactly_in_every_stage(tmp_path, tiny_model):
    data = make_dataset(tmp_path / "data", per_class=3, splits=("train", "test"))
    odd = os.fsencode(tmp_path / "data") + b"/test/s\xe9t\xff/1_fake/"
    os.makedirs(odd)
    for i in range(3):
        write(Path(os.fsdecode(odd + b"f\xfe%d.png" % i)), image_bytes(500 + i, smooth=True))
    changed = Path(os.fsdecode(odd + b"f\xfe0.png"))
    run_shard([data], tmp_path / "run")
    changed.write_bytes(image_bytes(900))  # rejected at extract: its name goes into a done marker
    for backend in ("zarr", "webdataset"):
        for _ in range(2):  # the rerun finds every shard done instead of failing on the marker
            extract(tmp_path / "run", tiny_model, backend=backend)
        cache = find_cache(tmp_path / "run/cache", None) if backend == "zarr" else \
            next(c for c in [find_cache(tmp_path / "run/cache", p.name.removesuffix("-wds"))
                             for p in (tmp_path / "run/cache").glob("*-wds")])
        assert cache.done_shards() == {0}
        rejected = cache.done_marker(0).rejected
        assert [os.fsencode(r["path"]) for r in rejected] == [os.fsencode(changed)]
    run_train(tmp_path / "run", train_opts("t", val_from="train:0.3", batch_size=64))
    run_eval(tmp_path / "run", tmp_path / "run/train/t/best.pt", "test", "e", workers=0, device="cpu",
             gallery=1)
    report = json.loads((tmp_path / "run/eval/e/report.json").read_text())
    assert "s\udce9t\udcff" in report["sources"]  # the exact name, back from JSON
    assert "s\\xe9t\\xff" in (tmp_path / "run/eval/e/report.md").read_text()  # shown readably
    info = json.loads((tmp_path / "run/run.json").read_text())
    assert info["images"] == 3 * 2 * 2 + 3


# 4 -------------------------------------------------------------------------------------------------
def test_an_animated_gif_decodes_its_first_frame_only(tmp_path):
    frames = []
    for i in range(300):  # 300 frames of 640 x 640: 370 MB decoded, a small file
        im = Image.new("P", (640, 640), 0)
        im.putpalette([v for c in range(256) for v in (c, 255 - c, (7 * c) % 256)])
        im.putpixel((i, i), 1 + i % 200)
        frames.append(im)
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], optimize=False)
    assert len(buf.getvalue()) < 2_000_000
    gif = write(tmp_path / "anim.gif", buf.getvalue())
    # resident memory while the decoded image is alive (a first-frame view of all frames keeps
    # them all), measured in a fresh process
    code = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from stages.domain.images import decode_rgb\n"
            "def rss(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
            "data = open(sys.argv[1], 'rb').read()\n"
            "before = rss()\n"
            "img = decode_rgb(data)\n"
            "print(tuple(img.shape), (rss() - before) // 2**20, int(img[1, 0, 0]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(gif)], capture_output=True, text=True, check=True)
    shape, grown_mib, green = out.stdout.split(")")[0] + ")", *map(int, out.stdout.split(")")[1].split())
    assert shape == "(3, 640, 640)"
    assert grown_mib < 100, f"decoding one frame grew the process by {grown_mib} MiB"
    with Image.open(gif) as im:  # the first frame, as Pillow decodes it alone
        assert green == int(np.asarray(im.convert("RGB"))[0, 0, 1])


# 5 -------------------------------------------------------------------------------------------------
def test_export_png_keeps_both_of_two_images_that_differ_in_suffix_only(tmp_path, tiny_model):
    d = tmp_path / "data/test/set/1_fake"
    write(d / "x.jpg", image_bytes(1, fmt="JPEG"))
    write(d / "x.png", image_bytes(2))
    write(d / "y.png", image_bytes(3))
    run_shard([tmp_path / "data"], tmp_path / "run")
    extract(tmp_path / "run", tiny_model)
    out = run_export_png(tmp_path / "run", tmp_path / "png")
    written = sorted(str(p.relative_to(tmp_path / "png")) for p in (tmp_path / "png").rglob("*.png"))
    assert written == ["test/set/1_fake/x.jpg.png", "test/set/1_fake/x.png.png", "test/set/1_fake/y.png"]
    assert out["images"] == 3 and out["renamed"] == 2


# 6 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [700, 1500])  # inside a member's bytes; inside a header
def test_a_truncated_pack_is_said_and_the_original_files_are_read(tmp_path, tiny_model, capsys, keep):
    data = make_dataset(tmp_path / "data", per_class=2, splits=("train",))
    run_shard([data], tmp_path / "run", pack=True)
    tar_path = tmp_path / "run/packed/00000.tar"
    tar_path.write_bytes(tar_path.read_bytes()[:keep])
    summary = extract(tmp_path / "run", tiny_model)
    assert summary["images"] == 4 and summary["rejected"] == 0
    assert "00000.tar is damaged" in capsys.readouterr().err


# 7 -------------------------------------------------------------------------------------------------
def test_a_perturbation_that_cannot_apply_rejects_the_image_only(tmp_path, tiny_model):
    data = make_dataset(tmp_path / "data", per_class=2, splits=("train",))
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2, 65_600, 3), dtype=np.uint8))
    buf = io.BytesIO()
    wide.save(buf, "PNG")
    write(data / "train/progan/0_real/wide.png", buf.getvalue())
    run_shard([data], tmp_path / "run")
    summary = extract(tmp_path / "run", tiny_model, perturb="jpeg:90")
    assert summary["images"] == 4 and summary["rejected"] == 1
    cache = next(iter((tmp_path / "run/cache").iterdir()))
    marker = json.loads((cache / "done/00000.json").read_text())
    assert marker["rejected"][0]["reason"].startswith("--perturb jpeg:90 cannot be applied")


# 8 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["zarr", "webdataset"])
def test_a_done_shard_without_its_data_is_an_error_in_every_reader(tmp_path, tiny_model, backend):
    data = make_dataset(tmp_path / "data", per_class=2, splits=("train", "val", "test"))
    run_shard([data], tmp_path / "run", shard_size=4)
    extract(tmp_path / "run", tiny_model, backend=backend)
    fid = json.loads(next((tmp_path / "run/cache").glob("*/config.json")).read_text())["feature_id"]
    cache = find_cache(tmp_path / "run/cache", fid + ("-wds" if backend == "webdataset" else ""))
    index = cache_index(cache, "train")
    shard = int(index.rows[0]) // 4
    path = cache.shard_file(shard)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # short, then missing
    for damage in ("short", "missing"):
        with pytest.raises(CacheError, match=rf"shard {shard:05d} .* --redo {shard}"):
            cache.row_reader()[int(index.rows[0])]
        with pytest.raises(CacheError, match=f"--redo {shard}"):
            cache.read_rows(shard * 4, shard * 4 + 4)
        with pytest.raises(CacheError, match=f"--redo {shard}"):
            list(cache.iter_shard(shard, {int(index.rows[0])}))
        if damage == "short":
            path.unlink()
    extract(tmp_path / "run", tiny_model, backend=backend, redo=(shard,))
    assert cache.row_reader()[int(index.rows[0])].any()


def test_zarr_data_reaches_the_disk_before_its_done_marker(tmp_path, tiny_model, monkeypatch):
    data = make_dataset(tmp_path / "data", per_class=1, splits=("train",))
    run_shard([data], tmp_path / "run")
    events = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    extract(tmp_path / "run", tiny_model)
    marker = next(i for i, p in enumerate(events) if "/done/" in p)
    before = events[:marker]
    assert any("/features.zarr/dnf/c/0/0/0/.0." in p for p in before)  # the dnf shard file
    assert any(p.endswith("/features.zarr/label/c/0") for p in before)
    assert any(p.endswith("/features.zarr/key/c/0/0") for p in before)


# 9 -------------------------------------------------------------------------------------------------
def test_an_append_killed_before_run_json_does_not_duplicate_its_rejects(tmp_path, monkeypatch):
    first = make_dataset(tmp_path / "a", per_class=1, splits=("train",))
    second = tmp_path / "b"
    write(second / "test/progan/0_real/new.png", image_bytes(101))
    write(second / "test/progan/0_real/bad.png", b"not an image")
    run_shard([first], tmp_path / "run")
    import storage.run as run_module

    real = run_module.write_json_atomic

    def killed(path, obj):
        if Path(path).name == "run.json":
            raise KeyboardInterrupt
        real(path, obj)
    monkeypatch.setattr(run_module, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        run_shard([second], tmp_path / "run", append=True)
    monkeypatch.setattr(run_module, "write_json_atomic", real)
    run_shard([second], tmp_path / "run", append=True)
    rejects = Run(tmp_path / "run").rejects()
    assert [Path(r["path"]).name for r in rejects] == ["bad.png"]
    assert Run(tmp_path / "run").info().rejects == 1


def test_append_pack_after_a_plain_append_packs_its_shards(tmp_path):
    first = make_dataset(tmp_path / "a", per_class=1, splits=("train",))
    second = tmp_path / "b"
    for i in range(4):
        write(second / f"test/progan/{i % 2}_{'fake' if i % 2 else 'real'}/{i}.png", image_bytes(200 + i))
    run_shard([first], tmp_path / "run", shard_size=2)
    run_shard([second], tmp_path / "run", shard_size=2, append=True)
    out = run_shard([second], tmp_path / "run", shard_size=2, append=True, pack=True)
    assert out["packed_now"] == 2
    assert sorted(p.name for p in (tmp_path / "run/packed").iterdir()) == ["00001.tar", "00002.tar"]


def test_a_worker_whose_claim_was_taken_over_moves_on(tmp_path, tiny_model):
    import time

    from pipeline.queue import ShardQueue

    data = make_dataset(tmp_path / "data", per_class=1, splits=("train",))
    run_shard([data], tmp_path / "run")
    extract(tmp_path / "run", tiny_model)
    cache = find_cache(tmp_path / "run/cache", None)
    cache.done_path(0).unlink()
    a = ShardQueue(tmp_path / "claims", 1, lambda s: False, mode="heartbeat", stale_s=0.2, heartbeat_s=0.05)
    b = ShardQueue(tmp_path / "claims", 1, lambda s: False, mode="heartbeat", stale_s=0.2)
    claim = a.claim(0)
    claim._stop.set()  # stalled: its heartbeat goes stale and b takes the shard over
    time.sleep(0.4)
    other = b.claim(0)
    assert other is not None
    dnf, label, keys = cache.read_rows(0, 2)
    marker = DoneMarker(shard=0, rows=(0, 2), count=2, cached=2, rejected=(), checksum="")
    writer = ShardWriter(cache, log=lambda m: None)
    writer.submit(0, 0, (dnf, label, ["train"] * 2, ["progan"] * 2, keys), marker, claim)
    writer.wait()  # no error: the other worker finishes the shard
    assert writer.lost == [0] and not cache.done_path(0).exists()
    other.release()


def test_gpu_decode_is_in_the_feature_config_and_keeps_limits_and_rejects(tmp_path):
    opts = ExtractOptions(model=tmp_path, size=SIZE, gpu_decode=True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plain = ExtractOptions(model=tmp_path, size=SIZE).feature("f" * 64, "fp32", cuda)
    assert "decoder" not in plain.to_json()  # ids of existing caches unchanged
    assert opts.feature("f" * 64, "fp32", cpu).feature_id == plain.feature_id  # not on the CPU
    nv = opts.feature("f" * 64, "fp32", cuda)
    assert nv.decoder == "nvjpeg" and nv.feature_id != plain.feature_id
    # a JPEG header declaring too many pixels is refused before any decoder sees it
    big = image_bytes(1, size=(300, 200), fmt="JPEG")
    write(tmp_path / "d/big.jpg", big)
    run_shard([tmp_path / "d"], tmp_path / "run", label="real")
    entries = Run(tmp_path / "run").entries()
    images = ShardImages(entries, SIZE, max_pixels=100 * 100, roots=None, gpu_jpeg=True)
    assert images[0][2].startswith("too large: 300x200")
    # one corrupt JPEG in a batch rejects itself only (decoded here on the CPU, as nvJPEG would on CUDA)
    good = torch.frombuffer(bytearray(image_bytes(2, fmt="JPEG")), dtype=torch.uint8)
    bad = torch.frombuffer(bytearray(image_bytes(3, fmt="JPEG")[:200]), dtype=torch.uint8)
    batch, kept, failed = gpu_batch([good, bad], SIZE, cpu)
    assert kept == [0] and batch.shape == (1, 3, SIZE, SIZE)
    assert failed[0][0] == 1 and failed[0][1].startswith(("truncated or corrupt", "unreadable image header"))
