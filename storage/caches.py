"""The registry of cache backends, and finding the caches of a run by feature id and backend.

A third backend is one new file implementing `storage.cache_folder.FeatureCache` plus one line in
`BACKENDS`."""

from __future__ import annotations

from pathlib import Path

from storage.atomic import read_json
from storage.cache_config import FeatureConfig
from storage.cache_folder import CacheError, FeatureCache
from storage.locations import as_path
from storage.wds_cache import WdsCache
from storage.zarr_cache import ZarrCache

BACKENDS: dict[str, type[FeatureCache]] = {
    "zarr": ZarrCache,
    "webdataset": WdsCache,
}


def backend_class(name: str, option: str = "--backend") -> type[FeatureCache]:
    """The class of a backend by its name; a clear error for an unknown one."""
    if name not in BACKENDS:
        raise CacheError(f"{option} {name}: one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def folder_name(feature_id: str, backend: str) -> str:
    """A cache's folder under RUN/cache/: the feature id, plus the backend's suffix (`-wds`)."""
    return feature_id + backend_class(backend).folder_suffix


def new_cache(root: Path | str, backend: str) -> FeatureCache:
    """An (empty) cache folder object of the given backend."""
    return backend_class(backend)(root)


def load_cache(root: Path | str) -> FeatureCache:
    """The cache folder at `root` as its backend's class (from its config.json)."""
    root = as_path(root)
    config = root / "config.json"
    backend = read_json(config).get("backend", "zarr") if config.exists() else "zarr"
    return backend_class(backend, f"{config}: backend")(root)


def caches_in(cache_root: Path) -> list[FeatureCache]:
    """Every feature cache folder under a run's `cache/`, by folder name."""
    if not cache_root.exists():
        return []
    return [load_cache(p) for p in sorted(cache_root.iterdir()) if (p / "config.json").exists()]


def perturbed_siblings(cache_root: Path, feature: FeatureConfig,
                       backend: str | None = None) -> list[FeatureCache]:
    """Caches of the same features as `feature` computed on perturbed images, by perturbation."""
    out = []
    for c in caches_in(cache_root):
        f = c.config().feature
        if f.perturb and f.clean() == feature.clean() and (backend is None or c.backend == backend):
            out.append(c)
    return sorted(out, key=lambda c: c.config().feature.perturb)


def find_cache(cache_root: Path, feature_id: str | None = None, backend: str | None = None) -> FeatureCache:
    """The cache with this feature id (a prefix will do), or, when none is given, the only cache,
    or the only clean one among perturbed variants of it. The same features in both backends
    (after `convert-cache`) resolve to the Zarr one unless `backend` asks for the other."""
    caches = caches_in(cache_root)
    if feature_id:
        caches = [c for c in caches if c.root.name.startswith(feature_id)]
    if backend:
        caches = [c for c in caches if c.backend == backend]
    if len(caches) > 1:
        clean = [c for c in caches if not c.config().feature.perturb]
        caches = clean if clean else caches
    if len(caches) > 1 and len({c.config().feature_id for c in caches}) == 1:
        caches = [c for c in caches if c.backend == "zarr"] or caches
    if len(caches) == 1:
        return caches[0]
    names = ", ".join(c.root.name for c in caches_in(cache_root)) or "none"
    if not caches:
        raise CacheError(f"{cache_root}: no feature cache{' ' + feature_id if feature_id else ''}"
                         f"{' in backend ' + backend if backend else ''} (caches: {names}); "
                         f"run `extract` first")
    raise CacheError(f"{cache_root}: several feature caches ({names}); choose one with --feature-id")
