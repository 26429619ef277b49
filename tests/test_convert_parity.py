"""`convert-model` for DDIM 'simple' checkpoints, and parity with the reference DNF.

The reference network (the DDIM authors' `Model`, as the DNF code loads it) is written out again
here, independently of diffusers and of stages/convert.py, as plain tensor operations on the
original state dict. The reference pipeline (read_image -> float -> bicubic antialiased Resize ->
[-1, 1] -> model(x, t=0) -> save_image) is then compared with our shard + extract on the
converted model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import zarr
from conftest import RandomWeights, cli, make_dataset
from PIL import Image
from torchvision.io import read_image
from torchvision.utils import save_image

from stages.convert_model import convert_model, ddim_architecture
from stages.domain.noise_model import ModelError, load_noise_model
from stages.extract import ExtractOptions, run_extract
from stages.shard import run_shard
from storage.run import Run

CFG = {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_levels": [1], "image_size": 32}


# -- the reference network, written from its description -----------------------------------------
def make_ddim_state(ch: int, ch_mult: list[int], num_res_blocks: int, attn_levels: list[int],
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the DDIM 'simple' layout (scaled so activations stay O(1))."""
    sd = RandomWeights(seed)
    conv, lin, norm = sd.conv, sd.linear, sd.norm

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        lin(f"{name}.temb_proj", 4 * ch, cout)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    lin("temb.dense.0", ch, 4 * ch)
    lin("temb.dense.1", 4 * ch, 4 * ch)
    conv("conv_in", 3, ch, 3)
    chans, c = [ch], ch
    for i, m in enumerate(ch_mult):
        for j in range(num_res_blocks):
            res(f"down.{i}.block.{j}", c, ch * m)
            c = ch * m
            if i in attn_levels:
                attn(f"down.{i}.attn.{j}", c)
            chans.append(c)
        if i != len(ch_mult) - 1:
            conv(f"down.{i}.downsample.conv", c, c, 3)
            chans.append(c)
    res("mid.block_1", c, c)
    attn("mid.attn_1", c)
    res("mid.block_2", c, c)
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            res(f"up.{i}.block.{j}", c + chans.pop(), ch * ch_mult[i])
            c = ch * ch_mult[i]
            if i in attn_levels:
                attn(f"up.{i}.attn.{j}", c)
        if i != 0:
            conv(f"up.{i}.upsample.conv", c, c, 3)
    norm("norm_out", c)
    conv("conv_out", c, 3, 3)
    return dict(sd)


def reference_forward(sd, x, t, ch_mult, num_res_blocks, attn_levels):
    """The DDIM 'simple' Model's forward pass on a state dict."""
    ch = sd["conv_in.weight"].shape[0]

    def gn(h, name):
        return F.group_norm(h, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def conv(h, name, stride=1, padding=1):
        return F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=stride, padding=padding)

    def res(h, temb, name):
        out = conv(F.silu(gn(h, f"{name}.norm1")), f"{name}.conv1")
        out = out + F.linear(F.silu(temb), sd[f"{name}.temb_proj.weight"],
                             sd[f"{name}.temb_proj.bias"])[:, :, None, None]
        out = conv(F.silu(gn(out, f"{name}.norm2")), f"{name}.conv2")
        if f"{name}.nin_shortcut.weight" in sd:
            h = conv(h, f"{name}.nin_shortcut", padding=0)
        return h + out

    def attn(h, name):
        b, c, hh, ww = h.shape
        n = gn(h, f"{name}.norm")
        q = conv(n, f"{name}.q", padding=0).reshape(b, c, hh * ww).permute(0, 2, 1)
        k = conv(n, f"{name}.k", padding=0).reshape(b, c, hh * ww)
        v = conv(n, f"{name}.v", padding=0).reshape(b, c, hh * ww)
        w = torch.softmax(torch.bmm(q, k) * (c ** -0.5), dim=2)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return h + conv(out, f"{name}.proj_out", padding=0)

    half = ch // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    emb = t.float()[:, None] * freqs[None]
    temb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    temb = F.linear(temb, sd["temb.dense.0.weight"], sd["temb.dense.0.bias"])
    temb = F.linear(F.silu(temb), sd["temb.dense.1.weight"], sd["temb.dense.1.bias"])
    hs = [conv(x, "conv_in")]
    for i in range(len(ch_mult)):
        for j in range(num_res_blocks):
            h = res(hs[-1], temb, f"down.{i}.block.{j}")
            if i in attn_levels:
                h = attn(h, f"down.{i}.attn.{j}")
            hs.append(h)
        if i != len(ch_mult) - 1:
            hs.append(conv(F.pad(hs[-1], (0, 1, 0, 1)), f"down.{i}.downsample.conv", stride=2, padding=0))
    h = attn(res(hs[-1], temb, "mid.block_1"), "mid.attn_1")
    h = res(h, temb, "mid.block_2")
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            h = res(torch.cat([h, hs.pop()], dim=1), temb, f"up.{i}.block.{j}")
            if i in attn_levels:
                h = attn(h, f"up.{i}.attn.{j}")
        if i != 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"up.{i}.upsample.conv")
    return conv(F.silu(gn(h, "norm_out")), "conv_out")


def reference_dnf_png(path: str, sd: dict, size: int, out: Path) -> np.ndarray:
    """The reference pipeline for one image, down to the PNG it writes; returns (3, S, S) uint8."""
    x = read_image(path).float()
    if x.shape[0] == 1:
        x = torch.cat([x] * 3, dim=0)
    elif x.shape[0] == 4:
        x = x[:3]
    x = T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)(x)
    x = (x / 255.0) * 2.0 - 1.0
    with torch.no_grad():
        eps = reference_forward(sd, x[None], torch.zeros(1), CFG["ch_mult"], CFG["num_res_blocks"],
                                CFG["attn_levels"])
    save_image(eps[0], out)
    return np.asarray(Image.open(out)).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def converted(module_tmp):
    tmp = module_tmp("convert")
    sd = make_ddim_state(CFG["ch"], CFG["ch_mult"], CFG["num_res_blocks"], CFG["attn_levels"])
    torch.save(sd, tmp / "model-2388000.ckpt")
    (tmp / "bedroom.yml").write_text(
        "data:\n  image_size: 32\nmodel:\n  ch: 32\n  ch_mult: [1, 2, 2]\n  num_res_blocks: 1\n"
        "  attn_resolutions: [16]\ndiffusion:\n  beta_schedule: linear\n  beta_start: 0.0001\n"
        "  beta_end: 0.02\n  num_diffusion_timesteps: 1000\n")
    summary = convert_model(tmp / "model-2388000.ckpt", tmp / "converted", config=tmp / "bedroom.yml")
    return {"sd": sd, "tmp": tmp, "model": tmp / "converted", "summary": summary}


def test_converted_network_equals_reference(converted):
    model = load_noise_model(converted["model"], torch.device("cpu"))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for t in (0, 10, 500):
        ours = model.predict(x, t)
        with torch.no_grad():
            ref = reference_forward(converted["sd"], x, torch.full((2,), float(t)), CFG["ch_mult"],
                                    CFG["num_res_blocks"], CFG["attn_levels"])
        assert ref.abs().mean() > 0.1  # a meaningful signal, not all zeros
        assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (t, (ours - ref).abs().max())


def test_extract_matches_reference_pngs(converted, tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3, splits=("test",), size=(45, 37))  # lossless + JPEG
    run_shard([data], tmp_path / "run")
    ref_summary = run_extract(tmp_path / "run", ExtractOptions(model=converted["model"], size=32,
                                                               batch_size=1, workers=0, device="cpu"))
    raw_summary = run_extract(tmp_path / "run", ExtractOptions(model=converted["model"], size=32,
                                                               encoding="raw", batch_size=1, workers=0,
                                                               device="cpu"))
    cached = zarr.open_group(ref_summary["cache"] + "/features.zarr", mode="r")["dnf"][:]
    raw = zarr.open_group(raw_summary["cache"] + "/features.zarr", mode="r")["dnf"][:]
    diffs, raw_diffs = [], []
    for row, e in enumerate(Run(tmp_path / "run").entries()):
        ref = reference_dnf_png(e.path, converted["sd"], 32, tmp_path / "ref.png")
        diffs.append(np.abs(cached[row].astype(int) - ref.astype(int)))
        x = read_image(e.path).float()
        x = torch.cat([x] * 3) if x.shape[0] == 1 else x[:3]
        x = T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC)(x) / 255.0 * 2.0 - 1.0
        with torch.no_grad():
            eps = reference_forward(converted["sd"], x[None], torch.zeros(1), CFG["ch_mult"],
                                    CFG["num_res_blocks"], CFG["attn_levels"])[0]
        raw_diffs.append(float((torch.from_numpy(raw[row].astype(np.float32)) - eps).abs().max()))
    diffs = np.stack(diffs)
    # uint8: equal except where float rounding between the two implementations crosses a
    # quantisation step (at most one step, and rarely)
    assert diffs.max() <= 1 and (diffs > 0).mean() < 1e-3, (diffs.max(), (diffs > 0).mean())
    assert max(raw_diffs) < 2e-3  # float16 storage: half a float16 step at |eps| < 4


def test_shape_inference_and_yaml_checks(converted):
    sd = converted["sd"]
    arch = ddim_architecture(sd, None)
    assert (arch["ch"], arch["ch_mult"], arch["num_res_blocks"], arch["attn_levels"]) == \
        (32, [1, 2, 2], 1, [1])
    with pytest.raises(ModelError, match="ch_mult: \\[1, 2\\] \\(YAML\\) vs \\[1, 2, 2\\]"):
        ddim_architecture(sd, {"model": {"ch_mult": [1, 2]}, "data": {"image_size": 32}})
    out = converted["tmp"] / "inferred"
    convert_model(converted["tmp"] / "model-2388000.ckpt", out)  # no YAML: from the shapes
    assert load_noise_model(out, torch.device("cpu")).fingerprint != ""


def test_refuses_unknown_layouts_and_unsafe_pickles(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(ModelError, match="unknown checkpoint layout"):
        convert_model(tmp_path / "other.ckpt", tmp_path / "out")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"temb.dense.0.weight": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(ModelError, match="refused"):
        convert_model(tmp_path / "evil.ckpt", tmp_path / "out")
    proc = cli("convert-model", tmp_path / "other.ckpt", "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "unknown checkpoint layout" in proc.stderr


def test_export_png_tree(converted, tmp_path):
    data = make_dataset(tmp_path / "data", per_class=2, splits=("train",))
    run_shard([data], tmp_path / "run")
    summary = run_extract(tmp_path / "run", ExtractOptions(model=converted["model"], size=32,
                                                           workers=0, device="cpu"))
    cli("export-png", "--run", tmp_path / "run", "--out", tmp_path / "png")
    dnf = zarr.open_group(summary["cache"] + "/features.zarr", mode="r")["dnf"]
    for row, e in enumerate(Run(tmp_path / "run").entries()):
        rel = Path(e.path).relative_to(data).with_suffix(".png")
        png = np.asarray(Image.open(tmp_path / "png" / rel)).transpose(2, 0, 1)
        assert np.array_equal(png, dnf[row])


def test_ddim_inversion_features(converted, tmp_path):
    """K-step DDIM inversion keeping chosen steps, against the DDIM update written out here."""
    from diffusers import DDPMScheduler

    data = make_dataset(tmp_path / "data", per_class=2, splits=("train", "val"))
    run_shard([data], tmp_path / "run")
    common = dict(model=converted["model"], size=32, encoding="raw", workers=0, device="cpu",
                  batch_size=1, inversion_steps=3, ddim_steps=20)
    stacked = run_extract(tmp_path / "run", ExtractOptions(**common, keep=(0, 2), combine="stack"))
    mean = run_extract(tmp_path / "run", ExtractOptions(**common, keep=(0, 2), combine="mean"))
    s = zarr.open_group(stacked["cache"] + "/features.zarr", mode="r")["dnf"][:].astype(np.float32)
    m = zarr.open_group(mean["cache"] + "/features.zarr", mode="r")["dnf"][:].astype(np.float32)
    assert s.shape[1] == 6 and m.shape[1] == 3
    ac = DDPMScheduler(beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000).alphas_cumprod.double()
    seq = [0, 50, 100]
    e = Run(tmp_path / "run").entries()[0]
    x = read_image(e.path).float()
    x = torch.cat([x] * 3) if x.shape[0] == 1 else x[:3]
    xt = T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC)(x)[None] / 255.0 * 2.0 - 1.0
    eps_all = []
    for i in range(3):
        with torch.no_grad():
            eps = reference_forward(converted["sd"], xt, torch.full((1,), float(seq[i])), CFG["ch_mult"],
                                    CFG["num_res_blocks"], CFG["attn_levels"])
        eps_all.append(eps[0])
        if i < 2:
            a, an = ac[seq[i]].item(), ac[seq[i + 1]].item()
            x0 = (xt - (1 - a) ** 0.5 * eps) / a ** 0.5
            xt = an ** 0.5 * x0 + (1 - an) ** 0.5 * eps
    want = torch.cat([eps_all[0], eps_all[2]]).numpy()
    assert np.abs(s[0] - want).max() < 2e-3
    assert np.abs(m[0] - (eps_all[0] + eps_all[2]).numpy() / 2).max() < 2e-3
    assert not np.allclose(eps_all[0].numpy(), eps_all[2].numpy(), atol=1e-2)  # steps differ
    # the classifier takes the 6 stacked channels
    from stages.train import TrainOptions, run_train

    run_train(tmp_path / "run", TrainOptions(name="inv", epochs=1, batch_size=4, workers=0, device="cpu",
                                             feature_id=stacked["feature_id"]))
    with pytest.raises(ValueError, match="--keep \\[3\\]"):
        run_extract(tmp_path / "run", ExtractOptions(**{**common, "keep": (3,)}))
