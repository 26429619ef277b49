"""`extract`: run the diffusion UNet once per image and write the DNF into the feature cache.

Per manifest shard: decode and resize in DataLoader workers, predict eps in batches that never
cross a shard boundary (so a redone shard gets the same bytes), encode, write the shard's rows in
one go, then the done marker. A shard without a done marker is redone from scratch on the next run.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import pipeline
from pipeline.config import FeatureConfig
from pipeline.device import resolve_device
from pipeline.progress import Progress
from pipeline.queue import ShardQueue
from pipeline.signals import StopFlag, graceful_stop
from stages.images import DecodeError, decode_rgb, preprocess
from stages.noise_model import NoiseModel, load_noise_model
from stages.shard import DEFAULT_MAX_PIXELS
from storage.run import Entry, Run, RunError, within_roots
from storage.zarr_cache import NOT_CACHED, CacheError, ZarrCache, shard_checksum


def encode(eps: torch.Tensor, encoding: str) -> torch.Tensor:
    """eps to the stored form: `reference` is exactly torchvision's save_image quantisation
    (`eps * 255 + 0.5`, clamped to [0, 255], truncated to uint8); `raw` is float16."""
    if encoding == "reference":
        return eps.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    if encoding == "raw":
        return eps.to(torch.float16)
    raise ValueError(f"unknown encoding {encoding!r}")


def read_checked(entry: Entry, roots: list[str] | None = None) -> bytes:
    """The image's bytes, refusing a file outside the run's inputs or changed since `shard`."""
    if roots is not None and not within_roots(entry.path, roots):
        raise DecodeError("outside the run's input folders: the manifest path was edited (../?)")
    try:
        with open(entry.path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise DecodeError("missing: the file was removed after `shard`") from e
    except OSError as e:
        raise DecodeError(f"unreadable: {e.strerror or e}") from e
    if hashlib.sha256(data).hexdigest() != entry.key:
        raise DecodeError("changed since `shard`: its sha256 no longer matches the manifest key")
    return data


class ShardImages(Dataset):
    """The images of one manifest shard, preprocessed; a failure gives its reason, not an error."""

    def __init__(self, entries: list[Entry], size: int, max_pixels: int, roots: list[str] | None):
        self.entries, self.size, self.max_pixels, self.roots = entries, size, max_pixels, roots

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            img = decode_rgb(read_checked(self.entries[i], self.roots), self.max_pixels)
            return i, preprocess(img, self.size), None
        except DecodeError as e:
            return i, None, str(e)


def _collate(items: list) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    ok = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, reason) for i, x, reason in items if x is None]
    batch = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], batch, failed


@dataclass
class ExtractOptions:
    """What `extract` computes and how; only the FeatureConfig part decides the cache."""

    model: Path
    size: int = 256
    timestep: int = 0
    encoding: str = "reference"
    batch_size: int = 16
    workers: int = -1  # -1: one fewer than the CPU cores, at most 8
    device: str = "auto"
    cache_dir: Path | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    redo: tuple[int, ...] = ()  # shards to compute again although marked done
    inversion_steps: int = 1
    ddim_steps: int = 20
    keep: tuple[int, ...] = (0,)
    combine: str = "stack"

    def feature(self, fingerprint: str) -> FeatureConfig:
        return FeatureConfig(fingerprint, self.timestep, self.size, self.encoding,
                             inversion_steps=self.inversion_steps, ddim_steps=self.ddim_steps,
                             keep=self.keep, combine=self.combine)

    def num_workers(self) -> int:
        if self.workers >= 0:
            return self.workers
        return max(1, min(8, (os.cpu_count() or 2) - 1))


def open_cache(run: Run, model: NoiseModel, opts: ExtractOptions) -> tuple[ZarrCache, FeatureConfig]:
    """The run's cache for these options, created or checked against the existing one."""
    info = run.info()
    if info["images"] == 0:
        raise RunError(f"{run.root}: the manifest has no images ({info['rejects']} rejected; see "
                       f"{run.rejects_path})")
    feature = opts.feature(model.fingerprint)
    cache = ZarrCache(opts.cache_dir or run.cache_root / feature.feature_id)
    config = {
        "feature_id": feature.feature_id,
        "feature": feature.to_json(),
        "backend": cache.backend,
        "dtype": feature.dtype,
        "channels": feature.channels,
        "manifest": {"fingerprint": run.manifest_fingerprint(), "images": info["images"],
                     "shard_size": info["shard_size"], "num_shards": info["num_shards"]},
        "about": {"model_path": model.path, "tool_version": pipeline.__version__},
    }
    cache.open_or_create(config, info["images"], info["shard_size"], opts.size, feature.dtype,
                         feature.channels)
    return cache, feature


def extract_shard(run: Run, cache: ZarrCache, shard_id: int, model: NoiseModel, feature: FeatureConfig,
                  opts: ExtractOptions, progress: Progress, stop: StopFlag) -> dict:
    """Compute, write and mark done one manifest shard; return its done marker.

    `stop` is checked after every batch: a stop leaves the shard unmarked, to be redone."""
    entries = run.shard_entries(shard_id)
    info = run.info()
    start = shard_id * info["shard_size"]
    n, size = len(entries), opts.size
    dnf = np.zeros((n, feature.channels, size, size), dtype=feature.dtype)
    labels = np.full(n, NOT_CACHED, dtype=np.int8)
    rejected = []
    device = model.device
    workers = min(opts.num_workers(), max(0, (n + opts.batch_size - 1) // opts.batch_size))
    loader = DataLoader(
        ShardImages(entries, size, opts.max_pixels, info.get("roots")), batch_size=opts.batch_size,
        shuffle=False, num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None)
    for idx, batch, failed in loader:
        for i, reason in failed:
            rejected.append({"key": entries[i].key, "path": entries[i].path, "reason": reason,
                             "stage": "extract"})
        if batch is not None:
            x = batch.to(device, non_blocking=True)
            out = encode(model.features(x, feature), opts.encoding).cpu().numpy()
            dnf[idx] = out
            labels[idx] = [entries[i].label for i in idx]
        progress.update(len(idx) + len(failed))
        stop.check()
    keys = [e.key for e in entries]
    marker = {
        "shard": shard_id,
        "rows": [start, start + n],
        "count": n,
        "cached": int((labels != NOT_CACHED).sum()),
        "rejected": rejected,
        "checksum": shard_checksum(dnf, labels, keys),
    }
    try:
        cache.write_shard(start, dnf, labels, [e.split for e in entries], [e.source for e in entries],
                          keys)
        cache.mark_done(shard_id, marker)
    except OSError as e:
        raise CacheError(
            f"shard {shard_id:05d}: writing to {cache.root} failed: {e.strerror or e}. "
            f"Shards finished before are kept and this one is not marked done; "
            f"free space (or fix the folder) and run `extract` again to resume") from e
    return marker


def _extract_pending(run: Run, cache: ZarrCache, queue: ShardQueue, pending: list[int],
                     model: NoiseModel, feature: FeatureConfig, opts: ExtractOptions,
                     progress: Progress, stop: StopFlag, done_now: list[int],
                     skipped: list[int]) -> None:
    for shard_id in pending:
        stop.check()
        with queue.try_claim(shard_id) as claimed:
            if not claimed or cache.done_path(shard_id).exists():
                skipped.append(shard_id)
                continue
            extract_shard(run, cache, shard_id, model, feature, opts, progress, stop)
        done_now.append(shard_id)
        progress.update(0, f"shard {shard_id} done", force_log=True)


def run_extract(run_dir: Path, opts: ExtractOptions) -> dict:
    """Extract every pending shard of the run that no other process holds; return a summary."""
    run = Run(run_dir)
    info = run.info()
    device = resolve_device(opts.device)
    model = load_noise_model(opts.model, device)
    model.check_size(opts.size)
    cache, feature = open_cache(run, model, opts)
    queue = ShardQueue(cache.claims_dir, info["num_shards"], lambda s: cache.done_path(s).exists())
    for shard_id in opts.redo:
        if not 0 <= shard_id < info["num_shards"]:
            raise RunError(f"--redo {shard_id}: the run has shards 0 to {info['num_shards'] - 1}")
        with queue.try_claim(shard_id) as claimed:
            if not claimed:
                raise CacheError(f"--redo {shard_id}: another process is working on that shard")
            cache.done_path(shard_id).unlink(missing_ok=True)
    pending = queue.pending()
    todo_images = sum(len(run.shard_entries(s)) for s in pending)
    progress = Progress(todo_images, f"extract {feature.feature_id}")
    done_now: list[int] = []
    skipped: list[int] = []
    t0 = time.perf_counter()
    with graceful_stop() as stop:
        try:
            _extract_pending(run, cache, queue, pending, model, feature, opts, progress, stop,
                             done_now, skipped)
        finally:
            progress.close()
    images = sum(cache.done_marker(s)["cached"] for s in done_now)
    rejected = sum(len(cache.done_marker(s)["rejected"]) for s in done_now)
    elapsed = time.perf_counter() - t0
    return {
        "cache": str(cache.root),
        "feature_id": feature.feature_id,
        "device": str(device),
        "shards_total": info["num_shards"],
        "shards_done_before": info["num_shards"] - len(pending),
        "shards_done_now": len(done_now),
        "shards_left_to_others": len(skipped),
        "images": images,
        "rejected": rejected,
        "seconds": round(elapsed, 2),
        "images_per_s": round(images / elapsed, 2) if elapsed > 0 and images else 0.0,
    }
