"""NPR (Tan et al., CVPR 2024): neighbouring-pixel relationships that up-sampling leaves, x minus
the nearest-neighbour up-sampling of its 2x nearest down-sampling, on the same decoded and resized
image as DNF in [-1, 1]. No model: this is NPR's feature under this project's ResNet50, not NPR's
own network.

`reference` encoding: uint8 q = floor(npr * 63.75 + 128) clamped, i.e. [-2, 2] onto [0, 255] with
round-half-up (npr = (q - 127.5) / 63.75 back, within 1/127.5: one grey level of the [-1, 1]
image); `raw`: float16."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from stages.domain.feature_kinds.base import FeatureKind, FeatureModel
from storage.errors import OptionError

SCALE = 63.75  # 255 / 4: the range [-2, 2] of a difference of two [-1, 1] images


def npr(x: torch.Tensor) -> torch.Tensor:
    """x - up(down(x)), nearest both ways (for even sides: each pixel minus the top-left pixel of
    its 2x2 block)."""
    down = F.interpolate(x, scale_factor=0.5, mode="nearest", recompute_scale_factor=True)
    return x - F.interpolate(down, scale_factor=2.0, mode="nearest", recompute_scale_factor=True)


class NprComputer:
    """NPR needs no weights: the 'model' is the expression, run where the batch is."""

    fingerprint = "none"  # the feature id names no weights
    precision = "fp32"
    path = ""

    def __init__(self, device: torch.device):
        self.device = device

    def check_size(self, size: int) -> None:
        if size % 2:
            raise OptionError(f"--size {size}: NPR halves the image, the size must be even")

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, timestep: int = 0) -> torch.Tensor:
        return npr(x.float())

    def features(self, x: torch.Tensor, feature) -> torch.Tensor:
        return self.predict(x)


class NprKind(FeatureKind):
    name = "npr"
    needs_model = False

    def load(self, model: Path | str | None, device: torch.device, precision: str = "fp32",
             compile: bool = False, download: bool = False) -> FeatureModel:
        return NprComputer(device)

    def check(self, feature) -> None:
        if feature.inversion_steps != 1 or feature.timestep != 0 or feature.precision != "fp32":
            raise OptionError("--feature npr has no diffusion model: --inversion-steps, --keep, "
                              "--timestep and --precision do not apply")

    def encode(self, x: torch.Tensor, encoding: str, inplace: bool = False) -> torch.Tensor:
        if encoding == "reference":
            return (x.mul_(SCALE) if inplace else x.mul(SCALE)).add_(128.0).clamp_(0, 255).to(torch.uint8)
        if encoding == "raw":
            return x.to(torch.float16)
        raise OptionError(f"unknown encoding {encoding!r}")
