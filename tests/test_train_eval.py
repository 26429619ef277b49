"""`train`, `eval`, `detect`: a tiny end-to-end run, exact resume, reports, checkpoints."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, make_dataset
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from stages.domain.detector import CheckpointError, build_resnet50, load_checkpoint
from stages.evaluate import run_eval
from stages.extract import ExtractOptions, run_extract
from stages.shard import run_shard
from stages.train import TrainError, TrainOptions, run_train
from storage.cache_folder import CacheError

SIZE = 32


@pytest.fixture(scope="module")
def cached_run(module_tmp, tiny_model) -> Path:
    tmp = module_tmp("trainrun")
    data = make_dataset(tmp / "data", per_class=4, sources=("gan_a", "gan_b"))
    run_shard([data], tmp / "run", shard_size=16)
    run_extract(tmp / "run", ExtractOptions(model=tiny_model, size=SIZE, workers=0, device="cpu"))
    return tmp / "run"


def opts(name: str, **kw) -> TrainOptions:
    return TrainOptions(name=name, **({"epochs": 2, "batch_size": 8, "workers": 0, "device": "cpu"} | kw))


def test_resume_continues_exactly(cached_run):
    full = run_train(cached_run, opts("full"))
    assert full["epochs_done"] == 2
    run_train(cached_run, opts("part", epochs=1))
    with pytest.raises(TrainError, match="--resume"):
        run_train(cached_run, opts("part"))
    with pytest.raises(TrainError, match="lr: 0.0001 .* vs 0.001"):
        run_train(cached_run, opts("part", lr=1e-3), resume=True)
    resumed = run_train(cached_run, opts("part"), resume=True)
    assert resumed["epochs_done"] == 2
    a = torch.load(cached_run / "train/full/last.pt", weights_only=True)["model"]
    b = torch.load(cached_run / "train/part/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (cached_run / "train/part/metrics.jsonl").read_text().splitlines()
    full_lines = (cached_run / "train/full/metrics.jsonl").read_text().splitlines()
    key = ("epoch", "train_loss", "val_acc", "val_ap")
    assert [{k: json.loads(x)[k] for k in key} for x in lines] == \
        [{k: json.loads(x)[k] for k in key} for x in full_lines]
    assert json.loads(lines[0])["init"] == "random (reference)"


def test_init_weights_from_a_local_file(cached_run, tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(5)
    imagenet_like = resnet50(weights=None)  # 1000-class head: only the backbone is taken
    torch.save(imagenet_like.state_dict(), tmp_path / "r50.pth")
    run_train(cached_run, opts("init", epochs=1, init_weights=str(tmp_path / "r50.pth")))
    first = json.loads((cached_run / "train/init/metrics.jsonl").read_text().splitlines()[0])
    assert first["init"].startswith("imagenet:")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        run_train(cached_run, opts("init2", init_weights=str(tmp_path / "none.pth")))


def test_lr_schedule_drops_and_stops(cached_run):
    # patience 1: the second epoch can only match or beat the first by < 0.001 rarely; with lr
    # 1e-5 two drops reach 1e-7 < 1e-6 and training stops before `epochs`.
    summary = run_train(cached_run, opts("sched", epochs=50, lr=1e-5, patience=1))
    lrs = [json.loads(x)["lr"] for x in (cached_run / "train/sched/metrics.jsonl").read_text().splitlines()]
    assert summary["epochs_done"] < 50
    assert lrs[0] == 1e-5 and min(lrs) < 1e-5


def test_eval_report_matches_sklearn(cached_run):
    if not (cached_run / "train/full/best.pt").exists():
        run_train(cached_run, opts("full"))
    summary = run_eval(cached_run, cached_run / "train/full/best.pt", "test", "e1", workers=0, device="cpu")
    out = Path(summary["out"])
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 16 and set(rows[0]) == {"key", "path", "source", "label", "probability", "logit"}
    assert all(os.path.exists(r["path"]) for r in rows)
    rep = json.loads((out / "report.json").read_text())
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    assert rep["overall"]["acc"] == pytest.approx(accuracy_score(y, p > 0.5))
    assert rep["overall"]["ap"] == pytest.approx(average_precision_score(y, p))
    assert rep["overall"]["auc"] == pytest.approx(roc_auc_score(y, p))
    for src in ("gan_a", "gan_b"):
        m = np.array([r["source"] == src for r in rows])
        assert rep["sources"][src]["ap"] == pytest.approx(average_precision_score(y[m], p[m]))
        assert rep["sources"][src]["real_acc"] == pytest.approx(accuracy_score(y[m & (y == 0)],
                                                                               p[m & (y == 0)] > 0.5))
    md = (out / "report.md").read_text()
    assert "| gan_a |" in md and "**overall**" in md


def test_reference_checkpoint_loads_and_predicts_the_same(cached_run, tmp_path, tiny_model):
    torch.manual_seed(3)
    ref = build_resnet50().eval()
    torch.save({"model": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "ref.pth")
    loaded, meta = load_checkpoint(tmp_path / "ref.pth")
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(ref(x), loaded(x))
    assert meta == {}
    summary = run_eval(cached_run, tmp_path / "ref.pth", "test", "ref", workers=0, device="cpu")
    assert "reference checkpoint" in summary["note"]
    # detect with a reference checkpoint computes the reference features (256x256, t=0)
    row = next(csv.DictReader(open(Path(summary["out"]) / "predictions.csv")))
    proc = cli("detect", row["path"], "--model", tiny_model, "--checkpoint", tmp_path / "ref.pth",
               "--device", "cpu", "--json")
    assert json.loads(proc.stdout.splitlines()[0])["verdict"] in ("real", "generated")


def test_detect_matches_eval(cached_run, tiny_model):
    if not (cached_run / "train/full/best.pt").exists():
        run_train(cached_run, opts("full"))
    ckpt = cached_run / "train/full/best.pt"
    summary = run_eval(cached_run, ckpt, "test", "e2", workers=0, device="cpu")
    rows = list(csv.DictReader(open(Path(summary["out"]) / "predictions.csv")))[:3]
    proc = cli("detect", *[r["path"] for r in rows], "--model", tiny_model, "--checkpoint", ckpt,
               "--device", "cpu", "--json")
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    for r, g in zip(rows, got, strict=True):
        assert g["path"] == r["path"]
        assert g["probability"] == pytest.approx(float(r["probability"]), abs=1e-4)


def test_bad_checkpoints_are_refused(tmp_path, cached_run):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_checkpoint(tmp_path / "text.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a ResNet50 detector"):
        load_checkpoint(tmp_path / "other.pt")
    proc = cli("eval", "--run", cached_run, "--checkpoint", tmp_path / "other.pt", check=False)
    assert proc.returncode == 2 and "other.pt: not a ResNet50 detector" in proc.stderr


def test_eval_refuses_other_features(cached_run, tmp_path, tiny_model):
    if not (cached_run / "train/full/best.pt").exists():
        run_train(cached_run, opts("full"))
    ckpt = torch.load(cached_run / "train/full/best.pt", weights_only=True)
    ckpt["feature"] = {**ckpt["feature"], "timestep": 10}
    torch.save(ckpt, tmp_path / "t10.pt")
    with pytest.raises(CacheError, match="timestep: 10 \\(checkpoint\\) vs 0 \\(cache\\)"):
        run_eval(cached_run, tmp_path / "t10.pt", "test", "bad", workers=0, device="cpu")


def test_per_format_metrics_and_gallery(cached_run, tmp_path):
    """report.json's per-format tables equal scikit-learn on the CSV with the manifest's formats;
    gallery.png holds one tile per listed mistake; `show` writes the tiles of chosen images."""
    from PIL import Image

    from stages.domain.gallery import COLUMNS, TILE_H, TILE_W, TITLE_H
    from storage.run import Run

    if not (cached_run / "train/full/best.pt").exists():
        run_train(cached_run, opts("full"))
    summary = run_eval(cached_run, cached_run / "train/full/best.pt", "test", "fmt", workers=0,
                       device="cpu", gallery=2)
    out = Path(summary["out"])
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    fmt = {e.key: e.format for e in Run(cached_run).entries()}
    rep = json.loads((out / "report.json").read_text())
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    f = np.array([fmt[r["key"]] for r in rows])
    assert set(rep["by_format"]) == {"JPEG", "PNG"}
    for name in ("JPEG", "PNG"):
        m = f == name
        assert rep["by_format"][name]["n"] == int(m.sum())
        assert rep["by_format"][name]["acc"] == pytest.approx(accuracy_score(y[m], p[m] > 0.5))
        if len(set(y[m])) == 2:
            assert rep["by_format"][name]["ap"] == pytest.approx(average_precision_score(y[m], p[m]))
            assert rep["by_format"][name]["auc"] == pytest.approx(roc_auc_score(y[m], p[m]))
    assert sum(r["n"] for r in rep["by_jpeg_quality"].values()) == int((f == "JPEG").sum())
    md = (out / "report.md").read_text()
    assert "## By original file format" in md and "| JPEG |" in md and "![gallery](gallery.png)" in md
    # the gallery: the most confident mistakes, at most 2 of each kind per source
    expected = 0
    for src in ("gan_a", "gan_b"):
        m = np.array([r["source"] == src for r in rows])
        expected += min(2, int((m & (y == 0) & (p > 0.5)).sum()))
        expected += min(2, int((m & (y == 1) & (p <= 0.5)).sum()))
    assert len(rep["gallery"]) == expected
    fps = [g["probability"] for g in rep["gallery"] if g["kind"] == "false positive"]
    assert all(v > 0.5 for v in fps)
    sections = Counter((g["source"], g["kind"]) for g in rep["gallery"])  # a titled section each
    with Image.open(out / "gallery.png") as im:
        assert im.size == (COLUMNS * TILE_W, max(TILE_H, sum(TITLE_H + -(-n // COLUMNS) * TILE_H
                                                               for n in sections.values())))
    # show: chosen images by path and by key prefix
    proc = cli("show", rows[0]["path"], rows[1]["key"][:10], "--run", cached_run, "--out", tmp_path / "s.png")
    assert "images: 2" in proc.stdout
    with Image.open(tmp_path / "s.png") as im:
        assert im.size == (COLUMNS * TILE_W, TILE_H)
        assert np.asarray(im).std() > 0  # not blank
    proc = cli("show", "nothing-like-this", "--run", cached_run, "--out", tmp_path / "t.png", check=False)
    assert proc.returncode == 2 and "no image of the run" in proc.stderr
