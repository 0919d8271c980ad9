"""kvtier for vLLM: ``KVTierConnector``, a v1 KV connector.

Load it with ``kv_connector="KVTierConnector"`` (registered by :mod:`kvtier.vllm.plugin`), or
with ``kv_connector_module_path="kvtier.vllm"`` besides.
The engine-agnostic halves live in :mod:`kvtier.vllm.scheduler` (ledger) and
:mod:`kvtier.vllm.worker` (loads/saves); :mod:`kvtier.vllm.connector` adapts them.
The connector (and vLLM with it) is imported on first use of ``KVTierConnector``,
so the engine-agnostic halves import without vLLM.
"""

__all__ = ["KVTierConnector"]


def __getattr__(name: str):
    if name == "KVTierConnector":
        from kvtier.vllm.connector import KVTierConnector

        return KVTierConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
