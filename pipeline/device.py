"""Device choice: `auto` takes a GPU when one is present, else the CPU."""

from __future__ import annotations

import torch

from storage.errors import OptionError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` is fp32 everywhere: the reference's numbers. bf16 / fp16 are opt-in (faster, and
    DNF values move; the README gives by how much). fp32 on CUDA also turns TF32 off."""
    if name == "auto":
        name = "fp32"
    if name not in PRECISIONS:
        raise OptionError(f"--precision {name!r}: choose auto, fp32, bf16 or fp16")
    if name == "fp32" and device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return name


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps` to a torch.device; a clear error if it is absent."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {name}: no CUDA GPU is visible here; use --device auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"--device {name}: MPS is not available here; use --device auto or cpu")
    return device
