"""Storage tiers. Each implements :class:`kvtier.tiers.base.Tier`."""

from kvtier.tiers.base import Tier, TierStats

__all__ = ["Tier", "TierStats"]
