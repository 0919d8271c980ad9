"""Triton backend: paged KV cache on a CUDA GPU <-> chunk buffers (pinned host or device).

One JIT kernel, ``_kv_copy``, moves whole rows (the W elements of one
(K/V, layer, token)) between the paged cache and a "chunk image" (bytes laid
out exactly as ``[2, L, T, W]`` chunks, or a run of pairs of one chunk), for
all layers in one launch. Per-layer bases, chunk addresses and the staging
ring are all reached as word offsets from one anchor tensor, so buffers from
different allocations (device, or pinned host memory through unified
addressing) need no pointer table of typed tensors. Rows move as raw words
(8, 4, 2 or 1 bytes, the widest the alignment allows): no float type involved.

Two ways to reach host chunk buffers (``mode``):

``"staged"`` (default)
    The kernel gathers into (or scatters from) a small ring of device staging
    buffers laid out exactly like the host chunks, and the copy engine moves
    each staged piece with one ``cudaMemcpyAsync`` per chunk. Each ring slot
    has its own stream, which runs its kernel and its DMAs in order, so a
    piece needs no events; consecutive pieces alternate slots, so the kernel
    of one overlaps the DMA of the previous. SMs work only for the device-side
    gather (about 1/30 of the PCIe time) and the DMA runs at the speed of a
    plain pinned ``copy_``.
``"uva"``
    Zero-copy: the kernel reads/writes pinned host memory directly over PCIe
    (unified virtual addressing). One launch, no staging memory, but it keeps
    SMs busy for the whole PCIe transfer.

Which is the default was decided by measurement (``benchmarks/bench_transfer.py``,
``docs/transfer.md``); ``KVTIER_TRANSFER_MODE`` or :func:`configure` overrides.

Streams: every call first makes its side streams wait for ``stream`` (default:
the caller's current stream), so it reads/writes the cache only after the
work already queued there; it never makes ``stream`` wait. The returned
:class:`~.paged.Transfer` holds an event after the last enqueued op: for a
load, ``t.wait_on(stream)`` before attention reads the slots; for a save, the
blocks may be reused and the chunk bytes read once ``t.done()``/``t.wait()``.

Every layout but ``cpu`` (vLLM's CPU backend layout, which only exists on CPU
tensors, refused with :class:`~.paged.LayoutError`): contiguous rows, or rows in
one piece per head (``kv_split``, vLLM 0.32's GPU layout).

Importing this module never fails when Triton is absent; ``available()`` says
whether it can run.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Sequence

import torch

from kvtier.trace import record, span

from .paged import LayoutError, PagedKV, Transfer, check_args, check_slots_host, layer_range

try:  # pragma: no cover - depends on the installation
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # noqa: BLE001 - any import failure means "no Triton"
    triton = None
    tl = None
    _HAVE_TRITON = False

log = logging.getLogger(__name__)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_WORD_DTYPE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}

# Tunables (see configure()).
_CFG = {
    "mode": os.environ.get("KVTIER_TRANSFER_MODE", "staged"),
    "staging_bytes": int(os.environ.get("KVTIER_STAGING_MB", "32")) << 20,  # one ring slot
    "staging_slots": int(os.environ.get("KVTIER_STAGING_SLOTS", "2")),
    # A save's pieces stay this small: vLLM's copy of the sampled tokens to the host queues behind the
    # save's DMAs in flight (two pieces), and 2 x 32 MiB of them added 1.27 ms to the step's end on an
    # H100, 2 x 8 MiB 0.07-0.31 ms (benchmarks/bench_save_tail.py). Loads copy the other way.
    "save_piece_bytes": int(os.environ.get("KVTIER_SAVE_PIECE_MB", "8")) << 20,
    "min_pieces": 4,  # split a transfer into at least this many pieces so DMA and gather overlap
}


def configure(mode: str | None = None, staging_bytes: int | None = None, staging_slots: int | None = None,
              min_pieces: int | None = None, save_piece_bytes: int | None = None) -> dict:
    """Change the tunables (process-wide); returns the current settings."""
    if mode is not None:
        if mode not in ("staged", "uva"):
            raise ValueError(f"mode must be 'staged' or 'uva', got {mode!r}")
        _CFG["mode"] = mode
    if staging_bytes is not None:
        _CFG["staging_bytes"] = int(staging_bytes)
    if staging_slots is not None:
        if staging_slots < 1:
            raise ValueError("staging_slots must be >= 1")
        _CFG["staging_slots"] = int(staging_slots)
    if min_pieces is not None:
        _CFG["min_pieces"] = max(1, int(min_pieces))
    if save_piece_bytes is not None:
        _CFG["save_piece_bytes"] = max(1, int(save_piece_bytes))
    with _LOCK:
        _STATE.clear()  # ring is rebuilt with the new sizes on next use
    return dict(_CFG)


def available() -> bool:
    """Triton imports and a CUDA device is present (or the interpreter is on)."""
    return _HAVE_TRITON and (torch.cuda.is_available() or _INTERPRET)


if _HAVE_TRITON:

    # Per-call values are not specialised on, so a new offset never triggers a recompile
    # in the serving path (only W, T, BS, word size and the flags select a compiled variant).
    @triton.jit(do_not_specialize=["buf_base", "buf_stride", "tok0", "n_tok", "pair0", "skip", "num_slots"])
    def _kv_copy(
        anchor,  # *word: every address below is anchor + a word offset
        layer_off,  # *int64 [L]: word offset of each layer's base
        buf_off,  # *int64 [chunks]: word offset of each chunk image (USE_TABLE)
        buf_base,  # word offset of chunk image 0 (not USE_TABLE)
        buf_stride,  # words between chunk images (not USE_TABLE)
        slots,  # *int32/int64: slot of each token (global token index), -1 = skip
        tok0,  # first global token of this launch (a multiple of T)
        n_tok,  # tokens in this launch
        pair0,  # first (kv, layer) pair of this launch; pair = kv * L + layer
        skip,  # tokens with global index < skip are not moved
        num_slots,
        L,
        block_stride,  # words
        kv_stride,  # words
        tok_stride,  # words
        piece_stride,  # words between the pieces of a row (kv_split: one piece per head)
        W: tl.constexpr,  # words per row
        T: tl.constexpr,  # tokens per chunk
        BS: tl.constexpr,  # block size
        PS: tl.constexpr,  # words per piece (W: the row is one piece); BLOCK_W divides it
        TO_PAGED: tl.constexpr,
        USE_TABLE: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_W: tl.constexpr,
        VEC: tl.constexpr,  # row offsets are multiples of VEC words (alignment hint)
    ):
        pid_t = tl.program_id(0)
        pid_p = tl.program_id(1)
        t_loc = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # token index within this launch
        c_loc = (pid_t * BLOCK_T) // T  # chunk image of this program (BLOCK_T divides T)
        tt = t_loc - c_loc * T  # token within the chunk
        in_range = t_loc < n_tok
        slot = tl.load(slots + tok0 + t_loc, mask=in_range, other=-1).to(tl.int64)
        ok = in_range & (slot >= 0) & (slot < num_slots) & (tok0 + t_loc >= skip)
        p = pair0 + pid_p
        kv = p // L
        layer = p - kv * L
        blk = slot // BS
        off = slot - blk * BS
        prow = tl.load(layer_off + layer) + blk * block_stride + kv * kv_stride + off * tok_stride
        if USE_TABLE:
            cbase = tl.load(buf_off + c_loc)
        else:
            cbase = buf_base + c_loc.to(tl.int64) * buf_stride
        # A whole chunk image (USE_TABLE) holds every pair; a staging piece only this launch's.
        if USE_TABLE:
            bpair = p.to(tl.int64)
        else:
            bpair = pid_p.to(tl.int64)
        brow = cbase + (bpair * T + tt) * W
        prow = tl.multiple_of(prow, VEC)
        brow = tl.multiple_of(brow, VEC)
        for w0 in tl.static_range(0, W, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            cm = cols < W
            # The tile lies inside one piece (BLOCK_W divides PS): piece w0 // PS, at w0 % PS in it.
            pcols = (w0 // PS) * piece_stride + (w0 % PS) + tl.arange(0, BLOCK_W)
            if TO_PAGED:
                m = ok[:, None] & cm[None, :]
                x = tl.load(anchor + brow[:, None] + cols[None, :], mask=m)
                tl.store(anchor + prow[:, None] + pcols[None, :], x, mask=m)
            else:
                # Rows of tokens not moved are written as zeros: a chunk never carries
                # stale staging bytes (which may be another request's KV).
                x = tl.load(anchor + prow[:, None] + pcols[None, :], mask=ok[:, None] & cm[None, :], other=0)
                tl.store(anchor + brow[:, None] + cols[None, :], x, mask=in_range[:, None] & cm[None, :])


# ---------------------------------------------------------------------- per-device state
_LOCK = threading.Lock()
_STATE: dict = {}


class _Ring:
    """Device staging buffers, each with its own stream.

    Slot j is only ever touched by stream j -- the kernel that fills or drains it and
    its DMAs -- so kernel -> DMA -> reuse of a slot is ordered by that stream alone,
    with no events between them; consecutive pieces alternate slots, hence streams,
    so the kernel of one piece overlaps the DMA of the previous one.
    """

    def __init__(self, device: torch.device, slot_bytes: int, n: int):
        self.slot_bytes = slot_bytes
        self.bufs = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(n)]
        cuda = device.type == "cuda"
        self.streams = [torch.cuda.Stream(device) if cuda else None for _ in range(n)]
        self.handles = [st.cuda_stream if cuda else 0 for st in self.streams]
        self.next = 0


class _Dev:
    def __init__(self, device: torch.device):
        self.device = device
        self.anchor = torch.empty(64, dtype=torch.int64, device=device)  # 512-byte aligned
        cuda = device.type == "cuda"
        self.kstream = torch.cuda.Stream(device) if cuda else None  # direct kernels, mapping copies
        self.khandle = self.kstream.cuda_stream if cuda else 0  # raw handle, for direct launches
        self.ring: _Ring | None = None
        # Re-recorded by each call, under the lock (a wait captures the record before it).
        self.caller_ev = torch.cuda.Event() if cuda else None
        self.map_ev = torch.cuda.Event() if cuda else None
        self.lock = threading.Lock()

    def ring_for(self, piece_bytes: int) -> _Ring:
        size = max(_CFG["staging_bytes"], piece_bytes)
        if self.ring is None or self.ring.slot_bytes < size:
            if self.ring is not None:  # the old ring may still be in use: wait for it
                for st in self.ring.streams:
                    if st is not None:
                        st.synchronize()
            self.ring = _Ring(self.device, size, _CFG["staging_slots"])
        return self.ring


def _dev(device: torch.device) -> _Dev:
    key = str(device)
    with _LOCK:
        d = _STATE.get(key)
        if d is None:
            d = _STATE[key] = _Dev(device)
        return d


def _event(stream, ev=None):
    """Record ``ev`` (a new event when None) on ``stream``; None on CPU."""
    if stream is None:
        return None
    ev = ev if ev is not None else torch.cuda.Event()
    ev.record(stream)
    return ev


def _wait(stream, ev) -> None:
    if stream is not None and ev is not None:
        stream.wait_event(ev)


def _use(stream) -> None:
    """Make ``stream`` current (cheaper than the ``torch.cuda.stream`` context; restored by the caller)."""
    if stream is not None:
        torch.cuda.set_stream(stream)


# ---------------------------------------------------------------------- geometry
def _word_size(paged: PagedKV, anchor_ptr: int, extra_ptrs: Sequence[int]) -> tuple[int, int]:
    """(bytes per word, VEC) for this call: the widest word every address and stride allows."""
    cache = paged.__dict__.setdefault("_kvtier_gcd", {})
    g = cache.get(anchor_ptr)
    if g is None:
        isz = paged.itemsize
        g = 0
        for v in (paged.width * isz, paged.block_stride * isz, paged.kv_stride * isz, paged.token_stride * isz,
                  paged.piece_size * isz, paged.piece_stride * isz):
            g = math.gcd(g, v)
        for t in paged.layers:
            g = math.gcd(g, t.data_ptr() - anchor_ptr)
        cache[anchor_ptr] = g
    for p in extra_ptrs:
        g = math.gcd(g, p - anchor_ptr)
    g = g or 16
    word = 8
    while g % word:
        word //= 2
    vec = 16 // word if g % 16 == 0 else 1
    return word, vec


def _layer_table(paged: PagedKV, d: _Dev, word: int) -> torch.Tensor:
    cache = paged.__dict__.setdefault("_kvtier_tables", {})
    key = (str(d.device), word, d.anchor.data_ptr())
    t = cache.get(key)
    if t is None:
        a = d.anchor.data_ptr()
        offs = [(x.data_ptr() - a) // word for x in paged.layers]
        t = cache[key] = torch.tensor(offs, dtype=torch.int64).to(d.device)
    return t


def _blocks(w_words: int, tokens: int, ps_words: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_W, num_warps): tiles of about 4 KiB words, BLOCK_T dividing T.

    A row in pieces (``ps_words < w_words``) takes BLOCK_W dividing the piece, so that
    no column tile straddles two pieces.
    """
    if ps_words < w_words:
        block_w = min(ps_words & -ps_words, 512)  # largest power of two dividing the piece
    else:
        block_w = min(triton.next_power_of_2(w_words), 512)
    bt = max(1, 2048 // block_w)
    while tokens % bt:
        bt //= 2
    return bt, block_w, 4


def _geometry(paged: PagedKV, d: _Dev, word: int, tokens: int) -> tuple:
    """Per (cache, chunk size, word size): the launch constants, computed once."""
    cache = paged.__dict__.setdefault("_kvtier_geo", {})
    key = (str(d.device), word, tokens, d.anchor.data_ptr())
    g = cache.get(key)
    if g is None:
        isz = paged.itemsize
        w_words = paged.width * isz // word
        ps_words = paged.piece_size * isz // word
        bt, bw, warps = _blocks(w_words, tokens, ps_words)
        fixed = (d.anchor.view(_WORD_DTYPE[word]) if word != 8 else d.anchor, _layer_table(paged, d, word),
                 paged.num_slots, paged.num_layers,
                 paged.block_stride * isz // word, paged.kv_stride * isz // word, paged.token_stride * isz // word,
                 paged.piece_stride * isz // word)
        g = cache[key] = fixed + (
            dict(W=w_words, T=tokens, BS=paged.block_size, PS=ps_words, BLOCK_T=bt, BLOCK_W=bw, num_warps=warps),
            bt,
            (warps,) + _launch_key(fixed),
        )
    return g


# Compiled kernels by launch key (see _launch_key): launched without Triton's per-call
# argument binding, which costs tens of microseconds of host time per launch.
_COMPILED: dict = {}
_DIRECT = {"on": os.environ.get("KVTIER_TRITON_DIRECT", "1") != "0" and not _INTERPRET}
_KNOBS = getattr(triton, "knobs", None) if _HAVE_TRITON else None


def _launch_key(args: tuple) -> tuple:
    """What Triton picks a compiled variant by, kept at least as fine as Triton's own key.

    Triton specialises pointers on dtype and 16-byte alignment and integers on width
    (i32 / i64), ``== 1`` and divisibility by 16 (the last two only where not in
    ``do_not_specialize``); this key takes all three for every integer, so two launches
    with one key always run the same compiled code.
    """
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            key.append((-(1 << 31) <= a < (1 << 31), a == 1, a % 16 == 0))
    return tuple(key)


def _fast_path(compiled):
    """(launcher, function, packed metadata) of a compiled kernel; None where this Triton differs."""
    try:
        compiled._init_handles()
        return compiled.run, compiled.function, compiled.packed_metadata
    except Exception:  # noqa: BLE001 - an older/newer CompiledKernel: use its runner instead
        return None


def _no_hook(hook) -> bool:
    """``hook`` is unset: None, or an empty ``HookChain`` (its ``calls`` list)."""
    return hook is None or (isinstance(getattr(hook, "calls", None), list) and not hook.calls)


def _hooks_off() -> bool:
    """No launch hooks (profilers) are installed, so launching without them loses nothing."""
    rt = getattr(_KNOBS, "runtime", None)
    return rt is not None and _no_hook(rt.launch_enter_hook) and _no_hook(rt.launch_exit_hook)


def _launch(geo: tuple, vec: int, slots: torch.Tensor, *, tok0: int, n_tok: int, pair0: int, n_pairs: int,
            skip: int, to_paged: bool, stream: int, table: torch.Tensor | None = None, buf_base: int = 0,
            buf_stride: int = 0) -> None:
    """One kernel launch on raw CUDA stream ``stream`` (which must also be the current stream)."""
    anchor, layer_tab, num_slots, n_layers, bstr, kvstr, tstr, pstr, consts, bt, fixed_key = geo
    grid = (triton.cdiv(n_tok, bt), n_pairs, 1)
    buf_off = table if table is not None else slots  # unused pointer when not USE_TABLE
    args = (anchor, layer_tab, buf_off, buf_base, buf_stride, slots, tok0, n_tok, pair0, skip, num_slots,
            n_layers, bstr, kvstr, tstr, pstr)
    # Constexprs in the kernel's parameter order (the launcher takes them, and skips them).
    cvals = (consts["W"], consts["T"], consts["BS"], consts["PS"], to_paged, table is not None, consts["BLOCK_T"],
             consts["BLOCK_W"], vec)
    key = None
    if _DIRECT["on"]:  # the per-geometry arguments are keyed once, in fixed_key
        key = (fixed_key, cvals) + _launch_key((buf_off, buf_base, buf_stride, slots, tok0, n_tok, pair0, skip))
        entry = _COMPILED.get(key)
        if entry is not None:
            compiled, fast = entry
            try:
                if fast is not None and _hooks_off():
                    fast[0](grid[0], grid[1], 1, stream, fast[1], fast[2], None, None, None, *args, *cvals)
                else:
                    compiled[grid](*args, *cvals, stream=stream)
                return
            except TypeError:  # this Triton's launcher takes other arguments: use the binder from now on
                log.warning("kvtier: launching compiled Triton kernels directly failed; using Triton's binder")
                _DIRECT["on"] = False
                _COMPILED.clear()
                key = None
    compiled = _kv_copy[grid](*args, TO_PAGED=to_paged, USE_TABLE=table is not None, VEC=vec, **consts)
    if key is not None and compiled is not None:
        _COMPILED[key] = (compiled, _fast_path(compiled))


def _raw(c: torch.Tensor) -> torch.Tensor:
    return c.view(torch.uint8).view(-1) if c.dtype != torch.uint8 else c


# ---------------------------------------------------------------------- the calls
def check_layout(paged: PagedKV) -> None:
    """Raise :class:`LayoutError` for vLLM's CPU layout, which only exists on CPU tensors."""
    if paged.kind == "cpu":
        raise LayoutError(
            f"the Triton backend does not move layout 'cpu' ({paged.describe()}): it is vLLM's CPU "
            f"backend layout, which only exists on CPU: use backend='torch'"
        )


def _pair_runs(paged: PagedKV, layers) -> list[tuple[int, int]]:
    """The (first pair, pair count) runs of layers ``[lo, hi)``; pair = kv * L + layer."""
    lo, hi = layer_range(paged, layers)
    if (lo, hi) == (0, paged.num_layers):
        return [(0, paged.num_kv * paged.num_layers)]
    return [(kv * paged.num_layers + lo, hi - lo) for kv in range(paged.num_kv)]


def _move(paged: PagedKV, slot_mapping: torch.Tensor, chunks: Sequence[torch.Tensor], skip: int,
          to_paged: bool, stream, mode: str | None, layers=None) -> Transfer:
    check_layout(paged)
    tokens, n = check_args(paged, slot_mapping, chunks, skip)
    runs = _pair_runs(paged, layers)
    dev = paged.device
    slots = slot_mapping[:n] if slot_mapping.numel() != n else slot_mapping
    host_map = slots.device.type == "cpu"
    if host_map:
        check_slots_host(paged, slots)  # the max; -1 (skip) never raises
        if dev.type == "cuda" and not slots.is_pinned():
            # A pageable H2D blocks the host until the driver has staged it; from pinned
            # memory (torch's caching host allocator, which also keeps the block until the
            # copy is done) it is one async DMA.
            with span("transfer.pin_map", tokens=int(slots.numel())):
                slots = slots.pin_memory()
    mode = mode or _CFG["mode"]
    d = _dev(dev)
    raws = [_raw(c) for c in chunks]
    on_dev = [r.device == dev for r in raws]
    if any(on_dev) and not all(on_dev):
        raise ValueError("chunk buffers must be all on the KV cache's device or all on the host")
    if mode == "uva" and dev.type == "cuda" and not all(on_dev) and not all(r.is_pinned() for r in raws):
        raise ValueError("mode='uva' needs pinned host chunk buffers (torch pin_memory=True)")
    # (Pageable host buffers work in staged mode, at pageable-copy speed.)
    direct = all(on_dev) or mode == "uva"
    cuda = dev.type == "cuda"
    if cuda and torch.cuda.current_device() != dev.index:
        with torch.cuda.device(dev):
            return _move(paged, slot_mapping, chunks, skip, to_paged, stream, mode, layers)
    prev = torch.cuda.current_stream(dev) if cuda else None
    caller = (stream if stream is not None else prev) if cuda else None
    t_lock = time.perf_counter()
    with d.lock:
        record("transfer.lock_wait", t_lock, time.perf_counter() - t_lock)  # (KVTIER_TRACE only)
        ks = d.kstream
        try:
            after = _event(caller, d.caller_ev)  # touch the cache only after the caller's queued work
            copy_map = host_map or slots.device != dev  # the kernels read the mapping on `dev`
            if direct or copy_map:
                _wait(ks, after)
                _use(ks)
                if copy_map:
                    slots = slots.to(dev, non_blocking=True)
                    after = _event(ks, d.map_ev)  # the staged streams start after the mapping's copy
                elif cuda:
                    slots.record_stream(ks)  # the caller's tensor: keep its memory until ks is past it
            if direct:
                word, vec = _word_size(paged, d.anchor.data_ptr(), [r.data_ptr() for r in raws])
                a = d.anchor.data_ptr()
                table = torch.tensor([(r.data_ptr() - a) // word for r in raws], dtype=torch.int64)
                table = table.to(dev, non_blocking=True) if cuda else table
                geo = _geometry(paged, d, word, tokens)
                for p0, npairs in runs:
                    _launch(geo, vec, slots, tok0=0, n_tok=n, pair0=p0, n_pairs=npairs, skip=skip,
                            to_paged=to_paged, stream=d.khandle, table=table)
                return Transfer(_event(ks), keep=(raws, slots, table))
            with span("transfer.staged", chunks=len(raws), to_paged=to_paged):
                done = _staged(d, paged, slots, raws, tokens, skip, to_paged, runs, after)
            return Transfer(done, keep=(raws, slots))
        finally:
            _use(prev)


def _pieces(paged: PagedKV, n_chunks: int, tokens: int, slot_bytes: int, runs: list[tuple[int, int]]):
    """Split the transfer into pieces that fit one ring slot: (c0, c1, pair0, n_pairs).

    A piece holds, for each chunk of ``[c0, c1)``, pairs ``[pair0, pair0 + n_pairs)`` of one run.
    """
    pair_bytes = tokens * paged.width * paged.itemsize
    total = n_chunks * sum(n for _, n in runs) * pair_bytes
    target = min(slot_bytes, max(pair_bytes, -(-total // _CFG["min_pieces"])))
    for r0, rn in runs:
        run_bytes = rn * pair_bytes
        if run_bytes <= target:
            k = target // run_bytes
            for c0 in range(0, n_chunks, k):
                yield c0, min(c0 + k, n_chunks), r0, rn
        else:
            q = max(1, target // pair_bytes)
            for c in range(n_chunks):
                for p0 in range(r0, r0 + rn, q):
                    yield c, c + 1, p0, min(q, r0 + rn - p0)


def _staged(d: _Dev, paged: PagedKV, slots: torch.Tensor, raws: list, tokens: int, skip: int,
            to_paged: bool, runs: list[tuple[int, int]], after) -> object:
    """Pieces through the ring, each on its slot's stream, all after event ``after``.

    A save piece is a gather kernel into the slot, then one DMA per chunk out of it; a
    load piece the mirror image. Returns an event recorded after every piece.
    """
    pair_bytes = tokens * paged.width * paged.itemsize
    ring = d.ring_for(pair_bytes)
    word, vec = _word_size(paged, d.anchor.data_ptr(), [b.data_ptr() for b in ring.bufs])
    geo = _geometry(paged, d, word, tokens)
    a = d.anchor.data_ptr()
    limit = ring.slot_bytes if to_paged else min(ring.slot_bytes, _CFG["save_piece_bytes"])
    pkey = (len(raws), tokens, limit, tuple(runs), _CFG["min_pieces"])
    cache = paged.__dict__.setdefault("_kvtier_pieces", {})
    pieces = cache.get(pkey)
    if pieces is None:
        pieces = cache[pkey] = list(_pieces(paged, len(raws), tokens, limit, runs))
    used: list[int] = []  # ring slots (streams) this call runs on, in first-use order
    j = ring.next
    for c0, c1, p0, npairs in pieces:
        j = ring.next
        ring.next = (j + 1) % len(ring.bufs)
        st = ring.streams[j]
        if j not in used:
            used.append(j)
            _wait(st, after)
        _use(st)
        buf = ring.bufs[j]
        piece = npairs * pair_bytes  # bytes of one chunk inside this piece
        lo = p0 * pair_bytes
        launch = dict(tok0=c0 * tokens, n_tok=(c1 - c0) * tokens, pair0=p0, n_pairs=npairs, skip=skip,
                      to_paged=to_paged, stream=ring.handles[j], buf_base=(buf.data_ptr() - a) // word,
                      buf_stride=piece // word)
        if to_paged:
            for i, c in enumerate(range(c0, c1)):
                buf[i * piece:(i + 1) * piece].copy_(raws[c][lo:lo + piece], non_blocking=True)
            _launch(geo, vec, slots, **launch)
        else:
            _launch(geo, vec, slots, **launch)
            for i, c in enumerate(range(c0, c1)):
                raws[c][lo:lo + piece].copy_(buf[i * piece:(i + 1) * piece], non_blocking=True)
    last = ring.streams[j]  # the last piece's stream waits for the others; one event after all
    for k in used:
        if k != j:
            _wait(last, _event(ring.streams[k]))
        if ring.streams[k] is not None:
            slots.record_stream(ring.streams[k])  # read there: keep its memory until they are past it
    return _event(last)


def gather(paged: PagedKV, slot_mapping: torch.Tensor, chunks: Sequence[torch.Tensor],
           skip_prefix_n_tokens: int = 0, *, stream=None, mode: str | None = None, layers=None) -> Transfer:
    """Paged KV -> chunk buffers (save); enqueued on side streams after ``stream``'s work.

    Chunk rows of tokens not moved (index < skip, slot -1) are written as zeros.
    """
    return _move(paged, slot_mapping, chunks, skip_prefix_n_tokens, False, stream, mode, layers)


def scatter(paged: PagedKV, slot_mapping: torch.Tensor, chunks: Sequence[torch.Tensor],
            skip_prefix_n_tokens: int = 0, *, stream=None, mode: str | None = None, layers=None) -> Transfer:
    """Chunk buffers -> paged KV (load); ``t.wait_on(stream)`` before reading the slots."""
    return _move(paged, slot_mapping, chunks, skip_prefix_n_tokens, True, stream, mode, layers)
