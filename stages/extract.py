"""`extract`: run the diffusion UNet once per image and write the DNF into the feature cache.

Per manifest shard: decode and resize in DataLoader workers, predict eps in batches that never
cross a shard boundary (so a redone shard gets the same bytes), encode, write the shard's rows in
one go, then the done marker. A shard without a done marker is redone from scratch on the next run.

The stages overlap so the model never waits: while shard k computes, shard k+1 is already claimed
and its workers decode ahead, and shard k-1 is written by a background thread.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import pipeline
from pipeline.device import resolve_device, resolve_precision
from pipeline.distributed import local_device, my_order, worker_identity
from pipeline.progress import Progress
from pipeline.queue import Claim, ShardQueue
from pipeline.shard_writer import ClaimLost, ShardWriter  # noqa: F401 (importable here, as before)
from pipeline.signals import StopFlag, graceful_stop
from stages.domain.feature_kinds import FeatureModel, feature_kind
from stages.domain.image_limits import DEFAULT_MAX_PIXELS
from stages.domain.images import GEOMETRIES
from stages.domain.shard_images import (  # noqa: F401 (ShardImages, gpu_batch: importable here, as before)
    ShardImages,
    UnitBatches,
    as_is,
    collate,
    gpu_batch,
)
from stages.domain.sources import ReadContext, RunReader
from stages.domain.sources.packed import open_pack
from storage.cache_config import PREPROCESSING, CacheConfig, DoneMarker, FeatureConfig, ManifestRef
from storage.cache_folder import NOT_CACHED, CacheError, FeatureCache
from storage.caches import folder_name, new_cache
from storage.errors import OptionError
from storage.locations import as_path
from storage.parquet_images import read_index
from storage.run import Run, RunError


@dataclass
class ExtractOptions:
    """What `extract` computes and how; only the FeatureConfig part decides the cache."""

    model: Path | None  # the kind's model (DNF, DIRE: a diffusion UNet); None for kinds without one
    size: int = 256
    timestep: int = 0
    encoding: str = ""  # "": the kind's default (reference uint8 for maps, raw float16 for CLIP)
    batch_size: int = 0  # 0: chosen from free GPU memory (16 on the CPU)
    workers: int = -1  # -1: auto (see num_workers)
    device: str = "auto"
    cache_dir: Path | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    redo: tuple[int, ...] = ()  # shards to compute again although marked done
    inversion_steps: int = 1
    ddim_steps: int = 20
    keep: tuple[int, ...] = (0,)
    combine: str = "stack"
    precision: str = "auto"  # auto = fp32; bf16 / fp16 autocast are faster and move values
    compile: bool = False  # torch.compile the UNet
    gpu_decode: bool = False  # decode JPEGs on the GPU (nvJPEG) instead of in the workers
    perturb: str = ""  # one canonical perturbation spec (see stages/perturb.py)
    worker_index: int | None = None  # default: torchrun RANK or the Slurm array task
    num_workers_total: int | None = None
    claims: str = "auto"  # flock, or heartbeat files for filesystems without flock (pipeline/queue.py)
    backend: str = "zarr"  # or "webdataset" (tar shards)
    download: bool = False  # a hub id not in the local Hugging Face cache is fetched (network)
    feature_kind: str = "dnf"  # a registered kind: dnf, dire (DIRE's baseline), npr (no model)
    crop: bool = False  # the old name of geometry "crop-resize" (DIRE's own preprocessing)
    geometry: str = "resize"  # resize (the reference), crop-resize, or crop (native-resolution window)
    fast_decode: bool = False  # JPEGs decoded at a reduced DCT scale (>= size): other pixels, opt-in
    resize_on: str = "auto"  # device (uint8 handed over, resized there), workers; auto: device on CUDA

    def __post_init__(self) -> None:
        if self.crop:
            self.geometry = "crop-resize"
        if self.geometry not in GEOMETRIES:
            raise OptionError(f"--geometry {self.geometry!r}: one of {', '.join(GEOMETRIES)}")
        if self.fast_decode and self.geometry == "crop":
            raise OptionError("--fast-decode shrinks the image before the resize; --geometry crop keeps "
                              "native pixels: use one or the other")

    def cache_root(self, run: Run, feature_id: str) -> Path:
        if self.cache_dir:
            return as_path(self.cache_dir)
        return run.cache_root / folder_name(feature_id, self.backend)

    def resize_on_device(self, device: torch.device) -> bool:
        """Whether loader workers hand uint8 pixels over and the bicubic resize runs on the device:
        on CUDA by default (a GPU resizes a batch in far less than the workers' 7 core-ms per
        1024 px image); `resize_on` forces it either way (the same ops, values within float
        rounding of each other)."""
        if self.resize_on not in ("auto", "device", "workers"):
            raise OptionError(f"--resize-on {self.resize_on!r}: auto, device or workers")
        return self.resize_on == "device" or (self.resize_on == "auto" and device.type == "cuda")

    def gpu_jpeg(self, device: torch.device) -> bool:
        """Whether JPEGs are decoded by nvJPEG: --gpu-decode on CUDA, for clean uncropped features."""
        return (self.gpu_decode and device.type == "cuda" and not self.perturb and self.geometry == "resize"
                and not self.fast_decode)

    def feature(self, fingerprint: str, precision: str = "fp32",
                device: torch.device | None = None) -> FeatureConfig:
        """The feature config; nvJPEG's decoded pixels differ from libjpeg's in the last bits, so
        the decoder is part of it (a cache never mixes the two)."""
        decoder = "nvjpeg" if device is not None and self.gpu_jpeg(device) else "cpu"
        kind = feature_kind(self.feature_kind)
        config = FeatureConfig(fingerprint, self.timestep, self.size, self.encoding or kind.default_encoding,
                               decoder=decoder,
                               inversion_steps=self.inversion_steps, ddim_steps=self.ddim_steps,
                               keep=self.keep, combine=self.combine, precision=precision,
                               perturb=self.perturb, kind=self.feature_kind,
                               preprocess=PREPROCESSING[self.geometry], fast_decode=self.fast_decode)
        kind.check(config)
        return config

    def num_workers(self, device: torch.device) -> int:
        """-1 means: on a GPU, one fewer than the CPU cores (at most 8) decode in parallel; on the
        CPU, decoding runs in the main process, since decode costs about 1 % of a CPU forward
        pass and worker processes only contend with the model's threads (measured: 0.95 of the
        model-alone rate with none, 0.85 with one on 2 cores)."""
        if self.workers >= 0:
            return self.workers
        return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))


def open_cache(run: Run, model: FeatureModel, opts: ExtractOptions,
               batch_size: int = 0) -> tuple[FeatureCache, FeatureConfig]:
    """The run's cache for these options, created or checked against the existing one."""
    info = run.info()
    if info.images == 0:
        raise RunError(f"{run.root}: the manifest has no images ({info.rejects} rejected; see "
                       f"{run.rejects_path})")
    feature = opts.feature(model.fingerprint, model.precision, model.device)
    cache = new_cache(opts.cache_root(run, feature.feature_id), opts.backend)
    channels, side, _ = feature_kind(feature.kind).row_shape(feature, model)
    config = CacheConfig(
        feature=feature, backend=cache.backend, channels=channels, format=cache.format_version,
        spatial=side if side != feature.size else 0,
        manifest=ManifestRef(run.manifest_fingerprint(), info.images, info.shard_size, info.num_shards,
                             info.rows),
        # batch_size: the first run's, reused by resumed runs with --batch-size 0, since the batch
        # composition moves eps in the last bits and a resumed cache should equal an uninterrupted one
        about={"model_path": model.path, "tool_version": pipeline.__version__, "batch_size": batch_size})

    def extends(old: ManifestRef) -> bool:  # the run grew by `shard --append` since the cache was made
        return (old.num_shards < info.num_shards
                and run.manifest_fingerprint(old.num_shards) == old.fingerprint)

    cache.open_or_create(config, extends, run.vocabulary)
    return cache, feature


def auto_batch_size(model: FeatureModel, size: int, channels: int = 3) -> int:
    """On CUDA: the largest power of two whose forward pass fits in 80 % of free memory,
    measured with one image; 16 on the CPU."""
    if model.device.type != "cuda":
        return 16
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(model.device)
    base = torch.cuda.memory_allocated(model.device)
    model.predict(torch.zeros(1, channels, size, size, device=model.device))
    per_image = max(torch.cuda.max_memory_allocated(model.device) - base, 1)
    free, _ = torch.cuda.mem_get_info(model.device)
    batch = 1
    while batch * 2 * per_image <= 0.8 * free and batch < 256:
        batch *= 2
    return batch


class ShardJob:
    """A claimed shard whose images are being decoded ahead by its DataLoader's workers."""

    def __init__(self, run: Run, shard_id: int, claim: Claim, opts: ExtractOptions, batch_size: int,
                 device: torch.device, log=print):
        self.shard_id, self.claim, self.max_pixels = shard_id, claim, opts.max_pixels
        self.entries = run.shard_entries(shard_id)
        info = run.info()
        self.start = info.shard_start(shard_id)
        # every container was checked unchanged since `shard` when extract began (run_extract)
        reader = RunReader(ReadContext(run.root, tuple(info.roots) or None, recheck=False),
                           pack=open_pack(run.root, shard_id, self.entries, log))
        images = ShardImages(self.entries, opts.size, opts.max_pixels, list(info.roots) or None,
                             gpu_jpeg=opts.gpu_jpeg(device), perturbation=opts.perturb,
                             geometry=opts.geometry,
                             draft=opts.size if opts.fast_decode else 0,
                             device_resize=opts.resize_on_device(device), reader=reader)
        units = reader.units(self.entries, batch_size)
        if units is not None:  # store units (parquet row groups): each worker reads whole ones
            workers = min(opts.num_workers(device), len(units))
            dataset = UnitBatches(images, units, batch_size)
            kwargs: dict = {"batch_size": None, "collate_fn": as_is}
        else:
            workers = min(opts.num_workers(device), -(-len(self.entries) // batch_size))
            dataset, kwargs = images, {"batch_size": batch_size, "shuffle": False, "collate_fn": collate}
        loader = DataLoader(dataset, num_workers=workers, pin_memory=device.type == "cuda",
                            prefetch_factor=4 if workers else None, **kwargs)
        self.batches = iter(loader)  # workers start decoding now


def compute_shard(job: ShardJob, model: FeatureModel, feature: FeatureConfig, progress: Progress,
                  stop: StopFlag, on_first_batch) -> tuple[tuple, DoneMarker]:
    """Run the model over a shard's batches; return (arrays to write, done marker)."""
    entries, n, size = job.entries, len(job.entries), feature.size
    kind = feature_kind(feature.kind)
    dnf = np.zeros((n, *kind.row_shape(feature, model)), dtype=feature.dtype)
    labels = np.full(n, NOT_CACHED, dtype=np.int8)
    rejected = []
    for b, (idx, tensors, failed) in enumerate(job.batches):
        if b == 0:
            on_first_batch()
        progress_n = len(idx) + len(failed)
        if len(tensors):
            x, kept, bad = gpu_batch(tensors, size, model.device, job.max_pixels)
            failed = [*failed, *((idx[k], reason) for k, reason in bad)]
            idx = [idx[k] for k in kept]
        rejected += [{"key": entries[i].key, "path": entries[i].path, "reason": reason, "stage": "extract"}
                     for i, reason in failed]
        if len(idx):
            with torch.inference_mode():  # the features are inference tensors: encoded in place
                out = kind.encode(model.features(x, feature), feature.encoding, inplace=True)
                dnf[idx] = out.cpu().numpy()
            labels[idx] = [entries[i].label for i in idx]
        progress.update(progress_n)
        stop.check()
    keys = [e.key for e in entries]
    arrays = (dnf, labels, [e.split for e in entries], [e.source for e in entries], keys)
    marker = DoneMarker(shard=job.shard_id, rows=(job.start, job.start + n), count=n,
                        cached=int((labels != NOT_CACHED).sum()), rejected=tuple(rejected),
                        checksum="")  # computed by the writer thread, off the model's path
    return arrays, marker


def resolve_batch_size(run: Run, model: FeatureModel, opts: ExtractOptions) -> int:
    """--batch-size; else the one the cache recorded (a resumed run repeats the first run's batches,
    so its bytes equal an uninterrupted run's); else from free GPU memory."""
    feature_id = opts.feature(model.fingerprint, model.precision, model.device).feature_id
    existing = new_cache(opts.cache_root(run, feature_id),
                         opts.backend)
    recorded = existing.config().batch_size if existing.exists() else 0
    return opts.batch_size or recorded or auto_batch_size(model, opts.size)


def forget_done(cache: FeatureCache, queue: ShardQueue, redo: tuple[int, ...]) -> None:
    """`--redo`: drop the done markers of these shards so they are computed again."""
    for shard_id in redo:
        if not 0 <= shard_id < queue.num_shards:
            raise RunError(f"--redo {shard_id}: the run has shards 0 to {queue.num_shards - 1}")
        with queue.try_claim(shard_id) as claimed:
            if not claimed:
                raise CacheError(f"--redo {shard_id}: another process is working on that shard")
            cache.done_path(shard_id).unlink(missing_ok=True)


def run_extract(run_dir: Path, opts: ExtractOptions) -> dict:
    """Extract every pending shard of the run that no other process holds; return a summary."""
    run = Run(run_dir)
    info = run.info()
    for source in read_index(run.root).values():  # a parquet file rewritten since `shard` is refused
        source.check_unchanged()
    device = resolve_device(local_device(opts.device))
    worker, workers_total = worker_identity(opts.worker_index, opts.num_workers_total)
    precision = resolve_precision(opts.precision, device)
    model = feature_kind(opts.feature_kind).load(opts.model, device, precision, compile=opts.compile,
                                                 download=opts.download)
    model.check_size(opts.size)
    batch_size = resolve_batch_size(run, model, opts)
    cache, feature = open_cache(run, model, opts, batch_size)
    queue = ShardQueue(cache.claims_dir, info.num_shards, cache.is_done, mode=opts.claims)
    forget_done(cache, queue, opts.redo)
    done_before = cache.done_shards()  # one listing, not a request per shard (object storage)
    pending = [s for s in range(info.num_shards) if s not in done_before]
    # totals from run.json: no need to parse every pending manifest shard twice
    progress = Progress(sum(run.shard_len(s) for s in pending), f"extract {feature.feature_id}")
    todo = iter(my_order(pending, worker, workers_total))
    done_now: list[int] = []
    skipped: list[int] = []

    def next_job() -> ShardJob | None:
        for shard_id in todo:
            claim = queue.claim(shard_id)
            if claim is None or cache.is_done(shard_id):
                if claim is not None:
                    claim.release()
                skipped.append(shard_id)
                continue
            return ShardJob(run, shard_id, claim, opts, batch_size, device, progress.write)
        return None

    t0 = time.perf_counter()
    writer = ShardWriter(cache, progress.write)
    job, ahead = None, None
    with graceful_stop() as stop:
        try:
            job = next_job()
            while job is not None:
                ahead = None

                def look_ahead() -> None:
                    nonlocal ahead
                    ahead = next_job()

                arrays, marker = compute_shard(job, model, feature, progress, stop, look_ahead)
                writer.submit(job.shard_id, job.start, arrays, marker, job.claim)
                done_now.append(job.shard_id)
                progress.update(0, f"shard {job.shard_id} computed", force_log=True)
                job = ahead or next_job()
            writer.wait()
        finally:
            progress.close()
            try:
                writer.wait()  # a complete shard in flight is still written
            finally:
                for j in (job, ahead):
                    if j is not None and j.shard_id not in done_now:
                        j.claim.release()
    done_now = [s for s in done_now if s not in writer.lost]
    markers = [cache.done_marker(s) for s in done_now]
    images = sum(m.cached for m in markers)
    rejected = sum(len(m.rejected) for m in markers)
    elapsed = time.perf_counter() - t0
    return {
        "cache": str(cache.root), "feature_id": feature.feature_id, "device": str(device),
        "worker": f"{worker + 1}/{workers_total}", "precision": precision, "batch_size": batch_size,
        "shards_total": info.num_shards, "shards_done_before": info.num_shards - len(pending),
        "shards_done_now": len(done_now), "shards_left_to_others": len(skipped) + len(writer.lost),
        "images": images, "rejected": rejected, "seconds": round(elapsed, 2),
        "images_per_s": round(images / elapsed, 2) if elapsed > 0 and images else 0.0,
    }
