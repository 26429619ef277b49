"""UnivFD (Ojha et al., CVPR 2023): the image embedding of a frozen CLIP vision tower (the
projection of its pooled output, as OpenAI's `encode_image` gives it), stored as float16 (D,)
per image (a (D, 1, 1) row of the cache) for a linear probe (`train --head linear`).

Preprocessing as UnivFD's: the decoded image centre-cropped (`extract --geometry crop`, its test
time) or resized (`--geometry resize`) to the tower's `image_size` (224 for ViT-L/14), then CLIP's
mean/std normalisation of [0, 1] pixels. Any transformers `CLIPVisionModelWithProjection` folder,
or a hub id in the local Hugging Face cache (`openai/clip-vit-large-patch14` by default).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from stages.domain.feature_kinds.base import FeatureKind, FeatureModel
from stages.domain.noise_model import ModelError, resolve_model
from storage.errors import OptionError

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def clip_fingerprint(folder: Path) -> str:
    """sha256 over the vision config (no `_` fields) and the weight bytes."""
    config = json.loads((folder / "config.json").read_text())
    h = hashlib.sha256(json.dumps({k: v for k, v in config.items() if not k.startswith("_")},
                                  sort_keys=True).encode())
    for name in WEIGHTS:
        if (folder / name).exists():
            with open(folder / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            break
    return h.hexdigest()


class ClipEmbedder:
    """A CLIP vision tower with projection on a device: [-1, 1] batches in, (B, D, 1, 1) out."""

    def __init__(self, net, device: torch.device, fingerprint: str, path: str, precision: str):
        self.net = net.to(device).eval()
        self.device, self.fingerprint, self.path, self.precision = device, fingerprint, path, precision
        self.image_size = int(net.config.image_size)
        self.dim = int(net.config.projection_dim)
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast_dtype = dtype

    def check_size(self, size: int) -> None:
        if size != self.image_size:
            raise OptionError(f"--size {size}: this CLIP tower ({self.path}) takes {self.image_size} x "
                              f"{self.image_size} (UnivFD: --size {self.image_size} --geometry crop)")

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, timestep: int = 0) -> torch.Tensor:
        pixels = ((x.float() + 1) / 2 - self.mean) / self.std
        with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            emb = self.net(pixel_values=pixels).image_embeds
        return emb.float()[:, :, None, None]

    def features(self, x: torch.Tensor, feature) -> torch.Tensor:
        return self.predict(x)


class ClipKind(FeatureKind):
    name = "clip"
    heads = ("linear",)
    default_encoding = "raw"
    bare_checkpoint_note = ("UnivFD linear probe: no feature config recorded; assumes this CLIP tower's "
                            "embeddings")

    def load(self, model: Path | str | None, device: torch.device, precision: str = "fp32",
             compile: bool = False, download: bool = False) -> FeatureModel:
        from transformers import CLIPVisionModelWithProjection

        folder = resolve_model(model or DEFAULT_MODEL, download)
        if not (Path(folder) / "config.json").exists():
            raise ModelError(f"{folder}: no CLIP vision model there (config.json and weights)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            net = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # transformers raises many kinds; the user needs the folder and the cause
            raise ModelError(f"{folder}: could not load a CLIPVisionModelWithProjection "
                             f"({type(e).__name__}: {e})") from e
        return ClipEmbedder(net, device, clip_fingerprint(Path(folder)), str(Path(folder).resolve()),
                            precision)

    def check(self, feature) -> None:
        if feature.encoding != "raw" or feature.inversion_steps != 1 or feature.timestep != 0:
            raise OptionError("--feature clip stores float16 embeddings (--encoding raw); --timestep and "
                              "--inversion-steps are for diffusion features")

    def row_shape(self, feature, model: FeatureModel) -> tuple[int, int, int]:
        return model.dim, 1, 1

    def encode(self, x: torch.Tensor, encoding: str, inplace: bool = False) -> torch.Tensor:
        return x.to(torch.float16)


def make_test_clip(out: Path | str, image_size: int = 32, dim: int = 16, seed: int = 0) -> Path:
    """Write a tiny randomly initialised CLIP vision tower with projection (tests, benchmarks)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, image_size=image_size, patch_size=8, projection_dim=dim)
    CLIPVisionModelWithProjection(config).save_pretrained(out)
    return Path(out)
