"""`extract`: run the diffusion UNet once per image and write the DNF into the feature cache.

Per manifest shard: decode and resize in DataLoader workers, predict eps in batches that never
cross a shard boundary (so a redone shard gets the same bytes), encode, write the shard's rows in
one go, then the done marker. A shard without a done marker is redone from scratch on the next run.

The stages overlap so the model never waits: while shard k computes, shard k+1 is already claimed
and its workers decode ahead, and shard k-1 is written by a background thread.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

import pipeline
from pipeline.device import resolve_device, resolve_precision
from pipeline.distributed import local_device, my_order, worker_identity
from pipeline.progress import Progress
from pipeline.queue import Claim, ShardQueue
from pipeline.signals import StopFlag, graceful_stop
from stages.domain.feature_kinds import FeatureModel, feature_kind
from stages.domain.image_limits import DEFAULT_MAX_PIXELS
from stages.domain.images import (
    GEOMETRIES,
    DecodeError,
    apply_geometry,
    center_crop,
    check_header,
    decode_rgb,
    normalize_,
    resized_batch,
)
from stages.domain.perturb import applies_to, perturb
from storage.cache_config import PREPROCESSING, CacheConfig, DoneMarker, FeatureConfig, ManifestRef
from storage.cache_folder import NOT_CACHED, CacheError, FeatureCache, shard_checksum
from storage.caches import folder_name, new_cache
from storage.errors import OptionError
from storage.locations import STORAGE_ERRORS, as_path, fenced, is_url
from storage.locations.object_store import read_objects
from storage.packed_images import PackReader, pack_path
from storage.parquet_images import ParquetError, RowGroupReader, read_index, read_units, split_address
from storage.run import Entry, Run, RunError, within_roots


def read_checked(entry: Entry, roots: list[str] | None = None,
                 fetched: bytes | BaseException | None = None) -> bytes:
    """The image's bytes (`fetched` when they were read already), refusing a file outside the
    run's inputs or changed since `shard`."""
    if roots is not None and not within_roots(entry.path, roots):
        raise DecodeError("outside the run's input folders: the manifest path was edited (../?)")
    try:
        if isinstance(fetched, BaseException):
            raise fetched
        data = fetched if fetched is not None else as_path(entry.path).read_bytes()  # file or object
    except FileNotFoundError as e:
        raise DecodeError("missing: the file was removed after `shard`") from e
    except OSError as e:
        raise DecodeError(f"unreadable: {e.strerror or e}") from e
    if hashlib.sha256(data).hexdigest() != entry.key:
        raise DecodeError("changed since `shard`: its sha256 no longer matches the manifest key")
    return data


def read_parquet_row(reader: RowGroupReader, entry: Entry) -> bytes:
    """A parquet row's image bytes, refusing a cell that changed since `shard`."""
    try:
        data = reader.read(entry.path)
    except ParquetError as e:
        raise DecodeError(str(e)) from e
    if not data or hashlib.sha256(data).hexdigest() != entry.key:
        raise DecodeError("changed since `shard`: the row's sha256 no longer matches the manifest key")
    return data


class RowGroupBatches(IterableDataset):
    """A shard with parquet rows, as batches: each loader worker reads whole units
    (`read_units`: row groups), so every row group is read once per shard, and yields their
    `batch_size` chunks collated (the indices tell the rows)."""

    def __init__(self, images: ShardImages, units: list[list[int]], batch_size: int):
        self.images, self.units, self.batch_size = images, units, batch_size

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        mine = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in mine:
            for k in range(0, len(unit), self.batch_size):
                yield _collate([self.images[i] for i in unit[k:k + self.batch_size]])


def _as_is(batch: tuple) -> tuple:
    return batch


class ShardImages(Dataset):
    """The images of one manifest shard, preprocessed; a failure gives its reason, not an error."""

    def __init__(self, entries: list[Entry], size: int, max_pixels: int, roots: list[str] | None,
                 gpu_jpeg: bool = False, perturbation: str = "", pack: PackReader | None = None,
                 geometry: str = "resize", parquet: RowGroupReader | None = None, draft: int = 0,
                 device_resize: bool = False):
        self.entries, self.size, self.max_pixels, self.roots = entries, size, max_pixels, roots
        self.pack = pack  # the shard's packed tar (`shard --pack`), read instead of the files
        self.parquet = parquet  # rows of parquet files (`file.parquet#row`), a row group at a time
        self.perturbation = perturbation
        self.geometry = geometry  # resize, crop-resize (DIRE's preprocessing) or crop (native window)
        # hand JPEG bytes to the GPU decoder instead of decoding here (clean, resized features only)
        self.gpu_jpeg = gpu_jpeg and not perturbation and geometry == "resize"
        self.draft = draft  # --fast-decode: JPEGs decoded at the DCT scale that keeps >= draft pixels
        # hand uint8 pixels over (a quarter of float32's bytes) and resize on the device
        self.device_resize = device_resize and geometry != "crop"

    def __len__(self) -> int:
        return len(self.entries)

    def __getitems__(self, indices: list[int]) -> list[tuple[int, torch.Tensor | None, str | None]]:
        """A batch: the images on object storage fetched concurrently first (their latency
        overlapped), then each decoded as `__getitem__` does."""
        remote = [i for i in indices if is_url(self.entries[i].path)
                  and not (self.pack is not None and self.entries[i].key in self.pack)]
        fetched = read_objects([self.entries[i].path for i in remote]) if len(remote) > 1 else {}
        return [self.item(i, fetched.get(self.entries[i].path)) for i in indices]

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        return self.item(i)

    def item(self, i: int, fetched: bytes | BaseException | None = None,
             ) -> tuple[int, torch.Tensor | None, str | None]:
        """(index, tensor, None), or (index, raw JPEG bytes, "jpeg") for the GPU decoder, or
        (index, None, reason) when the image cannot be used."""
        try:
            entry = self.entries[i]
            if self.pack is not None and entry.key in self.pack:
                data = self.pack.read(entry.key)
                if hashlib.sha256(data).hexdigest() != entry.key:
                    raise DecodeError(f"damaged in {self.pack.path}: its sha256 no longer matches the key")
            elif self.parquet is not None and split_address(entry.path):
                data = read_parquet_row(self.parquet, entry)
            else:
                data = read_checked(entry, self.roots, fetched)
            if self.gpu_jpeg and data[:3] == b"\xff\xd8\xff":
                check_header(data, self.max_pixels)  # the same limit and reasons as decode_rgb
                return i, torch.frombuffer(bytearray(data), dtype=torch.uint8), "jpeg"
            img = decode_rgb(data, self.max_pixels, self.draft)
            if self.perturbation and applies_to(self.perturbation, entry.label):
                try:
                    img = perturb(img, self.perturbation)
                except OSError as e:  # Pillow's encoder refusing the image, e.g. JPEG's 65,500-pixel side
                    raise DecodeError(f"--perturb {self.perturbation} cannot be applied: {e}") from e
            if self.device_resize:  # (H, W, 3) uint8: the decoders' own layout, stacked by a memcpy
                return i, (center_crop(img) if self.geometry == "crop-resize" else img).permute(1, 2, 0), None
            return i, apply_geometry(img, self.geometry, self.size).float(), None  # normalised in _collate
        except DecodeError as e:
            return i, None, str(e)


def _collate(items: list) -> tuple[list[int], torch.Tensor | list[torch.Tensor], list[tuple[int, str]]]:
    """Indices and tensors of the images that read, and (index, reason) of those that did not.
    Resized images are copied into one float batch and normalised there in place (one pass per
    step over the batch, no tensor per image), in the loader worker when there are workers, so a
    batch crosses to the main process as one shared-memory block; a batch holding JPEG bytes for
    the GPU decoder stays a list."""
    ok = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, reason) for i, x, reason in items if x is None]
    tensors = [x for _, x in ok]
    if tensors and all(t.ndim == 3 and t.dtype == torch.uint8 and t.shape == tensors[0].shape
                       for t in tensors):  # (H, W, 3) pixels of one size: one uint8 block
        return [i for i, _ in ok], torch.stack(tensors), failed
    if not tensors or any(t.ndim != 3 or t.dtype == torch.uint8 for t in tensors):
        return [i for i, _ in ok], tensors, failed
    batch = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.float32)
    for k, t in enumerate(tensors):
        batch[k].copy_(t)
    return [i for i, _ in ok], normalize_(batch), failed


def decode_one_jpeg(data: torch.Tensor, device: torch.device, max_pixels: int) -> torch.Tensor | str:
    """One JPEG on the device, or the reject reason: a file nvJPEG refuses is decoded on the CPU,
    which either reads it or says why it cannot."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, device=device, mode=ImageReadMode.RGB)
    except RuntimeError:
        try:
            return decode_rgb(data.numpy().tobytes(), max_pixels).to(device)
        except DecodeError as e:
            return str(e)


def gpu_batch(tensors: torch.Tensor | list[torch.Tensor], size: int, device: torch.device,
              max_pixels: int = DEFAULT_MAX_PIXELS
              ) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """(a batch on the device, the positions it holds, (position, reason) of the images that did
    not decode). A float batch was preprocessed by the loader; (H, W, 3) uint8 pixels (a stacked
    batch, or single images of any size) are resized on the device (`resized_batch`); JPEG bytes (1-D uint8)
    are decoded there by nvJPEG first, one corrupt file rejecting only itself; a float image
    in a list was resized by the loader and is normalised here."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if isinstance(tensors, torch.Tensor):  # already stacked by the loader
        batch = tensors.to(device, non_blocking=True)
        if batch.dtype == torch.uint8:  # (N, H, W, 3) pixels
            batch = resized_batch(list(batch.permute(0, 3, 1, 2)), size)
        return batch, list(range(len(tensors))), []
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for k, t in enumerate(tensors):  # (H, W, 3) uint8 pixels or a loader-resized (3, S, S) float
        if t.ndim == 3:
            t = t.to(device, non_blocking=True)
            out[k] = t.permute(2, 0, 1) if t.dtype == torch.uint8 else t
    jpeg_at = [k for k, t in enumerate(tensors) if t.ndim == 1]
    failed = []
    if jpeg_at:
        try:
            decoded = decode_jpeg([tensors[k] for k in jpeg_at], device=device, mode=ImageReadMode.RGB)
        except RuntimeError:  # one bad file fails the whole batch call: decode one by one
            decoded = [decode_one_jpeg(tensors[k], device, max_pixels) for k in jpeg_at]
        for k, img in zip(jpeg_at, decoded, strict=True):
            if isinstance(img, str):
                failed.append((k, img))
            else:
                out[k] = img
    kept = [k for k, x in enumerate(out) if x is not None]
    if not kept:
        return None, kept, failed
    pixels = [k for k in kept if out[k].dtype == torch.uint8]
    batch = torch.empty((len(kept), 3, size, size), dtype=torch.float32, device=device)
    if pixels:
        batch[[kept.index(k) for k in pixels]] = resized_batch([out[k] for k in pixels], size)
    for j, k in enumerate(kept):
        if out[k].dtype != torch.uint8:  # resized by the loader, not yet normalised
            batch[j] = normalize_(out[k].float())
    return batch, kept, failed


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


class ClaimLost(Exception):
    """Raised by a shard write's fence (`storage.locations.fenced`): the claim is no longer this
    worker's, so the write stops before its file appears."""


class ShardWriter:
    """Writes finished shards on a background thread, one at a time, so the model never waits
    on the disk; the shard's claim is released only after its done marker is written.

    The claim is checked before the write, at the last step of each file the write makes appear
    (the fence: before the rename, the PUT, the upload's completion), and before the done marker.
    What no check can stop: a worker stalled between its fence and the rename or PUT itself. Its
    bytes may then replace those of the worker that took its claim over; it finds that out after
    its write, and removes the other's done marker when the stored data no longer match it."""

    def __init__(self, cache: FeatureCache, log=print):
        self.cache = cache
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.lost: list[int] = []  # shards whose claim another worker took over: theirs to finish
        self.log = log

    def _gone(self, shard_id: int, claim: Claim) -> str | None:
        """Why this worker may no longer write the shard (its claim refreshed and taken over, or a
        done marker there: a done shard is never rewritten), or None while it may."""
        claim.refresh()
        if claim.lost:  # another worker took the shard over while this one was stalled
            return "the claim was taken over by another worker after this one's heartbeat went stale"
        if self.cache.is_done(shard_id):
            return "another worker marked it done meanwhile"
        return None

    def _still_mine(self, shard_id: int, claim: Claim) -> bool:
        """Whether this worker may still write the shard, before it writes anything of it."""
        why = self._gone(shard_id, claim)
        if why is None:
            return True
        self.lost.append(shard_id)  # left to the other worker; this one goes on
        self.log(f"shard {shard_id:05d}: {why}; this worker writes nothing of it and moves on")
        return False

    def _fence(self, shard_id: int, claim: Claim) -> None:
        """The check at the last step of each file of the shard's write."""
        why = self._gone(shard_id, claim)
        if why is not None:
            raise ClaimLost(why)

    def _write(self, shard_id: int, start: int, arrays: tuple, marker: DoneMarker, claim: Claim) -> None:
        try:
            if not self._still_mine(shard_id, claim):
                return
            try:
                with fenced(lambda: self._fence(shard_id, claim)):
                    index = self.cache.write_shard(start, *arrays)
            except ClaimLost as e:
                self.lost.append(shard_id)
                self.log(f"shard {shard_id:05d}: {e}; this worker stopped its write before its data "
                         f"file appeared (files identical across workers, labels and keys, may have "
                         f"been rewritten) and moves on")
                return
            marker = replace(marker, checksum=shard_checksum(arrays[0], arrays[1], arrays[4]), index=index)
            why = self._gone(shard_id, claim)
            if why is None:
                self.cache.mark_done(marker)
            else:
                self.lost.append(shard_id)
                self._after_a_lost_write(shard_id, why, marker.checksum)
        except STORAGE_ERRORS as e:  # a full disk, or object storage refusing after its retries
            why = getattr(e, "strerror", None) or e
            self.error = CacheError(
                f"shard {shard_id:05d}: writing to {self.cache.root} failed: {why}. "
                f"Shards finished before are kept and this one is not marked done; "
                f"free space (or fix the folder) and run `extract` again to resume")
        except BaseException as e:  # surfaced in the main thread by wait()
            self.error = e
        finally:
            claim.release()

    def _after_a_lost_write(self, shard_id: int, why: str, mine: str) -> None:
        """This worker wrote the shard's data, then found its claim lost (`why`): its bytes may have
        replaced those the taker marks done. When the stored data no longer match the done marker
        there, the marker is removed (the shard is pending again, recomputed by the next extract)
        instead of being left to fail `verify`; without a marker yet, the taker's own write comes
        later or has come before, which `verify` tells."""
        head = f"shard {shard_id:05d}: {why}; this worker found that out only after it wrote its data"
        there = self.cache.done_marker(shard_id)
        if there is None:
            self.log(f"{head}; the other worker has not marked it done yet (if its data were written "
                     f"before this worker's, `verify` will find them not matching its done marker: "
                     f"`extract --redo {shard_id}` recomputes it); moves on")
            return
        try:
            dnf, label, keys = self.cache.read_rows(*there.rows)
            stored = shard_checksum(dnf, label, keys)
        except Exception as e:  # noqa: BLE001 (unreadable now: as broken as a mismatch)
            stored = f"unreadable ({type(e).__name__})"
        if stored == there.checksum:
            self.log(f"{head}; the stored data match the other worker's done marker "
                     f"({'the same bytes' if stored == mine else 'its write came last'}); moves on")
            return
        if self.cache.done_marker(shard_id) == there:  # not rewritten meanwhile (not atomic: a
            self.cache.done_path(shard_id).unlink(missing_ok=True)  # narrow window, no CAS delete)
            self.log(f"{head}, which replaced the data the other worker marked done: that done marker "
                     f"no longer matched the stored data and was removed, so the shard is pending "
                     f"again and the next `extract` recomputes it; moves on")
        else:
            self.log(f"{head}; the shard's done marker changed while this worker checked it: run "
                     f"`verify`; moves on")

    def submit(self, shard_id: int, start: int, arrays: tuple, marker: DoneMarker, claim: Claim) -> None:
        self.wait()
        self.thread = threading.Thread(target=self._write, args=(shard_id, start, arrays, marker, claim),
                                       name=f"write-shard-{shard_id}", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        """Block until the shard in flight is written; raise its error, if any."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def open_pack(run: Run, shard_id: int, entries: list[Entry], log=print) -> PackReader | None:
    """The shard's packed tar (`shard --pack`) when there is one. A damaged one (a truncated copy,
    a full disk) is said, and the images it lacks are read from the original files instead."""
    packed = pack_path(run.root, shard_id)
    if not packed.exists():
        return None
    try:
        pack = PackReader(packed)
    except (tarfile.TarError, OSError) as e:
        log(f"shard {shard_id:05d}: {packed} is damaged ({e}); reading the original files instead "
            f"(delete it and run `shard --pack` again to rewrite it)")
        return None
    missing = sum(e.key not in pack for e in entries)
    if missing:
        log(f"shard {shard_id:05d}: {packed} is damaged (truncated?): it lacks {missing} of the shard's "
            f"{len(entries)} images, which are read from the original files instead")
    return pack


class ShardJob:
    """A claimed shard whose images are being decoded ahead by its DataLoader's workers."""

    def __init__(self, run: Run, shard_id: int, claim: Claim, opts: ExtractOptions, batch_size: int,
                 device: torch.device, log=print):
        self.shard_id, self.claim, self.max_pixels = shard_id, claim, opts.max_pixels
        self.entries = run.shard_entries(shard_id)
        info = run.info()
        self.start = info.shard_start(shard_id)
        sources = read_index(run.root) if any(split_address(e.path) for e in self.entries) else {}
        images = ShardImages(self.entries, opts.size, opts.max_pixels, list(info.roots) or None,
                             gpu_jpeg=opts.gpu_jpeg(device), perturbation=opts.perturb,
                             pack=open_pack(run, shard_id, self.entries, log), geometry=opts.geometry,
                             draft=opts.size if opts.fast_decode else 0,
                             device_resize=opts.resize_on_device(device),
                             parquet=RowGroupReader(sources) if sources else None)
        if sources:  # parquet rows: each worker reads whole row groups
            units = read_units([e.path for e in self.entries], sources, batch_size)
            workers = min(opts.num_workers(device), len(units))
            dataset, kwargs = RowGroupBatches(images, units, batch_size), {"batch_size": None,
                                                                          "collate_fn": _as_is}
        else:
            workers = min(opts.num_workers(device), -(-len(self.entries) // batch_size))
            dataset, kwargs = images, {"batch_size": batch_size, "shuffle": False, "collate_fn": _collate}
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
