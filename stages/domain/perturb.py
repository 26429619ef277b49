"""Perturbations applied to an image's pixels before preprocessing, as robustness studies do
(images on the web are recompressed, blurred, rescaled): `jpeg:Q`, `blur:SIGMA`, `resize:SCALE`.
A spec may be restricted to one class, `jpeg:96@fake` or `jpeg:96@real`: the bias-aligned protocols
of the field (JPEG Q96 on the fakes only, so that both classes are JPEGs); the other class's images
are left as they are. Each is deterministic, so a perturbed cache is reproducible byte for byte."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageFilter

from storage.errors import OptionError

KINDS = {"jpeg": (1, 100), "blur": (0.0, 50.0), "resize": (0.01, 8.0)}


def parse_perturbations(text: str) -> list[str]:
    """`jpeg:75,blur:1.0,jpeg:96@fake` -> canonical specs; a clear error for anything else."""
    specs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        part, _, only = part.partition("@")
        if only not in ("", "real", "fake"):
            raise OptionError(f"--perturb {part}@{only}: a perturbation applies to all images, @real or "
                              f"@fake")
        kind, _, value = part.partition(":")
        if kind not in KINDS or not value:
            raise OptionError(f"--perturb {part!r}: expected jpeg:QUALITY, blur:SIGMA or resize:SCALE")
        low, high = KINDS[kind]
        try:
            number = int(value) if kind == "jpeg" else float(value)
        except ValueError:
            raise OptionError(f"--perturb {part!r}: {value!r} is not a number") from None
        if not low <= number <= high or (kind != "jpeg" and number <= 0):
            raise OptionError(f"--perturb {part!r}: {kind} takes values in ({low}, {high}]")
        spec = f"{kind}:{number:g}" if kind != "jpeg" else f"jpeg:{number}"
        specs.append(f"{spec}@{only}" if only else spec)
    return specs


def applies_to(spec: str, label: int) -> bool:
    """Whether a spec perturbs an image of this label (0 real, 1 fake)."""
    _, _, only = spec.partition("@")
    return not only or only == ("fake" if label == 1 else "real")


def perturb(img: torch.Tensor, spec: str) -> torch.Tensor:
    """Apply one spec to a uint8 (3, H, W) image; returns uint8 (3, H', W') (the class restriction
    is the caller's: `applies_to`)."""
    kind, _, value = spec.partition("@")[0].partition(":")
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    if kind == "jpeg":
        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=int(value))
        pil = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    elif kind == "blur":
        pil = pil.filter(ImageFilter.GaussianBlur(radius=float(value)))
    elif kind == "resize":
        w, h = pil.size
        pil = pil.resize((max(1, round(w * float(value))), max(1, round(h * float(value)))),
                         Image.Resampling.BICUBIC)
    else:
        raise ValueError(f"unknown perturbation {spec!r}")
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()
