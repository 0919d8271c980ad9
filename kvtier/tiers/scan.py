"""Read what a disk directory or Redis namespace holds, without knowing its layout (`kvtier inspect`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from kvtier.layout import HEADER_SIZE, CorruptChunk, decode_header
from kvtier.tiers.base import StoredChunk
from kvtier.tiers.files import open_file


def scan_disk(path: str) -> Iterator[StoredChunk]:
    """Every file under ``path`` that starts with a valid kvtier header."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                with open(open_file(os.path.join(root, name)), "rb") as f:
                    header = decode_header(f.read(HEADER_SIZE))
            except (OSError, CorruptChunk):
                continue
            yield StoredChunk(header.key, header.nbytes, header.label)


def scan_redis(url: str, cluster: bool = False, prefix: str = "kvtier:", batch: int = 500) -> Iterator[StoredChunk]:
    """Every key under ``prefix`` whose value starts with a valid kvtier header."""
    import redis
    from redis.cluster import RedisCluster

    client = RedisCluster.from_url(url) if cluster else redis.Redis.from_url(url)
    try:
        skip = len(prefix.encode())
        # A chunk's second, third... values (NAME:{NAME}:i, kvtier.tiers.redis) are not chunks.
        keys = [k for k in client.scan_iter(match=prefix + "*", count=batch) if b":" not in k[skip:]]
        for i in range(0, len(keys), batch):
            part = keys[i:i + batch]
            pipe = client.pipeline(transaction=False) if not cluster else client.pipeline()
            for k in part:
                pipe.getrange(k, 0, HEADER_SIZE - 1)
            for raw in pipe.execute():
                try:
                    header = decode_header(raw)
                except CorruptChunk:
                    continue
                yield StoredChunk(header.key, header.nbytes, header.label)
    finally:
        client.close()
