"""The interface of a feature kind: what `extract` computes per image and `detect` recomputes.

A kind says which model it needs and loads it offline (`load`, returning a `FeatureModel`), checks
the config fields that apply to it, names its stored channels, and turns a preprocessed batch
(B, 3, S, S in [-1, 1]) into the stored arrays (`FeatureModel.features`, then `encode`). Adding a
kind is one file in this package and one line in its registry (`__init__.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol

import torch


class FeatureModel(Protocol):
    """What extract needs of a loaded kind: its device and precision, the fingerprint that names
    its weights in the feature id, the size check, and the features of a preprocessed batch."""

    device: torch.device
    precision: str
    fingerprint: str
    path: str

    def check_size(self, size: int) -> None: ...

    def predict(self, x: torch.Tensor, timestep: int = 0) -> torch.Tensor: ...

    def features(self, x: torch.Tensor, feature) -> torch.Tensor: ...


class FeatureKind(ABC):
    """One kind of cached feature (DNF, DIRE, NPR, ...)."""

    name: str
    needs_model: bool = True  # False: computed from the pixels alone (`--model` is not needed)
    heads: tuple[str, ...] = ("resnet50",)  # the detector heads that fit its arrays, the default first
    default_encoding: str = "reference"
    # what a checkpoint without a recorded feature config was trained on: the reference encoding of
    # this kind (DNF's released detectors), or, for a probe on embeddings, this kind's vectors
    bare_checkpoint_note: str = ""

    @abstractmethod
    def load(self, model: Path | str | None, device: torch.device, precision: str = "fp32",
             compile: bool = False, download: bool = False) -> FeatureModel:
        """The kind's model, read offline (a hub id from the local cache unless `download`)."""

    def check(self, feature) -> None:  # noqa: B027 (most kinds take every field as it is)
        """Raise OptionError for config fields this kind cannot honour."""

    def channels(self, feature) -> int:
        """Channels of one stored map (C, S, S)."""
        return 3

    def row_shape(self, feature, model: FeatureModel) -> tuple[int, int, int]:
        """The shape of one stored row: (C, S, S) maps, (D, 1, 1) for a vector."""
        return self.channels(feature), feature.size, feature.size

    @abstractmethod
    def encode(self, x: torch.Tensor, encoding: str, inplace: bool = False) -> torch.Tensor:
        """The stored form: `reference` (the kind's uint8) or `raw` (float16)."""
