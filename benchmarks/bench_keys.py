"""The cost of a new prompt's chunk keys: the first lookup of a request hashes its whole prompt.

vLLM hands the scheduler a Python list of token ids. ``KeyChain.extend`` converts it to
little-endian uint32 bytes and chains one hash per chunk. Measured against baselines from
the same run: the conversion numpy's way (``np.asarray`` then ``"<u4"``, what kvtier did
before) and the hashing alone (bytes already converted).

    .venv/bin/python benchmarks/bench_keys.py --json benchmarks/results/keys_cpu2.json
"""

from __future__ import annotations

import argparse
import random

import numpy as np

from _common import median_s, merge_json

from kvtier.keys import KeyChain, Namespace, _hash


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--hash", default="blake3")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", help="merge the results into this JSON file")
    ap.add_argument("--label", default="after")
    args = ap.parse_args()
    ns = Namespace(model="bench", kv_dtype="bfloat16", num_layers=32, num_kv_heads=8, head_size=128)
    rnd = random.Random(0)
    rows = []
    for n in args.tokens:
        toks = [rnd.randrange(0, 128256) for _ in range(n)]
        keychain = median_s(lambda: KeyChain(ns, args.chunk, args.hash).extend(toks), args.reps)
        numpy_way = median_s(lambda: np.ascontiguousarray(np.asarray(toks), dtype="<u4"), args.reps)
        raw = memoryview(np.asarray(toks, dtype="<u4")).cast("B")
        step = args.chunk * 4

        def hash_only() -> None:
            prev = ns.seed(args.hash)
            for i in range(n // args.chunk):
                prev = _hash(args.hash, prev, raw[i * step:(i + 1) * step])

        hashing = median_s(hash_only, args.reps)
        rows.append({"tokens": n, "keychain_ms": keychain * 1e3, "numpy_conversion_ms": numpy_way * 1e3,
                     "hash_only_ms": hashing * 1e3})
        print(f"{n:>7} tokens: keys {keychain * 1e3:.3f} ms (hashing alone {hashing * 1e3:.3f} ms, "
              f"{keychain / hashing:.2f}x of it); numpy's conversion alone {numpy_way * 1e3:.3f} ms "
              f"({numpy_way / keychain:.2f}x the whole keys)")
    merge_json(args.json, args.label, {"hash": args.hash, "chunk": args.chunk, "rows": rows})


if __name__ == "__main__":
    main()
