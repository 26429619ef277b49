"""Which real images each source is scored against: its own, or, for a source of generated images
only (DiffusionForensics `<set>/<generator>`, UniversalFakeDetect `laion/ldm_200`, Synthbuster),
the real images of its set (`<set>/...`), else every real image of the split."""

from __future__ import annotations

import numpy as np


def source_groups(sources: list[str], labels: np.ndarray) -> dict[str, np.ndarray]:
    """Row masks per source; single-class fake sources get their set's real images added."""
    sources_arr = np.asarray(sources, dtype=object)
    groups = {}
    for src in sorted(set(sources)):
        mask = sources_arr == src
        if np.all(labels[mask] == 1):
            prefix = src.split("/")[0] if "/" in src else None
            reals = labels == 0
            if prefix is not None:
                same_set = np.array([s.startswith(prefix + "/") for s in sources], dtype=bool)
                if (reals & same_set).any():
                    reals &= same_set
            mask = mask | reals
        groups[src] = mask
    return groups
