"""Perturbed variants at extraction, the robustness matrix in eval reports, and `compare`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import cli, make_dataset
from sklearn.metrics import accuracy_score, average_precision_score

from stages.domain.perturb import parse_perturbations, perturb
from stages.shard import run_shard

SIZE = 32


def test_parse_and_apply_perturbations():
    assert parse_perturbations("jpeg:75, blur:1.0,resize:0.5") == ["jpeg:75", "blur:1", "resize:0.5"]
    for bad in ("jpeg", "jpeg:0", "blur:x", "noise:1", "resize:-1"):
        with pytest.raises(ValueError, match="--perturb"):
            parse_perturbations(bad)
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 40, 50), dtype=np.uint8))
    for spec in ("jpeg:75", "blur:1", "resize:0.5"):
        a, b = perturb(img, spec), perturb(img, spec)
        assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape[0] == 3  # deterministic
        assert a.shape != img.shape or not torch.equal(a, img)
    assert perturb(img, "resize:0.5").shape == (3, 20, 25)


@pytest.fixture(scope="module")
def robust_run(module_tmp, tiny_model):
    tmp = module_tmp("robust")
    data = make_dataset(tmp / "data", per_class=4, sources=("gan_a", "gan_b"))
    run_shard([data], tmp / "run", shard_size=16)
    args = ["--model", tiny_model, "--size", SIZE, "--batch-size", 4, "--device", "cpu"]
    cli("extract", "--run", tmp / "run", *args, "--perturb", "jpeg:50,blur:1.5")
    cli("train", "--run", tmp / "run", "--name", "a", "--epochs", 1, "--batch-size", 8, "--workers", 0,
        "--device", "cpu")
    cli("train", "--run", tmp / "run", "--name", "b", "--epochs", 1, "--batch-size", 8, "--workers", 0,
        "--device", "cpu", "--seed", 1)
    return tmp / "run"


def test_perturbed_caches_are_siblings_and_deterministic(robust_run, tmp_path, tiny_model):
    caches = {json.loads((p / "config.json").read_text())["feature"]["perturb"]: p
              for p in (robust_run / "cache").iterdir() if (p / "config.json").exists()}
    assert set(caches) == {"", "jpeg:50", "blur:1.5"}
    clean = zarr.open_array(str(caches[""] / "features.zarr/dnf"))[:]
    for spec in ("jpeg:50", "blur:1.5"):
        assert not np.array_equal(zarr.open_array(str(caches[spec] / "features.zarr/dnf"))[:], clean)
    # the same perturbation extracted again elsewhere gives the same bytes
    data = Path(next(iter(json.loads((robust_run / "run.json").read_text())["inputs"])))
    run_shard([data], tmp_path / "again", shard_size=16)
    cli("extract", "--run", tmp_path / "again", "--model", tiny_model, "--size", SIZE, "--batch-size", 4,
        "--device", "cpu", "--perturb", "blur:1.5")
    again = next(p for p in (tmp_path / "again" / "cache").iterdir() if p.name == caches["blur:1.5"].name)
    assert np.array_equal(zarr.open_array(str(again / "features.zarr/dnf"))[:],
                          zarr.open_array(str(caches["blur:1.5"] / "features.zarr/dnf"))[:])


def test_eval_robustness_matrix_and_compare(robust_run):
    out = {}
    for name in ("a", "b"):
        cli("eval", "--run", robust_run, "--checkpoint", robust_run / f"train/{name}/best.pt",
            "--name", name, "--workers", 0, "--device", "cpu")
        out[name] = robust_run / "eval" / name
    rep = json.loads((out["a"] / "report.json").read_text())
    assert set(rep["perturbations"]) == {"jpeg:50", "blur:1.5"}
    rows = list(csv.DictReader(open(out["a"] / "predictions_jpeg_50.csv")))
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    cell = rep["perturbations"]["jpeg:50"]
    assert cell["overall"]["acc"] == pytest.approx(accuracy_score(y, p > 0.5))
    assert cell["overall"]["ap"] == pytest.approx(average_precision_score(y, p))
    m = np.array([r["source"] == "gan_b" for r in rows])
    assert cell["sources"]["gan_b"]["ap"] == pytest.approx(average_precision_score(y[m], p[m]))
    md = (out["a"] / "report.md").read_text()
    assert "## Robustness" in md and "| gan_a |" in md and "blur:1.5" in md
    table = cli("compare", out["a"], out["b"]).stdout
    rb = json.loads((out["b"] / "report.json").read_text())
    delta = 100 * (rb["overall"]["acc"] - rep["overall"]["acc"])
    assert f"{delta:+.1f}" in table and "**overall, jpeg:50**" in table
    bad = cli("compare", out["a"], robust_run / "eval" / "missing", check=False)
    assert bad.returncode == 2 and "no eval report there" in bad.stderr


def test_plots_cross_generator_and_variants(robust_run):
    from PIL import Image

    cli("train", "--run", robust_run, "--name", "seen_a", "--epochs", 1, "--batch-size", 8, "--workers", 0,
        "--device", "cpu", "--source", "gan_a", "--variants")
    meta = json.loads((robust_run / "train/seen_a/metrics.jsonl").read_text().splitlines()[0])
    assert meta["epoch"] == 1
    cli("eval", "--run", robust_run, "--checkpoint", robust_run / "train/seen_a/best.pt", "--name", "cg",
        "--workers", 0, "--device", "cpu")
    rep = json.loads((robust_run / "eval/cg/report.json").read_text())
    assert rep["cross_generator"]["seen"] == ["gan_a"] and rep["cross_generator"]["unseen"] == ["gan_b"]
    assert rep["cross_generator"]["unseen_mean"]["ap"] == pytest.approx(rep["sources"]["gan_b"]["ap"])
    for png in ("curves.png", "robustness.png"):
        with Image.open(robust_run / "eval/cg" / png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 200
    md = (robust_run / "eval/cg/report.md").read_text()
    assert "## Cross-generator" in md and "![curves](curves.png)" in md
    assert "![robustness](robustness.png)" in md
    # variants are drawn per (seed, epoch, sample): the same sample can come from different caches
    from storage.caches import find_cache, perturbed_siblings
    from storage.feature_dataset import CacheDataset, cache_index

    cache = find_cache(robust_run / "cache")
    siblings = perturbed_siblings(robust_run / "cache", cache.config().feature)
    ds = CacheDataset(cache, cache_index(cache, "train"), siblings, seed=0)
    seen = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        seen.add(ds[0][0].numpy().tobytes())
    assert len(seen) > 1
