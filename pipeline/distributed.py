"""Many extract workers on one run: which worker this is (torchrun ranks, Slurm array tasks, or
explicit options) and which GPU it uses. The shard queue's claims do the rest: there is no
scheduler; each worker starts at its own offset in the pending list and claims what is free."""

from __future__ import annotations

import os

import torch

from storage.errors import OptionError


def worker_identity(index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """(index, count) from the options, else torchrun's RANK / WORLD_SIZE, else a Slurm array's
    task id and count, else (0, 1)."""
    if (index is None) != (count is None):
        raise OptionError("--worker-index and --num-workers go together")
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
        raise OptionError(f"--worker-index {index} must lie in 0..{count - 1} (--num-workers {count})")
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


def init_training_group(device: torch.device) -> tuple[int, int]:
    """(rank, world size) of a training run; under torchrun (WORLD_SIZE > 1) this joins the
    process group: nccl on CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def rank_positions(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Positions in an epoch's order that this rank trains on: every global batch of
    `batch_size` is dealt out evenly, so the ranks' batches together are the one-process batches.
    The order is padded from its start to a multiple of `world`, so all ranks step equally often."""
    padded = n + (-n % world)
    return [p % n for p in range(padded) if (p % batch_size) % world == rank]
