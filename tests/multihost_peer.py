"""One "host" of tests/test_multihost.py: a redis tier in cluster mode or a mooncake tier, driven by JSON lines.

Started as ``ip netns exec NS python multihost_peer.py ARGS``, ARGS a JSON object: ``{"urls": [..],
"retry_after_s": s}`` (redis) or ``{"master": HOST:PORT, "metadata": URL, "retry_after_s": s}``
(mooncake, a pure client: no segment of its own). It reads one command per line and answers one
JSON line each:

- ``{"op": "put", "seeds": [..]}`` -> ``{"ok": [bool], "s": seconds}``
- ``{"op": "get", "seeds": [..]}`` -> ``{"ok": [bool], "same": [bool], "s": seconds}``: ``same[i]``
  is whether hit ``i`` holds exactly the payload of its seed (a miss counts as the same);
- ``{"op": "contains", "seeds": [..]}`` -> ``{"ok": [bool], "s": seconds}``
- ``{"op": "store_get", "seeds": [..]}`` -> ``{"ok": [bool], "s": seconds}``: through a
  :class:`kvtier.store.Store` over the tier (which bounds a hung transfer by the tier's deadline)
- ``{"op": "stats"}`` -> the tier's counters.

A chunk's key and payload follow from its seed alone, so every host knows what a chunk must hold.
An exception in the tier is reported as ``{"error": ...}`` (the test asserts there is none). The
first line, ``{"ready": true}``, says the tier is set up.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import numpy as np
import torch

from kvtier.layout import ChunkLayout
from kvtier.tiers.base import Tier

LAYOUT = ChunkLayout(4, 16, 64, torch.float16)  # 16 KiB chunks


def key_of(seed: int) -> bytes:
    return hashlib.blake2b(b"multihost-%d" % seed, digest_size=16).digest()


def payload_of(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, LAYOUT.nbytes, dtype=np.uint8)


def make_tier(args: dict) -> Tier:
    if "urls" in args:
        from kvtier.tiers.redis import RedisTier

        # A lost host costs a call one 2 s timeout, then its breaker answers at once: the test
        # tells the two apart even on a loaded box.
        return RedisTier(args["urls"], LAYOUT, cluster=True, prefix="mh:", connect_timeout_s=2.0,
                         op_timeout_s=2.0, retry_after_s=args["retry_after_s"])
    from kvtier.tiers.mooncake import MooncakeTier

    tier = MooncakeTier(args["master"], LAYOUT, metadata_server=args["metadata"], segment_bytes=0,
                        prefix="mh:", retry_after_s=args["retry_after_s"])
    if not tier.wait_connected(30):
        raise RuntimeError(f"mooncake tier: no connection to the master {args['master']} in 30 s")
    return tier


def over_store(tier: Tier):
    """A store whose only tier below a small cpu tier is ``tier``."""
    from kvtier.config import KVTierConfig
    from kvtier.store import Store

    return Store(KVTierConfig(cpu_bytes=64 * LAYOUT.nbytes, tiers=("cpu",)), LAYOUT, pin=False, tiers=[tier])


def serve(tier: Tier) -> None:
    store = None
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.monotonic()
        try:
            if req["op"] == "put":
                out = {"ok": tier.put([key_of(s) for s in req["seeds"]], [payload_of(s) for s in req["seeds"]])}
            elif req["op"] == "get":
                dests = [np.zeros(LAYOUT.nbytes, dtype=np.uint8) for _ in req["seeds"]]
                ok = tier.get_into([key_of(s) for s in req["seeds"]], dests)
                same = [not hit or np.array_equal(d, payload_of(s)) for hit, d, s in zip(ok, dests, req["seeds"])]
                out = {"ok": ok, "same": same}
            elif req["op"] == "contains":
                out = {"ok": tier.contains([key_of(s) for s in req["seeds"]])}
            elif req["op"] == "store_get":
                store = store or over_store(tier)
                refs = store.get([key_of(s) for s in req["seeds"]])
                out = {"ok": [r is not None for r in refs]}
                for r in refs:
                    if r is not None:
                        r.release()
            elif req["op"] == "stats":
                s = tier.stats()
                out = {"hits": s.hits, "misses": s.misses, "errors": s.errors, "puts": s.puts, **s.extra}
            else:
                out = {"error": f"unknown op {req['op']!r}"}
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            out = {"error": f"{type(e).__name__}: {e}"}
        out["s"] = time.monotonic() - t0
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    serve(make_tier(json.loads(sys.argv[1])))
