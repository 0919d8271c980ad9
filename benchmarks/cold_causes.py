"""Where a cold prompt's extra time goes with kvtier (issue 28's "cold TTFT with saving" row): the
two kvtier engines of ``gpu_vllm.py --nosave --trace DIR`` set side by side, the one that saves
(``trace_kvtier.jsonl``) and the consumer that saves nothing (``trace_nosave.jsonl``).

For each prompt length, over its cold requests (the first ``reps`` ``phase.ttft`` spans of that
length): the median TTFT, how many engine steps ran in it (``worker.step``), kvtier's host time on
the engine's threads per step type (``step_host.*``, the sum of its hooks), and the time of each
kvtier span name inside the window, kvtier's own threads (``name [kvtier-...]``) apart since they
do not hold up the engine's thread. A TTFT gap between the two engines that their host time does
not explain is the GPU's: the save copies beside the forward. The saving engine's hits (the next
``reps`` TTFT spans of each length) are listed too (``kvtier_hits``), with the start of each engine
step inside them (``step_starts_ms``, from the request's start).

    python3 benchmarks/cold_causes.py DIR [--reps 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from async_causes import _label, _spans


def ttft_windows(spans: list[dict], first: int, count: int) -> dict[int, list[dict]]:
    """Per prompt length, its TTFT spans ``first`` to ``first + count`` in time order: gpu_vllm's
    steps time every prompt cold (the first ``reps``), then every one again as a hit (the next)."""
    seen: dict[int, int] = defaultdict(int)
    out: dict[int, list[dict]] = defaultdict(list)
    for s in sorted((s for s in spans if s["name"] == "phase.ttft"), key=lambda s: s["t"]):
        i = seen[s["tokens"]]
        seen[s["tokens"]] += 1
        if first <= i < first + count:
            out[s["tokens"]].append(s)
    return dict(out)


def inside(window: dict, spans: list[dict]) -> dict:
    a, b = window["t"], window["t"] + window["dur"]
    held = [s for s in spans if s["name"] != "phase.ttft" and a <= s["t"] < b]
    per_name: dict[str, float] = defaultdict(float)
    for s in held:
        per_name[_label(s)] += 1e3 * s["dur"]
    starts = sorted(s["t"] for s in held if s["name"] == "worker.step")
    return {"ttft_ms": 1e3 * window["dur"], "steps": len(starts),
            "step_starts_ms": [round(1e3 * (t - a), 1) for t in starts],
            "host_ms": 1e3 * sum(s["dur"] for s in held if s["name"].startswith("step_host.")),
            "per_name_ms": dict(per_name)}


def summarize(path: Path, reps: int, hits: bool = False) -> dict[int, dict]:
    """Per length, medians over its cold requests (``hits``: over the hits after them)."""
    spans = _spans(path)
    rows = {}
    for n, windows in ttft_windows(spans, reps if hits else 0, reps).items():
        got = [inside(w, spans) for w in windows]
        names = sorted({k for g in got for k in g["per_name_ms"]})
        rows[n] = {"ttft_ms": statistics.median(g["ttft_ms"] for g in got),
                   "steps": statistics.median(g["steps"] for g in got),
                   "step_starts_ms": [g["step_starts_ms"] for g in got],
                   "host_ms": statistics.median(g["host_ms"] for g in got),
                   "per_name_ms": {k: round(statistics.median(g["per_name_ms"].get(k, 0.0) for g in got), 3)
                                   for k in names}}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {name: summarize(Path(args.dir) / f"trace_{name}.jsonl", args.reps) for name in ("kvtier", "nosave")}
    result["kvtier_hits"] = summarize(Path(args.dir) / "trace_kvtier.jsonl", args.reps, hits=True)
    for n in sorted(result["kvtier"]):
        save, bare = result["kvtier"][n], result["nosave"].get(n)
        line = f"{n:>6} tokens: saving {save['ttft_ms']:.2f} ms ({save['steps']:g} steps, host {save['host_ms']:.2f} ms)"
        if bare:
            line += f", saving nothing {bare['ttft_ms']:.2f} ms ({bare['steps']:g} steps, host {bare['host_ms']:.2f} ms)"
        print(line)
    for n, hit in sorted(result["kvtier_hits"].items()):
        print(f"{n:>6} tokens, cpu hit: {hit['ttft_ms']:.2f} ms in {hit['steps']:g} steps starting at "
              f"{hit['step_starts_ms'][0]} ms (the first hit), host {hit['host_ms']:.2f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
