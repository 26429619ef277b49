"""The faster decoders (simplejpeg, pyspng) give the same pixels as torchvision's decoder (the
reference's) on every kind of file, and refuse what is damaged; the reduced-scale JPEG decode of
`--fast-decode` picks the largest DCT reduction that keeps both sides at the target size."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from stages.domain.images import DecodeError, decode_rgb


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(xx * (3 + c) + yy * 2) for c in range(3)], -1)
    return np.clip((base * 0.4 + 0.5) * 255 + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def saved(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def cases() -> dict[str, bytes]:
    rgb = Image.fromarray(photo(61, 83))
    return {
        "jpeg 4:2:0": saved(rgb, "JPEG", quality=90),
        "jpeg 4:4:4": saved(rgb, "JPEG", quality=95, subsampling=0),
        "jpeg progressive": saved(rgb, "JPEG", quality=80, progressive=True),
        "jpeg grey": saved(rgb.convert("L"), "JPEG"),
        "jpeg cmyk": saved(rgb.convert("CMYK"), "JPEG"),
        "png rgb": saved(rgb, "PNG"),
        "png rgba": saved(rgb.convert("RGBA"), "PNG"),
        "png grey": saved(rgb.convert("L"), "PNG"),
        "png grey+alpha": saved(rgb.convert("LA"), "PNG"),
        "png palette": saved(rgb.convert("P"), "PNG"),
        "png 16-bit": saved(Image.fromarray(photo(20, 30)[..., 0].astype(np.uint16) * 257), "PNG"),
    }


@pytest.mark.parametrize("name", list(cases()))
def test_same_pixels_as_torchvision(name):
    data = cases()[name]
    got = decode_rgb(data)
    try:
        want = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:  # torchvision cannot read it: Pillow's RGB is the reference then
        rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()
        want = torch.from_numpy(rgb).permute(2, 0, 1)
    if want.dtype == torch.uint16:
        want = (want.to(torch.int32) // 257).to(torch.uint8)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert torch.equal(got.contiguous(), want.contiguous())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_damaged_files_are_refused(fmt):
    data = saved(Image.fromarray(photo(64, 64)), fmt)
    with pytest.raises(DecodeError):
        decode_rgb(data[: len(data) // 2])


def test_fast_decode_takes_the_largest_dct_reduction_that_keeps_the_size():
    data = saved(Image.fromarray(photo(600, 1000)), "JPEG", quality=90)
    assert tuple(decode_rgb(data, draft=256).shape) == (3, 300, 500)  # 1/2: 1/4 would give 150 rows
    assert tuple(decode_rgb(data, draft=150).shape) == (3, 150, 250)  # 1/4
    assert tuple(decode_rgb(data, draft=40).shape) == (3, 75, 125)  # 1/8 at most
    assert tuple(decode_rgb(data, draft=0).shape) == (3, 600, 1000)
    with Image.open(io.BytesIO(data)) as im:  # Pillow's own DCT-domain draft: the same scale and pixels
        im.draft("RGB", (256, 256))
        pil = np.asarray(im.convert("RGB"))
    assert np.array_equal(decode_rgb(data, draft=256).permute(1, 2, 0).numpy(), pil)
    png = saved(Image.fromarray(photo(600, 1000)), "PNG")
    assert tuple(decode_rgb(png, draft=256).shape) == (3, 600, 1000)  # PNGs have no reduced decode


def test_fast_decode_is_recorded_and_changes_only_jpeg_features(tmp_path, tiny_model):
    from conftest import write

    from stages.extract import ExtractOptions, run_extract
    from stages.shard import run_shard
    from storage.caches import find_cache

    for i in range(4):
        arr = Image.fromarray(photo(300 + 10 * i, 400, seed=i))
        write(tmp_path / f"data/train/x/{i % 2}_{'fake' if i % 2 else 'real'}/{i}.jpg", saved(arr, "JPEG"))
        write(tmp_path / f"data/train/x/{i % 2}_{'fake' if i % 2 else 'real'}/{i}.png", saved(arr, "PNG"))
    run = tmp_path / "run"
    run_shard([tmp_path / "data"], run, shard_size=8)
    ids, rows = {}, {}
    for fast in (False, True):
        opts = ExtractOptions(model=tiny_model, size=32, batch_size=8, workers=0, device="cpu",
                              fast_decode=fast)
        out = run_extract(run, opts)
        ids[fast] = out["feature_id"]
        cache = find_cache(run / "cache", out["feature_id"])
        _, _, _, keys = cache.index_arrays()
        rows[fast] = dict(zip(map(str, keys), cache.read_rows(0, len(keys))[0], strict=True))
        assert cache.config().feature.fast_decode is fast
    assert ids[False] != ids[True]
    from storage.run import Run

    for e in Run(run).entries():
        same = np.array_equal(rows[False][e.key], rows[True][e.key])
        assert same == e.path.endswith(".png")  # PNGs decode as before; JPEGs from the 1/8 scale differ


@pytest.mark.parametrize("h, w", [(300, 300), (380, 400), (260, 511), (511, 511), (512, 520), (257, 1000),
                                  (1100, 700), (33, 40)])
def test_fast_decode_scales_by_powers_of_two_only_as_pillows_draft_does(h, w):
    """Sides between S and 2S decode whole (libjpeg's 7/8, 3/4, 5/8 scales are never taken), larger
    ones at 1/2, 1/4 or 1/8: the same shape and pixels as Pillow's DCT-domain draft, which uses only
    those scales (JPEG's own power-of-two IDCT reductions)."""
    data = saved(Image.fromarray(photo(h, w)), "JPEG", quality=90)
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (256, 256))
        pil = np.asarray(im.convert("RGB"))
    got = decode_rgb(data, draft=256).permute(1, 2, 0).numpy()
    assert got.shape == pil.shape
    assert np.array_equal(got, pil)


def test_fast_decode_caches_of_the_older_scales_keep_their_own_id():
    """Caches made when --fast-decode took any M/8 scale hold other pixels: a new extract must not
    resume into them, so the recorded value (and the id) changed; the old config still reads."""
    from storage.cache_config import FeatureConfig

    new = FeatureConfig("f" * 64, fast_decode=True)
    old_json = {**new.to_json(), "fast_decode": True}
    assert new.to_json()["fast_decode"] != True  # noqa: E712
    assert FeatureConfig.from_json(old_json).fast_decode is True
    assert FeatureConfig.from_json(new.to_json()) == new
    legacy_id = __import__("hashlib").sha256(__import__("json").dumps(old_json, sort_keys=True)
                                             .encode()).hexdigest()[:16]
    assert new.feature_id != legacy_id
    plain = FeatureConfig("f" * 64)
    assert FeatureConfig.from_json(plain.to_json()).feature_id == plain.feature_id
