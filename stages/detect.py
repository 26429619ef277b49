"""`detect`: is this image generated? DNF computed on the fly with the checkpoint's feature
config (no cache), then the detector's probability. A checkpoint that records no feature config
is DNF's reference detector unless the user names its kind (`--checkpoint-kind`); the assumption
is printed."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.device import resolve_device, resolve_precision
from stages.domain.detector import CheckpointError, Detector, head_of
from stages.domain.feature_kinds import FEATURE_KINDS, FeatureKind, FeatureModel, feature_kind
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


def bare_feature(checkpoint: Path, detector: Detector, said: str | None) -> tuple[dict, str]:
    """The feature config `detect` recomputes for a checkpoint that records none, and a note saying
    what was assumed: the kind the user names (`said`) at its default encoding and 256 x 256, else
    the DNF reference's (only a ResNet50 on 3 channels is the reference detector; any other bare
    head, e.g. UnivFD's released linear probe, is refused: its features are unknown)."""
    head, width = head_of(detector.model)
    if said is not None:
        kind = feature_kind_named(said)
        if head not in kind.heads or (head == "resnet50" and width != 3):
            raise CheckpointError(f"{checkpoint}: records no feature config and its {head} head (on {width} "
                                  f"{'values' if head == 'linear' else 'channels'}) is not one that detect "
                                  f"can pair with {said!r} features at their defaults; extract a cache and "
                                  f"use `eval --checkpoint-kind {said}`")
        feature = {**REFERENCE_FEATURE, "kind": said, "encoding": kind.default_encoding}
        return feature, (f"{checkpoint} records no feature config: taken as trained on {said!r} features "
                         f"(--checkpoint-kind), {feature['encoding']} encoding, {feature['size']} x "
                         f"{feature['size']}")
    if (head, width) != ("resnet50", 3):
        what = f"a linear probe on {width} values (UnivFD's layout)" if head == "linear" else \
            f"a ResNet50 on {width} channels"
        raise CheckpointError(f"{checkpoint}: records no feature config and is {what}, not the DNF "
                              f"reference detector; detect recomputes features from the config a "
                              f"checkpoint records, so it cannot tell which to compute. Extract a cache of "
                              f"its feature kind and use `eval` (e.g. --feature clip for UnivFD's probe), "
                              f"or train one here (checkpoints of `train` record their features)")
    return REFERENCE_FEATURE, (f"{checkpoint} records no feature config: taken as DNF's reference detector "
                               f"(a ResNet50 on DNF, reference encoding, 256 x 256); if it was trained on "
                               f"other features, say which with --checkpoint-kind")


def recorded_feature(checkpoint: Path, detector: Detector, said: str | None = None,
                     note: Callable[[str], None] | None = None) -> dict:
    """The feature config `detect` recomputes: the one the checkpoint records (a `said` kind must
    agree with it), or for a checkpoint without one, `bare_feature`'s (its assumption told to `note`,
    by default printed on stderr)."""
    if "feature" in detector.meta:
        recorded = detector.meta["feature"].get("kind", "dnf")
        if said is not None and feature_kind_named(said).name != recorded:
            raise CheckpointError(f"{checkpoint} records that it was trained on {recorded!r} features; "
                                  f"--checkpoint-kind {said} contradicts it")
        return detector.meta["feature"]
    feature, why = bare_feature(checkpoint, detector, said)
    (note or (lambda m: print(f"note: {m}", file=sys.stderr)))(why)
    return feature


def feature_kind_named(said: str) -> FeatureKind:
    """The kind `--checkpoint-kind` names, or an error listing the registered ones."""
    if said not in FEATURE_KINDS:
        raise CheckpointError(f"--checkpoint-kind {said!r}: not a feature kind; one of "
                              f"{', '.join(FEATURE_KINDS)}")
    return FEATURE_KINDS[said]


def load_feature_model(kind: FeatureKind, feature: dict, assumed: bool, model_path: Path | None,
                       checkpoint: Path, dev: torch.device, download: bool) -> FeatureModel:
    """The kind's model; for a checkpoint taken as DNF's reference detector (it records no
    features, none were named), a missing --model is explained by that assumption."""
    if assumed and model_path is None and kind.needs_model:
        raise ModelError(f"{checkpoint} records no feature config, so it is taken as DNF's reference "
                         f"detector, whose features need the diffusion model: pass --model (the UNet it was "
                         f"trained with), or name the features it was trained on with --checkpoint-kind "
                         f"(e.g. npr, which needs no model)")
    precision = resolve_precision(feature.get("precision", "fp32"), dev)
    return kind.load(model_path, dev, precision, download=download)


@torch.inference_mode()
def run_detect(inputs: list[Path], model_path: Path | None, checkpoint: Path, device: str = "auto",
               batch_size: int = 16, threshold: float = 0.5, download: bool = False,
               checkpoint_kind: str | None = None, note: Callable[[str], None] | None = None) -> list[dict]:
    """One result per image: path, probability of being generated (float64 sigmoid of the logit,
    also given), verdict (or the error). `checkpoint_kind`: the feature kind a checkpoint that
    records none was trained on (default: DNF's reference, said through `note`). NaN scores are an
    error naming the checkpoint; an infinite logit is a certain score."""
    dev = resolve_device(device)
    detector = Detector.from_checkpoint(checkpoint, dev)
    feature = recorded_feature(checkpoint, detector, checkpoint_kind, note)
    kind = feature_kind(feature.get("kind", "dnf"))
    assumed = "feature" not in detector.meta and checkpoint_kind is None  # taken as DNF's reference
    noise_model = load_feature_model(kind, feature, assumed, model_path, checkpoint, dev, download)
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
        bad = torch.isnan(logits).nonzero().flatten().tolist()
        if bad:
            raise CheckpointError(f"{checkpoint}: {len(bad)} of {len(logits)} scores are NaN (not a number; "
                                  f"first {batch[bad[0]][0]['path']}): the detector's weights or its forward "
                                  f"pass are broken")
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
