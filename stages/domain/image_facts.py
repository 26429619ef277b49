"""What an image file's header says, besides its pixels: container format, size, colour mode, EXIF,
and for JPEGs the quality (estimated from the quantisation tables) and chroma subsampling. `shard`
records these in the manifest so that `audit` can look for properties other than the generator that
separate real from fake without reopening a million files."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

# The JPEG standard's luminance table (Annex K), natural order, which libjpeg scales by quality.
LUMA_TABLE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.int64)
SUBSAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}
FACTS = ("format", "width", "height", "mode", "exif", "quality", "subsampling")


def _libjpeg_tables() -> np.ndarray:
    """The luminance table libjpeg writes for each quality 1..100 (row q - 1)."""
    q = np.arange(1, 101)
    scale = np.where(q < 50, 5000 // q, 200 - 2 * q)
    return np.clip((LUMA_TABLE[None, :] * scale[:, None] + 50) // 100, 1, 255)


_TABLES = _libjpeg_tables()


def jpeg_quality(luma: list[int] | np.ndarray) -> int:
    """The libjpeg quality (1..100) whose luminance table is nearest to `luma` (exact for files
    written by libjpeg, Pillow or OpenCV; the nearest equivalent for cameras' own tables)."""
    table = np.asarray(luma, dtype=np.int64).reshape(-1)[:64]
    return int(np.argmin(np.abs(_TABLES - table[None, :]).sum(1))) + 1


def header_facts(im: Image.Image) -> dict:
    """The facts of an opened image (nothing is decoded)."""
    facts = {"format": im.format or "unknown", "width": im.width, "height": im.height, "mode": im.mode,
             "exif": bool(im.info.get("exif")), "quality": None, "subsampling": None}
    if im.format == "JPEG" and getattr(im, "quantization", None):
        facts["quality"] = jpeg_quality(im.quantization[0])
        facts["subsampling"] = SUBSAMPLING.get(JpegImagePlugin.get_sampling(im), "other")
    return facts


def read_facts(data: bytes) -> dict | None:
    """The facts of an image file's bytes from its header, or None when it is no image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return header_facts(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return None
