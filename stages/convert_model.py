"""`convert-model`: the diffusion checkpoints users hold, as diffusers folders.

ddim: the DDIM authors' "simple" models (e.g. LSUN-Bedroom `model-2388000.ckpt`), which the DNF
reference code loads; keys like `temb.dense.0.weight`, `down.0.block.0.norm1.weight`,
`mid.attn_1.q.weight`. The network maps one to one onto a diffusers UNet2DModel with
`downsample_padding=0`, `flip_sin_to_cos=False`, `freq_shift=1`, `norm_eps=1e-6` and one attention
head per layer. The architecture comes from a reference-style YAML or from the tensor shapes.

Checkpoints are read with `torch.load(weights_only=True)`; one that needs more is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from stages.domain.adm import ADMUNet
from stages.domain.noise_model import ModelError, model_fingerprint
from storage.checkpoint_file import read_state_dict


def load_original(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict, loaded without executing code."""
    return read_state_dict(path, ModelError, wrappers=("state_dict", "model", "ema"))[0]


def detect_format(state: dict[str, torch.Tensor], path: Path) -> str:
    if "temb.dense.0.weight" in state and "conv_in.weight" in state:
        return "ddim"
    if "input_blocks.0.0.weight" in state:
        return "adm"
    first = ", ".join(list(state)[:4])
    raise ModelError(f"{path}: unknown checkpoint layout (first keys: {first}); expected the DDIM "
                     f"'simple' layout (temb.dense.*, down.*) or OpenAI ADM (input_blocks.*)")


# -- ddim ----------------------------------------------------------------------------------------
def ddim_architecture(state: dict[str, torch.Tensor], yaml_config: dict | None) -> dict:
    """ch, ch_mult, num_res_blocks, attention levels and image size, from shapes (and the YAML)."""
    ch = state["conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"down\.(\d+)\.", k))})
    ch_mult = [state[f"down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
    num_res_blocks = len({k.split(".")[3] for k in state if k.startswith("down.0.block.")})
    attn_levels = [i for i in levels if f"down.{i}.attn.0.q.weight" in state]
    arch = {"ch": ch, "ch_mult": ch_mult, "num_res_blocks": num_res_blocks, "attn_levels": attn_levels,
            "in_channels": state["conv_in.weight"].shape[1], "out_ch": state["conv_out.weight"].shape[0],
            "image_size": 256, "schedule": {"beta_schedule": "linear", "beta_start": 1e-4,
                                            "beta_end": 0.02, "num_train_timesteps": 1000}}
    if yaml_config:
        model, data = yaml_config.get("model", {}), yaml_config.get("data", {})
        image_size = int(data.get("image_size", 256))
        claimed = {
            "ch": model.get("ch", ch), "ch_mult": list(model.get("ch_mult", ch_mult)),
            "num_res_blocks": model.get("num_res_blocks", num_res_blocks),
            "attn_levels": [i for i in levels
                            if image_size // 2 ** i in set(model.get("attn_resolutions", []))]
            if "attn_resolutions" in model else attn_levels,
        }
        diff = [f"{k}: {claimed[k]} (YAML) vs {arch[k]} (weights)" for k in claimed if claimed[k] != arch[k]]
        if diff:
            raise ModelError("the YAML does not describe these weights: " + "; ".join(diff))
        arch["image_size"] = image_size
        diffusion = yaml_config.get("diffusion", {})
        arch["schedule"] = {"beta_schedule": diffusion.get("beta_schedule", "linear"),
                            "beta_start": float(diffusion.get("beta_start", 1e-4)),
                            "beta_end": float(diffusion.get("beta_end", 0.02)),
                            "num_train_timesteps": int(diffusion.get("num_diffusion_timesteps", 1000))}
    return arch


def ddim_unet_config(arch: dict) -> dict:
    n = len(arch["ch_mult"])
    return {
        "sample_size": arch["image_size"], "in_channels": arch["in_channels"],
        "out_channels": arch["out_ch"], "block_out_channels": [arch["ch"] * m for m in arch["ch_mult"]],
        "layers_per_block": arch["num_res_blocks"],
        "down_block_types": ["AttnDownBlock2D" if i in arch["attn_levels"] else "DownBlock2D"
                             for i in range(n)],
        "up_block_types": ["AttnUpBlock2D" if i in arch["attn_levels"] else "UpBlock2D"
                           for i in reversed(range(n))],
        "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6,
        "norm_num_groups": 32, "attention_head_dim": None, "act_fn": "silu",
        "time_embedding_type": "positional", "center_input_sample": False, "dropout": 0.0,
    }


_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
           "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def ddim_key(key: str, num_levels: int) -> str:
    """A DDIM 'simple' key to its diffusers UNet2DModel key."""
    fixed = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
             "norm_out": "conv_norm_out", "conv_in": "conv_in", "conv_out": "conv_out",
             "mid.block_1": "mid_block.resnets.0", "mid.attn_1": "mid_block.attentions.0",
             "mid.block_2": "mid_block.resnets.1"}
    prefix, _, param = key.rpartition(".")
    for old, new in fixed.items():
        if prefix == old or prefix.startswith(old + "."):
            rest = prefix[len(old):].lstrip(".")
            if rest:
                rest = _RESNET.get(rest) or _ATTN.get(rest) or rest
            return ".".join(p for p in (new, rest, param) if p)
    m = re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)", prefix)
    if m:
        side, level, kind, j, layer = m.groups()
        block = f"down_blocks.{level}" if side == "down" else f"up_blocks.{num_levels - 1 - int(level)}"
        sub = f"resnets.{j}.{_RESNET[layer]}" if kind == "block" else f"attentions.{j}.{_ATTN[layer]}"
        return f"{block}.{sub}.{param}"
    m = re.fullmatch(r"down\.(\d+)\.downsample\.conv", prefix)
    if m:
        return f"down_blocks.{m.group(1)}.downsamplers.0.conv.{param}"
    m = re.fullmatch(r"up\.(\d+)\.upsample\.conv", prefix)
    if m:
        return f"up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.conv.{param}"
    raise ModelError(f"unexpected key in a DDIM checkpoint: {key}")


def convert_ddim(state: dict[str, torch.Tensor], yaml_config: dict | None):
    """(UNet2DModel with the checkpoint's weights, scheduler settings)."""
    from diffusers import UNet2DModel

    arch = ddim_architecture(state, yaml_config)
    unet = UNet2DModel(**ddim_unet_config(arch))
    n = len(arch["ch_mult"])
    mapped = {}
    for key, value in state.items():
        new = ddim_key(key, n)
        if re.search(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", new):
            value = value.reshape(value.shape[0], value.shape[1])  # 1x1 conv -> linear
        mapped[new] = value
    missing, unexpected = unet.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise ModelError(f"the DDIM checkpoint does not fill the converted UNet: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    return unet, arch["schedule"]


# -- adm -----------------------------------------------------------------------------------------
def adm_config(state: dict[str, torch.Tensor], yaml_config: dict | None) -> dict:
    """ADMUNet settings from the tensor shapes; heads and image size from the YAML (flags of
    guided-diffusion's scripts), defaulting to the released 256x256 models' (64 channels per head)."""
    if "label_emb.weight" in state:
        raise ModelError("class-conditional ADM checkpoints are not supported: DNF needs an "
                         "unconditional model (e.g. 256x256_diffusion_uncond.pt)")
    mc = state["input_blocks.0.0.weight"].shape[0]
    n_out = len({int(k.split(".")[1]) for k in state if k.startswith("output_blocks.")})
    # A level ends at the output block that holds an upsampling layer (all but the last level).
    ups = sorted({int(m.group(1)) for k in state
                  if (m := re.match(r"output_blocks\.(\d+)\.[12]\.(in_layers|conv)\.", k))})
    per_level = ups[0] + 1 if ups else n_out
    levels = n_out // per_level
    mults, attn_ds = [], []
    for lv in range(levels):
        first = (levels - 1 - lv) * per_level  # output blocks run from the deepest level up
        mults.append(state[f"output_blocks.{first}.0.out_layers.3.weight"].shape[0] // mc)
        if f"output_blocks.{first}.1.qkv.weight" in state:
            attn_ds.append(2 ** lv)
    first_res = "input_blocks.1.0"
    emb_out = state[f"{first_res}.emb_layers.1.weight"].shape[0]
    config = {
        "in_channels": state["input_blocks.0.0.weight"].shape[1],
        "out_channels": state["out.2.weight"].shape[0], "model_channels": mc,
        "channel_mult": mults, "num_res_blocks": per_level - 1, "attention_resolutions": attn_ds,
        "use_scale_shift_norm": emb_out == 2 * state[f"{first_res}.out_layers.3.weight"].shape[0],
        "resblock_updown": not any(k.endswith(".op.weight") or re.search(r"\.\d+\.conv\.weight$", k)
                                   for k in state if "blocks." in k),
        "sample_size": 256, "num_head_channels": 64, "num_heads": 4, "num_heads_upsample": -1,
        "use_new_attention_order": False,
    }
    schedule = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000}
    if yaml_config:
        flags = yaml_config.get("model", yaml_config)
        for key in ("num_head_channels", "num_heads", "num_heads_upsample", "use_new_attention_order"):
            if key in flags:
                config[key] = flags[key]
        if "image_size" in flags:
            config["sample_size"] = int(flags["image_size"])
        if "attention_resolutions" in flags:
            resolutions = str(flags["attention_resolutions"]).split(",")
            given = sorted(config["sample_size"] // int(r) for r in resolutions)
            if given != sorted(attn_ds):
                raise ModelError(f"the YAML's attention_resolutions give rates {given}, "
                                 f"the weights {attn_ds}")
        if flags.get("noise_schedule", "linear") != "linear":
            schedule["beta_schedule"] = "squaredcos_cap_v2"
    return config, schedule


def convert_adm(state: dict[str, torch.Tensor], yaml_config: dict | None):
    """(ADMUNet holding the checkpoint's weights in float32, scheduler settings)."""
    config, schedule = adm_config(state, yaml_config)
    model = ADMUNet(**config)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise ModelError(f"the ADM checkpoint does not fit the inferred architecture {config}: "
                         f"{str(e).splitlines()[0]}") from e
    return model, schedule


def convert_model(src: Path, out: Path, fmt: str = "auto", config: Path | None = None) -> dict:
    """Convert `src` into a diffusers pipeline folder `out` (unet/ + scheduler/); return a summary."""
    from diffusers import DDPMPipeline, DDPMScheduler

    state = load_original(Path(src))
    found = detect_format(state, Path(src))
    if fmt != "auto" and fmt != found:
        raise ModelError(f"{src}: --format {fmt} given, but the keys are of the {found} layout")
    yaml_config = None
    if config is not None:
        import yaml

        yaml_config = yaml.safe_load(Path(config).read_text())
    if found == "ddim":
        unet, schedule = convert_ddim(state, yaml_config)
    else:
        unet, schedule = convert_adm(state, yaml_config)
    scheduler = DDPMScheduler(**schedule)
    out = Path(out)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    return {"format": found, "out": str(out), "parameters": sum(v.numel() for v in state.values()),
            "fingerprint": model_fingerprint(out)}
