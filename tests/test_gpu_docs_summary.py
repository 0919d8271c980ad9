"""gpu_docs' verdict on pass 3's outputs: which document parts from vLLM alone's, where, and how close
each side's choice was there (a near tie, which bf16 rounding alone can flip, against a clear lead,
which only different KV explains)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_docs  # noqa: E402


def _run(outputs: list[list[int]], margins: list[list[float]]) -> dict:
    steps: list[dict] = [{"op": "metrics", "values": {}}]
    for p in (1, 2):
        steps += [{"op": "ttft", "pass": p, "s": 0.1, "cached": 0, "tokens": [i]} for i in range(len(outputs))]
        steps.append({"op": "metrics", "values": {}})
    steps.append({"op": "generate", "pass": 3, "s": 1.0, "cached": 0, "outputs": outputs, "margins": margins})
    steps.append({"op": "metrics", "values": {}})
    return {"startup_s": 1.0, "steps": steps}


def test_pass3_names_the_differing_document_position_and_both_margins() -> None:
    base = _run([[5, 6, 7, 8], [1, 2, 3, 4]], [[0.5, 0.4, 0.3, 0.2], [1.0, 0.9, 0.01, 0.7]])
    mine = copy.deepcopy(base)
    gen = next(x for x in mine["steps"] if x["op"] == "generate")
    gen["outputs"][1][2:] = [9, 9]
    gen["margins"][1][2] = 0.02
    rows = gpu_docs.summarize("kvtier_cpu", mine, base)
    (p3,) = [r for r in rows if r["pass"] == 3]
    assert p3["outputs_match"] is False
    assert p3["outputs_differ_at"] == [[1, 2]]
    assert p3["margins_where_differ"] == [[1, 2, 0.02, 0.01]]
    (same,) = [r for r in gpu_docs.summarize("kvtier_cpu", copy.deepcopy(base), base) if r["pass"] == 3]
    assert same["outputs_match"] is True and same["outputs_differ_at"] == [] and same["margins_where_differ"] == []


def test_pass3_is_also_set_against_vllm_apc_the_control_with_the_same_reuse() -> None:
    """A document that parts from vLLM alone's but equals vLLM-with-its-prefix-cache's shows no
    difference from the control; one that parts from both shows it with both margins."""
    base = _run([[5, 6], [1, 2], [3, 4]], [[0.5, 0.4], [0.0, 0.3], [0.2, 0.1]])
    control = copy.deepcopy(base)
    next(x for x in control["steps"] if x["op"] == "generate")["outputs"][1] = [7, 2]
    mine = copy.deepcopy(control)
    gen = next(x for x in mine["steps"] if x["op"] == "generate")
    gen["outputs"][2][1] = 8
    gen["margins"][2][1] = 0.03125
    (p3,) = [r for r in gpu_docs.summarize("kvtier_cpu", mine, base, control) if r["pass"] == 3]
    assert p3["outputs_differ_at"] == [[1, 0], [2, 1]]
    assert p3["differ_from_vllm_apc"] == [[2, 1, 0.03125, 0.1]]
    (no_control,) = [r for r in gpu_docs.summarize("kvtier_cpu", mine, base) if r["pass"] == 3]
    assert "differ_from_vllm_apc" not in no_control
