"""Feature kinds by name (`extract --feature`): one file per kind, one line each here."""

from __future__ import annotations

from stages.domain.feature_kinds.base import FeatureKind, FeatureModel
from stages.domain.feature_kinds.clip import ClipKind
from stages.domain.feature_kinds.dire import DireKind
from stages.domain.feature_kinds.dnf import DnfKind
from stages.domain.feature_kinds.latent_dnf import LatentDnfKind
from stages.domain.feature_kinds.npr import NprKind
from storage.errors import OptionError

FEATURE_KINDS: dict[str, FeatureKind] = {
    "dnf": DnfKind(),
    "dire": DireKind(),
    "npr": NprKind(),
    "clip": ClipKind(),
    "latent-dnf": LatentDnfKind(),
}


def feature_kind(name: str) -> FeatureKind:
    """The registered kind, or an OptionError listing them."""
    if name not in FEATURE_KINDS:
        raise OptionError(f"--feature {name!r}: one of {', '.join(FEATURE_KINDS)}")
    return FEATURE_KINDS[name]


__all__ = ["FEATURE_KINDS", "FeatureKind", "FeatureModel", "feature_kind"]
