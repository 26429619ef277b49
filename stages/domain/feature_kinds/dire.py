"""DIRE (Wang et al. 2023), the paper's baseline: |x - reconstruction| after a DDIM inversion to
the end of the schedule and sampling back, with the same UNet as DNF."""

from __future__ import annotations

from pathlib import Path

import torch

from stages.domain.feature_kinds.base import FeatureKind, FeatureModel
from stages.domain.noise_model import encode, load_for_kind
from storage.errors import OptionError


class DireKind(FeatureKind):
    name = "dire"

    def load(self, model: Path | str | None, device: torch.device, precision: str = "fp32",
             compile: bool = False, download: bool = False) -> FeatureModel:
        return load_for_kind(model, device, precision, compile, download, self.name)

    def check(self, feature) -> None:
        if feature.inversion_steps != 1 or feature.timestep != 0:
            raise OptionError("--feature dire runs the whole DDIM inversion and reconstruction over "
                              "--ddim-steps; --inversion-steps, --keep and --timestep are for dnf")

    def encode(self, x: torch.Tensor, encoding: str, inplace: bool = False) -> torch.Tensor:
        return encode(x, encoding, inplace=inplace, kind="dire")
