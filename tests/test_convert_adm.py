"""`convert-model` for OpenAI guided-diffusion (ADM) checkpoints.

A tiny ADM state dict is made here in the original key layout, and ADM's forward pass is written
again as plain tensor operations on that state dict; the converted model must give the same eps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from conftest import RandomWeights, make_dataset

from stages.convert_model import convert_model
from stages.domain.noise_model import ModelError, load_noise_model
from stages.extract import ExtractOptions, run_extract
from stages.shard import run_shard

MC, MULT, R, ATTN_DS, HEAD_CH = 32, (1, 2), 1, (2,), 16


def make_adm_state(updown: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    sd = RandomWeights(seed)
    conv, lin, gn = sd.conv, sd.linear, sd.norm

    def res(name, cin, cout):
        gn(f"{name}.in_layers.0", cin)
        conv(f"{name}.in_layers.2", cin, cout, 3)
        lin(f"{name}.emb_layers.1", 4 * MC, 2 * cout)
        gn(f"{name}.out_layers.0", cout)
        conv(f"{name}.out_layers.3", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.skip_connection", cin, cout, 1)

    def attn(name, c):
        gn(f"{name}.norm", c)
        conv(f"{name}.qkv", c, 3 * c, 1, dims=1)
        conv(f"{name}.proj_out", c, c, 1, dims=1)

    lin("time_embed.0", MC, 4 * MC)
    lin("time_embed.2", 4 * MC, 4 * MC)
    conv("input_blocks.0.0", 3, MC, 3)
    chans, ch, ds, n = [MC], MC, 1, 1
    for level, mult in enumerate(MULT):
        for _ in range(R):
            res(f"input_blocks.{n}.0", ch, mult * MC)
            ch = mult * MC
            if ds in ATTN_DS:
                attn(f"input_blocks.{n}.1", ch)
            chans.append(ch)
            n += 1
        if level != len(MULT) - 1:
            if updown:
                res(f"input_blocks.{n}.0", ch, ch)
            else:
                conv(f"input_blocks.{n}.0.op", ch, ch, 3)
            chans.append(ch)
            n, ds = n + 1, ds * 2
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    n = 0
    for level, mult in list(enumerate(MULT))[::-1]:
        for i in range(R + 1):
            res(f"output_blocks.{n}.0", ch + chans.pop(), MC * mult)
            ch = MC * mult
            k = 1
            if ds in ATTN_DS:
                attn(f"output_blocks.{n}.1", ch)
                k = 2
            if level and i == R:
                if updown:
                    res(f"output_blocks.{n}.{k}", ch, ch)
                else:
                    conv(f"output_blocks.{n}.{k}.conv", ch, ch, 3)
                ds //= 2
            n += 1
    gn("out.0", ch)
    conv("out.2", ch, 6, 3)
    return dict(sd)


def adm_reference(sd, x, t, updown=True):
    """ADM's forward pass (learned sigma: 6 channels) on the original state dict."""
    def gn(h, name):
        return F.group_norm(h.float(), 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)

    def conv(h, name, **kw):
        w = sd[f"{name}.weight"]
        f = F.conv2d if w.ndim == 4 else F.conv1d
        return f(h, w, sd[f"{name}.bias"], **kw)

    def res(h, emb, name, resample=None):
        a = F.silu(gn(h, f"{name}.in_layers.0"))
        if resample == "down":
            a, h = F.avg_pool2d(a, 2), F.avg_pool2d(h, 2)
        elif resample == "up":
            a, h = F.interpolate(a, scale_factor=2, mode="nearest"), F.interpolate(h, scale_factor=2,
                                                                                  mode="nearest")
        a = conv(a, f"{name}.in_layers.2", padding=1)
        e = F.linear(F.silu(emb), sd[f"{name}.emb_layers.1.weight"], sd[f"{name}.emb_layers.1.bias"])
        scale, shift = e[:, :, None, None].chunk(2, dim=1)
        a = gn(a, f"{name}.out_layers.0") * (1 + scale) + shift
        a = conv(F.silu(a), f"{name}.out_layers.3", padding=1)
        skip = conv(h, f"{name}.skip_connection") if f"{name}.skip_connection.weight" in sd else h
        return skip + a

    def attn(h, name):
        b, c, hh, ww = h.shape
        flat = h.reshape(b, c, hh * ww)
        qkv = conv(gn(flat, f"{name}.norm"), f"{name}.qkv")
        heads = c // HEAD_CH
        q, k, v = qkv.reshape(b * heads, 3 * HEAD_CH, hh * ww).split(HEAD_CH, dim=1)  # legacy order
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(HEAD_CH), dim=-1)
        out = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh * ww)
        return (flat + conv(out, f"{name}.proj_out")).reshape(b, c, hh, ww)

    half = MC // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half).float() / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    emb = F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])
    emb = F.linear(F.silu(emb), sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    h = conv(x, "input_blocks.0.0", padding=1)
    hs, ds, n = [h], 1, 1
    for level in range(len(MULT)):
        for _ in range(R):
            h = res(h, emb, f"input_blocks.{n}.0")
            if ds in ATTN_DS:
                h = attn(h, f"input_blocks.{n}.1")
            hs.append(h)
            n += 1
        if level != len(MULT) - 1:
            h = res(h, emb, f"input_blocks.{n}.0", "down") if updown else \
                conv(h, f"input_blocks.{n}.0.op", stride=2, padding=1)
            hs.append(h)
            n, ds = n + 1, ds * 2
    h = res(attn(res(h, emb, "middle_block.0"), "middle_block.1"), emb, "middle_block.2")
    n = 0
    for level in reversed(range(len(MULT))):
        for i in range(R + 1):
            h = res(torch.cat([h, hs.pop()], dim=1), emb, f"output_blocks.{n}.0")
            k = 1
            if ds in ATTN_DS:
                h, k = attn(h, f"output_blocks.{n}.1"), 2
            if level and i == R:
                h = res(h, emb, f"output_blocks.{n}.{k}", "up") if updown else \
                    conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"output_blocks.{n}.{k}.conv",
                         padding=1)
                ds //= 2
            n += 1
    return conv(F.silu(gn(h, "out.0")), "out.2", padding=1)


@pytest.mark.parametrize("updown", [True, False])
def test_adm_conversion_matches_reference(tmp_path, updown):
    sd = make_adm_state(updown)
    torch.save(sd, tmp_path / "adm.pt")
    (tmp_path / "flags.yml").write_text(f"model:\n  num_head_channels: {HEAD_CH}\n  image_size: 32\n")
    summary = convert_model(tmp_path / "adm.pt", tmp_path / "out", config=tmp_path / "flags.yml")
    assert summary["format"] == "adm"
    model = load_noise_model(tmp_path / "out", torch.device("cpu"))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    for t in (0, 250):
        with torch.no_grad():
            ref = adm_reference(sd, x, torch.full((2,), float(t)), updown)
        assert ref.shape[1] == 6 and ref.abs().mean() > 0.1
        ours = model.predict(x, t)  # the first three channels: eps
        assert torch.allclose(ours, ref[:, :3], atol=1e-4, rtol=1e-4), (ours - ref[:, :3]).abs().max()


def test_adm_extract_end_to_end_and_refusals(tmp_path):
    sd = make_adm_state()
    torch.save(sd, tmp_path / "adm.pt")
    (tmp_path / "flags.yml").write_text(f"num_head_channels: {HEAD_CH}\n")
    convert_model(tmp_path / "adm.pt", tmp_path / "out", fmt="adm", config=tmp_path / "flags.yml")
    data = make_dataset(tmp_path / "data", per_class=2, splits=("test",))
    run_shard([data], tmp_path / "run")
    summary = run_extract(tmp_path / "run", ExtractOptions(model=tmp_path / "out", size=32, workers=0,
                                                           device="cpu"))
    dnf = zarr.open_group(summary["cache"] + "/features.zarr", mode="r")["dnf"][:]
    assert summary["images"] == 4 and np.ptp(dnf) > 0
    with pytest.raises(ModelError, match="--format ddim given, but the keys are of the adm layout"):
        convert_model(tmp_path / "adm.pt", tmp_path / "x", fmt="ddim")
    sd["label_emb.weight"] = torch.zeros(10, 4 * MC)
    torch.save(sd, tmp_path / "cond.pt")
    with pytest.raises(ModelError, match="class-conditional"):
        convert_model(tmp_path / "cond.pt", tmp_path / "y")
