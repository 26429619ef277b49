"""The noise-feature model: a diffusers UNet2DModel loaded from a local folder, offline.

`NoiseModel.predict(x, t)` is the DNF before encoding: the UNet's noise prediction eps for images
`x` in [-1, 1] at timestep `t` (the reference uses t = 0, the first DDIM inversion step).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from pipeline.device import PRECISIONS
from storage.errors import UserError

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name


class ModelError(UserError, RuntimeError):
    """A model folder that cannot be used; the message names the folder and what is missing."""


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved as huggingface_hub does (read now, not at import)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_model(model: Path | str, download: bool = False) -> Path:
    """A local model folder as given; a hub id (`google/ddpm-bedroom-256`) from the local Hugging
    Face cache, offline; with `download`, fetched into that cache first (network needed)."""
    path = Path(model)
    if path.exists() or not HUB_ID.match(str(model)):
        return path
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(str(model), cache_dir=cache, local_files_only=not download,
                                      allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"]))
    except Exception as e:  # not cached (LocalEntryNotFoundError), or the download failed
        how = "" if download else (f"; on a machine with a network, `huggingface-cli download {model}` "
                                   f"(or rerun with --download) puts it there")
        raise ModelError(f"{model}: no such folder, and not in the Hugging Face cache {cache} "
                         f"(searched models--{str(model).replace('/', '--')}/snapshots/ there; "
                         f"HF_HUB_CACHE or HF_HOME move it){how} ({type(e).__name__})") from e


def unet_folder(path: Path | str) -> Path:
    """The folder holding the UNet's config.json: `path` itself or a pipeline folder's `unet/`."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no such model folder (a diffusers UNet2DModel or pipeline folder; "
                         f"`dnf-pipeline make-test-model --out DIR` writes a tiny one)")
    for candidate in (path, path / "unet"):
        if (candidate / "config.json").exists() and any((candidate / w).exists() for w in WEIGHT_NAMES):
            return candidate
    raise ModelError(f"{path}: holds no diffusers UNet (config.json and {WEIGHT_NAMES[0]}, "
                     f"in the folder or in unet/)")


def model_fingerprint(path: Path | str) -> str:
    """sha256 over the UNet's architecture config and its weight bytes; names the model in a cache."""
    folder = unet_folder(path)
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}  # drop version, origin
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in WEIGHT_NAMES:
        weights = folder / name
        if weights.exists():
            with open(weights, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
            break
    return h.hexdigest()


class NoiseModel:
    """A UNet2DModel on a device, in inference mode, predicting eps."""

    def __init__(self, unet: torch.nn.Module, device: torch.device, fingerprint: str, path: str,
                 precision: str = "fp32", channels_last: bool = True, compile: bool = False):
        self.unet = unet.to(device).eval().requires_grad_(False)
        self.channels_last = channels_last
        if channels_last:  # faster convolutions on CPU (oneDNN) and on tensor cores
            self.unet = self.unet.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.unet) if compile else self.unet
        self.precision = precision
        self.autocast_dtype = PRECISIONS[precision]
        self.device = device
        self.fingerprint = fingerprint
        self.path = path
        self._alphas: torch.Tensor | None = None
        self._betas64: np.ndarray | None = None
        config = dict(unet.config)
        self.levels = len(config.get("block_out_channels") or config.get("channel_mult") or (0,))

    def check_size(self, size: int) -> None:
        """The UNet halves the image (levels - 1) times: refuse sizes it cannot take."""
        step = 2 ** max(self.levels - 1, 0)
        if size % step:
            raise ModelError(f"--size {size} is not a multiple of {step}, which this UNet "
                             f"({self.levels} levels, {self.path}) needs")

    def alphas_cumprod(self) -> torch.Tensor:
        """alpha-bar_t of the model's training schedule (scheduler/ beside the UNet, or DDPM's
        linear 1e-4..0.02 over 1000 steps when the folder has none)."""
        if self._alphas is None:
            from diffusers import DDPMScheduler

            folder = Path(self.path)
            sched_dir = folder / "scheduler"
            if not sched_dir.is_dir():
                sched_dir = folder.parent / "scheduler"
            if (sched_dir / "scheduler_config.json").exists():
                scheduler = DDPMScheduler.from_pretrained(sched_dir, local_files_only=True)
            else:
                scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
            self._alphas = scheduler.alphas_cumprod.to(torch.float64)
            self._betas64 = betas_float64(dict(scheduler.config))
        return self._alphas

    def ddim_coefficients(self, count: int) -> tuple[list[int], dict[str, list[torch.Tensor]]]:
        """The timesteps of guided-diffusion's `ddim{count}` respacing and, per step, the
        coefficients it uses, built as it builds them: float64 betas, the respaced betas
        1 - a_t / a_prev, their cumulative product, then each coefficient cast to float32."""
        self.alphas_cumprod()
        base = np.cumprod(1.0 - self._betas64)
        steps = respaced_timesteps(len(base), count)
        new_betas, last = [], 1.0
        for t in steps:
            new_betas.append(1 - base[t] / last)
            last = base[t]
        ac = np.cumprod(1.0 - np.asarray(new_betas))
        arrays = {"recip": np.sqrt(1.0 / ac), "recipm1": np.sqrt(1.0 / ac - 1),
                  "next": np.append(ac[1:], 0.0), "prev": np.append(1.0, ac[:-1])}
        return steps, {k: [torch.tensor(v, dtype=torch.float32) for v in a] for k, a in arrays.items()}

    @torch.inference_mode()
    def features(self, x: torch.Tensor, feature) -> torch.Tensor:
        """The feature before encoding for a FeatureConfig: eps at the timestep (the reference DNF),
        the kept noise estimates of a DDIM inversion (stacked on the channels or averaged), or DIRE."""
        if feature.kind == "dire":
            return self.dire(x, feature.ddim_steps)
        if feature.inversion_steps == 1:
            return self.predict(x, feature.timestep)
        ac = self.alphas_cumprod()
        seq = [int(v) for v in np.linspace(0, len(ac), feature.ddim_steps + 1)]
        kept, xt = [], x
        for i in range(feature.inversion_steps):
            eps = self.predict(xt, seq[i])
            if i in feature.keep:
                kept.append(eps)
            if i + 1 < feature.inversion_steps:
                a, a_next = ac[seq[i]].item(), ac[min(seq[i + 1], len(ac) - 1)].item()
                x0 = (xt - (1 - a) ** 0.5 * eps) / a ** 0.5
                xt = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
        return torch.cat(kept, dim=1) if feature.combine == "stack" else torch.stack(kept).mean(0)

    def _eps_and_x0(self, xt: torch.Tensor, t: int, recip: torch.Tensor,
                    recipm1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """guided-diffusion's p_mean_variance with clip_denoised, then _predict_eps_from_xstart:
        x0 from the predicted eps, clipped to [-1, 1], and the eps that clipped x0 implies."""
        eps = self.predict(xt, t)
        recip, recipm1 = recip.to(xt.device), recipm1.to(xt.device)
        x0 = (recip * xt - recipm1 * eps).clamp(-1, 1)
        return (recip * xt - x0) / recipm1, x0

    @torch.inference_mode()
    def dire(self, x: torch.Tensor, ddim_steps: int = 20) -> torch.Tensor:
        """DIRE (Wang et al. 2023): |x - reconstruction| after DDIM inversion from t = 0 to the end
        of guided-diffusion's `ddim{ddim_steps}` respacing and DDIM sampling back (eta 0, x0 clipped
        at every step), as guided-diffusion's ddim_reverse_sample and ddim_sample compute it."""
        steps, c = self.ddim_coefficients(ddim_steps)
        xt = x
        for i, t in enumerate(steps):  # inversion (ddim_reverse_sample): x_t -> x_{t+1}
            eps, x0 = self._eps_and_x0(xt, t, c["recip"][i], c["recipm1"][i])
            a = c["next"][i].to(x.device)
            xt = x0 * torch.sqrt(a) + torch.sqrt(1 - a) * eps
        for i in reversed(range(len(steps))):  # sampling back (ddim_sample, eta 0): x_t -> x_{t-1}
            eps, x0 = self._eps_and_x0(xt, steps[i], c["recip"][i], c["recipm1"][i])
            a = c["prev"][i].to(x.device)
            xt = x0 * torch.sqrt(a) + torch.sqrt(1 - a) * eps
        return (x - xt).abs()

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, timestep: int = 0) -> torch.Tensor:
        """eps = unet(x, t) in float32, first three channels (learned-sigma models give six)."""
        t = torch.full((x.shape[0],), timestep, device=x.device, dtype=torch.long)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            out = self.forward(x, t).sample
        return out[:, :3].float().contiguous()


def betas_float64(config: dict) -> np.ndarray:
    """The training betas in float64 as guided-diffusion computes them (linear, or the cosine
    schedule diffusers calls squaredcos_cap_v2), from a diffusers scheduler config."""
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("beta_schedule", "linear") == "squaredcos_cap_v2":
        def f(t):
            return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
        return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=np.float64)
    if config.get("beta_schedule", "linear") != "linear":
        raise ModelError(f"beta schedule {config.get('beta_schedule')!r}: DIRE needs linear or "
                         f"squaredcos_cap_v2")
    return np.linspace(float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)), n,
                       dtype=np.float64)


def respaced_timesteps(num_timesteps: int, count: int) -> list[int]:
    """guided-diffusion's `space_timesteps(T, "ddim{count}")`: the first stride whose range(0, T,
    stride) has `count` steps (ddim20 of 1000: 0, 50, ..., 950)."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return list(range(0, num_timesteps, stride))
    raise ValueError(f"cannot make {count} equally spaced steps out of {num_timesteps}")


def encode(eps: torch.Tensor, encoding: str, inplace: bool = False, kind: str = "dnf") -> torch.Tensor:
    """A feature to the stored form. DNF: `reference` is exactly torchvision's save_image
    quantisation (`eps * 255 + 0.5`, clamped to [0, 255], truncated to uint8). DIRE: `reference` is
    what DIRE's compute_dire.py saves, `dire * 255 / 2` clamped and truncated to uint8. `raw` is
    float16. `inplace` reuses the input's memory for the intermediate steps (it is then lost)."""
    if kind == "dire" and encoding == "reference":
        return (eps.mul_(255.0) if inplace else eps.mul(255.0)).div_(2.0).clamp_(0, 255).to(torch.uint8)
    if encoding == "reference":
        return (eps.mul_(255) if inplace else eps.mul(255)).add_(0.5).clamp_(0, 255).to(torch.uint8)
    if encoding == "raw":
        return eps.to(torch.float16)
    raise ValueError(f"unknown encoding {encoding!r}")


def load_noise_model(path: Path | str, device: torch.device, precision: str = "fp32",
                     channels_last: bool = True, compile: bool = False) -> NoiseModel:
    """Load a UNet2DModel (or a converted ADM UNet) from a local folder, never from the network."""
    from diffusers import UNet2DModel

    folder = unet_folder(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_class = UNet2DModel
    if json.loads((folder / "config.json").read_text()).get("_class_name") == "ADMUNet":
        from stages.domain.adm import ADMUNet

        model_class = ADMUNet
    try:
        unet = model_class.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as e:  # diffusers raises many kinds; the user needs the folder and the cause
        raise ModelError(f"{folder}: could not load a UNet2DModel ({type(e).__name__}: {e})") from e
    if unet.config.in_channels != 3 or unet.config.out_channels < 3:
        raise ModelError(f"{folder}: the UNet takes {unet.config.in_channels} and gives "
                         f"{unet.config.out_channels} channels; DNF needs an RGB pixel-space model")
    return NoiseModel(unet, device, model_fingerprint(folder), str(Path(path).resolve()),
                      precision, channels_last, compile)


def load_for_kind(model: Path | str | None, device: torch.device, precision: str = "fp32",
                  compile: bool = False, download: bool = False, kind: str = "dnf") -> NoiseModel:
    """The pixel-space UNet a diffusion feature kind (dnf, dire) runs: `--model` resolved offline."""
    if model is None:
        raise ModelError(f"--feature {kind} needs --model (a diffusers UNet or pipeline folder, or a hub id "
                         f"in the local cache)")
    return load_noise_model(resolve_model(model, download), device, precision, compile=compile)


def make_test_model(out: Path | str, size: int = 64, seed: int = 0) -> Path:
    """Write a tiny randomly initialised DDPM pipeline folder (UNet + linear-beta scheduler)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    # Attention only at 1/8 resolution, as the bedroom model has it at 1/16: cheap at 256x256 too.
    unet = UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32, 32, 64), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                              beta_schedule="linear")
    out = Path(out)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    return out
