"""The extraction config: what makes two caches hold the same features, and its short id."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

# Bump when decoding or resizing changes in a way that changes DNF values.
PREPROCESS_VERSION = "rgb-bicubic-aa-float-v1"
ENCODINGS = ("reference", "raw")


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that determines the DNF values of an image (and nothing that does not)."""

    model_fingerprint: str  # sha256 over the UNet's config and weights
    timestep: int = 0
    size: int = 256
    encoding: str = "reference"  # reference: uint8 as save_image writes; raw: float16 eps
    preprocess: str = PREPROCESS_VERSION
    # Beyond the reference: DDIM inversion over `inversion_steps` steps of the schedule
    # linspace(0, T, ddim_steps + 1), keeping the noise estimates of steps `keep`.
    inversion_steps: int = 1
    ddim_steps: int = 20
    keep: tuple[int, ...] = (0,)
    combine: str = "stack"  # stack: 3 channels per kept step; mean: their average
    precision: str = "fp32"  # fp32 (the reference's numbers), bf16 or fp16 autocast
    perturb: str = ""  # robustness variant applied to the pixels first, e.g. "jpeg:75"

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", tuple(int(k) for k in self.keep))
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {self.encoding!r}: choose one of {', '.join(ENCODINGS)}")
        if self.size < 8:
            raise ValueError(f"--size must be at least 8 (got {self.size})")
        if not 1 <= self.inversion_steps <= self.ddim_steps:
            raise ValueError(f"--inversion-steps must be 1 to --ddim-steps ({self.ddim_steps})")
        if not self.keep or any(not 0 <= k < self.inversion_steps for k in self.keep):
            raise ValueError(f"--keep {list(self.keep)}: steps must lie in 0..{self.inversion_steps - 1}")
        if self.combine not in ("stack", "mean"):
            raise ValueError(f"--combine {self.combine!r}: stack or mean")
        if self.inversion_steps > 1 and self.timestep != 0:
            raise ValueError("--timestep applies to single-step features; inversion starts at t = 0")

    @property
    def channels(self) -> int:
        return 3 * len(self.keep) if self.combine == "stack" else 3

    @property
    def dtype(self) -> str:
        return "uint8" if self.encoding == "reference" else "float16"

    def clean(self) -> FeatureConfig:
        """The same features without the perturbation."""
        return FeatureConfig(**{**self.to_json(), "perturb": ""})

    def to_json(self) -> dict:
        d = asdict(self)
        d["keep"] = list(self.keep)
        return d

    @property
    def feature_id(self) -> str:
        """A 16-hex-digit id of this config; names the cache folder."""
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Readable lines `name: old -> new` for every field that differs between two config dicts."""
    lines = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += describe_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            lines.append(f"{prefix}{k}: {a!r} (cache) vs {b!r} (now)")
    return lines
