"""`detect`: is this image generated? DNF computed on the fly with the checkpoint's feature
config (no cache), then the detector's probability."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.device import resolve_device, resolve_precision
from stages.domain.detector import Detector
from stages.domain.feature_kinds import feature_kind
from stages.domain.images import DecodeError, apply_geometry, decode_rgb, normalize_
from stages.domain.noise_model import ModelError
from storage.cache_config import PREPROCESSING, FeatureConfig

REFERENCE_FEATURE = {"size": 256, "timestep": 0, "encoding": "reference"}


def list_images(inputs: list[Path]) -> list[Path]:
    """Files as given; folders walked in sorted order."""
    out = []
    for inp in map(Path, inputs):
        if inp.is_dir():
            for dirpath, dirnames, files in os.walk(inp):
                dirnames.sort()
                out += [Path(dirpath) / f for f in sorted(files)]
        else:
            out.append(inp)
    return out


@torch.inference_mode()
def run_detect(inputs: list[Path], model_path: Path | None, checkpoint: Path, device: str = "auto",
               batch_size: int = 16, threshold: float = 0.5, download: bool = False) -> list[dict]:
    """One result per image: path, probability of being generated, verdict (or the error)."""
    dev = resolve_device(device)
    detector = Detector.from_checkpoint(checkpoint, dev)
    feature = detector.meta.get("feature", REFERENCE_FEATURE)
    kind = feature_kind(feature.get("kind", "dnf"))
    noise_model = kind.load(model_path, dev, resolve_precision(feature.get("precision", "fp32"), dev),
                            download=download)
    config = FeatureConfig(**{**feature, "model_fingerprint": noise_model.fingerprint})
    expected = feature.get("model_fingerprint")
    if expected and expected != noise_model.fingerprint:
        raise ModelError(f"{model_path} is not the diffusion model {checkpoint} was trained with "
                         f"(weights fingerprint {noise_model.fingerprint[:12]} vs {expected[:12]})")
    results, batch = [], []

    def flush() -> None:
        if not batch:
            return
        x = torch.stack([t for _, t in batch]).to(dev)
        dnf = kind.encode(noise_model.features(x, config), config.encoding)
        probs = detector.probabilities(dnf).tolist()
        for (res, _), p in zip(batch, probs, strict=True):
            res.update(probability=round(p, 6), verdict="generated" if p > threshold else "real")
        batch.clear()

    for path in list_images(inputs):
        res = {"path": str(path)}
        results.append(res)
        try:
            img = decode_rgb(path.read_bytes(), draft=config.size if config.fast_decode else 0)
        except (DecodeError, OSError) as e:
            res.update(probability=None, verdict="error", error=str(e))
            continue
        geometry = {v: k for k, v in PREPROCESSING.items()}.get(config.preprocess, "resize")
        batch.append((res, normalize_(apply_geometry(img, geometry, feature["size"]).float())))
        if len(batch) >= batch_size:
            flush()
    flush()
    return results
