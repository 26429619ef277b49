"""OpenAI guided-diffusion (ADM) UNets, e.g. `256x256_diffusion_uncond.pt` (used by DIRE), as a
diffusers model; `stages/convert_model.py` maps the original checkpoints onto it.

diffusers has no block with ADM's scale-shift ResBlocks that resample inside the block and its
legacy QKV attention order, so the network is a small module of our own that loads the original
keys unchanged. It is a diffusers ModelMixin, so a converted folder (config.json + safetensors)
loads like any other model; the output has 6 channels for learned-sigma models, of which the
first 3 are eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32, as ADM does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """ADM's sinusoidal embedding: cos first, frequencies exp(-log(P) * i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Resample(nn.Module):
    """Nearest 2x upsampling or 2x2 average-pool / strided-conv downsampling, optionally with a conv."""

    def __init__(self, channels: int, up: bool, use_conv: bool):
        super().__init__()
        self.up = up
        if use_conv and up:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        elif use_conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x) if hasattr(self, "conv") else x
        return self.op(x) if hasattr(self, "op") else F.avg_pool2d(x, 2, 2)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, scale_shift: bool,
                 up: bool = False, down: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if self.updown:
            self.h_upd = Resample(channels, up, use_conv=False)
            self.x_upd = Resample(channels, up, use_conv=False)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if scale_shift
                                                             else out_channels))
        self.out_layers = nn.Sequential(norm(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else \
            nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int, new_order: bool):
        super().__init__()
        self.num_heads, self.new_order = num_heads, new_order
        self.norm = norm(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length, heads = qkv.shape[-1], self.num_heads
        ch = c // heads
        if self.new_order:
            q, k, v = (t.reshape(b * heads, ch, length) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        h = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class Block(nn.ModuleList):
    """A sequence whose layers take the timestep embedding when they want it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


@dataclass
class ADMOutput:
    sample: torch.Tensor


class ADMUNet(ModelMixin, ConfigMixin):
    """guided-diffusion's UNetModel (unconditional), with its original parameter names."""

    @register_to_config
    def __init__(self, sample_size: int = 256, in_channels: int = 3, out_channels: int = 6,
                 model_channels: int = 256, channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4),
                 num_res_blocks: int = 2, attention_resolutions: tuple[int, ...] = (8, 16, 32),
                 num_head_channels: int = 64, num_heads: int = 4, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = True, resblock_updown: bool = True,
                 use_new_attention_order: bool = False):
        super().__init__()
        mc, ted = model_channels, model_channels * 4
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample

        def attention(ch: int, heads: int) -> AttentionBlock:
            n = heads if num_head_channels == -1 else ch // num_head_channels
            return AttentionBlock(ch, n, use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.input_blocks = nn.ModuleList([Block([nn.Conv2d(in_channels, mc, 3, padding=1)])])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, ted, mult * mc, use_scale_shift_norm)]
                ch = mult * mc
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(Block(layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                down = ResBlock(ch, ted, ch, use_scale_shift_norm, down=True) if resblock_updown \
                    else Resample(ch, up=False, use_conv=True)
                self.input_blocks.append(Block([down]))
                chans.append(ch)
                ds *= 2
        self.middle_block = Block([ResBlock(ch, ted, ch, use_scale_shift_norm), attention(ch, num_heads),
                                   ResBlock(ch, ted, ch, use_scale_shift_norm)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), ted, mc * mult, use_scale_shift_norm)]
                ch = mc * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, heads_up))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, ted, ch, use_scale_shift_norm, up=True) if resblock_updown
                                  else Resample(ch, up=True, use_conv=True))
                    ds //= 2
                self.output_blocks.append(Block(layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> ADMOutput:
        if not torch.is_tensor(timestep) or timestep.ndim == 0:
            timestep = torch.full((sample.shape[0],), float(timestep), device=sample.device)
        emb = self.time_embed(timestep_embedding(timestep, self.config.model_channels).to(sample.dtype))
        hs, h = [], sample
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return ADMOutput(self.out(h))
