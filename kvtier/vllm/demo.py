"""`kvtier demo`: a shared long document, computed once, loaded after an engine restart.

Three engine processes on a random-weight Llama made locally (no download):
1. vLLM alone: the reference outputs and the cold time to first token (TTFT);
2. vLLM + kvtier on an empty cache: computes the document once, kvtier saves it;
3. vLLM + kvtier after a restart: vLLM's own cache is gone, the document comes from
   kvtier's disk tier.
It prints TTFT per phase, kvtier's hit rate and whether every output equals phase 1's.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from kvtier.vllm.phases import run_phase


def model_dir(size: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"kvtier-model-{size}")


def run_demo(size: str = "demo", doc_tokens: int = 2048, questions: int = 4, question_tokens: int = 64,
             answer_tokens: int = 16, disk_path: str | None = None,
             out: Callable[[str], None] = print, lower: str = "disk") -> dict[str, Any]:
    """``lower``: the tier below cpu, "disk" or "mooncake" (a master and a segment holder of 1 GiB
    started here on loopback, so the chunks outlive the engine's restart)."""
    from tqdm import tqdm

    from kvtier.models import SIZES, make_random_llama

    out(f"making a random {size} Llama (no download) ...")
    model = make_random_llama(model_dir(size), size)
    vocab = SIZES[size]["vocab_size"]
    rnd = random.Random(0)
    doc = [rnd.randrange(3, vocab) for _ in range(doc_tokens)]
    prompts = [doc + [rnd.randrange(3, vocab) for _ in range(question_tokens)] for _ in range(questions)]
    disk = disk_path or tempfile.mkdtemp(prefix="kvtier-demo-disk-")
    kv = {"tiers": ["cpu", "disk"], "cpu_bytes": "1GiB", "disk_path": disk, "disk_bytes": "4GiB"}
    mooncake: list = []
    if lower == "mooncake":
        from kvtier.local_mooncake import MooncakeMaster, MooncakeSegment

        mooncake.append(MooncakeMaster())
        mooncake.append(MooncakeSegment(mooncake[0], 1 << 30))
        kv = {"tiers": ["cpu", "mooncake"], "cpu_bytes": "1GiB", "mooncake_master": mooncake[0].address,
              "mooncake_metadata": mooncake[0].metadata_url, "mooncake_segment_bytes": 0}
    elif lower != "disk":
        raise ValueError(f"lower={lower!r}: disk or mooncake")
    warm = [{"op": "ttft", "prompt": [rnd.randrange(3, vocab) for _ in range(40)]}]  # first-call overheads
    steps = warm + [{"op": "ttft", "prompt": p} for p in prompts] + [
        {"op": "generate", "prompts": prompts, "max_tokens": answer_tokens}]
    phases = [("vLLM alone", None), ("vLLM + kvtier, empty cache", kv), ("vLLM + kvtier, after restart", kv)]
    results = []
    try:
        for name, cfg in tqdm(phases, desc="kvtier demo", unit="engine", file=sys.stderr):
            results.append((name, run_phase(model, steps, cfg)))
    finally:
        if disk_path is None:
            shutil.rmtree(disk, ignore_errors=True)
        for proc in reversed(mooncake):
            proc.stop()
    ref = results[0][1]["steps"][-1]["outputs"]
    rows = []
    for name, r in results:
        ttfts = [s for s in r["steps"][1:] if s["op"] == "ttft"]
        final = r["steps"][-1]
        rows.append({"phase": name, "first_ttft_s": ttfts[0]["s"],
                     "hit_rate": ttfts[0]["cached"] / len(prompts[0]),
                     "later_ttft_s": sum(s["s"] for s in ttfts[1:]) / max(1, len(ttfts) - 1),
                     "outputs_match": final["outputs"] == ref})
    out(f"\n{questions} questions about one {doc_tokens}-token document, {size} model, vLLM on CPU, "
        f"cpu + {lower} tiers")
    out(f"{'phase':<30} {'TTFT 1st':>9} {'cached':>7} {'TTFT rest':>10}  outputs = vLLM alone")
    for r in rows:
        out(f"{r['phase']:<30} {r['first_ttft_s']:>8.2f}s {r['hit_rate']:>6.0%} {r['later_ttft_s']:>9.2f}s  "
            f"{'yes' if r['outputs_match'] else 'NO'}")
    speedup = rows[0]["first_ttft_s"] / rows[2]["first_ttft_s"]
    out(f"\nafter the restart, the first question's TTFT is {speedup:.1f}x faster than computing the document")
    return {"rows": rows, "speedup": speedup, "all_match": all(r["outputs_match"] for r in rows)}
