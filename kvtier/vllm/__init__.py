"""kvtier for vLLM: ``KVTierConnector``, a v1 KV connector.

Load it with ``kv_connector="KVTierConnector", kv_connector_module_path="kvtier.vllm"``.
The engine-agnostic halves live in :mod:`kvtier.vllm.scheduler` (ledger) and
:mod:`kvtier.vllm.worker` (loads/saves); :mod:`kvtier.vllm.connector` adapts them.
"""

from kvtier.vllm.connector import KVTierConnector

__all__ = ["KVTierConnector"]
