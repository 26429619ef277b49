"""`torchrun --nproc-per-node 2 cli.py train ...` (DDP, gloo on the CPU) against one process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT, cli
from test_reliability import clean  # noqa: F401

from pipeline.distributed import rank_positions
from stages.domain.detector import build_resnet50

_ = clean
ARGS = ["--epochs", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--seed", "3"]


def test_rank_positions_deal_out_every_global_batch():
    n, batch = 21, 8
    parts = [rank_positions(n, batch, r, 2) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 11  # padded to 22: both ranks step equally often
    for k in range(3):  # global batch k = the union of the ranks' batch k
        got = sorted(parts[0][4 * k:4 * k + 4] + parts[1][4 * k:4 * k + 4])
        assert got == sorted(p % n for p in range(8 * k, min(8 * k + 8, 22)))
    assert rank_positions(n, batch, 0, 1) == list(range(n))


def torchrun_train(run: Path, name: str, *extra: str) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", "29531",
                           str(ROOT / "cli.py"), "train", "--run-dir", str(run), "--name", name,
                           *ARGS, *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def distances(run: Path, a: str, b: str) -> tuple[float, float]:
    """(how far run a's weights moved from the init, how far run b's weights are from run a's)."""
    one = torch.load(run / f"train/{a}/last.pt", weights_only=True)["model"]
    two = torch.load(run / f"train/{b}/last.pt", weights_only=True)["model"]
    init = build_resnet50(seed=3).state_dict()
    weights = [k for k, v in init.items() if v.is_floating_point() and "running" not in k]
    moved = sum(float((one[k] - init[k]).norm() ** 2) for k in weights) ** 0.5
    apart = sum(float((two[k] - one[k]).norm() ** 2) for k in weights) ** 0.5
    return moved, apart


def test_two_ranks_match_one_within_tolerance(clean, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(clean["run"], run)
    # With BatchNorm on its running statistics the two ranks' averaged gradients are the one
    # process's gradients (same global batches, same flips) up to float summation order.
    cli("train", "--run", run, "--name", "one-frozen", *ARGS, "--freeze-bn")
    torchrun_train(run, "two-frozen", "--freeze-bn")
    moved, apart = distances(run, "one-frozen", "two-frozen")
    print(f"frozen BN: weights moved {moved:.4f} from init; 1 vs 2 ranks apart {apart:.2e}")
    assert apart < 1e-2 * moved, (apart, moved)  # measured: 6e-4 of the distance moved
    # Trained BatchNorm normalises over each rank's half batch, so runs drift apart (Adam turns
    # small gradient differences into full steps); the recipe and bookkeeping still match.
    cli("train", "--run", run, "--name", "one", *ARGS)
    torchrun_train(run, "two")
    lines = [json.loads(s) for s in (run / "train/two/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and all(r["ranks"] == 2 for r in lines)  # rank 0 only
    ref = [json.loads(s) for s in (run / "train/one/metrics.jsonl").read_text().splitlines()]
    assert [r["train_samples"] for r in lines] == [r["train_samples"] for r in ref]
    two = torch.load(run / "train/two/last.pt", weights_only=True)
    assert two["train"]["state"]["epoch"] == 2 and (run / "train/two/best.pt").exists()
