"""Storage tiers. Each implements :class:`kvtier.tiers.base.Tier`; :func:`make_tier` builds a lower
tier from the config (the store, and the writer process for its own copies of them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier.tiers.base import Protected, Tier, TierStats

if TYPE_CHECKING:  # kept out of `import kvtier.tiers`: the layout pulls in torch
    from kvtier.config import KVTierConfig
    from kvtier.layout import ChunkLayout

__all__ = ["Tier", "TierStats", "make_tier"]


def make_tier(name: str, config: KVTierConfig, layout: ChunkLayout, label: str, protected: Protected) -> Tier:
    """Build the lower tier ``name`` ("disk", "redis" or "mooncake") from ``config``."""
    if name == "disk":
        from kvtier.tiers.disk import DiskTier

        return DiskTier(config.disk_path, config.disk_bytes, layout, label=label, protected=protected,
                        read_threads=config.disk_read_threads)
    if name == "redis":
        from kvtier.tiers.redis import RedisTier

        return RedisTier(
            config.redis_url, layout, label=label, cluster=config.redis_cluster, prefix=config.redis_prefix,
            ttl_s=config.redis_ttl_s, connect_timeout_s=config.connect_timeout_s,
            op_timeout_s=config.op_timeout_s, retry_after_s=config.retry_after_s,
        )
    if name == "mooncake":
        from kvtier.tiers.mooncake import MooncakeTier

        return MooncakeTier(
            config.mooncake_master, layout, label=label, metadata_server=config.mooncake_metadata,
            protocol=config.mooncake_protocol, local_hostname=config.mooncake_host,
            segment_bytes=config.mooncake_segment_bytes, buffer_bytes=config.mooncake_buffer_bytes,
            rdma_devices=config.mooncake_rdma_devices, prefix=config.mooncake_prefix,
            connect_timeout_s=config.connect_timeout_s, retry_after_s=config.retry_after_s,
            op_timeout_s=config.op_timeout_s,
        )
    raise ValueError(f"no tier named {name!r}")
