"""The detector: torchvision ResNet50 with one logit, its input transform, and its checkpoints.

Checkpoints are `{"model": state_dict, ...}` as the reference code saves them; ours add the feature
config they were trained on. Loading never unpickles code (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet50

from storage.checkpoint_file import read_state_dict


class CheckpointError(RuntimeError):
    """A file that is not a usable detector checkpoint; the message names it and says why."""


def build_resnet50(init_weights: Path | None = None, seed: int | None = None,
                   in_channels: int = 3) -> nn.Module:
    """ResNet50 with `fc` 2048 -> 1; random init as the reference (fc weights from N(0, 0.02)),
    or ImageNet weights from a local file when `init_weights` is given (never downloaded).
    Stacked inversion features have more than 3 channels: conv1 then takes them (random init)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = resnet50(weights=None)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if init_weights is not None:
        state, _ = read_state_dict(Path(init_weights), CheckpointError)
        state = {k: v for k, v in state.items()
                 if not k.startswith("fc.") and not (in_channels != 3 and k == "conv1.weight")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"fc.weight", "fc.bias", "conv1.weight"}:
            raise CheckpointError(f"{init_weights}: not ResNet50 weights (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
    model.fc = nn.Linear(2048, 1)
    nn.init.normal_(model.fc.weight.data, 0.0, 0.02)
    return model


def classifier_input(dnf: torch.Tensor) -> torch.Tensor:
    """Stored DNF to the network's input: uint8 / 255 (reference encoding), float16 eps as float."""
    if dnf.dtype == torch.uint8:
        return dnf.float().div_(255.0)
    return dnf.float()


def load_checkpoint(path: Path | str) -> tuple[nn.Module, dict]:
    """The detector of a checkpoint (ours or the reference's) and its metadata (may be empty)."""
    path = Path(path)
    state, meta = read_state_dict(path, CheckpointError)
    conv1 = state.get("conv1.weight")
    model = build_resnet50(in_channels=conv1.shape[1] if conv1 is not None and conv1.ndim == 4 else 3)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: not a ResNet50 detector with fc 2048 -> 1 "
                              f"({str(e).splitlines()[0]})") from e
    return model.eval(), meta
