"""`shard`'s probe of the candidates: read, hash and fully decode each through its source, in
batches (a source's unit, such as a parquet row group, probed whole), on worker processes, each
finished batch checkpointed so a killed `shard` continues where it stopped."""

from __future__ import annotations

import os
from multiprocessing import get_context
from pathlib import Path

from pipeline.progress import Progress
from stages.domain.sources import Candidate, Collected
from stages.domain.sources import source as source_of
from storage.atomic import read_jsonl, write_jsonl_atomic

PROBE_BATCH = 1024  # files per probe task and per checkpoint file (DNF_SHARD_BATCH overrides)


def _probe_batch(args: tuple) -> tuple[int, list[dict]]:
    """One probe task (in a worker process): its source reads, hashes and decodes the batch."""
    b, kind, addresses, max_pixels, max_bytes, group = args
    return b, source_of(kind).probe(addresses, group, max_pixels, max_bytes)


def probe_batches(candidates: list[Candidate], size: int, found: Collected) -> list[tuple]:
    """(kind, addresses, group) batches: up to `size` consecutive images of one kind, or the images
    of one unit its source probes whole (a parquet row group, read once)."""
    out: list[tuple] = []
    for c in candidates:
        group = source_of(c.kind).probe_group(c.address, found)
        last = out[-1] if out else None
        if last is not None and last[0] == c.kind and (
                (group is None and last[2] is None and len(last[1]) < size)
                or (group is not None and last[2] == group)):
            last[1].append(c.address)
        else:
            out.append((c.kind, [c.address], group))
    return out


def probe_all(candidates: list[Candidate], workers: int, max_pixels: int, max_bytes: int,
              checkpoints: Path, found: Collected | None = None) -> list[dict]:
    """Read, hash and decode every candidate (`{"key", "size", "facts"}` or `{"reason"}`), in order,
    on `workers` processes. Each finished batch is written to `checkpoints/NNNNNN.jsonl`
    (atomically), and batches found there are not probed again."""
    size = int(os.environ.get("DNF_SHARD_BATCH", PROBE_BATCH))
    batches = probe_batches(candidates, size, found or Collected())
    results: list[list[dict] | None] = [None] * len(batches)
    progress = Progress(len(candidates), "shard: probing", unit="file")
    for b, (_, batch, _) in enumerate(batches):
        rows = read_jsonl(checkpoints / f"{b:06d}.jsonl")
        if [r.pop("path") for r in rows] == [a.path for a in batch]:
            results[b] = rows
            progress.update(len(batch))
    todo = [(b, kind, batch, max_pixels, max_bytes, group) for b, (kind, batch, group) in enumerate(batches)
            if results[b] is None]
    if todo:
        checkpoints.mkdir(parents=True, exist_ok=True)

    def done(b: int, rows: list[dict]) -> None:
        write_jsonl_atomic(checkpoints / f"{b:06d}.jsonl",
                           [{"path": a.path, **r} for a, r in zip(batches[b][1], rows, strict=True)])
        results[b] = rows
        progress.update(len(rows))

    if workers > 1 and sum(len(t[2]) for t in todo) > 64:
        with get_context("spawn").Pool(workers) as pool:
            for b, rows in pool.imap_unordered(_probe_batch, todo):
                done(b, rows)
    else:
        for task in todo:
            done(*_probe_batch(task))
    progress.close()
    return [r for rows in results for r in rows]
