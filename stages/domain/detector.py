"""The detector: torchvision ResNet50 with one logit, its checkpoints, and `Detector`, the one
place that turns stored features into its inputs and its outputs into probabilities (device,
channels_last, input scaling, autocast, sigmoid) for training, validation, eval and detect.

Checkpoints are `{"model": state_dict, ...}` as the reference code saves them; ours add the feature
config they were trained on. Loading never unpickles code (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models import resnet50

from storage.cache_folder import FeatureCache
from storage.checkpoint_file import read_state_dict
from storage.errors import UserError
from storage.feature_dataset import CacheDataset, CacheIndex
from storage.locations import as_path


class CheckpointError(UserError, RuntimeError):
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


class LinearProbe(nn.Module):
    """UnivFD's classifier: one linear layer on a feature vector (a (D, 1, 1) cache row)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


HEADS = ("resnet50", "linear")


def build_detector(head: str, row_shape: tuple[int, int, int], init_weights: Path | None = None,
                   seed: int | None = None) -> nn.Module:
    """The named head for cache rows of this shape: ResNet50 on maps, a linear probe on vectors."""
    if head == "resnet50":
        return build_resnet50(init_weights, seed, in_channels=row_shape[0])
    if head == "linear":
        if seed is not None:
            torch.manual_seed(seed)
        return LinearProbe(int(np.prod(row_shape)))
    raise CheckpointError(f"--head {head!r}: one of {', '.join(HEADS)}")


def classifier_input(dnf: torch.Tensor) -> torch.Tensor:
    """Stored DNF to the network's input: uint8 / 255 (reference encoding), float16 eps as float."""
    if dnf.dtype == torch.uint8:
        return dnf.float().div_(255.0)
    return dnf.float()


def random_flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flip the samples whose mask entry is True horizontally."""
    mask = mask.to(x.device)
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def load_checkpoint(path: Path | str) -> tuple[nn.Module, dict]:
    """The detector of a checkpoint (ours or the reference's) and its metadata (may be empty)."""
    path = as_path(path)
    state, meta = read_state_dict(path, CheckpointError)
    if set(state) == {"weight", "bias"}:  # UnivFD's released fc_weights.pth: nn.Linear(768, 1)
        state = {f"fc.{k}": v for k, v in state.items()}
    if set(state) == {"fc.weight", "fc.bias"} and state["fc.weight"].ndim == 2:
        probe = LinearProbe(state["fc.weight"].shape[1])
        probe.load_state_dict(state)
        return probe.eval(), meta
    conv1 = state.get("conv1.weight")
    model = build_resnet50(in_channels=conv1.shape[1] if conv1 is not None and conv1.ndim == 4 else 3)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: not a ResNet50 detector with fc 2048 -> 1 "
                              f"({str(e).splitlines()[0]})") from e
    return model.eval(), meta


class Detector:
    """A detector network on a device: stored features in, logits or probabilities out.

    On CUDA the network and its inputs are channels_last and, with `amp`, the training forward pass
    (`logits`) runs in bf16 autocast; scoring (`scores`) and everything elsewhere is fp32, as the
    reference. `meta` is the checkpoint's metadata (the
    feature config it was trained on; empty for reference checkpoints)."""

    def __init__(self, model: nn.Module, device: torch.device, amp: bool = False, meta: dict | None = None):
        self.device, self.amp, self.meta = device, amp, meta or {}
        self.model = model.to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_checkpoint(cls, path: Path | str, device: torch.device, amp: bool = False) -> Detector:
        """A detector checkpoint (ours or the reference's), in eval mode."""
        model, meta = load_checkpoint(path)
        return cls(model, device, amp, meta)

    def inputs(self, dnf: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """A batch of stored features as the network's input, on its device (optionally flipped)."""
        x = classifier_input(dnf.to(self.device, non_blocking=True))
        if flip is not None:
            x = random_flip(x, flip)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.amp and self.device.type == "cuda")

    def logits(self, x: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        """One float32 logit per sample of an input batch; `net` is the model as wrapped for
        training (e.g. DistributedDataParallel), by default the model itself."""
        with self.autocast():
            return (net or self.model)(x).float().squeeze(1)

    @torch.inference_mode()
    def scores(self, dnf: torch.Tensor) -> torch.Tensor:
        """The logits (float32, the network's own output) for a batch of stored features, on the CPU.
        Always in fp32, never under `amp`'s autocast: train's validation, eval and detect score
        alike (a threshold chosen on bf16 logits would be applied to fp32 ones)."""
        self.model.eval()
        return self.model(self.inputs(dnf)).float().squeeze(1).cpu()

    def probabilities(self, dnf: torch.Tensor) -> torch.Tensor:
        """P(generated) for a batch of stored features, on the CPU: float64 sigmoid of the logits
        (a float32 sigmoid is exactly 1.0 beyond logit ~16.6)."""
        return torch.sigmoid(self.scores(dnf).double())


def head_of(model: nn.Module) -> tuple[str, int]:
    """The head of a detector and the input it takes: ("linear", vector length) or ("resnet50",
    input channels)."""
    if isinstance(model, LinearProbe):
        return "linear", int(model.fc.in_features)
    return "resnet50", int(model.conv1.in_channels)


def predict_logits(detector: Detector, cache: FeatureCache, index: CacheIndex, batch_size: int,
                   workers: int) -> np.ndarray:
    """The detector's logits for every row of a cache index, in order, as float64 (exactly the
    float32 values the network gave)."""
    loader = DataLoader(CacheDataset(cache, index), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=detector.device.type == "cuda")
    out = [detector.scores(x).numpy() for x, _ in loader]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0, dtype=np.float64)


def predict(detector: Detector, cache: FeatureCache, index: CacheIndex, batch_size: int,
            workers: int) -> np.ndarray:
    """Probabilities of being generated for every row of a cache index, in order (float64 sigmoid
    of `predict_logits`; metrics should take the logits themselves)."""
    from scipy.special import expit

    return expit(predict_logits(detector, cache, index, batch_size, workers))
