"""DNF (Zhang & Xu 2023): the noise a pixel-space diffusion UNet predicts at t = 0 (or the kept
estimates of a short DDIM inversion), stored as save_image stores it."""

from __future__ import annotations

from pathlib import Path

import torch

from stages.domain.feature_kinds.base import FeatureKind, FeatureModel
from stages.domain.noise_model import encode, load_for_kind


class DnfKind(FeatureKind):
    name = "dnf"

    def load(self, model: Path | str | None, device: torch.device, precision: str = "fp32",
             compile: bool = False, download: bool = False) -> FeatureModel:
        return load_for_kind(model, device, precision, compile, download, self.name)

    def channels(self, feature) -> int:
        return 3 * len(feature.keep) if feature.combine == "stack" else 3

    def encode(self, x: torch.Tensor, encoding: str, inplace: bool = False) -> torch.Tensor:
        return encode(x, encoding, inplace=inplace, kind="dnf")
