"""Test-only faults inside the worker processes of a tensor-parallel vLLM engine (issue 27.2).

vLLM's CPU platform starts TP workers with ``spawn``: the patches engine_proc.py makes in the
engine process do not reach them. vLLM imports ``worker_extension_cls`` in every worker, so an
engine started with ``worker_extension_cls="tp_faults.RankFaults"`` (this directory on
PYTHONPATH) runs this module in each rank's process. Settings come from the environment:

- ``KVT_TP_LOSE_RANK`` / ``KVT_TP_LOSE_P`` / ``KVT_TP_LOSE_SEED``: on that rank only, each chunk a
  load fetches is lost with probability p (its blocks then hold noise: a torn load);
- ``KVT_TP_STATS``: a directory where each rank writes ``rank<r>.json`` after every step
  (the worker's counters, chunks lost, the cross-rank exchanges of kvtier.vllm.ranks).
"""

from __future__ import annotations

import json
import os
import random

import torch

from kvtier.transfer import scatter
from kvtier.vllm import connector as kv_connector
from kvtier.vllm import worker as kv_worker

LOSE_RANK = int(os.environ.get("KVT_TP_LOSE_RANK", "-1"))
LOSE_P = float(os.environ.get("KVT_TP_LOSE_P", "0.25"))
STATS_DIR = os.environ.get("KVT_TP_STATS", "")
_state = {"lost": 0, "torn_blocks": 0, "rnd": random.Random(int(os.environ.get("KVT_TP_LOSE_SEED", "0")))}


class RankFaults:
    """The worker extension vLLM mixes into each worker (nothing of its own: importing is the point)."""


def _rank() -> int:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


def _lossy(get):
    def lossy_get(keys):
        got = list(get(keys))
        for i, ref in enumerate(got):
            if ref is not None and _state["rnd"].random() < LOSE_P:
                ref.release()
                got[i] = None
                _state["lost"] += 1
        return got
    return lossy_get


_orig_start_load = kv_worker.KVWorker.start_load


def start_load(self, specs):
    if _rank() == LOSE_RANK and not getattr(self.store, "_tp_lossy", False):
        self.store.get = _lossy(self.store.get)
        self.store._tp_lossy = True
    failed_blocks, failed_reqs = _orig_start_load(self, specs)
    if failed_blocks:  # what a failed load leaves in its blocks is never the right KV
        bs = self.block_size
        slots = torch.tensor([b * bs + i for b in sorted(failed_blocks) for i in range(bs)])
        scatter(self.paged, slots, [torch.randn(self.paged.chunk_shape(slots.numel()), dtype=self.paged.dtype)]).wait()
        _state["torn_blocks"] += len(failed_blocks)
    return failed_blocks, failed_reqs


_orig_wait_for_save = kv_connector.KVTierConnector.wait_for_save


def wait_for_save(self):
    _orig_wait_for_save(self)
    if STATS_DIR and self.worker is not None:
        r = _rank()
        doc = {"rank": r, "tp_rank": self.namespace.tp_rank, "worker": dict(self.worker.stats),
               "lost": _state["lost"], "torn_blocks": _state["torn_blocks"],
               "exchanges": getattr(self._ranks, "exchanges", None)}
        path = os.path.join(STATS_DIR, f"rank{r}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f)
        os.replace(path + ".tmp", path)


kv_worker.KVWorker.start_load = start_load
kv_connector.KVTierConnector.wait_for_save = wait_for_save
