"""benchmarks/bench_gpu.py (run on the device machine by benchmarks/gpu_run.sh): its grid, its budget
guard and its results file (fast), and its --quick grid end to end on the CPU (slow)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench_gpu  # noqa: E402


def test_full_grid_covers_the_issue_and_starts_with_the_goal_row():
    args = bench_gpu.parse_args([])
    grid = bench_gpu.build_grid(args, cuda=True)
    first = grid[0]
    assert (first.kind, first.precision, first.compile, first.batch, first.jpeg, first.nvjpeg) == \
        ("dnf", "bf16", False, 256, 256, False)
    dnf = [t for t in grid if t.kind == "dnf"]
    assert {t.precision for t in dnf} == {"fp32", "bf16", "fp16"}
    assert {t.compile for t in dnf} == {False, True}
    assert {t.batch for t in dnf} == {64, 256}
    assert {t.nvjpeg for t in dnf} == {False, True}
    assert {t.jpeg for t in dnf} == {256, 1024}
    assert {"reference", "clip", "npr", "train"} <= {t.kind for t in grid}
    assert len({t.name for t in grid}) == len(grid)  # no row twice
    # the reference loop for 256 px comes right after the goal row (its speed-up needs it)
    assert grid[1].kind == "reference" and grid[1].jpeg == 256
    assert args.images == 2048 and args.resize_on == "device"


def test_quick_cpu_grid_is_small_and_leaves_out_what_a_cpu_lacks():
    args = bench_gpu.parse_args(["--device", "cpu", "--quick"])
    grid = bench_gpu.build_grid(args, cuda=False)
    assert args.images <= 64
    assert not any(t.nvjpeg or t.compile for t in grid)  # nvJPEG needs CUDA; compile: minutes on 2 cores
    assert {"dnf", "reference", "clip", "npr", "train"} == {t.kind for t in grid}
    assert len(grid) <= 16


def test_budget_guard_skips_rows_that_do_not_fit():
    now = [0.0]
    budget = bench_gpu.Budget(100.0, clock=lambda: now[0])
    small, big = bench_gpu.Task("npr", estimate_s=10), bench_gpu.Task("dnf", compile=True, estimate_s=90)
    assert budget.fits(small) and budget.fits(big)
    now[0] = 50.0
    assert budget.fits(small) and not budget.fits(big)
    assert "50 s left" in budget.note(big) and "90 s" in budget.note(big)
    assert bench_gpu.Budget(None).fits(big)  # no budget: everything runs


def test_zero_budget_writes_every_row_as_skipped_with_the_environment(tmp_path):
    out = tmp_path / "gpu_results.json"
    bench_gpu.main(["--device", "cpu", "--quick", "--budget-s", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["env"]["torch"] and "cuda" in result["env"] and "gpu" in result["env"]
    rows = result["rows"]
    assert len(rows) == len(bench_gpu.build_grid(bench_gpu.parse_args(["--device", "cpu", "--quick"]),
                                                 cuda=False))
    assert all(r["status"] == "skipped" and "budget" in r["note"] for r in rows)


@pytest.mark.slow
def test_quick_grid_runs_end_to_end_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "gpu_results.json"
    bench_gpu.main(["--device", "cpu", "--quick", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r for r in rows if r["status"] != "ok"] == []
    ref = {r["jpeg_px"]: r["reference_img_s"] for r in rows if r["kind"] == "reference"}
    for r in rows:
        if r["kind"] in ("dnf", "clip", "npr"):
            assert r["images"] == 16 and r["pipeline_img_s"] > 0 and r["model_alone_img_s"] > 0
            assert r["pipeline_over_model"] == pytest.approx(r["pipeline_img_s"] / r["model_alone_img_s"],
                                                             rel=1e-2, abs=1e-3)  # kept to 3 decimals
            assert 0 <= r["gpu_wait_fraction"] < 1
        if r["kind"] == "dnf":
            expected = r["pipeline_img_s"] / ref[r["jpeg_px"]]
            assert r["speedup_vs_reference"] == pytest.approx(expected, rel=1e-2)
    train = next(r for r in rows if r["kind"] == "train")
    assert train["train_samples_per_s"] > 0 and 0 <= train["data_wait_fraction"] <= 1
    assert "| dnf bf16" in capsys.readouterr().out  # the closing table
