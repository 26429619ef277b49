"""Many extract workers on one run: which worker this is (torchrun ranks, Slurm array tasks, or
explicit options) and which GPU it uses. The shard queue's claims do the rest: there is no
scheduler; each worker starts at its own offset in the pending list and claims what is free."""

from __future__ import annotations

import os

import torch


def worker_identity(index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """(index, count) from the options, else torchrun's RANK / WORLD_SIZE, else a Slurm array's
    task id and count, else (0, 1)."""
    if (index is None) != (count is None):
        raise ValueError("--worker-index and --num-workers go together")
    if index is not None and count is not None:
        pass
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        index, count = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    elif "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - first
        count = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    else:
        index, count = 0, 1
    if not 0 <= index < count:
        raise ValueError(f"--worker-index {index} must lie in 0..{count - 1} (--num-workers {count})")
    return index, count


def local_device(name: str) -> str:
    """Under torchrun, `auto` and `cuda` mean this process's GPU, `cuda:LOCAL_RANK`."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(local) % torch.cuda.device_count()}"
    return name


def my_order(pending: list[int], index: int, count: int) -> list[int]:
    """The pending shards rotated so that worker i starts at i/count of the list."""
    if not pending or count <= 1:
        return pending
    start = index * len(pending) // count
    return pending[start:] + pending[:start]
