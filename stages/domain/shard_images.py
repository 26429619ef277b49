"""A manifest shard's images as `extract`'s DataLoader sees them: read through their input
sources (`stages.domain.sources.RunReader`), decoded and preprocessed in loader workers, collated
into batches; and the batch's last steps on the device (nvJPEG decoding, the resize)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from stages.domain.image_limits import DEFAULT_MAX_PIXELS
from stages.domain.images import (
    DecodeError,
    apply_geometry,
    center_crop,
    check_header,
    decode_rgb,
    normalize_,
    resized_batch,
)
from stages.domain.perturb import applies_to, perturb
from stages.domain.sources import ReadContext, ReadError, RunReader
from storage.run import Entry


class UnitBatches(IterableDataset):
    """A shard whose images lie in store units read whole (parquet row groups), as batches: each
    loader worker reads whole units (`RunReader.units`), so every unit is read once per shard, and
    yields their `batch_size` chunks collated (the indices tell the rows)."""

    def __init__(self, images: ShardImages, units: list[list[int]], batch_size: int):
        self.images, self.units, self.batch_size = images, units, batch_size

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        mine = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in mine:
            for k in range(0, len(unit), self.batch_size):
                yield collate([self.images[i] for i in unit[k:k + self.batch_size]])


def as_is(batch: tuple) -> tuple:
    """A batch collated already (by `UnitBatches`), as it is."""
    return batch


class ShardImages(Dataset):
    """The images of one manifest shard, preprocessed; a failure gives its reason, not an error.
    Bytes come through `reader` (each entry's input source, the shard's packed tar first)."""

    def __init__(self, entries: list[Entry], size: int, max_pixels: int, roots: list[str] | None,
                 gpu_jpeg: bool = False, perturbation: str = "", geometry: str = "resize", draft: int = 0,
                 device_resize: bool = False, reader: RunReader | None = None):
        self.entries, self.size, self.max_pixels = entries, size, max_pixels
        self.reader = reader or RunReader(ReadContext(roots=tuple(roots) if roots is not None else None))
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
        """A batch: its bytes read first, a batch per source where the store rewards it (objects
        on object storage fetched concurrently, their latency overlapped), then each decoded as
        `__getitem__` does."""
        got = self.reader.read_many([self.entries[i] for i in indices])
        return [self.item(i, data) for i, data in zip(indices, got, strict=True)]

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        return self.item(i)

    def item(self, i: int, data: bytes | ReadError | None = None,
             ) -> tuple[int, torch.Tensor | None, str | None]:
        """(index, tensor, None), or (index, raw JPEG bytes, "jpeg") for the GPU decoder, or
        (index, None, reason) when the image cannot be used. `data`: its checked bytes (or why
        they could not be read) when they were read already."""
        try:
            entry = self.entries[i]
            if isinstance(data, ReadError):
                raise data
            if data is None:
                data = self.reader.read(entry)
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
            return i, apply_geometry(img, self.geometry, self.size).float(), None  # normalised in collate
        except (DecodeError, ReadError) as e:
            return i, None, str(e)


def collate(items: list) -> tuple[list[int], torch.Tensor | list[torch.Tensor], list[tuple[int, str]]]:
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


