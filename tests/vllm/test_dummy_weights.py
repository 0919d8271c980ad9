"""The GPU benchmarks' dummy weights make a model whose output depends on its KV.

vLLM's own dummy weights (U(-1e-3, 1e-3), norms included) make greedy outputs follow the last token
alone: on the H100 every prompt length answered a two-token cycle, so "outputs match vLLM alone"
held whatever a connector loaded. ``kvtier.vllm.phases.start_llm`` replaces them for
``load_format="dummy"`` (:func:`use_kv_sensitive_dummy_weights`), in vLLM's spawned worker processes
too (a general plugin).
"""

from __future__ import annotations

import torch

from kvtier.vllm.phases import run_phase, use_kv_sensitive_dummy_weights


def test_prompts_that_differ_only_early_get_different_answers(tiny_model):
    """Two prompts with the same last 32 tokens: with vLLM's dummy weights both answered
    [345, 668, 345, 668, ...] on vLLM 0.32's CPU engine (its worker is a spawned process)."""
    a = [(7 * i) % 1000 + 3 for i in range(96)]
    b = [(11 * i + 5) % 1000 + 3 for i in range(64)] + a[64:]
    steps = [{"op": "generate", "prompts": [a, b], "max_tokens": 8}]
    out = run_phase(tiny_model, steps, None, engine={"load_format": "dummy", "gpu_memory_utilization": 0.3})
    got_a, got_b = out["steps"][0]["outputs"]
    assert got_a != got_b, got_a
    assert len(set(got_a)) > 2, f"a short cycle again: {got_a}"


def test_every_process_draws_the_same_weights_and_norms_are_one():
    from vllm.model_executor.model_loader import weight_utils

    use_kv_sensitive_dummy_weights()
    init = weight_utils.initialize_single_dummy_weight
    x, y = torch.empty(64, 128, dtype=torch.bfloat16), torch.empty(64, 128, dtype=torch.bfloat16)
    init(x)
    init(y)
    assert torch.equal(x, y)  # seeded per tensor: two engine processes hold the same model
    bound = (3.0 / 128) ** 0.5
    assert 0.5 * bound < float(x.float().abs().max()) <= bound * 1.01
    norm = torch.empty(128, dtype=torch.bfloat16)
    init(norm)
    assert torch.equal(norm, torch.ones(128, dtype=torch.bfloat16))
    ids = torch.zeros(4, dtype=torch.int64)
    init(ids)  # integers keep vLLM's own handling (left as they are on CUDA and CPU)
    assert torch.equal(ids, torch.zeros(4, dtype=torch.int64))
