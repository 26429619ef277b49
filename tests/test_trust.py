"""Results a reviewer can trust (issue 22): bootstrap intervals, deployment metrics and the
validation threshold, each checked against an independent computation written out here (numpy /
scikit-learn), never against the project's own functions; the gallery shows each image once."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset
from sklearn.metrics import average_precision_score, roc_auc_score

from stages.domain.bootstrap import bootstrap_metrics
from stages.evaluate import EvalOptions, run_eval, worst_errors
from stages.extract import ExtractOptions, run_extract
from stages.shard import run_shard
from stages.train import TrainOptions, run_train
from storage.feature_dataset import CacheIndex

SIZE = 32


def independent_bootstrap(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int) -> dict:
    """The definition written out: stratified resamples (reals, then fakes, drawn as index
    arrays from one generator), each scored with scikit-learn, then the 2.5 / 97.5 percentiles."""
    rng = np.random.default_rng(seed)
    reals, fakes = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    real_draws = reals[rng.integers(0, len(reals), size=(n_boot, len(reals)))]
    fake_draws = fakes[rng.integers(0, len(fakes), size=(n_boot, len(fakes)))]
    values = {k: [] for k in ("acc", "ap", "auc", "real_acc", "fake_acc")}
    for b in range(n_boot):
        idx = np.concatenate([real_draws[b], fake_draws[b]])
        yy, pp = y[idx], p[idx]
        values["acc"].append(np.mean((pp > 0.5) == yy))
        values["real_acc"].append(np.mean(pp[yy == 0] <= 0.5))
        values["fake_acc"].append(np.mean(pp[yy == 1] > 0.5))
        values["auc"].append(roc_auc_score(yy, pp))
        values["ap"].append(average_precision_score(yy, pp))
    return {k: list(np.percentile(v, [2.5, 97.5])) for k, v in values.items()}


def test_bootstrap_intervals_equal_the_definition_written_out():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    p = np.round(np.clip(rng.normal(0.45 + 0.2 * y, 0.2), 0, 1), 2)  # ties, as real scores have
    got = bootstrap_metrics(y, p, n_boot=200, seed=5)
    want = independent_bootstrap(y, p, 200, 5)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k


def test_bootstrap_of_100000_rows_covers_the_truth():
    """Its speed is `make bench-bootstrap`'s figure (a timed assertion failed on a loaded machine)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100_000)
    p = 1 / (1 + np.exp(-(rng.normal(size=100_000) + 1.5 * (2 * y - 1))))
    ci = bootstrap_metrics(y, p, n_boot=1000)
    auc = roc_auc_score(y, p)
    assert ci["auc"][0] < auc < ci["auc"][1] and ci["auc"][1] - ci["auc"][0] < 0.01


@pytest.fixture(scope="module")
def evaluated(module_tmp, tiny_model) -> dict:
    tmp = module_tmp("trust")
    data = make_dataset(tmp / "data", per_class=8, sources=("gan_a", "gan_b"))
    run = tmp / "run"
    run_shard([data], run, shard_size=16)
    run_extract(run, ExtractOptions(model=tiny_model, size=SIZE, workers=0, device="cpu"))
    run_train(run, TrainOptions(name="t", epochs=2, batch_size=64, workers=0, device="cpu", lr=1e-3))
    ckpt = run / "train/t/best.pt"
    run_eval(run, ckpt, "test", "test", workers=0, device="cpu", opts=EvalOptions(calibrate_on="val",
                                                                                  bootstrap=300))
    run_eval(run, ckpt, "val", "val", workers=0, device="cpu", opts=EvalOptions(bootstrap=0))
    return {"run": run}


def predictions(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with open(folder / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    return (np.array([int(r["label"]) for r in rows]), np.array([float(r["probability"]) for r in rows]),
            np.array([r["source"] for r in rows]))


def test_report_metrics_equal_an_independent_computation_from_predictions_csv(evaluated):
    out = evaluated["run"] / "eval/test"
    rep = json.loads((out / "report.json").read_text())
    y, p, src = predictions(out)
    o = rep["overall"]
    # TPR at 1 % / 5 % FPR: the threshold is the (floor(f * n_real) + 1)-th highest real score
    reals = np.sort(p[y == 0])[::-1]
    for f, key in ((0.01, "tpr_at_fpr_1"), (0.05, "tpr_at_fpr_5")):
        t = reals[int(np.floor(f * len(reals)))]
        assert o[key] == pytest.approx(np.mean(p[y == 1] > t))
    # ECE over 15 equal-width bins, written out
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        m = (p >= lo) & ((p < hi) if b < 14 else (p <= hi))
        if m.any():
            ece += m.mean() * abs(y[m].mean() - p[m].mean())
    assert o["ece"] == pytest.approx(ece)
    assert o["brier"] == pytest.approx(np.mean((p - y) ** 2))
    # EER over every threshold (flag p >= t, t in the distinct scores and +inf), |FPR - FNR| compared
    # exactly; two equally close thresholds: the mean of their values (roc_curve keeps only corners)
    n0, n1 = np.sum(y == 0), np.sum(y == 1)
    rates = [(abs(np.sum(p[y == 0] >= t) * n1 - np.sum(p[y == 1] < t) * n0),
              np.mean(p[y == 0] >= t), np.mean(p[y == 1] < t)) for t in [*np.unique(p), np.inf]]
    best = min(r[0] for r in rates)
    assert o["eer"] == pytest.approx(np.mean([(a + b) / 2 for d, a, b in rates if d == best]))
    # the intervals: the written-out bootstrap over the overall rows and over one source
    want = independent_bootstrap(y, p, 300, 0)
    for k in want:
        assert o["ci"][k] == pytest.approx(want[k], abs=1e-12)
    m = src == "gan_a"  # CNNDetection layout: each generator with its own reals
    want = independent_bootstrap(y[m], p[m], 300, 0)
    assert rep["sources"]["gan_a"]["ci"]["auc"] == pytest.approx(want["auc"], abs=1e-12)
    # every cell of the main table has an interval
    md = (out / "report.md").read_text()
    table = md.split("## Deployment")[0]
    assert all(line.count("[") >= 5 for line in table.splitlines() if line.startswith("| gan_")
               or line.startswith("| **"))


def test_the_threshold_is_chosen_on_val_by_balanced_accuracy(evaluated):
    rep = json.loads((evaluated["run"] / "eval/test/report.json").read_text())
    yv, pv, _ = predictions(evaluated["run"] / "eval/val")
    best, best_t = -1.0, None
    for t in sorted({0.0, *pv.tolist()}, key=lambda t: abs(t - 0.5)):  # ties: closest to 0.5 first
        bal = (np.mean(pv[yv == 0] <= t) + np.mean(pv[yv == 1] > t)) / 2
        if bal > best + 1e-12:
            best, best_t = bal, t
    assert rep["threshold"]["value"] == pytest.approx(best_t, abs=1e-6)  # probabilities in the csv: 6 digits
    y, p, _ = predictions(evaluated["run"] / "eval/test")
    t = rep["threshold"]["value"]
    assert rep["overall"]["at_threshold"]["acc"] == pytest.approx(np.mean((p > t) == y))
    assert rep["overall"]["at_threshold"]["fake_acc"] == pytest.approx(np.mean(p[y == 1] > t))


def test_the_gallery_shows_a_shared_real_image_once():
    # DiffusionForensics: both generators are scored against set/real
    sources = ["set/real"] * 3 + ["set/g1"] * 2 + ["set/g2"] * 2
    index = CacheIndex(np.arange(7), np.array([0, 0, 0, 1, 1, 1, 1]), sources, [f"k{i}" for i in range(7)])
    probs = np.array([0.9, 0.8, 0.1, 0.2, 0.9, 0.3, 0.7])
    errors = worst_errors(index, probs, 4)
    fps = [e for e in errors if e["kind"] == "false positive"]
    assert [e["key"] for e in fps] == ["k0", "k1"] and {e["source"] for e in fps} == {"set/real"}
    fns = {(e["source"], e["key"]) for e in errors if e["kind"] == "false negative"}
    assert fns == {("set/g1", "k3"), ("set/g2", "k5")}


def write_eval(folder: Path, keys: list[str], y: np.ndarray, p: np.ndarray, sources: list[str]) -> Path:
    """An eval folder as `eval` writes it (predictions.csv and a report.json), for `compare`."""
    folder.mkdir(parents=True)
    with open(folder / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "path", "source", "label", "probability"])
        w.writerows([k, "", s, int(t), f"{v:.6f}"] for k, s, t, v in zip(keys, sources, y, p, strict=True))
    rep = {"sources": {}, "overall": {"acc": None, "ap": None, "auc": roc_auc_score(y, p)}}
    (folder / "report.json").write_text(json.dumps(rep))
    return folder


def test_compare_calls_equals_within_noise_and_a_broken_detector_different(tmp_path):
    from stages.compare import paired_differences

    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    sources = ["gan_a" if i % 2 else "gan_b" for i in range(n)]
    keys = [f"{i:064x}" for i in range(n)]
    signal = 1.2 * (2 * y - 1)
    p_a = np.round(1 / (1 + np.exp(-(signal + rng.normal(size=n)))), 6)
    p_b = np.round(1 / (1 + np.exp(-(signal + rng.normal(size=n)))), 6)  # the same detector, another seed
    a = write_eval(tmp_path / "a", keys, y, p_a, sources)
    b = write_eval(tmp_path / "b", keys, y, p_b, sources)
    broken = write_eval(tmp_path / "broken", keys, y, rng.permutation(p_a), sources)  # shuffled scores
    same = paired_differences(a, b, n_boot=300)
    assert all(row["auc"]["within_noise"] for row in same["sources"].values())
    worse = paired_differences(a, broken, n_boot=300)
    assert not any(row["auc"]["within_noise"] for row in worse["sources"].values())
    assert all(row["auc"]["delta"] < -0.2 for row in worse["sources"].values())
    # the paired interval of the overall AUC difference, written out: the same draws for both sides
    r = np.random.default_rng(0)
    reals, fakes = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    rd = reals[r.integers(0, len(reals), size=(300, len(reals)))]
    fd = fakes[r.integers(0, len(fakes), size=(300, len(fakes)))]
    deltas = []
    for i in range(300):
        idx = np.concatenate([rd[i], fd[i]])
        deltas.append(roc_auc_score(y[idx], p_b[idx]) - roc_auc_score(y[idx], p_a[idx]))
    assert same["sources"]["overall"]["auc"]["ci"] == pytest.approx(list(np.percentile(deltas, [2.5, 97.5])),
                                                                     abs=1e-12)
    want = roc_auc_score(y, p_b) - roc_auc_score(y, p_a)
    assert same["sources"]["overall"]["auc"]["delta"] == pytest.approx(want)


def test_seeds_train_one_detector_each_and_eval_reports_their_spread(evaluated):
    from stages.evaluate import run_eval_seeds
    from stages.train import run_train_seeds

    run = evaluated["run"]
    opts = TrainOptions(name="s", epochs=1, batch_size=64, workers=0, device="cpu", lr=1e-3)
    run_train_seeds(run, opts, [0, 1])
    assert sorted(p.name for p in (run / "train/s").iterdir()) == ["seed-0", "seed-1", "seeds.json"]
    again = run_train_seeds(run, opts, [0, 1], resume=True)  # resumable like one run: nothing left to do
    assert all(s["epochs_done"] == 1 for s in again["seeds"].values())
    summary = run_eval_seeds(run, run / "train/s", "test", "s", workers=0, device="cpu",
                             opts=EvalOptions(bootstrap=50, gallery=0))
    rep = json.loads((run / "eval/s/report.json").read_text())
    aucs = [roc_auc_score(*predictions(run / f"eval/s/seed-{k}")[:2]) for k in (0, 1)]
    assert rep["spread"]["**overall**"]["auc"]["mean"] == pytest.approx(np.mean(aucs), abs=1e-5)
    assert rep["spread"]["**overall**"]["auc"]["std"] == pytest.approx(np.std(aucs, ddof=1), abs=1e-5)
    assert summary["seeds"] == 2 and "best.pt" in rep["checkpoint_rule"]
    md = (run / "eval/s/report.md").read_text()
    assert "AUC seed-0" in md and "±" in md
    # the same name trained again with fewer seeds: eval takes the seeds recorded, not every seed-K left
    run_train_seeds(run, opts, [1], resume=True)
    again = run_eval_seeds(run, run / "train/s", "test", "s1", workers=0, device="cpu",
                           opts=EvalOptions(bootstrap=0, gallery=0))
    assert again["seeds"] == 1
    assert json.loads((run / "eval/s1/report.json").read_text())["seeds"] == ["seed-1"]


def test_a_fake_only_perturbation_leaves_the_reals_byte_identical(tmp_path, tiny_model):
    from stages.domain.perturb import parse_perturbations
    from storage.caches import caches_in

    assert parse_perturbations("jpeg:96@fake, jpeg:96") == ["jpeg:96@fake", "jpeg:96"]
    data = make_dataset(tmp_path / "data", per_class=3, splits=("test",))
    run = tmp_path / "run"
    run_shard([data], run, shard_size=4)
    for spec in ("", "jpeg:96@fake"):
        run_extract(run, ExtractOptions(model=tiny_model, size=SIZE, workers=0, device="cpu", perturb=spec))
    caches = {c.config().feature.perturb: c for c in caches_in(run / "cache")}
    assert set(caches) == {"", "jpeg:96@fake"}
    assert caches[""].config().feature_id != caches["jpeg:96@fake"].config().feature_id
    clean, fake_only = caches[""], caches["jpeg:96@fake"]
    changed = 0
    for shard in sorted(clean.done_shards()):
        start, end = clean.done_marker(shard).rows
        a, labels, _ = clean.read_rows(start, end)
        b, _, _ = fake_only.read_rows(start, end)
        for j, label in enumerate(labels):
            if label == 0:
                assert a[j].tobytes() == b[j].tobytes()
            else:
                changed += a[j].tobytes() != b[j].tobytes()
    assert changed == 3


def test_geometry_crop_is_the_central_window_of_the_decoded_pixels(tmp_path):
    from PIL import Image

    from stages.extract import ShardImages
    from storage.run import Run

    data = make_dataset(tmp_path / "data", per_class=4, splits=("test",), size=(50, 41))
    run_shard([data], tmp_path / "run")
    entries = [e for e in Run(tmp_path / "run").entries() if e.format == "PNG"]  # grey, RGBA: as RGB
    assert entries
    images = ShardImages(entries, 32, 10**8, roots=None, geometry="crop")
    for i, e in enumerate(entries):
        _, x, reason = images[i]
        assert reason is None
        with Image.open(e.path) as im:
            pixels = np.asarray(im.convert("RGB"))
        h, w = pixels.shape[:2]
        top, left = (h - 32) // 2, (w - 32) // 2
        want = pixels[top:top + 32, left:left + 32].transpose(2, 0, 1)
        assert np.array_equal(np.asarray(x), want)
    small = ShardImages(entries, 64, 10**8, roots=None, geometry="crop")  # under the size: upscaled
    assert tuple(small[0][1].shape) == (3, 64, 64)
