"""DIRE (Wang et al. 2023), the paper's baseline: |x - reconstruction| after a DDIM inversion to
the end of the schedule and sampling back, with the same UNet as DNF."""

from __future__ import annotations

import torch

from stages.domain.feature_kinds.dnf import DnfKind
from stages.domain.noise_model import encode
from storage.errors import OptionError


class DireKind(DnfKind):
    name = "dire"

    def check(self, feature) -> None:
        if feature.inversion_steps != 1 or feature.timestep != 0:
            raise OptionError("--feature dire runs the whole DDIM inversion and reconstruction over "
                              "--ddim-steps; --inversion-steps, --keep and --timestep are for dnf")

    def channels(self, feature) -> int:
        return 3

    def encode(self, x: torch.Tensor, encoding: str, inplace: bool = False) -> torch.Tensor:
        return encode(x, encoding, inplace=inplace, kind="dire")
