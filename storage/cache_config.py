"""The records of a feature cache folder (DESIGN.md sec. 4), each read and written here only:
`FeatureConfig` (what makes two caches hold the same features, and its short id), `CacheConfig`
(config.json) and `DoneMarker` (done/NNNNN.json). Their JSON on disk is canonical: sorted keys."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from storage.errors import OptionError, RecordError

# Bump when decoding or resizing changes in a way that changes DNF values.
PREPROCESS_VERSION = "rgb-bicubic-aa-float-v1"
FAST_DECODE = "dct-1/2-1/4-1/8"  # --fast-decode's scales, recorded in the feature id
# DIRE's own preprocessing (its compute_dire.py): centre crop to a square, then the same resize
PREPROCESS_CROP = "rgb-centercrop-bicubic-aa-float-v1"
# `--geometry crop`: the central window at native resolution (images under the size upscaled first)
PREPROCESS_NATIVE_CROP = "rgb-native-centercrop-v1"
PREPROCESSING = {"resize": PREPROCESS_VERSION, "crop-resize": PREPROCESS_CROP, "crop": PREPROCESS_NATIVE_CROP}
ENCODINGS = ("reference", "raw")
DECODERS = ("cpu", "nvjpeg")


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that determines the feature values of an image (and nothing that does not).
    `kind`: the feature kind (`stages/domain/feature_kinds`: `dnf`, the default, `dire`, `npr`), which
    checks the fields that apply to it and names its channels; a `dnf` config's id does not include it."""

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
    kind: str = "dnf"
    decoder: str = "cpu"  # cpu (libjpeg / Pillow, the reference's) or nvjpeg (--gpu-decode): other values
    fast_decode: bool = False  # JPEGs decoded at a reduced DCT scale before the resize: other values

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", tuple(int(k) for k in self.keep))
        if self.encoding not in ENCODINGS:
            raise OptionError(f"unknown encoding {self.encoding!r}: choose one of {', '.join(ENCODINGS)}")
        if self.size < 8:
            raise OptionError(f"--size must be at least 8 (got {self.size})")
        if not 1 <= self.inversion_steps <= self.ddim_steps:
            raise OptionError(f"--inversion-steps must be 1 to --ddim-steps ({self.ddim_steps})")
        if not self.keep or any(not 0 <= k < self.inversion_steps for k in self.keep):
            raise OptionError(f"--keep {list(self.keep)}: steps must lie in 0..{self.inversion_steps - 1}")
        if self.combine not in ("stack", "mean"):
            raise OptionError(f"--combine {self.combine!r}: stack or mean")
        if self.inversion_steps > 1 and self.timestep != 0:
            raise OptionError("--timestep applies to single-step features; inversion starts at t = 0")
        if self.decoder not in DECODERS:
            raise OptionError(f"unknown decoder {self.decoder!r}: one of {', '.join(DECODERS)}")
        if self.preprocess not in PREPROCESSING.values():
            raise OptionError(f"unknown preprocessing {self.preprocess!r}")

    @property
    def dtype(self) -> str:
        return "uint8" if self.encoding == "reference" else "float16"

    def clean(self) -> FeatureConfig:
        """The same features without the perturbation."""
        return replace(self, perturb="")

    @classmethod
    def from_json(cls, d: dict) -> FeatureConfig:
        if "fast_decode" in d:  # FAST_DECODE, or true from before the scales were powers of two
            d = {**d, "fast_decode": bool(d["fast_decode"])}
        return cls(**d)

    def to_json(self) -> dict:
        d = asdict(self)
        d["keep"] = list(self.keep)
        if self.kind == "dnf":
            del d["kind"]  # DNF configs (and their ids) as before feature kinds existed
        if self.decoder == "cpu":
            del d["decoder"]  # likewise: ids as before --gpu-decode was recorded
        if not self.fast_decode:
            del d["fast_decode"]  # likewise: ids as before --fast-decode existed
        else:  # caches of the older M/8 scales (recorded as true) keep their own ids, never mixed
            d["fast_decode"] = FAST_DECODE
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


def _record(cls, d: Any, what: str):
    """`cls(**d)`, naming the record when the file holds something else."""
    try:
        return cls.from_json(d)
    except (TypeError, KeyError, AttributeError) as e:
        raise RecordError(f"{what}: not a {cls.__name__} record ({e})") from e


@dataclass(frozen=True)
class ManifestRef:
    """The manifest a cache indexes: its fingerprint and shape. `rows` (the cache's row count) is
    recorded only where it differs from `images`: after `shard --append` behind a partial shard."""

    fingerprint: str
    images: int
    shard_size: int
    num_shards: int
    rows: int = 0

    @property
    def row_count(self) -> int:
        return self.rows or self.images

    @classmethod
    def from_json(cls, d: dict) -> ManifestRef:
        return cls(**d)

    def to_json(self) -> dict:
        d = asdict(self)
        if self.rows in (0, self.images):
            del d["rows"]
        return d


@dataclass(frozen=True)
class CacheConfig:
    """config.json of a cache folder. `about` is informational (model path, tool version, the first
    run's batch size) and never compared between runs."""

    feature: FeatureConfig
    manifest: ManifestRef
    backend: str = "zarr"
    channels: int = 3
    about: dict = field(default_factory=dict)
    format: int = 1  # the backend's storage format version (`FeatureCache.format_version`)
    spatial: int = 0  # rows of (channels, spatial, spatial), e.g. 1 for embeddings; 0: the feature size

    @property
    def feature_id(self) -> str:
        return self.feature.feature_id

    @property
    def dtype(self) -> str:
        return self.feature.dtype

    @property
    def shard_size(self) -> int:
        return self.manifest.shard_size

    @property
    def model_path(self) -> str | None:
        """The model folder the first extract used (informational)."""
        return self.about.get("model_path")

    @property
    def batch_size(self) -> int:
        """The first extract's batch size (0: unknown); a resumed extract repeats it."""
        return int(self.about.get("batch_size") or 0)

    def row_shape(self) -> tuple[int, int, int]:
        side = self.spatial or self.feature.size
        return self.channels, side, side

    @classmethod
    def from_json(cls, d: dict) -> CacheConfig:
        return cls(feature=FeatureConfig.from_json(d["feature"]),
                   manifest=ManifestRef.from_json(d["manifest"]), backend=d.get("backend", "zarr"),
                   channels=d.get("channels", 3), about=d.get("about", {}), format=d.get("format", 1),
                   spatial=d.get("spatial", 0))

    def to_json(self) -> dict:
        d = {"feature_id": self.feature_id, "feature": self.feature.to_json(), "backend": self.backend,
             "dtype": self.dtype, "channels": self.channels, "manifest": self.manifest.to_json(),
             "about": dict(self.about)}
        if self.format != 1:  # format 1 caches (and WebDataset's) keep the config.json they had
            d["format"] = self.format
        if self.spatial:  # vector features only: map caches keep the config.json they had
            d["spatial"] = self.spatial
        return d

    def differences(self, other: CacheConfig) -> list[str]:
        """`name: old (cache) vs new (now)` for every compared field that differs (`about` is not)."""
        def compared(c: CacheConfig) -> dict:
            return {k: v for k, v in c.to_json().items() if k != "about"}
        return describe_differences(compared(self), compared(other))

    @classmethod
    def read(cls, d: Any, path: str) -> CacheConfig:
        return _record(cls, d, path)


@dataclass(frozen=True)
class DoneMarker:
    """done/NNNNN.json, written last: the shard's rows, counts, the images rejected at extract and a
    backend-independent checksum of the decoded rows. `index` (WebDataset caches) holds each row's
    key, label, split, source and the byte offset and size of its array in the tar."""

    shard: int
    rows: tuple[int, int]
    count: int
    cached: int
    rejected: tuple[dict, ...]
    checksum: str
    index: dict | None = None

    @classmethod
    def from_json(cls, d: dict) -> DoneMarker:
        return cls(shard=d["shard"], rows=tuple(d["rows"]), count=d["count"], cached=d["cached"],
                   rejected=tuple(d["rejected"]), checksum=d["checksum"], index=d.get("index"))

    def to_json(self) -> dict:
        d = {"shard": self.shard, "rows": list(self.rows), "count": self.count, "cached": self.cached,
             "rejected": list(self.rejected), "checksum": self.checksum}
        if self.index is not None:
            d["index"] = self.index
        return d

    @property
    def rejected_keys(self) -> set[str]:
        return {r["key"] for r in self.rejected}

    @classmethod
    def read(cls, d: Any, path: str) -> DoneMarker:
        return _record(cls, d, path)
