"""`detect`: is this image generated? DNF computed on the fly with the checkpoint's feature
config (no cache), then the detector's probability."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.device import resolve_device, resolve_precision
from stages.domain.detector import CheckpointError, Detector, head_of
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


def recorded_feature(checkpoint: Path, detector: Detector) -> dict:
    """The feature config `detect` recomputes: the one the checkpoint records, or for a checkpoint
    without one, the DNF reference's (only a ResNet50 on 3 channels is the reference detector; any
    other bare head, e.g. UnivFD's released linear probe, is refused: its features are unknown)."""
    if "feature" in detector.meta:
        return detector.meta["feature"]
    head, width = head_of(detector.model)
    if (head, width) != ("resnet50", 3):
        what = f"a linear probe on {width} values (UnivFD's layout)" if head == "linear" else \
            f"a ResNet50 on {width} channels"
        raise CheckpointError(f"{checkpoint}: records no feature config and is {what}, not the DNF "
                              f"reference detector; detect recomputes features from the config a "
                              f"checkpoint records, so it cannot tell which to compute. Extract a cache of "
                              f"its feature kind and use `eval` (e.g. --feature clip for UnivFD's probe), "
                              f"or train one here (checkpoints of `train` record their features)")
    return REFERENCE_FEATURE


@torch.inference_mode()
def run_detect(inputs: list[Path], model_path: Path | None, checkpoint: Path, device: str = "auto",
               batch_size: int = 16, threshold: float = 0.5, download: bool = False) -> list[dict]:
    """One result per image: path, probability of being generated (float64 sigmoid of the logit,
    also given), verdict (or the error)."""
    dev = resolve_device(device)
    detector = Detector.from_checkpoint(checkpoint, dev)
    feature = recorded_feature(checkpoint, detector)
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
        logits = detector.scores(dnf).double()
        for (res, _), z, p in zip(batch, logits.tolist(), torch.sigmoid(logits).tolist(), strict=True):
            res.update(probability=p, logit=z, verdict="generated" if p > threshold else "real")
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
