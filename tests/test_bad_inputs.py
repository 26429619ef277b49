"""A corpus of awkward and broken inputs: each is processed or rejected with a specific reason,
no stage crashes, and the counts add up (inputs = cached + rejected + duplicates)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from conftest import image_bytes, write
from PIL import Image

from stages.extract import ExtractOptions, run_extract
from stages.shard import run_shard
from storage.run import Run
from storage.zarr_cache import ZarrCache

RNG = np.random.default_rng(0)


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb(h: int = 30, w: int = 40) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header that declares a huge image, followed by almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def corpus(root: Path) -> dict[str, str]:
    """Write the corpus under root/train/set/0_real/; return file name -> expected outcome
    ("ok", "duplicate", or the start of the reject reason)."""
    d = root / "train" / "set" / "0_real"
    jpeg = encoded(rgb(60, 80), "JPEG", quality=90)
    png = encoded(rgb(), "PNG")
    frames = [rgb(20, 20) for _ in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    files = {
        "zero.jpg": (b"", "empty file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated or corrupt"),
        "truncated.png": (png[: len(png) // 2], "truncated or corrupt"),
        "text.jpg": (b"just some text, not a JPEG\n" * 10, "not an image"),
        "page.png": (b"<!doctype html><html><body>hello</body></html>", "not an image"),
        "cmyk.jpg": (encoded(rgb().convert("CMYK"), "JPEG"), "ok"),
        "deep16.png": (encoded(Image.fromarray(RNG.integers(0, 65535, (30, 40)).astype(np.uint16)), "PNG"),
                       "ok"),
        "palette_trns.png": (encoded(rgb().convert("P"), "PNG", transparency=0), "ok"),
        "grey_alpha.png": (encoded(rgb().convert("LA"), "PNG"), "ok"),
        "animated.gif": (gif.getvalue(), "ok"),
        "photo.webp": (encoded(rgb(), "WEBP"), "ok"),
        "bomb.png": (png_bomb(100_000, 100_000), "too large"),
        "one_pixel.png": (encoded(rgb(1, 1), "PNG"), "ok"),
        "large.jpg": (encoded(rgb(3000, 4000), "JPEG", quality=80), "ok"),
        "name with spaces.png": (image_bytes(11), "ok"),
        "x.jpg/inside.png": (image_bytes(12), "ok"),  # a folder named like an image is walked
        "locked.png": (image_bytes(13), "ok" if os.geteuid() == 0 else "unreadable"),
    }
    for name, (data, _) in files.items():
        write(d / name, data)
    os.chmod(d / "locked.png", 0)
    raw_name = os.fsencode(str(d)) + b"/caf\xe9-latin1.png"  # not valid UTF-8
    with open(raw_name, "wb") as f:
        f.write(image_bytes(14))
    outside = write(root.parent / "outside" / "target.png", image_bytes(15))
    os.symlink(outside, d / "link_outside.png")
    os.symlink(d / "cmyk.jpg", d / "link_inside.jpg")  # same bytes as cmyk.jpg: a duplicate
    os.symlink(d / "loop_b.png", d / "loop_a.png")
    os.symlink(d / "loop_a.png", d / "loop_b.png")
    expected = {name.split("/")[-1]: outcome for name, (_, outcome) in files.items()}
    expected.update({os.fsdecode(b"caf\xe9-latin1.png"): "ok", "link_outside.png": "ok",
                     "loop_a.png": "unreadable", "loop_b.png": "unreadable"})
    expected["cmyk.jpg|link_inside.jpg"] = "duplicate"
    return expected


def test_bad_input_corpus(tmp_path, tiny_model):
    data = tmp_path / "data"
    expected = corpus(data)
    summary = run_shard([data], tmp_path / "run", shard_size=8)
    run = Run(tmp_path / "run")
    got = {Path(r["path"]).name: r["reason"] for r in run.rejects()}
    for name, outcome in expected.items():
        if outcome not in ("ok", "duplicate"):
            assert got.get(name, "").startswith(outcome), (name, got.get(name))
    taken = {Path(e.path).name for e in run.entries()}
    dups = run.duplicates()
    assert len(dups) == 1 and {Path(dups[0]["path"]).name, Path(dups[0]["kept"]).name} == \
        {"cmyk.jpg", "link_inside.jpg"}
    ok = {n for n, o in expected.items() if o == "ok"}
    assert ok - {"cmyk.jpg"} <= taken
    assert summary["files"] == len(run.entries()) + len(run.rejects()) + len(dups)

    result = run_extract(tmp_path / "run", ExtractOptions(model=tiny_model, size=32, workers=0,
                                                          device="cpu"))
    assert result["images"] == len(run.entries()) and result["rejected"] == 0
    cache = ZarrCache(result["cache"])
    dnf = cache.open_read()["dnf"][:]
    assert dnf.shape[0] == len(run.entries()) and (dnf.reshape(len(dnf), -1).max(1) > 0).all()
