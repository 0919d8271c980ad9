"""kvtier: tiered storage for the attention KV cache of prompt prefixes.

The core (keys, layout, memory, tiers, store) knows nothing of any inference
engine; ``kvtier.vllm`` adapts it to vLLM's v1 KV connector API.
"""

__version__ = "0.1.0"
