"""vLLM general plugin: lets users write ``"kv_connector": "KVTierConnector"`` without
``kv_connector_module_path``.

Registered through the ``vllm.general_plugins`` entry point (pyproject.toml), which vLLM
loads in every engine and worker process before it creates connectors. Registration is
lazy: kvtier's connector module is imported only when an engine asks for it.
"""

from __future__ import annotations


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector("KVTierConnector", "kvtier.vllm.connector", "KVTierConnector")
    except ValueError:  # already registered (plugins load once per process; be safe if twice)
        pass
