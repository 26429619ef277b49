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
        # wraps around: a split predicted twice (a calibration split, then the test split) gets the same
        out = self.logits[torch.arange(self.at, self.at + len(x)) % len(self.logits)]
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


# ---- review of issue 33's fixes ----------------------------------------------------------------

def strict_json(text: str):
    """JSON as every other reader takes it: Infinity and NaN are not JSON."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def brute_balanced_threshold(y: np.ndarray, z: np.ndarray) -> float:
    """Over the distinct logits t (generated when z > t), the highest (real acc + fake acc) / 2;
    ties: the closest to 0."""
    best, best_t = -1.0, None
    for t in sorted(set(z.tolist()), key=abs):
        bal = (np.mean(z[y == 0] <= t) + np.mean(z[y == 1] > t)) / 2
        if bal > best + 1e-12:
            best, best_t = bal, t
    return best_t


def scripted_detector(run: Path, monkeypatch, ckpt: Path, logits: np.ndarray,
                      meta: dict | None = None) -> dict:
    """Detector.from_checkpoint returns a detector that answers `logits` in cache order."""
    from stages.domain import detector as det

    cache = dnf_cache(run)
    meta = {"feature": cache.config().feature.to_json(), "feature_id": cache.config().feature_id,
            **(meta or {})}
    torch.save({"model": {}, **meta}, ckpt)
    z = np.asarray(logits, dtype=np.float32)
    monkeypatch.setattr(det.Detector, "from_checkpoint",
                        classmethod(lambda cls, path, device, amp=False: cls(Scripted(z), device, amp, meta)))
    return meta


def validate_on(run: Path, detector, tmp_path: Path, epoch: int = 0) -> dict:
    """train's validation of `detector` on the run's test split (as the val rows)."""
    from types import SimpleNamespace

    from stages.train import validate

    cache = dnf_cache(run)
    setup = SimpleNamespace(cache=cache, val_idx=cache_index(cache, "test"), out=tmp_path / "train" / "v")
    val, _ = validate(detector, setup, SimpleNamespace(batch_size=64, workers=0), 0, 1, 0.0, epoch=epoch)
    return val


def test_train_chooses_and_records_the_val_threshold_as_a_logit(small_run, monkeypatch, tmp_path):
    """Item 1: logits beyond 36.7 are probability 1.0 in float64; train worked on probabilities
    (AUC 0.5, threshold p = 0 -> logit -inf in eval). Now: logits, recorded under their own key."""
    from stages.domain.detector import Detector

    y = cache_index(dnf_cache(small_run), "test").labels
    rng = np.random.default_rng(0)
    z = (np.where(y == 1, 45.0, 38.0) + rng.uniform(-0.5, 0.5, len(y))).astype(np.float32).astype(np.float64)
    scripted_detector(small_run, monkeypatch, tmp_path / "sat.pt", z)
    val = validate_on(small_run, Detector.from_checkpoint(tmp_path / "sat.pt", torch.device("cpu")), tmp_path)
    assert val["auc"] == pytest.approx(brute_auc(y, z), abs=1e-12) and val["auc"] == 1.0
    assert val["ap"] == pytest.approx(brute_ap(y, z), abs=1e-12)
    t = brute_balanced_threshold(y, z)
    assert val["threshold_logit"] == t
    # eval applies the recorded logit as it is: every val image on its side
    scripted_detector(small_run, monkeypatch, tmp_path / "sat.pt", z, {"val_threshold_logit": t,
                                                                      "val_threshold": 1.0})
    run_eval(small_run, tmp_path / "sat.pt", "test", "sat", workers=0, device="cpu",
             opts=EvalOptions(bootstrap=0, gallery=0))
    rep = json.loads((small_run / "eval" / "sat" / "report.json").read_text())
    assert rep["threshold"]["logit"] == t
    assert rep["overall"]["at_threshold"]["acc"] == np.mean((z > t) == y) == 1.0
    # a checkpoint of before (a probability under val_threshold) still reads: its logit, log(p / (1 - p))
    scripted_detector(small_run, monkeypatch, tmp_path / "old.pt", z, {"val_threshold": 0.25})
    run_eval(small_run, tmp_path / "old.pt", "test", "old", workers=0, device="cpu",
             opts=EvalOptions(bootstrap=0, gallery=0))
    rep = json.loads((small_run / "eval" / "old" / "report.json").read_text())
    assert rep["threshold"]["logit"] == pytest.approx(np.log(0.25 / 0.75), abs=1e-15)


def test_train_validation_refuses_nan_scores(small_run, monkeypatch, tmp_path):
    """Item 2: a NaN counted as a correct real (and topped the ranks): a diverged epoch could be best."""
    from stages.domain.detector import Detector

    y = cache_index(dnf_cache(small_run), "test").labels
    z = np.where(y == 1, 1.0, -1.0)
    z[np.flatnonzero(y == 0)[:4]] = np.nan
    scripted_detector(small_run, monkeypatch, tmp_path / "nan.pt", z)
    det = Detector.from_checkpoint(tmp_path / "nan.pt", torch.device("cpu"))
    with pytest.raises(UserError, match=r"train/v(.|\n)*epoch 3(.|\n)*4 of \d+ (.|\n)*NaN"):
        validate_on(small_run, det, tmp_path, epoch=2)


def test_validation_scores_in_fp32_even_when_training_runs_under_autocast(small_run, tmp_path):
    """Item 5: train's detector has amp on (bf16 autocast on CUDA); validation scored under it while
    eval scores fp32. The CUDA autocast is simulated on the CPU, as the review did."""
    from stages.domain.detector import Detector

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 1))
    amp = Detector(net, torch.device("cpu"), amp=True)
    amp.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=True)
    x = torch.randint(0, 256, (16, 3, SIZE, SIZE), dtype=torch.uint8)
    with torch.no_grad():
        want = net(x.float() / 255).squeeze(1)
        with amp.autocast():
            assert not torch.equal(net(x.float() / 255).float().squeeze(1), want)  # the simulation bites
    assert torch.equal(amp.scores(x), want)
    # validate goes through the same scores: its AUC is the fp32 logits' one
    cache = dnf_cache(small_run)
    idx = cache_index(cache, "test")
    rows = torch.stack([torch.as_tensor(np.array(cache.row_reader()[int(r)])) for r in idx.rows])
    with torch.no_grad():
        z = net(rows.float() / 255 if rows.dtype == torch.uint8 else rows.float()).squeeze(1).double().numpy()
    val = validate_on(small_run, amp, tmp_path)
    assert val["auc"] == pytest.approx(brute_auc(idx.labels, z), abs=1e-12)
    assert val["threshold_logit"] == brute_balanced_threshold(idx.labels, z)


def npr_cache(run: Path, encoding: str = "reference"):
    """The run's NPR cache of that encoding, extracted on first use (no model: fast)."""
    found = [c for c in caches_in(run / "cache")
             if c.config().feature.kind == "npr" and c.config().feature.encoding == encoding]
    if not found:
        run_extract(run, ExtractOptions(model=None, feature_kind="npr", encoding=encoding, size=SIZE,
                                        workers=0, device="cpu"))
        return npr_cache(run, encoding)
    return found[0]


def test_detect_refuses_nan_scores_and_writes_certain_ones_as_standard_json(small_run, tmp_path):
    """Items 3 and 4: NaN scores were called 'real'; detect --json wrote Infinity."""
    from stages.detect import run_detect
    from stages.domain.detector import build_resnet50

    feature = npr_cache(small_run).config().feature.to_json()
    image = next((small_run.parent / "data" / "test").rglob("*.png"))
    m = build_resnet50(seed=0)
    with torch.no_grad():
        m.fc.bias.fill_(float("nan"))
    torch.save({"model": m.state_dict(), "feature": feature}, tmp_path / "nan-npr.pt")
    with pytest.raises(UserError, match=r"nan-npr\.pt(.|\n)*NaN"):
        run_detect([image], None, tmp_path / "nan-npr.pt", device="cpu")
    with torch.no_grad():
        m.fc.bias.fill_(float("inf"))
    torch.save({"model": m.state_dict(), "feature": feature}, tmp_path / "inf-npr.pt")
    r = cli("detect", image, "--checkpoint", tmp_path / "inf-npr.pt", "--device", "cpu", "--json")
    row = strict_json(r.stdout.strip())
    assert row["verdict"] == "generated" and row["probability"] == 1.0 and float(row["logit"]) == np.inf


def test_reports_hold_standard_json_with_certain_scores(small_run, monkeypatch, tmp_path):
    """Item 4: a gallery entry's logit and the threshold can be infinite; report.json wrote Infinity."""
    from storage.atomic import dumps_json

    y = cache_index(dnf_cache(small_run), "test").labels
    z = np.where(y == 1, 2.0, -2.0)
    z[np.flatnonzero(y == 0)[0]] = np.inf  # a real the detector is certain of: the gallery's first
    scripted_detector(small_run, monkeypatch, tmp_path / "inf.pt", z, {"val_threshold_logit": -np.inf})
    run_eval(small_run, tmp_path / "inf.pt", "test", "inf-json", workers=0, device="cpu",
             opts=EvalOptions(bootstrap=0, gallery=2))
    rep = strict_json((small_run / "eval" / "inf-json" / "report.json").read_text())
    fp = [e for e in rep["gallery"] if e["kind"] == "false positive"]
    assert float(fp[0]["logit"]) == np.inf and fp[0]["probability"] == 1.0
    assert float(rep["threshold"]["logit"]) == -np.inf
    assert rep["overall"]["at_threshold"]["acc"] == np.mean((z > -np.inf) == y)
    with pytest.raises(ValueError):  # a NaN left anywhere is a bug, not a value to write
        dumps_json({"x": float("nan")})


def write_side(folder: Path, keys: list[str], y: np.ndarray, z: np.ndarray, seeds: int = 0) -> None:
    """An eval folder with logits: one predictions.csv, or (seeds > 0) seed-K/predictions.csv."""
    names = [f"seed-{s}/predictions.csv" for s in range(seeds)] or ["predictions.csv"]
    for s, name in enumerate(names):
        zs = z + s * np.random.default_rng(s).normal(size=len(z))
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        with open(folder / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["key", "path", "source", "label", "probability", "logit"])
            w.writerows([k, "", "gan_a", int(t), repr(float(1 / (1 + np.exp(-v)))), repr(float(v))]
                        for k, t, v in zip(keys, y, zs, strict=True))
    rep = ({"seeds": [f"seed-{s}" for s in range(seeds)], "spread": {}, "split": "test", "predictions": names}
           if seeds else {"sources": {"gan_a": {}}, "overall": {}, "predictions": names})
    (folder / "report.json").write_text(json.dumps(rep))


def test_compare_checks_labels_without_the_bootstrap_too(tmp_path):
    """Item 6: with --bootstrap 0 the side-by-side table subtracted images the runs label differently."""
    from stages.compare import compare_markdown

    y = np.tile([0, 1], 20)
    keys = [f"{i:064x}" for i in range(len(y))]
    z = np.random.default_rng(5).normal(size=len(y)) + (2 * y - 1)
    write_side(tmp_path / "a", keys, y, z)
    write_side(tmp_path / "b", keys, np.r_[1 - y[:6], y[6:]], z)
    with pytest.raises(UserError, match="6 of the images both scored another label"):
        compare_markdown(tmp_path / "a", tmp_path / "b", n_boot=0)


def test_compare_without_bootstrap_of_evaluations_over_seeds_prints_the_table(tmp_path):
    """Low: two evaluations over seeds with --bootstrap 0 printed no table at all."""
    from stages.compare import compare_markdown

    y = np.tile([0, 1], 20)
    keys = [f"{i:064x}" for i in range(len(y))]
    base = np.random.default_rng(7).normal(size=len(y))
    write_side(tmp_path / "a", keys, y, base + 0.5 * (2 * y - 1), seeds=2)
    write_side(tmp_path / "b", keys, y, base + 2.0 * (2 * y - 1), seeds=2)
    md = compare_markdown(tmp_path / "a", tmp_path / "b", n_boot=0)
    overall = next(line for line in md.splitlines() if line.startswith("| **overall**"))
    cells = [c.strip() for c in overall.strip("|").split("|")]

    def mean_auc(side: str) -> float:
        aucs = []
        for s in range(2):
            rows = read_csv(tmp_path / side / f"seed-{s}" / "predictions.csv")
            aucs.append(brute_auc(np.array([int(r["label"]) for r in rows]),
                              np.array([float(r["logit"]) for r in rows])))
        return float(np.mean(aucs))
    # source, n A, n B, acc A/B/delta, ap A/B/delta, auc A/B/delta
    assert cells[1:3] == ["40", "40"]
    assert cells[9:11] == [f"{100 * mean_auc('a'):.1f}", f"{100 * mean_auc('b'):.1f}"]
    assert "different images" not in md.lower()


def test_a_named_checkpoint_kind_is_checked_for_encoding_and_against_the_registry(small_run, bare_resnet):
    """Item 7 and low: --checkpoint-kind skipped the encoding check (a bare ResNet50 of the released
    format on raw NPR features was accepted); an unknown kind got a misleading message."""
    raw = npr_cache(small_run, "raw")
    with pytest.raises(UserError, match=r"reference\.pth(.|\n)*'raw'"):
        run_eval(small_run, bare_resnet, "test", "bare-npr-raw", feature_id=raw.config().feature_id,
                 workers=0, device="cpu", opts=EvalOptions(bootstrap=0, gallery=0, checkpoint_kind="npr"))
    with pytest.raises(UserError, match=r"--checkpoint-kind 'DNF'(.|\n)*dnf, dire, npr, clip, latent-dnf"):
        run_eval(small_run, bare_resnet, "test", "bogus", feature_id=dnf_cache(small_run).config().feature_id,
                 workers=0, device="cpu", opts=EvalOptions(bootstrap=0, gallery=0, checkpoint_kind="DNF"))


def test_detect_takes_checkpoint_kind_and_says_when_it_assumes_dnf(small_run, bare_resnet, tiny_model,
                                                                   capsys):
    """Item 8: detect took every bare 3-channel ResNet50 for DNF's reference, silently."""
    from stages.detect import run_detect

    image = next((small_run.parent / "data" / "test").rglob("*.png"))
    assert "--checkpoint-kind" in cli("detect", "--help").stdout
    # no --model: the message says why a model is needed and how to name another kind
    with pytest.raises(UserError,
                       match=r"reference\.pth(.|\n)*DNF's reference detector(.|\n)*--checkpoint-kind"):
        run_detect([image], None, bare_resnet, device="cpu")
    # the assumption is printed when it is made
    res = run_detect([image], tiny_model, bare_resnet, device="cpu")
    assert res[0]["verdict"] in ("real", "generated")
    assert "DNF's reference detector" in capsys.readouterr().err
    # said: NPR features, no model needed; the checkpoint's own kind wins over nothing
    res = run_detect([image], None, bare_resnet, device="cpu", checkpoint_kind="npr")
    assert res[0]["verdict"] in ("real", "generated") and 0 <= res[0]["probability"] <= 1
    with pytest.raises(UserError, match=r"--checkpoint-kind 'nope'(.|\n)*npr"):
        run_detect([image], None, bare_resnet, device="cpu", checkpoint_kind="nope")


def test_no_temperature_is_fitted_when_every_calibration_logit_is_infinite(small_run, monkeypatch, tmp_path):
    """Item 9: infinite logits carry no information on T; with none left the fit returned e^4."""
    from stages.domain.calibration import fit_temperature

    assert fit_temperature(np.array([0, 1, 0, 1]), np.array([-np.inf, np.inf, -np.inf, np.inf])) is None
    y = cache_index(dnf_cache(small_run), "test").labels
    z = np.where(y == 1, np.inf, -np.inf)
    scripted_detector(small_run, monkeypatch, tmp_path / "allinf.pt", z)
    run_eval(small_run, tmp_path / "allinf.pt", "test", "allinf", workers=0, device="cpu",
             opts=EvalOptions(bootstrap=0, gallery=0, calibrate_on="test", temperature=True))
    out = small_run / "eval" / "allinf"
    rep = strict_json((out / "report.json").read_text())
    assert rep["temperature"]["value"] is None and "infinite" in rep["temperature"]["note"]
    assert "no temperature" in (out / "report.md").read_text().lower()


def test_train_seeds_help_says_the_folder_holds_the_last_calls_seeds():
    """Low: seeds.json is rewritten by each `train --seeds` call."""
    import re

    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", cli("train", "--help").stdout).split())
    assert "seeds.json" in text and "last" in text


def test_nan_scores_never_reach_a_ranking_unchecked():
    """Item 2's cause: ranks() put NaN above +inf, so a NaN scored as the most generated image."""
    y, s = np.array([0, 1, 0, 1]), np.array([0.1, 0.2, np.nan, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        binary_metrics(y, s, threshold=0.0)
