"""Image decoding and the reference preprocessing: RGB, bicubic antialiased resize, [-1, 1].

Decoding follows the reference (torchvision `read_image`): grey becomes three channels, alpha is
dropped, EXIF orientation is ignored. Formats torchvision cannot read fall back to Pillow.
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


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Bytes to a uint8 (3, H, W) tensor; DecodeError with the reason when that is not possible."""
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as im:  # header only: refuse bombs before decoding
            w, h = im.size
    except UnidentifiedImageError as e:
        raise DecodeError("not an image: no image format recognised") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"unreadable image header: {e}") from e
    if w * h > max_pixels:
        raise DecodeError(f"too large: {w}x{h} pixels > {max_pixels}")
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        try:
            img = _pillow_rgb(data)
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise DecodeError(f"truncated or corrupt image: {e}") from e
    if img.ndim == 4:  # animated GIF / WebP: the first frame
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


def preprocess(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) to float32 (3, size, size) in [-1, 1], as the reference computes it:
    float -> bicubic antialiased resize (no clamping) -> x / 255 * 2 - 1."""
    x = resized(img, size)
    return normalize_(x.float() if x.dtype == torch.uint8 else x)
