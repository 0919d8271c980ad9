"""kvtier's host time per step on vLLM's scheduler side, against the step of vLLM's own scheduler
(issue 28: kvtier's share of a step's host time, at most 0.3 ms for any batch).

vLLM's real v1 ``Scheduler`` with kvtier's connector, without a model (the harness of
tests/vllm/test_scheduler_direct.py: every token "sampled" at once): ``--batch`` requests of
``--prompt`` tokens each, prefilled, then decoding together. Per step it times every connector
hook vLLM's scheduler calls (lookups, allocation, ``build_connector_meta``, outputs, finish) and
vLLM's ``schedule()`` + ``update_from_output()`` around them (the baseline, measured in the same
steps, kvtier's hooks included; the fake model output is built outside the timed calls). Reported for the decode steps (the whole batch running, no load
and no save in most of them) and for the prefill steps.

    python benchmarks/bench_sched_hooks.py --json benchmarks/results/sched_hooks_cpu2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "vllm"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

HOOKS = ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
         "update_connector_output", "request_finished")


def run(batch: int, prompt: int, max_tokens: int, model: str) -> dict:
    from test_scheduler_direct import BLOCK, Harness

    blocks = batch * (-(-(prompt + max_tokens) // BLOCK) + 1) + 64
    h = Harness(model, num_blocks=blocks, budget=8192, max_model_len=prompt + max_tokens + BLOCK,
                check_answers=False)
    h.scheduler.max_num_running_reqs = h.scheduler.max_num_active_reqs = batch  # the whole batch at once
    spent = [0.0]
    conn = h.connector
    for name in HOOKS:
        fn = getattr(conn, name)

        def timed(*a, _fn=fn, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t0

        setattr(conn, name, timed)
    for i in range(batch):
        h.add(f"r{i}", [(i * 7919 + j) % 30000 + 3 for j in range(prompt)], max_tokens)
    decode, prefill = [], []  # (kvtier s, vLLM s) per step
    sched = h.scheduler
    while sched.has_requests():
        spent[0] = 0.0
        t0 = time.perf_counter()
        so = sched.schedule()
        t1 = time.perf_counter()
        out = model_output(sched, so)
        t2 = time.perf_counter()
        sched.update_from_output(so, out)
        total = time.perf_counter() - t2 + (t1 - t0)
        decoding = not so.scheduled_new_reqs and all(n == 1 for n in so.num_scheduled_tokens.values())
        (decode if decoding and len(so.num_scheduled_tokens) == batch else prefill).append((spent[0], total))
    return {"batch": batch, "prompt_tokens": prompt, "max_tokens": max_tokens,
            "decode": summarize(decode), "prefill": summarize(prefill)}


def model_output(sched, so):
    """What the model runner would return: one sampled token per request whose prompt is done."""
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    ids = list(so.num_scheduled_tokens)
    sampled = [[7] if sched.requests[r].num_computed_tokens >= sched.requests[r].num_tokens else [] for r in ids]
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                             sampled_token_ids=sampled, kv_connector_output=KVConnectorOutput())


def summarize(rows: list[tuple[float, float]]) -> dict:
    if not rows:
        return {"steps": 0}
    ours = sorted(r[0] for r in rows)
    step = sorted(r[1] for r in rows)
    return {"steps": len(rows), "kvtier_us_p50": round(statistics.median(ours) * 1e6, 1),
            "kvtier_us_p99": round(ours[min(len(ours) - 1, int(0.99 * len(ours)))] * 1e6, 1),
            "step_us_p50": round(statistics.median(step) * 1e6, 1),
            "kvtier_share_p50": round(statistics.median(r[0] / r[1] for r in rows), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="32,128,256,512")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--label", default="cpu2")
    args = ap.parse_args()
    from kvtier.models import make_random_llama

    model = make_random_llama(f"{tempfile.gettempdir()}/kvtier-unit-model", "tiny")
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        row = run(b, args.prompt, args.max_tokens, model)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        path = Path(args.json)
        doc = json.loads(path.read_text()) if path.exists() else {}
        doc[args.label] = {"command": "python " + " ".join(sys.argv), "cpus": os.cpu_count(),
                           "goal_us": 300, "rows": rows}
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
