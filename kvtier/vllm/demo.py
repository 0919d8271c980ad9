"""``kvtier demo``: a random Llama on vLLM, a long shared prefix computed once, then loaded.

``run_demo()`` makes a random model (no download), starts vLLM with kvtier, sends a batch of
prompts sharing a long prefix, clears vLLM's own prefix cache, sends them again and reports
time to first token both ways and that the outputs are identical.
"""

from __future__ import annotations

import os
import random
import tempfile
import time


def run_demo(size: str = "tiny", prefix_tokens: int = 768, requests: int = 4, model_dir: str | None = None,
             kvtier: dict | None = None, out=print) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from kvtier.models import make_random_llama

    model = make_random_llama(model_dir or os.path.join(tempfile.gettempdir(), f"kvtier-demo-{size}"), size)
    extra = {"chunk_size": 256, "tiers": ["cpu"], "cpu_bytes": "1GiB"}
    extra.update(kvtier or {})
    llm = LLM(model=model, skip_tokenizer_init=True, enforce_eager=True, dtype="float32", block_size=32,
              enable_prefix_caching=True, max_model_len=prefix_tokens + 256, disable_log_stats=True,
              kv_transfer_config=KVTransferConfig(kv_connector="KVTierConnector",
                                                  kv_connector_module_path="kvtier.vllm",
                                                  kv_role="kv_both", kv_connector_extra_config=extra))
    rnd = random.Random(0)
    vocab = 1024 if size == "tiny" else 4096
    prefix = [rnd.randrange(3, vocab) for _ in range(prefix_tokens)]
    prompts = [TokensPrompt(prompt_token_ids=prefix + [rnd.randrange(3, vocab) for _ in range(16)])
               for _ in range(requests)]
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    result = {}
    outputs = []
    for name in ("compute", "kvtier"):
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        result[f"{name}_s"] = time.perf_counter() - t0
        result[f"{name}_cached_tokens"] = sum(o.num_cached_tokens for o in outs)
        outputs.append([o.outputs[0].token_ids for o in outs])
    result["identical"] = outputs[0] == outputs[1]
    out(f"{requests} requests sharing {prefix_tokens} tokens ({size} model): "
        f"computed in {result['compute_s']:.2f}s, with kvtier loads in {result['kvtier_s']:.2f}s "
        f"({result['kvtier_cached_tokens']} tokens loaded); outputs identical: {result['identical']}")
    return result
