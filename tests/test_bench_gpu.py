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
    assert {"dnf", "reference", "clip", "npr", "train", "alone"} == {t.kind for t in grid}
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


def check_quick_rows(rows: list[dict], out_dir: Path) -> None:
    """What every row of a --quick run holds (the slow test; also run on gpu_run.sh's CPU results)."""
    assert [r for r in rows if r["status"] != "ok"] == []
    ref = {r["jpeg_px"]: r["reference_img_s"] for r in rows if r["kind"] == "reference"}
    assert all(r["tf32"] is False for r in rows if r["kind"] == "reference")
    for r in rows:
        if r["kind"] in ("dnf", "clip", "npr"):
            assert r["images"] == 16 and r["pipeline_img_s"] > 0 and r["model_alone_img_s"] > 0
            assert r["pipeline_over_model"] == pytest.approx(r["pipeline_img_s"] / r["model_alone_img_s"],
                                                             rel=1e-2, abs=1e-3)  # kept to 3 decimals
            assert r["pipeline_steady_img_s"] > 0
            steady = r["pipeline_steady_img_s"] / r["model_alone_img_s"]
            assert r["steady_over_model"] == pytest.approx(steady, rel=1e-2, abs=1e-3)
            assert 0 <= r["gpu_wait_fraction"] < 1
        if r["kind"] == "dnf":
            expected = r["pipeline_img_s"] / ref[r["jpeg_px"]]
            assert r["speedup_vs_reference"] == pytest.approx(expected, rel=1e-2)
    assert rows[0]["warmup_s"] > 0 and all("warmup_s" not in r for r in rows[1:])
    alone = next(r for r in rows if r["kind"] == "alone")
    assert alone["channels_last"] is False and alone["model_alone_img_s"] > 0
    assert alone["channels_last_speedup"] == pytest.approx(rows[0]["model_alone_img_s"]
                                                           / alone["model_alone_img_s"], rel=2e-2)
    train = next(r for r in rows if r["kind"] == "train")
    assert train["epoch"] == 2 and train["train_samples_per_s"] > 0 and 0 <= train["data_wait_fraction"] <= 1
    assert "self_cpu_time_total" in (out_dir / "gpu_profile_row1.txt").read_text()


@pytest.mark.slow
def test_quick_grid_runs_end_to_end_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "gpu_results.json"
    bench_gpu.main(["--device", "cpu", "--quick", "--out", str(out)])
    check_quick_rows(json.loads(out.read_text())["rows"], tmp_path)
    assert "| dnf bf16" in capsys.readouterr().out  # the closing table


# --- the review's defects (each test failed on the script before its fix) ---

def _jpeg_bytes(size: int = 16) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 90)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _refusing_decode_jpeg(*a, **k):
    raise RuntimeError("nvjpeg not available (test)")


def test_nvjpeg_probe_reports_a_decoder_that_refuses(monkeypatch):
    import torch
    import torchvision.io

    assert bench_gpu.nvjpeg_probe(torch.device("cpu")) is None  # a decoder that works: nothing to say
    monkeypatch.setattr(torchvision.io, "decode_jpeg", _refusing_decode_jpeg)
    message = bench_gpu.nvjpeg_probe(torch.device("cpu"))
    assert "nvjpeg not available (test)" in message


def test_nvjpeg_rows_are_skipped_when_the_probe_failed():
    budget = bench_gpu.Budget(None)
    on, off = bench_gpu.Task("dnf", nvjpeg=True), bench_gpu.Task("dnf", nvjpeg=False)
    note = bench_gpu.skip_reason(on, budget, "RuntimeError: no nvjpeg")
    assert note.startswith("skipped") and "nvJPEG" in note and "no nvjpeg" in note
    assert bench_gpu.skip_reason(off, budget, "RuntimeError: no nvjpeg") is None
    assert bench_gpu.skip_reason(on, budget, None) is None


def test_cpu_fallbacks_of_the_gpu_decoder_are_counted(monkeypatch):
    import torch
    import torchvision.io

    from stages.extract import gpu_batch

    data = [torch.frombuffer(bytearray(_jpeg_bytes()), dtype=torch.uint8) for _ in range(3)]
    with bench_gpu.count_jpeg_fallbacks() as counts:  # a decoder that works: no fallback
        gpu_batch(list(data), 8, torch.device("cpu"))
    assert counts == {"batch_calls_failed": 0, "cpu_fallbacks": 0}
    monkeypatch.setattr(torchvision.io, "decode_jpeg", _refusing_decode_jpeg)  # nvJPEG missing
    with bench_gpu.count_jpeg_fallbacks() as counts:
        batch, kept, failed = gpu_batch(list(data), 8, torch.device("cpu"))
    assert kept == [0, 1, 2] and failed == []  # extract's behaviour is unchanged: decoded on the CPU
    assert counts == {"batch_calls_failed": 1, "cpu_fallbacks": 3}
    assert torchvision.io.decode_jpeg is _refusing_decode_jpeg  # the wrapper is gone after the block


class _SleepyModel:
    """A stand-in FeatureModel whose forward takes 30 ms per call on the CPU."""

    def __init__(self):
        import torch

        self.device = torch.device("cpu")

    def features(self, x, feature):
        import time

        time.sleep(0.03)
        return x


def test_timed_features_gives_busy_seconds_and_the_steady_rate():
    import time

    import torch

    model, ends = _SleepyModel(), []
    with bench_gpu.timed_features(model) as box:
        for n in (4, 4, 2):
            model.features(torch.zeros(n, 3, 2, 2), None)
            ends.append(time.perf_counter())
            time.sleep(0.02)  # the pipeline's own time between forwards
    assert box["busy_s"] == pytest.approx(0.09, abs=0.03)
    # images after the first batch / end of the first forward to the end of the last
    assert box["steady_img_s"] == pytest.approx(6 / (ends[-1] - ends[0]), rel=0.15)
    assert box["forwards"] == 3


def test_train_row_runs_two_epochs_labelled_bf16_on_cuda():
    grid = bench_gpu.build_grid(bench_gpu.parse_args([]), cuda=True)
    train = next(t for t in grid if t.kind == "train")
    assert train.precision == "bf16" and train.name == "train 2 epochs bf16 amp"
    assert bench_gpu.TRAIN_EPOCHS == 2


def test_reference_1024_and_compile_come_before_fp32():
    grid = bench_gpu.build_grid(bench_gpu.parse_args([]), cuda=True)
    names = [t.name for t in grid]
    ref = names.index("reference loop 1024px")
    compiled = names.index("dnf bf16 compile-on b256 256px nvjpeg-off")
    fp32 = names.index("dnf fp32 compile-off b256 256px nvjpeg-off")
    assert ref < compiled < fp32


def test_train_worker_has_a_timeout_from_the_budget_and_is_killed_with_its_children(tmp_path):
    import os
    import subprocess as sp

    assert bench_gpu.train_timeout(200.0) == 195.0 and bench_gpu.train_timeout(10.0) == 30.0
    grandchild = tmp_path / "pid"
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(grandchild)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    with pytest.raises(TimeoutError, match="timed out after 2 s"):
        bench_gpu.run_bounded([sys.executable, "-c", script], timeout=2.0, cwd=tmp_path)
    pid = int(grandchild.read_text())
    for _ in range(50):  # the whole process group was killed, torchrun's worker too
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]:
            break
        import time

        time.sleep(0.1)
    else:
        raise AssertionError(f"process {pid} outlived the timeout")
    ok = bench_gpu.run_bounded([sys.executable, "-c", "print('hi')"], timeout=30.0, cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip() == "hi"
    del sp


def test_grid_has_one_cheap_channels_last_off_model_alone_row():
    grid = bench_gpu.build_grid(bench_gpu.parse_args([]), cuda=True)
    layout = [t for t in grid if not t.channels_last]
    assert len(layout) == 1 and layout[0].kind == "alone" and layout[0].estimate_s <= 15
    assert layout[0].precision == "bf16" and layout[0].batch == 256
    compiled = [t.name for t in grid].index("dnf bf16 compile-on b256 256px nvjpeg-off")
    assert grid.index(layout[0]) < compiled
    quick = bench_gpu.build_grid(bench_gpu.parse_args(["--device", "cpu", "--quick"]), cuda=False)
    assert [t.kind for t in quick].count("alone") == 1


def test_profile_table_of_a_forward_is_written(tmp_path):
    import torch

    path = tmp_path / "gpu_profile_row1.txt"
    x = torch.rand(64, 64)
    bench_gpu.write_profile(lambda: x @ x, path, torch.device("cpu"), steps=2)
    text = path.read_text()
    assert "aten::mm" in text and "Name" in text


def test_reference_row_frees_the_pipeline_model_and_runs_without_tf32(tmp_path, monkeypatch):
    import torch

    args = bench_gpu.parse_args(["--device", "cpu", "--quick"])
    b = bench_gpu.Bench(args, torch.device("cpu"), tmp_path)
    b.models[("dnf", "bf16", False, True)] = object()
    (tmp_path / "jpegs-48").mkdir()
    b.runs[48], b.dirs["dnf"] = tmp_path / "run-48", tmp_path
    seen = {}

    def fake_loop(*a, **k):
        seen.update(models=dict(b.models), cudnn=torch.backends.cudnn.allow_tf32,
                    matmul=torch.backends.cuda.matmul.allow_tf32)
        return 10.0

    monkeypatch.setattr(bench_gpu, "reference_loop", fake_loop)
    torch.backends.cudnn.allow_tf32 = True
    try:
        row = bench_gpu.reference_row(b, bench_gpu.Task("reference", jpeg=48, batch=16))
    finally:
        b.defaults()
    assert seen == {"models": {}, "cudnn": False, "matmul": False}
    assert row["reference_img_s"] == 10.0 and row["tf32"] is False


def _gpu_run(tmp_path, env_extra, *args):
    import os
    import subprocess

    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), **env_extra}
    return subprocess.run(["bash", str(ROOT / "benchmarks/gpu_run.sh"), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_gpu_run_names_the_make_command_when_no_wheel_matches_this_python(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"")
    (wheels / "google_crc32c-1.9.0-cp399-cp399-manylinux2014_x86_64.whl").write_bytes(b"")
    proc = _gpu_run(tmp_path, {"WHEELS": str(wheels)}, "--device", "cpu", "--quick")
    tag = "{}.{}".format(*sys.version_info[:2])
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"make gpu-wheels GPU_PYTHON={tag}" in proc.stdout and "google_crc32c" in proc.stdout
    assert "torch" not in proc.stdout  # said before anything slow ran


def test_gpu_run_checks_the_deep_imports_before_making_any_jpeg(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "transformers").mkdir()  # a transformers without CLIP: only the deep check sees it
    (shadow / "transformers" / "__init__.py").write_text("")
    empty = tmp_path / "nowheels"
    empty.mkdir()
    proc = _gpu_run(tmp_path, {"WHEELS": str(empty), "PYTHONPATH": str(shadow), "GPU_RUN_BUDGET_S": "60"},
                    "--device", "cpu", "--quick")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "shadow/transformers" in proc.stdout and "do not import" in proc.stdout
    assert not (tmp_path / "out" / "gpu_results.json").exists()
