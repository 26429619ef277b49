"""Latent DNF: DNF's idea with a latent diffusion model (the LaRE2 / FIND line of follow-ups). The
image's VAE latent mean times the scaling factor, z, goes once through the Stable Diffusion UNet at
`--timestep` (default 0) with the empty prompt's text embedding (computed once per run); the
predicted noise, (4, S/8, S/8), is the feature, stored as float16 (`raw`, the default).

The model is a diffusers Stable Diffusion pipeline folder (`vae/`, `unet/`, `text_encoder/`,
`tokenizer/`) or a hub id from the local Hugging Face cache, read offline.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from pipeline.device import PRECISIONS
from stages.domain.feature_kinds.base import FeatureKind, FeatureModel
from stages.domain.noise_model import ModelError, resolve_model
from storage.errors import OptionError

PARTS = ("unet", "vae", "text_encoder")
WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
           "pytorch_model.bin")


def pipeline_fingerprint(folder: Path) -> str:
    """sha256 over the configs (no `_` fields) and weight bytes of the UNet, VAE and text encoder."""
    h = hashlib.sha256()
    for part in PARTS:
        config = json.loads((folder / part / "config.json").read_text())
        own = {k: v for k, v in config.items() if not k.startswith("_")}
        h.update(json.dumps(own, sort_keys=True).encode())
        for name in WEIGHTS:
            if (folder / part / name).exists():
                with open(folder / part / name, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        h.update(block)
                break
    return h.hexdigest()


class LatentNoise:
    """VAE, UNet and the empty prompt's embedding on a device: [-1, 1] batches in, eps of z out."""

    def __init__(self, vae, unet, empty: torch.Tensor, device: torch.device, fingerprint: str, path: str,
                 precision: str):
        self.vae, self.unet = vae.to(device).eval(), unet.to(device).eval()
        self.empty = empty.to(device)
        self.device, self.fingerprint, self.path, self.precision = device, fingerprint, path, precision
        self.autocast_dtype = PRECISIONS[precision]
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(unet.config.out_channels)

    def check_size(self, size: int) -> None:
        step = self.factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if size % step:
            raise OptionError(f"--size {size} is not a multiple of {step}, which this pipeline's VAE and "
                              f"UNet ({self.path}) need")

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, timestep: int = 0) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            z = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
            t = torch.full((x.shape[0],), timestep, device=x.device, dtype=torch.long)
            cond = self.empty.expand(x.shape[0], -1, -1)
            eps = self.unet(z, t, encoder_hidden_states=cond).sample
        return eps.float().contiguous()

    def features(self, x: torch.Tensor, feature) -> torch.Tensor:
        return self.predict(x, feature.timestep)


def empty_prompt_embedding(folder: Path) -> torch.Tensor:
    """The text encoder's last hidden state for "" padded to the tokenizer's length, (1, L, D)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.inference_mode():
        return encoder(ids)[0].float()


class LatentDnfKind(FeatureKind):
    name = "latent-dnf"
    default_encoding = "raw"

    def load(self, model: Path | str | None, device: torch.device, precision: str = "fp32",
             compile: bool = False, download: bool = False) -> FeatureModel:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        if model is None:
            raise OptionError("--feature latent-dnf needs --model (a Stable Diffusion pipeline folder or a "
                              "hub id)")
        folder = Path(resolve_model(model, download))
        missing = [p for p in (*PARTS, "tokenizer") if not (folder / p).is_dir()]
        if missing:
            raise ModelError(f"{folder}: not a Stable Diffusion pipeline folder (no {', '.join(missing)}/)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
            unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
            empty = empty_prompt_embedding(folder)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{folder}: could not load the pipeline ({type(e).__name__}: {e})") from e
        return LatentNoise(vae, unet, empty, device, pipeline_fingerprint(folder), str(folder.resolve()),
                           precision)

    def check(self, feature) -> None:
        if feature.inversion_steps != 1:
            raise OptionError("--feature latent-dnf is one UNet pass; --inversion-steps is for dnf")

    def row_shape(self, feature, model: FeatureModel) -> tuple[int, int, int]:
        side = feature.size // model.factor
        return model.latent_channels, side, side

    def encode(self, x: torch.Tensor, encoding: str, inplace: bool = False) -> torch.Tensor:
        if encoding != "raw":
            raise OptionError("--feature latent-dnf stores float16 noise (--encoding raw)")
        return x.to(torch.float16)


def make_test_pipeline(out: Path | str, seed: int = 0) -> Path:
    """Write a tiny random Stable-Diffusion-shaped pipeline folder (tests, benchmarks): a VAE that
    downsamples 8x, a conditional UNet, a CLIP text encoder and a tokenizer of a few tokens."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out)
    torch.manual_seed(seed)
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                  sample_size=32).save_pretrained(out / "vae")
    UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                         layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                         attention_head_dim=4, norm_num_groups=8).save_pretrained(out / "unet")
    CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                                 eos_token_id=1, pad_token_id=1)).save_pretrained(out / "text_encoder")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{f"{c}</w>": 2 + i for i, c in enumerate("abcdef")}}
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16).save_pretrained(out / "tokenizer")
    return out
