"""Tensor parallelism: what the ranks of one engine must agree on in a step.

Each TP rank runs its own :class:`~kvtier.vllm.worker.KVWorker` over its slice of the KV heads,
and loads its own chunks (per-rank keys, :func:`kvtier.keys.rank_keys`). vLLM aggregates what the
ranks report (``KVOutputAggregator``, vllm/distributed/kv_transfer/kv_connector/utils.py): the
invalid block ids are the union over ranks, a parked load is finished when every rank reported
it. So the scheduler already treats a load that failed on one rank as failed on all: the request
recomputes from the first failed block, on every rank.

What vLLM does not aggregate is a worker's own decision in the same step: the step's forward ran on
the failed rank's unloaded blocks, and every rank's KV of later layers depends on that rank's
attention (the all-reduce after each layer mixes the heads of all ranks). A chunk saved in that
step by another rank (of the failed request, or of a request sharing its blocks through the prefix
cache) would hold KV computed from a wrong cache. :class:`RankAgreement` unions the step's failed
requests and blocks over the ranks before any rank decides which of its saves to commit.
"""

from __future__ import annotations

from collections.abc import Callable, Set

# all_gather(obj) -> [obj of rank 0, obj of rank 1, ...], a collective every rank calls.
AllGather = Callable[[object], list]
# any_rank(flag) -> True when some rank passed True, a collective every rank calls.
AnyRank = Callable[[bool], bool]


class RankAgreement:
    """Unions a step's failed loads over the TP ranks of one engine (see the module docstring)."""

    def __init__(self, all_gather: AllGather, any_rank: AnyRank | None = None) -> None:
        self._all_gather = all_gather
        self._any = any_rank
        self.exchanges = 0  # steps whose failures were exchanged (a rank had one)

    def union(self, failed_reqs: Set[str], failed_blocks: Set[int]) -> tuple[set[str], set[int]]:
        """The failed requests and blocks of this step on any rank. Every rank calls it in the
        same step (a collective): decide whether to from the step's metadata, which all ranks share."""
        mine = bool(failed_reqs or failed_blocks)
        if self._any is not None and not self._any(mine):  # the usual step: one small all-reduce
            return set(failed_reqs), set(failed_blocks)
        self.exchanges += 1
        reqs, blocks = set(failed_reqs), set(failed_blocks)
        for r, b in self._all_gather((sorted(failed_reqs), sorted(failed_blocks))):
            reqs.update(r)
            blocks.update(b)
        return reqs, blocks

    @classmethod
    def tensor_parallel(cls) -> "RankAgreement | None":
        """Over this worker's TP group (vLLM's CPU process group); None without tensor parallelism."""
        import torch
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_tp_group

        group = get_tp_group()
        if group.world_size <= 1:
            return None
        cpu_group = group.cpu_group

        def all_gather(obj: object) -> list:
            out: list = [None] * group.world_size
            dist.all_gather_object(out, obj, group=cpu_group)
            return out

        def any_rank(flag: bool) -> bool:
            t = torch.tensor([1 if flag else 0], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=cpu_group)
            return bool(t.item())

        return cls(all_gather, any_rank)
