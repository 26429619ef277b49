"""A small pixel-space DDPM for the demo, trained for a few CPU minutes on the training photos.

No pretrained diffusion weights can be downloaded here, so the demo trains its own noise predictor
(diffusers `UNet2DModel`, linear betas, 1000 steps, epsilon loss) on random crops of the train-split
photos, made by the same crop-and-resize as the demo's real images, and saves a DDPM pipeline folder
that `extract --model` loads like any other: the EMA of its weights, as the DDPM authors release
(`benchmarks/demo_noise_models.py` measures this and the other variants).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from demo.data import _seed, finish, open_photo, random_crop


@dataclass
class DDPMConfig:
    """The demo model's architecture and training budget; another config trains a new model."""

    size: int = 64
    steps: int = 240
    batch_size: int = 16
    lr: float = 5e-4
    channels: tuple[int, ...] = (32, 64, 128, 128)
    seed: int = 0
    crop: int = 0  # train on random crops of this side of the demo-size images (0: whole images)
    ema: float = 0.99  # save an exponential moving average of the weights with this decay (0: none)
    small_t: float = 0.0  # share of each batch with t below 100 (the DNF is read at t = 0)


def build_unet(cfg: DDPMConfig):
    """UNet2DModel with attention only at the lowest resolution (8x8 for 64x64 images)."""
    from diffusers import UNet2DModel

    levels = len(cfg.channels)
    return UNet2DModel(
        sample_size=cfg.size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=cfg.channels, norm_num_groups=8, attention_head_dim=16,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
    )


def training_batch(images: list[Image.Image], rng: np.random.Generator, cfg: DDPMConfig) -> torch.Tensor:
    """A batch of demo-size crops, made as the demo's real images are (`finish`), randomly
    flipped and, with `cfg.crop`, cut to that side; in [-1, 1]."""
    side = cfg.crop or cfg.size
    batch = []
    for _ in range(cfg.batch_size):
        img = finish(random_crop(images[int(rng.integers(len(images)))], rng, 2 * cfg.size), cfg.size)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x, y = (int(v) for v in rng.integers(0, cfg.size - side + 1, size=2))
        arr = np.asarray(img)[y:y + side, x:x + side]
        batch.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return torch.stack(batch).float() / 255 * 2 - 1


def train_ddpm(photos: list[Path], out: Path, cfg: DDPMConfig | None = None, log=print) -> dict:
    """Train the demo DDPM on crops of `photos` and save it as a pipeline folder at `out` (written
    beside it and renamed when complete); a folder trained with the same config and photos is kept."""
    from diffusers import DDPMPipeline, DDPMScheduler

    cfg = cfg or DDPMConfig()
    wanted = {"config": asdict(cfg), "photos": sorted(str(p) for p in photos)}
    info_path = out / "demo-model.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if {k: info.get(k) for k in wanted} == json.loads(json.dumps(wanted)):
            log(f"demo model: {out} is up to date (trained {info['steps_done']} steps, "
                f"final loss {info['final_loss']:.4f})")
            return info
        log(f"demo model: {out} was trained with other settings; training again")
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                              beta_schedule="linear")
    alphas = scheduler.alphas_cumprod
    images = [open_photo(p) for p in photos]
    rng = _seed("ddpm", cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(unet.parameters(), lr=cfg.lr)
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"demo model: training a {n_params / 1e6:.1f} M-parameter DDPM UNet at {cfg.size}x{cfg.size} on "
        f"{len(photos)} photos, {cfg.steps} steps of {cfg.batch_size}")
    unet.train()
    losses, t0 = [], time.perf_counter()
    ema = [p.detach().clone() for p in unet.parameters()] if cfg.ema else []
    n_small = round(cfg.small_t * cfg.batch_size)
    for step in range(cfg.steps):
        x0 = training_batch(images, rng, cfg)
        t = torch.cat([torch.randint(0, 100, (n_small,), generator=gen),
                       torch.randint(0, 1000, (cfg.batch_size - n_small,), generator=gen)])
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(xt, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1 - cfg.ema)
        losses.append(loss.item())
        if (step + 1) % 40 == 0 or step + 1 == cfg.steps:
            log(f"demo model: step {step + 1}/{cfg.steps}, loss {np.mean(losses[-40:]):.4f}, "
                f"{time.perf_counter() - t0:.0f} s")
    seconds = time.perf_counter() - t0
    if ema:
        with torch.no_grad():
            for p, avg in zip(unet.parameters(), ema, strict=True):
                p.copy_(avg)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    quarter = max(1, len(losses) // 4)
    info = {**wanted, "steps_done": cfg.steps, "first_loss": float(np.mean(losses[:quarter])),
            "final_loss": float(np.mean(losses[-quarter:])), "seconds": round(seconds, 1),
            "parameters": n_params, "losses": [round(v, 5) for v in losses]}
    (tmp / "demo-model.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info
