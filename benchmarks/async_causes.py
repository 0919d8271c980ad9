"""What delays the running requests while cached prompts arrive: ITL spikes of a
``gpu_async.py --trace DIR`` run set against kvtier's spans in the same window.

A spike is a gap between two tokens of a running request over twice the median gap of that
run, overlapping gaps merged into one; those that begin before the first arrival (the running
requests' admission) are listed apart, in ``before_first_arrival_ms``. For each mode and run: how many spikes, their extra time, and which kvtier spans
(``KVTIER_TRACE``) overlapped them, with the overlap per span name (a span of kvtier's own threads,
``name [kvtier-load]``, overlaps without holding up the engine's thread); and the durations of the
load thread's work per arrival (planning, enqueueing copies). ``stacks_in_spikes_ms``: where the
engine's thread was during the spikes, from its sampled stacks (``KVTIER_TRACE_SAMPLE_MS``, which
``gpu_async.py --trace`` sets to 5; innermost frame first), for the time no span accounts for; a load
thread's stacks are listed apart, as ``[kvtier-load_0] stack``.

    python3 benchmarks/async_causes.py DIR [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def _spans(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def _label(span: dict) -> str:
    """A span's name, with its thread when that is one of kvtier's own (``kvtier-load``...): those
    overlap a spike without holding up the engine's thread (older traces name no thread)."""
    thread = span.get("thread", "")
    return f"{span['name']} [{thread}]" if thread.startswith("kvtier-") else span["name"]


def _merge(gaps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Overlapping gaps as one (several running requests share one step: a spike is one step)."""
    merged: list[tuple[float, float]] = []
    for a, b in sorted(gaps):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def analyse(run: dict, spans: list[dict]) -> dict:
    added = set(run["added"])
    gaps = [(a, b) for rid, ts in run["token_times"].items() if rid not in added for a, b in zip(ts, ts[1:])]
    med = statistics.median(b - a for a, b in gaps)
    spikes = sorted((a, b) for a, b in gaps if b - a > 2 * med)
    # Gaps that began before the first arrival belong to the running requests' own admission (their
    # prompts computed in steps of the batch budget): reported apart. Merged with the rest, they made
    # a 0.5-0.7 s "first-arrival stall" in two H100 runs that no arrival caused.
    first_arrival = min(run["added"].values()) if run["added"] else float("-inf")  # none: no split
    admission = _merge([g for g in spikes if g[0] < first_arrival])
    merged = _merge([g for g in spikes if g[0] >= first_arrival])
    lo = min(a for a, _ in gaps)
    hi = max(b for _, b in gaps)
    window = [s for s in spans if s["t"] + s["dur"] >= lo and s["t"] <= hi]
    overlap: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    stacks: dict[str, float] = defaultdict(float)  # KVTIER_TRACE_SAMPLE_MS: the engine thread's stacks
    for a, b in merged:
        for s in window:
            o = min(b, s["t"] + s["dur"]) - max(a, s["t"])
            if o <= 0:
                continue
            if s["name"] == "sample":
                where, thread = " < ".join(s["stack"][:6]), s.get("thread", "MainThread")
                stacks[where if thread == "MainThread" else f"[{thread}] {where}"] += o
            else:
                overlap[_label(s)][0] += 1
                overlap[_label(s)][1] += o
    by_name: dict[str, list[float]] = defaultdict(list)
    for s in window:
        if s["name"] != "sample":
            by_name[s["name"]].append(s["dur"])
    return {
        "median_itl_ms": 1e3 * med,
        "before_first_arrival_ms": [round(1e3 * (b - a), 2) for a, b in admission],
        "spikes": len(merged),
        "spike_extra_ms": 1e3 * sum(b - a - med for a, b in merged),
        "worst_spikes_ms": sorted((round(1e3 * (b - a), 2) for a, b in merged), reverse=True)[:8],
        "spans_in_spikes": {k: {"count": v[0], "overlap_ms": round(1e3 * v[1], 2)}
                            for k, v in sorted(overlap.items(), key=lambda kv: -kv[1][1])},
        "stacks_in_spikes_ms": {k: round(1e3 * v, 2) for k, v in sorted(stacks.items(), key=lambda kv: -kv[1])[:8]},
        "spans_in_window": {k: {"count": len(d), "total_ms": round(1e3 * sum(d), 2),
                                "max_ms": round(1e3 * max(d), 2)} for k, d in sorted(by_name.items())},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    d = Path(args.dir)
    out = {}
    for times in sorted(d.glob("times_*.json")):
        mode = times.stem[len("times_"):]
        spans = _spans(d / f"trace_{mode}.jsonl")
        runs = json.loads(times.read_text())
        out[mode] = {name: analyse(run, spans) for name, run in runs.items() if "token_times" in run}
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python3 benchmarks/async_causes.py " +
                                              " ".join(sys.argv[1:]), "modes": out}, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
