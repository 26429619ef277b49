"""Metrics at their edges (issue 33): scores at full precision (logits, not rounded text), EER, TPR
at a fixed FPR and AUC against brute force over every threshold, scores that are not finite, what
`compare` reads (the recorded prediction files; the images both sides scored), and bare checkpoints
on caches of another feature kind. Every statistic is written out here in numpy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, make_dataset
from torch import nn

from stages.domain.calibration import equal_error_rate, tpr_at_fpr
from stages.domain.metrics import binary_metrics
from stages.evaluate import EvalOptions, run_eval
from stages.extract import ExtractOptions, run_extract
from stages.shard import run_shard
from storage.caches import caches_in
from storage.errors import UserError
from storage.feature_dataset import cache_index

SIZE = 32


# ---- brute force, written out ---------------------------------------------------------------

def brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    """P(fake score > real score) + 0.5 P(tie), over all (fake, real) pairs."""
    fake, real = s[y == 1][:, None], s[y == 0][None, :]
    return float(np.mean((fake > real) + 0.5 * (fake == real)))


def brute_ap(y: np.ndarray, s: np.ndarray) -> float:
    """Sum over the distinct thresholds t (flag score >= t), highest first, of the recall step times
    the precision there."""
    ap, last_recall = 0.0, 0.0
    for t in np.unique(s)[::-1]:
        flagged = s >= t
        tp = np.sum(flagged & (y == 1))
        recall = tp / np.sum(y == 1)
        ap += (recall - last_recall) * tp / np.sum(flagged)
        last_recall = recall
    return float(ap)


def brute_eer(y: np.ndarray, s: np.ndarray) -> float:
    """Every split of the sorted distinct scores (flag score >= t for t in the distinct scores and
    +inf): the thresholds where |FPR - FNR| is smallest; EER = (FPR + FNR) / 2 there, averaged over
    them when two are equally close."""
    n_real, n_fake = np.sum(y == 0), np.sum(y == 1)
    rows = []
    for t in [*np.unique(s), np.inf]:
        fp, fn = np.sum((s >= t) & (y == 0)), np.sum((s < t) & (y == 1))
        rows.append((abs(fp * n_fake - fn * n_real), fp / n_real, fn / n_fake))  # exact: integers
    best = min(r[0] for r in rows)
    return float(np.mean([(fpr + fnr) / 2 for d, fpr, fnr in rows if d == best]))


def brute_tpr_at_fpr(y: np.ndarray, s: np.ndarray, f: float) -> float:
    """The highest TPR over every threshold (flag score > t) whose FPR is at most f."""
    best = 0.0
    for t in [-np.inf, *np.unique(s)]:
        if np.sum((s > t) & (y == 0)) <= f * np.sum(y == 0) + 1e-9:
            best = max(best, float(np.mean(s[y == 1] > t)))
    return best


# ---- item 2: EER, TPR at FPR, AUC -----------------------------------------------------------

def test_eer_of_the_issue_example_is_the_brute_force_value():
    rng = np.random.default_rng(0)
    reals = np.concatenate([rng.uniform(0.01, 0.10, 90), rng.uniform(0.95, 0.99, 10)])
    fakes = rng.uniform(0.5, 0.9, 100)
    y, s = np.r_[np.zeros(100), np.ones(100)].astype(int), np.r_[reals, fakes]
    assert brute_eer(y, s) == pytest.approx(0.10)
    assert equal_error_rate(y, s) == pytest.approx(0.10, abs=1e-12)


@pytest.mark.parametrize("seed", range(60))
def test_eer_tpr_auc_ap_equal_brute_force_on_random_detectors(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 80))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = rng.normal(size=n) + rng.uniform(0, 2) * y
    if seed % 3 == 0:
        s = np.round(s, 1)  # ties within and across the classes
    if seed % 5 == 0:
        s[rng.integers(0, n, 3)] = [np.inf, -np.inf, np.inf]  # certain scores rank at the ends
    assert equal_error_rate(y, s) == pytest.approx(brute_eer(y, s), abs=1e-12)
    for f in (0.01, 0.05, 0.1, 0.3):
        assert tpr_at_fpr(y, s, f) == pytest.approx(brute_tpr_at_fpr(y, s, f), abs=1e-12)
    m = binary_metrics(y, s, threshold=0.0)
    assert m["auc"] == pytest.approx(brute_auc(y, s), abs=1e-12)
    assert m["ap"] == pytest.approx(brute_ap(y, s), abs=1e-12)
    assert m["acc"] == pytest.approx(np.mean((s > 0) == y))


# ---- eval with a scripted detector ------------------------------------------------------------

class Scripted(nn.Module):
    """A 'network' that returns the next logits of a fixed sequence (eval predicts in order)."""

    def __init__(self, logits: np.ndarray):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)
        self.at = 0
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.at:self.at + len(x)]
        self.at += len(x)
        return out[:, None] + 0 * self.anchor


@pytest.fixture(scope="module")
def small_run(module_tmp, tiny_model) -> Path:
    tmp = module_tmp("edges")
    data = make_dataset(tmp / "data", per_class=12, sources=("gan_a",), splits=("test",))
    run = tmp / "run"
    run_shard([data], run, shard_size=64)
    run_extract(run, ExtractOptions(model=tiny_model, size=SIZE, workers=0, device="cpu"))
    return run


def dnf_cache(run: Path):
    return next(c for c in caches_in(run / "cache") if c.config().feature.kind == "dnf")


def scripted_eval(run: Path, monkeypatch, tmp_path: Path, make_logits, name: str, **kw) -> tuple:
    """Evaluate `run`'s test split with a detector whose logits are make_logits(labels)."""
    from stages.domain import detector as det

    cache = dnf_cache(run)
    labels = cache_index(cache, "test").labels
    logits = np.asarray(make_logits(labels), dtype=np.float32)
    ckpt = tmp_path / f"{name}.pt"
    meta = {"feature": cache.config().feature.to_json(), "feature_id": cache.config().feature_id}
    torch.save({"model": {}, **meta}, ckpt)
    monkeypatch.setattr(det.Detector, "from_checkpoint",
                        classmethod(lambda cls, path, device, amp=False: cls(Scripted(logits), device,
                                                                              amp, meta)))
    run_eval(run, ckpt, "test", name, workers=0, device="cpu", opts=EvalOptions(bootstrap=0, gallery=0, **kw))
    return labels, logits.astype(np.float64), run / "eval" / name


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def confident(labels: np.ndarray) -> np.ndarray:
    """Reals far below, unseen fakes a little above them: every probability < 5e-7 (0.000000 at six
    digits), some fakes beyond logit 16.6 (1.0 in float32) and reals just under them."""
    out = np.zeros(len(labels))
    reals, fakes = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    out[reals] = -30 + np.arange(len(reals)) * 0.5
    out[fakes] = -29.75 + np.arange(len(fakes)) * 1.0
    out[reals[-2:]] = [17.0, 18.5]
    out[fakes[-3:]] = [17.5, 19.0, 20.0]
    return out


def test_eval_scores_the_detectors_logits_not_rounded_probabilities(small_run, monkeypatch, tmp_path):
    y, s, out = scripted_eval(small_run, monkeypatch, tmp_path, confident, "confident")
    rep = json.loads((out / "report.json").read_text())
    o = rep["overall"]
    assert o["auc"] == pytest.approx(brute_auc(y, s), abs=1e-12)
    assert o["ap"] == pytest.approx(brute_ap(y, s), abs=1e-12)
    assert o["eer"] == pytest.approx(brute_eer(y, s), abs=1e-12)
    assert o["acc"] == pytest.approx(np.mean((s > 0) == y))
    p64 = 1 / (1 + np.exp(-s))
    assert o["brier"] == pytest.approx(np.mean((p64 - y) ** 2), rel=1e-12)
    # predictions.csv keeps the logit exactly (and the probability, at full precision)
    rows = read_csv(out / "predictions.csv")
    assert [float(r["logit"]) for r in rows] == s.tolist()
    assert np.allclose([float(r["probability"]) for r in rows], p64, rtol=1e-15, atol=0)


def test_compare_reads_logits_and_old_probability_only_csvs(small_run, monkeypatch, tmp_path):
    from stages.compare import paired_differences

    y, s, a = scripted_eval(small_run, monkeypatch, tmp_path, confident, "ca")
    old = tmp_path / "old"  # an eval folder written before the logit column: six-digit probabilities
    old.mkdir()
    rows = read_csv(a / "predictions.csv")
    with open(old / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "path", "source", "label", "probability"])
        w.writerows([r["key"], r["path"], r["source"], r["label"], f"{float(r['probability']):.6f}"]
                    for r in rows)
    (old / "report.json").write_text(json.dumps({"sources": {}, "overall": {}}))
    d = paired_differences(old, a, n_boot=50)
    p_old = np.array([float(f"{1 / (1 + np.exp(-v)):.6f}" if np.isfinite(v) else 0.0) for v in s])
    want = brute_auc(y, s) - brute_auc(y, p_old)
    assert d["sources"]["overall"]["auc"]["delta"] == pytest.approx(want, abs=1e-12)
    assert want > 0.05  # the rounding cost the old CSV this much


# ---- item 9: scores that are not finite -------------------------------------------------------

def test_nan_scores_are_a_clear_error_naming_the_checkpoint(small_run, monkeypatch, tmp_path):
    def with_nan(labels):
        out = np.linspace(-3, 3, len(labels))
        out[[1, 4]] = np.nan
        return out
    with pytest.raises(UserError, match=r"nan\.pt.*2 of \d+ .*NaN"):
        scripted_eval(small_run, monkeypatch, tmp_path, with_nan, "nan")


def test_infinite_logits_are_certain_scores(small_run, monkeypatch, tmp_path):
    def with_inf(labels):
        out = np.where(labels == 1, 1.0, -1.0) + np.linspace(-2, 2, len(labels))
        out[np.flatnonzero(labels == 1)[:2]] = np.inf
        out[np.flatnonzero(labels == 0)[:1]] = np.inf  # a real the detector is certain of, wrongly
        out[np.flatnonzero(labels == 0)[1:3]] = -np.inf
        return out
    y, s, out = scripted_eval(small_run, monkeypatch, tmp_path, with_inf, "inf")
    o = json.loads((out / "report.json").read_text())["overall"]
    assert o["auc"] == pytest.approx(brute_auc(y, s), abs=1e-12)
    assert o["ap"] == pytest.approx(brute_ap(y, s), abs=1e-12)
    assert o["eer"] == pytest.approx(brute_eer(y, s), abs=1e-12)
    assert o["brier"] == pytest.approx(np.mean((1 / (1 + np.exp(-s)) - y) ** 2), rel=1e-12)
    rows = read_csv(out / "predictions.csv")
    assert [float(r["logit"]) for r in rows] == s.tolist()


# ---- items 6 and 7: what `compare` reads ----------------------------------------------------

def write_predictions(path: Path, keys: list[str], y: np.ndarray, p: np.ndarray, src: str = "gan_a") -> None:
    """predictions.csv as eval wrote it before the logit column (probabilities)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "path", "source", "label", "probability"])
        w.writerows([k, "", src, int(t), repr(float(v))] for k, t, v in zip(keys, y, p, strict=True))


def cells(y: np.ndarray, p: np.ndarray) -> dict:
    return {"n": len(y), "n_real": int(np.sum(y == 0)), "n_fake": int(np.sum(y == 1)),
            "acc": float(np.mean((p > 0.5) == y)), "ap": brute_ap(y, p), "auc": brute_auc(y, p)}


def detector_scores(seed: int, y: np.ndarray, signal: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 1 / (1 + np.exp(-(rng.normal(size=len(y)) + signal * (2 * y - 1))))


def test_compare_pairs_the_seeds_the_report_records_not_every_seed_folder(tmp_path):
    from stages.compare import paired_differences

    y = np.tile([0, 1], 40)
    keys = [f"{i:064x}" for i in range(len(y))]
    a, b = tmp_path / "a", tmp_path / "b"
    p_a, p_b, stale = detector_scores(1, y), detector_scores(2, y, 2.0), detector_scores(3, y, -1.0)
    write_predictions(a / "predictions.csv", keys, y, p_a)
    (a / "report.json").write_text(json.dumps({"sources": {}, "overall": cells(y, p_a)}))
    # B: an evaluation over seeds that recorded seed-0 only; seed-1 is left from an earlier eval
    write_predictions(b / "seed-0/predictions.csv", keys, y, p_b)
    write_predictions(b / "seed-1/predictions.csv", keys, y, stale)
    (b / "report.json").write_text(json.dumps({"seeds": ["seed-0"], "split": "test", "spread": {}}))
    d = paired_differences(a, b, n_boot=20)
    assert d["seeds"] == [1, 1]
    assert d["sources"]["overall"]["auc"]["delta"] == pytest.approx(brute_auc(y, p_b) - brute_auc(y, p_a),
                                                                    abs=1e-12)
    # A's name reused: a single-checkpoint eval over a folder that still holds seed-K/ files
    write_predictions(a / "seed-0/predictions.csv", keys, y, stale)
    d = paired_differences(a, b, n_boot=20)
    assert d["sources"]["overall"]["auc"]["delta"] == pytest.approx(brute_auc(y, p_b) - brute_auc(y, p_a),
                                                                    abs=1e-12)


def test_eval_records_the_prediction_files_its_report_was_made_from(small_run, monkeypatch, tmp_path):
    _, _, out = scripted_eval(small_run, monkeypatch, tmp_path, confident, "recorded")
    rep = json.loads((out / "report.json").read_text())
    assert rep["predictions"] == ["predictions.csv"]


def test_compare_of_different_image_sets_shows_counts_and_compares_the_common_images(tmp_path):
    from stages.compare import compare_markdown

    y_b = np.tile([0, 1], 45)  # B: 90 images, after `shard --append` added 30 to A's 60
    keys = [f"{i:064x}" for i in range(len(y_b))]
    p_b = detector_scores(4, y_b, 0.5)
    p_b[60:] = np.where(y_b[60:] == 1, 0.99, 0.01)  # the new images are easy
    y_a, p_a = y_b[:60], p_b[:60]  # the same detector: the same scores on the common images
    for folder, y, p in ((tmp_path / "a", y_a, p_a), (tmp_path / "b", y_b, p_b)):
        write_predictions(folder / "predictions.csv", keys[:len(y)], y, p)
        (folder / "report.json").write_text(json.dumps({"sources": {"gan_a": cells(y, p)},
                                                        "overall": cells(y, p)}))
    md = compare_markdown(tmp_path / "a", tmp_path / "b", n_boot=0)
    assert "different images" in md.lower()
    assert "60" in md and "90" in md
    overall = next(line for line in md.splitlines() if line.startswith("| **overall**"))
    assert overall.count("+0.0") == 3, overall  # acc, AP, AUC of the same detector on the same images
    naive = f"{100 * (cells(y_b, p_b)['acc'] - cells(y_a, p_a)['acc']):+.1f}"
    assert naive != "+0.0" and naive not in overall


def test_compare_refuses_images_the_two_runs_label_differently(tmp_path):
    from stages.compare import paired_differences

    y = np.tile([0, 1], 20)
    keys = [f"{i:064x}" for i in range(len(y))]
    p = detector_scores(5, y)
    for folder, labels in ((tmp_path / "a", y), (tmp_path / "b", np.r_[1 - y[:3], y[3:]])):
        write_predictions(folder / "predictions.csv", keys, labels, p)
        (folder / "report.json").write_text(json.dumps({"sources": {}, "overall": cells(labels, p)}))
    with pytest.raises(UserError, match="3 of the images both scored another label"):
        paired_differences(tmp_path / "a", tmp_path / "b", n_boot=20)


# ---- item 8: bare checkpoints on caches of another kind ---------------------------------------

@pytest.fixture(scope="module")
def bare_resnet(module_tmp) -> Path:
    from stages.domain.detector import build_resnet50

    path = module_tmp("bare") / "reference.pth"
    torch.save({"model": build_resnet50(seed=0).state_dict()}, path)
    return path


def test_a_reference_checkpoint_is_refused_on_an_npr_cache(small_run, bare_resnet):
    run_extract(small_run, ExtractOptions(model=None, feature_kind="npr", size=SIZE, workers=0, device="cpu"))
    npr = next(c for c in caches_in(small_run / "cache") if c.config().feature.kind == "npr")
    with pytest.raises(UserError, match=r"reference\.pth.*no recorded feature kind(.|\n)*'npr'"):
        run_eval(small_run, bare_resnet, "test", "bare-npr", feature_id=npr.config().feature_id, workers=0,
                 device="cpu", opts=EvalOptions(bootstrap=0, gallery=0))
    # said by the user, on the command line: the checkpoint was trained on NPR features
    fid = npr.config().feature_id
    common = ("eval", "--run", small_run, "--checkpoint", bare_resnet, "--feature-id", fid, "--workers", 0,
              "--device", "cpu", "--bootstrap", 0, "--gallery", 0)
    refused = cli(*common, "--name", "bare-npr", check=False)
    assert refused.returncode == 2 and "--checkpoint-kind npr" in refused.stderr
    said = cli(*common, "--name", "bare-npr-said", "--checkpoint-kind", "npr")
    assert "trained on 'npr' features as the user said" in said.stdout


def test_a_bare_linear_probe_is_refused_on_a_dnf_cache_and_by_detect(small_run, tmp_path):
    from stages.detect import run_detect
    from stages.domain.detector import CheckpointError

    probe = tmp_path / "fc_weights.pth"
    torch.save({"weight": torch.zeros(1, 768), "bias": torch.zeros(1)}, probe)
    with pytest.raises(UserError, match=r"fc_weights\.pth(.|\n)*'dnf'"):
        run_eval(small_run, probe, "test", "probe", feature_id=dnf_cache(small_run).config().feature_id,
                 workers=0, device="cpu", opts=EvalOptions(bootstrap=0, gallery=0))
    image = make_dataset(tmp_path / "img", per_class=1, sources=("g",), splits=("test",))
    with pytest.raises(CheckpointError, match=r"fc_weights\.pth"):
        run_detect([image], tmp_path / "clip-model", probe, device="cpu")
