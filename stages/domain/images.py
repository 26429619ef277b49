"""Image decoding and the reference preprocessing: RGB, bicubic antialiased resize, [-1, 1].

Decoding follows the reference (torchvision `read_image`): grey becomes three channels, alpha is
dropped, EXIF orientation is ignored. Formats torchvision cannot read fall back to Pillow. JPEGs
go through simplejpeg and 8-bit RGB / RGBA PNGs through pyspng first: the same libjpeg-turbo and
the same pixels (tested), 1.3-1.5x faster (`make bench-decoders`); anything they refuse goes the
torchvision way. `draft` (`extract --fast-decode`) decodes a JPEG at the smallest DCT scale
(1/2, 1/4, 1/8 only, as Pillow's `draft`) that keeps both sides at least that many pixels: other
pixels, opt-in.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from stages.domain.image_limits import DEFAULT_MAX_PIXELS
from storage.errors import UserError


class DecodeError(UserError, ValueError):
    """An image that cannot be decoded; the message is the reject reason."""


def _pillow_rgb(data: bytes) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def dct_scale(width: int, height: int, draft: int) -> int:
    """The DCT downscale `--fast-decode` uses for a JPEG: the largest of 8, 4, 2 with both sides
    >= k * draft, else 1 (a full decode; also when draft is 0). Pillow's `draft` chooses the same."""
    for k in (8, 4, 2):
        if draft > 0 and width >= k * draft and height >= k * draft:
            return k
    return 1


def _fast_decode(data: bytes, draft: int = 0) -> torch.Tensor | None:
    """(3, H, W) uint8 (HWC memory) from simplejpeg or pyspng, None where they do not apply or
    refuse the file (CMYK JPEGs, grey or 16-bit or palette PNGs, damaged files)."""
    try:
        if data[:3] == b"\xff\xd8\xff":
            import simplejpeg

            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace not in ("YCbCr", "Gray"):  # CMYK, YCCK: libjpeg's way
                return None
            k = dct_scale(width, height, draft)
            # min sizes of exactly ceil(side / k) with min_factor k leave libjpeg one choice, 1/k:
            # left free it picks any M/8 (7/8, 3/4, ...), slower than a full decode and other pixels
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // k),
                                         min_width=-(-width // k), min_factor=k)
        elif data[:8] == PNG_MAGIC and data[12:16] == b"IHDR" and data[24] == 8 and data[25] in (2, 6):
            import pyspng

            arr = pyspng.load(data)[..., :3]
        else:
            return None
    except (ValueError, RuntimeError, ImportError):
        return None
    return torch.from_numpy(arr).permute(2, 0, 1)


def check_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Read the header only and refuse decompression bombs before decoding (DecodeError with the
    reason); True when the file holds several frames (animated GIF / WebP / PNG, multi-page TIFF)."""
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            frames = bool(getattr(im, "is_animated", False))
    except UnidentifiedImageError as e:
        raise DecodeError("not an image: no image format recognised") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"unreadable image header: {e}") from e
    if w * h > max_pixels:
        raise DecodeError(f"too large: {w}x{h} pixels > {max_pixels}")
    return frames


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int = 0) -> torch.Tensor:
    """Bytes to a uint8 (3, H, W) tensor; DecodeError with the reason when that is not possible.
    A file of several frames gives its first, decoded alone: torchvision decodes every frame of a
    GIF (a 240 KB file took 2.8 GB), so those go to Pillow, which stops after the first. `draft`:
    a JPEG decoded at a reduced DCT scale that keeps both sides >= draft (0: full size)."""
    if check_header(data, max_pixels):
        try:
            return _pillow_rgb(data)
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise DecodeError(f"truncated or corrupt image: {e}") from e
    fast = _fast_decode(data, draft)
    if fast is not None:
        return fast
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        try:
            img = _pillow_rgb(data)
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise DecodeError(f"truncated or corrupt image: {e}") from e
    if img.ndim == 4:  # a format whose frames the header did not count: the first one
        img = img[0]
    if img.dtype == torch.uint16:  # 16-bit PNG: scale to the 8-bit range the model expects
        img = (img.to(torch.int32) // 257).to(torch.uint8)
    if img.shape[0] != 3:
        img = img[:3] if img.shape[0] > 3 else img[:1].expand(3, -1, -1)
    return img  # any memory layout (libjpeg's is HWC): preprocess converts it in one pass


def resized(img: torch.Tensor, size: int) -> torch.Tensor:
    """The first half of `preprocess`: uint8 (3, H, W) as it is when already size x size, else
    float32 (3, size, size) from a bicubic antialiased resize of the float image (no clamping)."""
    if img.shape[-2:] == (size, size):
        return img
    return F.interpolate(img.contiguous().float().unsqueeze(0), size=(size, size), mode="bicubic",
                         align_corners=False, antialias=True)[0]


def resized_batch(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """`preprocess` of many images at once, where they are (on a GPU: `extract` hands uint8 pixels
    over and resizes there): uint8 or float (3, H, W) in, float32 (N, 3, size, size) in [-1, 1]
    out; images of one size share one interpolate call, with the same ops as `preprocess`."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=images[0].device)
    groups: dict[tuple, list[int]] = {}
    for k, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(k)
    for shape, ks in groups.items():
        x = torch.stack([images[k] for k in ks]).float()
        if shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        out[ks] = x
    return normalize_(out)


def normalize_(x: torch.Tensor) -> torch.Tensor:
    """The second half: float pixel values to [-1, 1] in place, (x / 255) * 2 - 1 (the same float
    ops as the reference, so the same values, for one image or a whole batch)."""
    return x.div_(255.0).mul_(2.0).sub_(1.0)


def center_crop(img: torch.Tensor) -> torch.Tensor:
    """The largest centred square of a (3, H, W) image (DIRE's preprocessing before the resize)."""
    h, w = img.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return img[..., top:top + s, left:left + s]


def native_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size window at native resolution (`--geometry crop`): pixels as decoded,
    uint8, rows from (H - size) // 2 and columns from (W - size) // 2. An image with a side under
    `size` is first upscaled (bicubic, aspect kept) so that its shorter side is `size`; it then comes
    back as float."""
    h, w = img.shape[-2:]
    if min(h, w) < size:
        scale = size / min(h, w)
        shape = (max(size, round(h * scale)), max(size, round(w * scale)))
        img = F.interpolate(img.contiguous().float().unsqueeze(0), size=shape, mode="bicubic",
                            align_corners=False)[0]
        h, w = shape
    top, left = (h - size) // 2, (w - size) // 2
    return img[..., top:top + size, left:left + size]


GEOMETRIES = ("resize", "crop-resize", "crop")


def apply_geometry(img: torch.Tensor, geometry: str, size: int) -> torch.Tensor:
    """resize (the reference: the whole image to size x size), crop-resize (the largest centred
    square, then resized: DIRE's) or crop (the central window at native resolution)."""
    if geometry == "crop":
        return native_crop(img, size)
    return resized(center_crop(img) if geometry == "crop-resize" else img, size)


def preprocess(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) to float32 (3, size, size) in [-1, 1], as the reference computes it:
    float -> bicubic antialiased resize (no clamping) -> x / 255 * 2 - 1."""
    x = resized(img, size)
    return normalize_(x.float() if x.dtype == torch.uint8 else x)
