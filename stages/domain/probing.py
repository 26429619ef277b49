"""What `shard` learns of an image by reading it: its key (sha256 of the bytes), size and header
facts after a full decode, or the reason it is refused. Runs in `shard`'s worker processes, so it
imports no torch."""

from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image, UnidentifiedImageError

from stages.domain.image_facts import header_facts
from stages.domain.image_limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from storage.locations import read_many
from storage.locations.base import TooLarge

OBJECTS_AT_ONCE = 64  # objects fetched concurrently by one probe task: latency overlapped, memory bounded


def probe_file(path: str, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Read, hash and fully decode one file or object: `{"key", "size", "facts"}` or `{"reason"}`."""
    return probe_files([path], max_pixels, max_bytes)[0]


def probe_files(paths: list[str], max_pixels: int, max_bytes: int) -> list[dict]:
    """`probe_file` of each path, read in groups the way its location reads several
    (`Location.read_many`: objects fetched concurrently, files one by one, a file over
    `max_bytes` never read)."""
    out = []
    for k in range(0, len(paths), OBJECTS_AT_ONCE):
        part = paths[k:k + OBJECTS_AT_ONCE]
        got = read_many(part, max_bytes)
        out += [probe_read(got[p], max_pixels, max_bytes) for p in part]
    return out


def probe_read(got: bytes | OSError, max_pixels: int, max_bytes: int) -> dict:
    """`probe_file` of what reading a file or object gave: its bytes, or the error."""
    if isinstance(got, IsADirectoryError):
        return {"reason": "is a folder, not an image file"}
    if isinstance(got, TooLarge):
        return {"reason": f"too large: {got.size} bytes > --max-bytes {max_bytes}"}
    if isinstance(got, FileNotFoundError):
        return {"reason": f"missing: {got.strerror or 'no such object'}"}
    if isinstance(got, OSError):
        return {"reason": f"unreadable: {got.strerror or got}"}
    if not got:
        return {"reason": "empty file (0 bytes)"}
    return probe_bytes(got, max_pixels, max_bytes)


def probe_bytes(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Hash and fully decode an image's bytes (a file's, a parquet cell's, an archive member's)."""
    if not data:
        return {"reason": "empty image bytes (0 bytes or null)"}
    if len(data) > max_bytes:
        return {"reason": f"too large: {len(data)} bytes > --max-bytes {max_bytes}"}
    key = hashlib.sha256(data).hexdigest()
    reason, facts = check_image_bytes(data, max_pixels)
    if reason:
        return {"reason": reason, "key": key}
    return {"key": key, "size": len(data), "facts": facts}


def check_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str | None, dict]:
    """(None, the header's facts) when `data` decodes completely as an image within the pixel
    limit, else (the reason, {})."""
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, checked before any pixel is decoded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    return f"too large: {w}x{h} pixels > --max-pixels {max_pixels}", {}
                if w < 1 or h < 1:
                    return f"empty image: {w}x{h} pixels", {}
                facts = header_facts(im)
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # fast, still reads all data
                im.load()
    except UnidentifiedImageError:
        return "not an image: no image format recognised", {}
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return f"truncated or corrupt image: {e}", {}
    return None, facts
