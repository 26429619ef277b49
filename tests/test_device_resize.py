"""Loader workers hand uint8 pixels over and the resize runs where the model runs
(`--resize-on device`, the default on CUDA): the stored bytes equal those of the worker resize
(within one uint8 step), with 0 or 2 workers, for every geometry and mixed sizes; a redone shard is
byte-identical; and a batch mixing JPEG bytes, pixels and worker-resized images is normalised."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import image_bytes, make_dataset, write

from stages.domain.images import decode_rgb, preprocess
from stages.extract import ExtractOptions, gpu_batch, run_extract
from stages.shard import run_shard
from storage.caches import load_cache


@pytest.mark.parametrize("geometry", ["resize", "crop-resize"])
def test_device_resize_stores_the_worker_resize_bytes(tmp_path, tiny_model, geometry):
    data = make_dataset(tmp_path / "data", per_class=5, splits=("train",), size=(48, 40))
    for i in range(3):  # some already at the target size, and repeated sizes
        write(data / f"train/progan/0_real/sq{i}.png", image_bytes(900 + i, (32, 32)))
    run = tmp_path / "run"
    run_shard([data], run, shard_size=8)
    got = {}
    for name, resize_on, workers in (("workers", "workers", 0), ("device0", "device", 0),
                                     ("device2", "device", 2)):
        opts = ExtractOptions(model=tiny_model, size=32, batch_size=4, workers=workers, device="cpu",
                              geometry=geometry, resize_on=resize_on,
                              cache_dir=tmp_path / f"cache-{name}")
        run_extract(run, opts)
        got[name] = _rows_at(tmp_path / f"cache-{name}")
    assert len(got["workers"]) == 13
    for k, want in got["workers"].items():
        assert np.abs(got["device0"][k].astype(int) - want).max() <= 1
        assert np.array_equal(got["device0"][k], got["device2"][k])
    # a redone shard gets the same bytes
    opts = ExtractOptions(model=tiny_model, size=32, batch_size=4, workers=0, device="cpu",
                          geometry=geometry, resize_on="device", cache_dir=tmp_path / "cache-device0",
                          redo=(0,))
    run_extract(run, opts)
    again = _rows_at(tmp_path / "cache-device0")
    assert all(np.array_equal(again[k], got["device0"][k]) for k in again)


def _rows_at(root) -> dict:
    cache = load_cache(root)
    labels, _, _, keys = cache.index_arrays()
    data = cache.read_rows(0, len(keys))[0]
    return {str(k): data[i] for i, k in enumerate(keys) if labels[i] >= 0}


def test_a_mixed_batch_is_preprocessed_as_preprocess_does():
    """JPEG bytes (the GPU decoder's input; decoded by the CPU fallback here when nvJPEG is
    absent), uint8 pixels of two sizes and a loader-resized float image in one list."""
    jpeg = image_bytes(1, (50, 40), fmt="JPEG")
    png_a, png_b = image_bytes(2, (50, 40)), image_bytes(3, (32, 32))
    loader_resized = torch.nn.functional.interpolate(decode_rgb(png_a).float()[None], size=(32, 32),
                                                     mode="bicubic", align_corners=False, antialias=True)[0]
    items = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), decode_rgb(png_a).permute(1, 2, 0),
             decode_rgb(png_b).permute(1, 2, 0), loader_resized]  # pixels are handed over as (H, W, 3)
    if not torch.cuda.is_available():
        items = items[1:]
    batch, kept, failed = gpu_batch(items, 32, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert failed == [] and kept == list(range(len(items)))
    want = [preprocess(decode_rgb(b), 32) for b in ([jpeg] if torch.cuda.is_available() else [])
            + [png_a, png_b, png_a]]
    for got, ref in zip(batch.cpu(), want, strict=True):
        assert torch.allclose(got, ref, atol=1e-5)
