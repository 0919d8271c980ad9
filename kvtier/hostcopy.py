"""Host-memory copies of chunk bytes that do not depend on the caller's torch thread settings.

torch runs a CPU ``copy_`` / ``index_copy_`` on its intra-op thread pool, which by default has
one thread per core *in every process*. With several engine processes on one host those pools
oversubscribe the cores and their threads spin against each other: on 2 cores, 8 client
processes of ``kvtier serve`` copying 4 MiB chunks out moved 0.5-1.2 GB/s in total with torch's
``copy_``, 14-15 GB/s with numpy (``benchmarks/bench_server_clients.py``, docs/server.md). kvtier
therefore copies host bytes with numpy: one thread, the GIL released, whatever
``torch.set_num_threads`` says.
A copy that touches a GPU stays a torch copy (a DMA; no CPU thread pool involved).
"""

from __future__ import annotations

import numpy as np
import torch

_UINT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def host_array(t: torch.Tensor) -> np.ndarray:
    """CPU tensor ``t`` as a numpy array over the same memory (same shape and strides).

    Viewed as the integer type of its element size first: numpy has no bfloat16 or fp8, and
    a copy never needs the float type.
    """
    if t.device.type != "cpu":
        raise ValueError(f"host_array needs a CPU tensor, got one on {t.device}")
    return t.detach().view(_UINT_OF_SIZE[t.element_size()]).numpy()


def _flat_bytes(buf: object) -> np.ndarray:
    """``buf`` (CPU tensor, ndarray or buffer) as a flat uint8 array over the same memory."""
    if isinstance(buf, torch.Tensor):
        if not buf.is_contiguous():
            raise ValueError("copy_bytes needs contiguous tensors")
        return host_array(buf.reshape(-1)).view(np.uint8)
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError("copy_bytes needs contiguous arrays")
        return buf.reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


def _on_gpu(buf: object) -> bool:
    return isinstance(buf, torch.Tensor) and buf.device.type != "cpu"


def _as_tensor(buf: object) -> torch.Tensor:
    t = buf if isinstance(buf, torch.Tensor) else torch.from_numpy(_flat_bytes(buf))
    return t.reshape(-1).view(torch.uint8)


def copy_bytes(dst: object, src: object, non_blocking: bool = False) -> None:
    """Copy the bytes of ``src`` into ``dst`` (tensors of any dtype, ndarrays or buffers; same size).

    Host to host: one single-threaded memcpy that releases the GIL. If either side is a GPU
    tensor: torch ``copy_`` (``non_blocking`` as there; the caller synchronizes).
    """
    if _on_gpu(dst) or _on_gpu(src):
        d, s = _as_tensor(dst), _as_tensor(src)
        if d.numel() != s.numel():
            raise ValueError(f"copy_bytes of {s.numel()} bytes into {d.numel()}")
        d.copy_(s, non_blocking=non_blocking)
        return
    d, s = _flat_bytes(dst), _flat_bytes(src)
    if d.size != s.size:
        raise ValueError(f"copy_bytes of {s.size} bytes into {d.size}")
    np.copyto(d, s)
