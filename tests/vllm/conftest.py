"""Fixtures of the vLLM connector tests: a tiny random Llama, engines in child processes.

Engines never run in the pytest process itself (see engine_proc.py); the direct
Scheduler tests do, since they start no worker.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

sys.path.insert(0, str(Path(__file__).parent))

from engine_proc import SUMMARY, EngineProc  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from kvtier.models import make_random_llama

    return make_random_llama(tmp_path_factory.mktemp("model") / "tiny", "tiny")


class _Engines:
    """Engine processes of one test module, all closed at its end."""

    def __init__(self, logdir, module: str) -> None:
        self.logdir, self.module = logdir, module
        self.procs: list[EngineProc] = []

    def __call__(self, model: str, engine: dict, kvtier: dict | None, **kw) -> EngineProc:
        """``engines(model, engine_kwargs, kvtier_extra|None, ...) -> EngineProc``."""
        log_path = self.logdir / f"{self.module}-{len(self.procs)}.log"
        p = EngineProc(model, engine, kvtier, log_path=str(log_path), **kw)
        self.procs.append(p)
        return p

    def pair(self, model: str, engine: dict, kvtier: dict, **kw) -> tuple[EngineProc, EngineProc]:
        """vLLM alone and vLLM with kvtier (``kw`` for the latter), started side by side, both ready."""
        base = self(model, engine, None, wait=False)
        kv = self(model, engine, kvtier, wait=False, **kw)
        base.wait_ready()
        kv.wait_ready()
        return base, kv


@pytest.fixture(scope="module")
def engines(tmp_path_factory, request):
    """:class:`_Engines` of this module: ``engines(...)`` starts one, ``engines.pair(...)`` two."""
    started = _Engines(tmp_path_factory.mktemp("engine-logs"), request.module.__name__.split(".")[-1])
    yield started
    for p in started.procs:
        p.close()


def engine_kwargs(**over) -> dict:
    kw = dict(block_size=32, enable_prefix_caching=True, max_num_batched_tokens=256,
              num_gpu_blocks_override=64, max_model_len=1024, seed=0)
    kw.update(over)
    return kw


def make_connector(role: str, model_name: str, *, block_size: int, chunk_size: int, num_blocks: int,
                   layers: list[str], kv_heads: int, head_size: int):
    """A KVTierConnector (``role`` "scheduler" or "worker") built as vLLM builds one, without an
    engine: a tiny random Llama's config, a cpu tier of 16 MiB, kvtier model name ``model_name``."""
    import tempfile

    import torch
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from kvtier.models import make_random_llama
    from kvtier.vllm.connector import KVTierConnector

    model = make_random_llama(f"{tempfile.gettempdir()}/kvtier-unit-model", "tiny")
    tc = KVTransferConfig(kv_connector="KVTierConnector", kv_connector_module_path="kvtier.vllm", kv_role="kv_both",
                          kv_connector_extra_config={"chunk_size": chunk_size, "tiers": ["cpu"], "cpu_bytes": "16MiB",
                                                     "model": model_name})
    vc = EngineArgs(model=model, skip_tokenizer_init=True, enforce_eager=True, dtype="float32", block_size=block_size,
                    enable_prefix_caching=True, max_model_len=1024, num_gpu_blocks_override=num_blocks,
                    kv_transfer_config=tc).create_engine_config()
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=kv_heads, head_size=head_size, dtype=torch.float32)
    kvc = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layers, spec)])
    return KVTierConnector(vc, KVConnectorRole.SCHEDULER if role == "scheduler" else KVConnectorRole.WORKER, kvc)


def pytest_terminal_summary(terminalreporter):
    if SUMMARY["scenarios"] or SUMMARY["hit_tokens"]:
        terminalreporter.write_line(
            f"kvtier vllm: scenarios={SUMMARY['scenarios']} preemptions={SUMMARY['preemptions']} "
            f"hit_tokens={SUMMARY['hit_tokens']} load_errors={SUMMARY['load_errors']}"
        )
