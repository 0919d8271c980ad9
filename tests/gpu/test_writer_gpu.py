"""The writer process on a GPU machine: ``writer: auto`` picks it, its pool is pinned, chunks reach the disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from kvtier.config import KVTierConfig  # noqa: E402
from kvtier.layout import ChunkLayout  # noqa: E402
from kvtier.store import Store  # noqa: E402
from kvtier.tiers.disk import DiskTier  # noqa: E402


def test_auto_writes_from_a_process_out_of_a_pinned_shared_pool(tmp_path):
    layout = ChunkLayout(2, 256, 64, torch.bfloat16)
    cfg = KVTierConfig(chunk_size=256, tiers=("cpu", "disk"), cpu_bytes=16 * layout.nbytes,
                       disk_path=str(tmp_path), disk_bytes=2**30)
    src = torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8, device="cuda")
    key = b"gpu-chunk".ljust(16, b"\0")
    with Store(cfg, layout) as s:
        assert s.writer == "process"
        assert s.pool.buffer.is_pinned(), "the shared pool is not registered with CUDA"
        ref = s.allocate()
        ref.data.copy_(src, non_blocking=True)  # device -> host DMA into the shared pool
        torch.cuda.synchronize()
        s.commit(key, ref)
        assert s.flush(60)
        assert s.lower[0].stats().puts == 1
    disk = DiskTier(tmp_path, 2**30, layout)
    out = np.zeros(layout.nbytes, dtype=np.uint8)
    assert disk.get_into([key], [out]) == [True]
    assert np.array_equal(out, src.cpu().numpy())
