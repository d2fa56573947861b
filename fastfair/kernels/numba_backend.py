"""Numba CPU backend: every op of ``reference`` as compiled kernels, for edge devices.

Signatures, input guarantees and the math are those of ``fastfair.kernels.reference``; the hash is
the contract of ``fastfair.kernels.hashing``, reproduced bit for bit. Addresses and signs are never
stored: each lookup computes ``fmix32(i ^ ka)`` and ``fmix32(i ^ ks)`` once, then one address hash
per chunk of ``Z`` columns and one sign word per 32 columns, all in registers.

Hash arithmetic runs on ``uint64`` values masked to 32 bits after every multiply and add. Numba
types ``uint32 * int`` as ``int64`` and ``uint64 (op) int64`` as ``float64``, so every operand
that meets a hash word is made ``uint64`` explicitly (the constants below are ``np.uint64``).

Kernels are compiled with ``cache=True``, so only the first process on a machine pays for
compilation (each dtype combination compiles on first use). Numba keys that cache on this file
alone and freezes globals into it: the hash constants are read from ``hashing`` at compile time,
so a change of the contract must also touch this file (or clear ``__pycache__``).
"""
from __future__ import annotations

import functools
import os
import threading
import types

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange
from numba import types as nbtypes
from numba.core import cgutils
from numba.extending import intrinsic

from . import hashing

NAME = "numba"

# Without TBB numba takes its OpenMP layer, whose runtime resets the process-wide OpenMP thread
# count that torch reads (torch.set_num_threads(1) read back 2 after our first launch) and whose
# workers spin-wait after every launch; torch's own OpenMP pool then fights them for the cores.
# Measured on the 2-core VM: one local epoch of a 1/2-capacity Goodreads client took 1.1-2.6 s
# with the OpenMP layer and 0.2 s with the workqueue layer; a fused Adam step 34 ms and 6 ms.
# Unless the user picked a layer, prefer TBB, then the workqueue layer, which leaves torch alone
# and sleeps when idle. The workqueue layer aborts the process if two threads launch at once,
# so every parallel launch holds ``_LAUNCH``.
if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER_PRIORITY = ["tbb", "workqueue", "omp"]
# The layer is fixed when numba first starts its threads, which ``numba.set_num_threads`` and
# ``numba.get_num_threads`` do: a caller that sets numba's thread count before this module is
# imported gets numba's default order (OpenMP first) instead.
_LAUNCH = threading.Lock()

# Launches over fewer elements than this run a serial build on the calling thread: waking the
# pool costs more than they compute, and every training step makes four (two tables, forward and
# backward; 1,024 rows x d = 8 = 8,192 elements on Goodreads). Measured on the 2-core VM,
# 1 thread, workqueue layer, median per launch: at 8,192 elements forward 72 us serial vs 167 us
# through the pool, backward kernel 97 us vs 166 us; at 16,384 elements 141 vs 239 us and
# 188 vs 233 us; at 32,768 about even (backward 382 vs 368 us). The parallel build keeps larger
# launches, even on one thread: parfor bodies are compiled with ``noalias``, which the serial
# build cannot ask for, so its scatter is faster (at 65,536 elements backward 580 vs 705 us, best
# of 300; at 2.9M, a download's projection, 25 vs 33 ms of CPU time).
PARALLEL_MIN_WORK = 1 << 15


def _serial(work: int) -> bool:
    """Whether a launch over ``work`` elements takes the serial build."""
    return work < PARALLEL_MIN_WORK


def _parallel(fn):
    """``fn`` compiled twice: ``njit(parallel=True, cache=True)``, whose launches are serialised
    by ``_LAUNCH``, and a serial build (``prange`` runs as ``range``) that never touches the
    thread pool. ``launch(serial, *args)`` runs the one ``serial`` asks for."""
    kernel = njit(parallel=True, cache=True)(fn)
    # Numba's on-disk cache names entries by module, qualname and line and keys them by
    # signature and bytecode, not by compile options: under the same name the serial build would
    # load the parallel one's cached code (or the reverse), so it gets a name of its own. Parfor
    # bodies use numpy's error model (no zero-division checks); the serial build does too.
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    twin.__qualname__ = f"{fn.__qualname__}_serial"
    serial_build = njit(cache=True, error_model="numpy")(twin)

    @functools.wraps(fn)
    def launch(serial, *args):
        if serial:
            return serial_build(*args)
        with _LAUNCH:
            return kernel(*args)

    return launch


_MASK = np.uint64(hashing.MASK32)
_M1 = np.uint64(hashing.M1)
_M2 = np.uint64(hashing.M2)
_GOLDEN = np.uint64(hashing.GOLDEN)
_U1 = np.uint64(1)
_U13 = np.uint64(13)
_U16 = np.uint64(16)
_U32 = np.uint64(32)
_U8 = np.uint64(8)
_BYTE = np.uint64(0xFF)

# Byte budget for the per-thread private copies of a scatter target (bag_backward, slot_counts).
# Past it the copies cost more memory (and zero-fill / reduction traffic) than an edge device
# should spend, so the kernels switch to partitioning the slot range among threads.
PRIVATE_BYTES = 32 << 20
# Elements per parallel task of the streaming loops (fold, tile, aggregate, the reduction of the
# private gradient copies): a task's float64 accumulator stays in L1 and the output is written
# exactly once.
BLOCK = 4096

# _SIGNS[byte, l] = -1 if bit l of byte is set else +1: the signs of 8 consecutive columns from
# one byte of a sign word, so a block of 8 columns costs one table row instead of 8 selects.
_BITS = (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1
_SIGNS = {np.dtype(t): (1 - 2 * _BITS).astype(t) for t in (np.float32, np.float64)}


def _signs(dtype):
    """The ``_SIGNS`` table in ``dtype``; also where unsupported float types are turned away."""
    if dtype not in _SIGNS:
        raise TypeError(f"the numba backend computes in float32 or float64, got {dtype}")
    return _SIGNS[dtype]


def available(device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type == "cpu":
        return True, ""
    return False, f"Numba kernels run on CPU tensors only (got {device})"


# ----------------------------------------------------------------------------------------------
# Hash primitives


@njit(cache=True, inline="always")
def _fmix32(x):
    """MurmurHash3 fmix32 of a ``uint64`` holding a 32-bit word."""
    x ^= x >> _U16
    x = (x * _M1) & _MASK
    x ^= x >> _U13
    x = (x * _M2) & _MASK
    return x ^ (x >> _U16)


@njit(cache=True, inline="always")
def _row_hash(row, key):
    """``fmix32(row ^ key)``: the per-row half of the address or sign hash."""
    return _fmix32(np.uint64(row) ^ key)


@njit(cache=True, inline="always")
def _word(hrow, w):
    """``fmix32(hrow + w * GOLDEN)`` mod 2**32: chunk ``w``'s address hash or sign word ``w``."""
    return _fmix32((hrow + np.uint64(w) * _GOLDEN) & _MASK)


def _mod_magic(d: int) -> np.uint64:
    """``ceil(2**64 / d)`` mod 2**64, the multiplier of ``_fastmod`` (0 for ``d = 1``)."""
    return np.uint64(((2**64 - 1) // d + 1) % 2**64)


@njit(cache=True, inline="always")
def _fastmod(h, magic, d):
    """``h mod d`` for ``h < 2**32``, ``1 <= d <= 2**32``, without a division.

    Lemire, Kaser & Kurz (2019): ``h mod d = (((magic * h) mod 2**64) * d) >> 64`` with
    ``magic = ceil(2**64 / d)``, exact for 32-bit ``h`` and ``d`` (and for ``d = 2**32``, where
    both sides are ``h``). The 64x33-bit high product is assembled from 32-bit halves; no partial
    sum exceeds 2**64. Measured, a hardware 64-bit divide per chunk doubled the hashing time.
    """
    low = magic * h
    return ((low >> _U32) * d + (((low & _MASK) * d) >> _U32)) >> _U32


@njit(cache=True, inline="always")
def _sign_window(hs, wi, cw, win, dim):
    """Sign words ``wi`` and ``wi + 1`` as one 64-bit window (low word first).

    Any 8 columns starting in word ``wi`` lie inside it. Stepping from window ``cw = wi - 1``
    reuses the word already hashed (``cw = -1``: no window yet), and a word past ``dim`` is left
    0 rather than hashed, so each sign word of a row is hashed once.
    """
    hi = _word(hs, wi + 1) << _U32 if (wi + 1) << 5 < dim else np.uint64(0)
    if cw >= 0 and wi == cw + 1:
        return (win >> _U32) | hi
    return _word(hs, wi) | hi


# ----------------------------------------------------------------------------------------------
# Row kernels: one virtual row against the array, chunk by chunk. Inside a chunk, columns go in
# blocks of 8 with their signs from one ``_SIGNS`` row, then one by one for the tail. Numba's
# LLVM pipeline does not SLP-vectorise, so this is what keeps the inner loops short and free of
# per-column bit tests. Array positions are ``uint64``: Numba adds a negative-index wraparound
# test to every signed index it cannot prove non-negative (measured: a third of the forward). ``lo <= slot_chunk < hi`` restricts the scatter to one thread's share of the slot range
# (the full range everywhere else).


@intrinsic
def _prefetch(typingctx, array, index):
    """Hint the CPU to fetch the line of ``array[index]`` (1-D) into every cache level for a
    read (LLVM's ``prefetch``). It never faults and computes nothing: a gather over an array
    far larger than the caches issues the loads of the elements it reaches later first, so
    their misses overlap instead of each waiting its turn."""
    if not isinstance(array, nbtypes.Array) or array.ndim != 1:
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]],
                                       wraparound=False, boundscheck=False)
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]),
            "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, byte_ptr), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return nbtypes.void(array, index), codegen


@njit(cache=True, inline="always")
def _gather_row(acc, w, a, hr, hs, dim, z, nslots, magic, signs, signed):
    """``acc[k] += a * sign(i, k) * w[idx(i, k)]`` for ``k < dim``."""
    cw = -1
    win = np.uint64(0)
    for c in range((dim + z - 1) // z):
        k = c * z
        k1 = min(k + z, dim)
        p = np.uint64(z) * _fastmod(_word(hr, c), magic, nslots)
        while k < k1:
            if signed and k >> 5 != cw:
                win = _sign_window(hs, k >> 5, cw, win, dim)
                cw = k >> 5
            bits = win >> np.uint64(k & 31)
            uk = np.uint64(k)
            if k + 8 <= k1:
                if signed:
                    byte = bits & _BYTE
                    for l in range(8):
                        ul = np.uint64(l)
                        acc[uk + ul] += (a * signs[byte, ul]) * w[p + ul]
                else:
                    for l in range(8):
                        ul = np.uint64(l)
                        acc[uk + ul] += a * w[p + ul]
                p += _U8
                k += 8
            else:
                acc[uk] += (-a if bits & _U1 else a) * w[p]
                p += _U1
                k += 1


@njit(cache=True, inline="always")
def _scatter_row(dst, g, a, hr, hs, dim, z, nslots, magic, signs, signed, lo, hi):
    """``dst[idx(i, k)] += a * sign(i, k) * g[k]`` for ``k < dim``, ``lo <= idx // Z < hi``."""
    cw = -1
    win = np.uint64(0)
    for c in range((dim + z - 1) // z):
        q = _fastmod(_word(hr, c), magic, nslots)
        if q < lo or q >= hi:
            continue
        k = c * z
        k1 = min(k + z, dim)
        p = np.uint64(z) * q
        while k < k1:
            if signed and k >> 5 != cw:
                win = _sign_window(hs, k >> 5, cw, win, dim)
                cw = k >> 5
            bits = win >> np.uint64(k & 31)
            uk = np.uint64(k)
            if k + 8 <= k1:
                if signed:
                    byte = bits & _BYTE
                    for l in range(8):
                        ul = np.uint64(l)
                        dst[p + ul] += (a * signs[byte, ul]) * g[uk + ul]
                else:
                    for l in range(8):
                        ul = np.uint64(l)
                        dst[p + ul] += a * g[uk + ul]
                p += _U8
                k += 8
            else:
                dst[p] += (-a if bits & _U1 else a) * g[uk]
                p += _U1
                k += 1


# ----------------------------------------------------------------------------------------------
# hash_index


def _slots(memory_size, chunk_size):
    """``m / Z`` as ``uint64`` and its ``_fastmod`` multiplier."""
    nslots = memory_size // chunk_size
    return np.uint64(nslots), _mod_magic(nslots)


@njit(cache=True, inline="always")
def _index_row(row, dim, z, nslots, magic, ka, ks, signed, idx, sign):
    """``idx[k] = Z (addr_hash(row, k // Z) mod m/Z) + k mod Z`` and, if signed,
    ``sign[k] = 1 - 2 bit_{k mod 32}(sign_word(row, k // 32))`` for ``k < dim`` (``ka``, ``ks``
    as ``uint64``)."""
    hr = _row_hash(row, ka)
    for c in range((dim + z - 1) // z):
        k0 = c * z
        base = z * np.int64(_fastmod(_word(hr, c), magic, nslots)) - k0
        for k in range(k0, min(k0 + z, dim)):
            idx[k] = base + k
    if signed:
        hs = _row_hash(row, ks)
        for wi in range((dim + 31) >> 5):
            sw = _word(hs, wi)
            for k in range(wi << 5, min((wi + 1) << 5, dim)):
                sign[k] = 1 - 2 * np.int8((sw >> np.uint64(k & 31)) & _U1)


@_parallel
def _hash_index(rows, dim, z, nslots, magic, ka, ks, signed, idx, sign):
    """``_index_row`` of every ``rows[r]`` into ``idx[r]``, ``sign[r]``."""
    ka = np.uint64(ka)
    ks = np.uint64(ks)
    for r in prange(rows.shape[0]):
        _index_row(rows[r], dim, z, nslots, magic, ka, ks, signed, idx[r], sign[r])


def hash_index(rows, dim, memory_size, chunk_size, seed, signed):
    """Materialised addresses (int64) and signs (int8) of ``rows`` ``[N] -> [N, dim]``."""
    ka, ks = hashing.keys(seed)
    r = rows.detach().numpy()
    idx = np.empty((r.shape[0], dim), dtype=np.int64)
    sign = (np.empty if signed else np.ones)((r.shape[0], dim), dtype=np.int8)
    _hash_index(_serial(r.shape[0] * dim), r, dim, chunk_size, *_slots(memory_size, chunk_size),
                ka, ks, bool(signed), idx, sign)
    return torch.from_numpy(idx), torch.from_numpy(sign)


# ----------------------------------------------------------------------------------------------
# Embedding bag


@_parallel
def _bag_forward(w, indices, offsets, psw, dim, z, nslots, magic, ka, ks, signs, signed, mean, pad,
                 out):
    """``out[b] = sum_{j in bag b, i_j != pad} a_j v(i_j)`` (``/ count`` for mean); ``out`` is 0.

    One task per bag: the bag's output row is private to it, so no synchronisation is needed.
    """
    ka = np.uint64(ka)
    ks = np.uint64(ks)
    for b in prange(offsets.shape[0] - 1):
        acc = out[b]
        n = 0
        for j in range(offsets[b], offsets[b + 1]):
            row = indices[j]
            if row == pad:
                continue
            n += 1
            a = w.dtype.type(1)
            if psw is not None:
                a = psw[j]
            _gather_row(acc, w, a, _row_hash(row, ka), _row_hash(row, ks), dim, z, nslots, magic,
                        signs, signed)
        if mean and n > 1:
            inv = w.dtype.type(1.0 / n)
            for k in range(dim):
                acc[k] *= inv


# One row per bag (a plain lookup, ``expand_dense``) over an array larger than the caches: rows
# go in blocks whose addresses are computed and prefetched first, then read, so a block's misses
# overlap instead of each waiting its turn. Measured on the 2-core VM, one thread, 359,014 x 8
# rows, outputs already mapped: from a 1.4M-slot array (5.7 MB) 20.5 ms against 34-46 ms for the
# per-bag walk; from a 4,096-slot one, in cache, 19.5 against 13.5 ms (the blocks' bookkeeping),
# hence the size threshold.
ROWS_PREFETCH_BYTES = 1 << 22
ROW_BLOCK = 64


@_parallel
def _rows_forward(w, indices, dim, z, nslots, magic, ka, ks, signed, out):
    """``out[r] = v(indices[r])``, ``ROW_BLOCK`` rows at a time."""
    ka = np.uint64(ka)
    ks = np.uint64(ks)
    n = indices.shape[0]
    for blk in prange((n + ROW_BLOCK - 1) // ROW_BLOCK):
        lo = blk * ROW_BLOCK
        hi = min(lo + ROW_BLOCK, n)
        idx = np.empty((ROW_BLOCK, dim), dtype=np.int64)
        sgn = np.ones((ROW_BLOCK, dim), dtype=np.int8)
        for r in range(lo, hi):
            _index_row(indices[r], dim, z, nslots, magic, ka, ks, signed, idx[r - lo],
                       sgn[r - lo])
            for k in range(dim):
                _prefetch(w, idx[r - lo, k])
        for r in range(lo, hi):
            for k in range(dim):
                # A product, not a branch: signs are random, a branch mispredicts half of them.
                out[r, k] = sgn[r - lo, k] * w[idx[r - lo, k]]


def _prefetched_rows(w, offsets, per_sample_weights, padding_idx):
    """Whether a lookup takes ``_rows_forward``: one row per bag from an array past the caches."""
    return (offsets is None and per_sample_weights is None and padding_idx < 0
            and w.nbytes > ROWS_PREFETCH_BYTES)


def _as_offsets(offsets, n):
    """Offsets as int64 numpy, ``None`` meaning one bag per index."""
    if offsets is None:
        return np.arange(n + 1, dtype=np.int64)
    return offsets.detach().numpy()


def _psw(per_sample_weights):
    return None if per_sample_weights is None else per_sample_weights.detach().numpy()


def bag_forward(weight, indices, offsets, per_sample_weights, dim, chunk_size, seed, signed,
                mode, padding_idx):
    ka, ks = hashing.keys(seed)
    w = weight.detach().numpy()
    ind = indices.detach().numpy()
    off = _as_offsets(offsets, ind.shape[0])
    if _prefetched_rows(w, offsets, per_sample_weights, padding_idx):
        _signs(w.dtype)  # turns other dtypes away, as the per-bag walk does
        # Every element is written: no zero fill (a fresh zeroed array faults twice a page).
        out = np.empty((ind.shape[0], dim), dtype=w.dtype)
        _rows_forward(_serial(ind.shape[0] * dim), w, ind, dim, chunk_size,
                      *_slots(w.shape[0], chunk_size), ka, ks, bool(signed), out)
        return torch.from_numpy(out)
    out = np.zeros((off.shape[0] - 1, dim), dtype=w.dtype)
    _bag_forward(_serial(int(off[-1]) * dim), w, ind, off, _psw(per_sample_weights), dim,
                 chunk_size, *_slots(w.shape[0], chunk_size), ka, ks, _signs(w.dtype), bool(signed),
                 mode == 1, padding_idx, out)
    return torch.from_numpy(out)


@njit(cache=True, inline="always")
def _bag_scatter(grad_out, indices, offsets, psw, b, dim, z, nslots, magic, ka, ks, signs, signed,
                 mean, pad, dst, lo, hi):
    """Scatter bag ``b``'s gradient ``a_j * grad_out[b]`` of every element into ``dst``."""
    g = grad_out[b]
    # Typed as the gradient's dtype: a float64 ``inv`` would turn the whole scatter into
    # mixed-precision arithmetic.
    inv = grad_out.dtype.type(1)
    if mean:
        n = 0
        for j in range(offsets[b], offsets[b + 1]):
            if indices[j] != pad:
                n += 1
        if n > 1:
            inv = grad_out.dtype.type(1.0 / n)
    for j in range(offsets[b], offsets[b + 1]):
        row = indices[j]
        if row == pad:
            continue
        a = inv
        if psw is not None:
            a = psw[j] * inv
        _scatter_row(dst, g, a, _row_hash(row, ka), _row_hash(row, ks), dim, z, nslots, magic,
                     signs, signed, lo, hi)


@_parallel
def _bag_backward_private(grad_out, indices, offsets, psw, bounds, dim, z, nslots, magic, ka, ks,
                          signs, signed, mean, pad, grad_w, extra):
    """Thread ``t`` scatters bags ``bounds[t]:bounds[t+1]`` into its own copy (``grad_w`` for
    ``t = 0``, ``extra[t-1]`` after), then ``grad_w[s] += sum_t extra[t, s]`` in fixed order.

    ``extra`` arrives dirty (a reused workspace); each thread zeroes its own copy first, in
    parallel and leaving it in that thread's cache.
    """
    ka = np.uint64(ka)
    ks = np.uint64(ks)
    for t in prange(bounds.shape[0] - 1):
        dst = grad_w if t == 0 else extra[t - 1]
        if t > 0:
            dst[:] = 0
        for b in range(bounds[t], bounds[t + 1]):
            _bag_scatter(grad_out, indices, offsets, psw, b, dim, z, nslots, magic, ka, ks, signs,
                         signed, mean, pad, dst, np.uint64(0), nslots)
    m = grad_w.shape[0]
    for blk in prange((m + BLOCK - 1) // BLOCK):
        s0 = np.uint64(blk * BLOCK)
        for t in range(extra.shape[0]):
            for s in range(s0, s0 + np.uint64(min(BLOCK, m - blk * BLOCK))):
                grad_w[s] += extra[t, s]


@_parallel
def _bag_backward_partitioned(grad_out, indices, offsets, psw, nthreads, dim, z, nslots, magic, ka,
                              ks, signs, signed, mean, pad, grad_w):
    """Thread ``t`` walks every bag but writes only slot chunks ``[t, t+1) * nslots / nthreads``."""
    ka = np.uint64(ka)
    ks = np.uint64(ks)
    total = np.int64(nslots)
    for t in prange(nthreads):
        lo = np.uint64(total * t // nthreads)
        hi = np.uint64(total * (t + 1) // nthreads)
        for b in range(offsets.shape[0] - 1):
            _bag_scatter(grad_out, indices, offsets, psw, b, dim, z, nslots, magic, ka, ks, signs,
                         signed, mean, pad, grad_w, lo, hi)


_local = threading.local()


def _workspace(rows, size, dtype):
    """An uninitialised ``[rows, size]`` array reused by later calls on this Python thread.

    A fresh multi-megabyte array is mapped on demand, and first touching it costs a page fault
    per 4 KiB page: measured on a 2-core VM, more than the whole scatter it serves. The buffer
    only grows, to at most ``PRIVATE_BYTES``.
    """
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.size < rows * size:
        buf = bufs[dtype] = np.empty(rows * size, dtype=dtype)
    return buf[:rows * size].reshape(rows, size)


def bag_backward(grad_out, indices, offsets, per_sample_weights, memory_size, dim, chunk_size,
                 seed, signed, mode, padding_idx):
    """Scatter-add of the bag gradient into a dense ``[memory_size]`` gradient.

    Threads would race on shared slots, so two race-free schemes are used. Private copies: thread
    ``t`` scatters a contiguous share of the elements into its own array and the copies are summed
    slot by slot; each thread hashes only its share, at the price of ``threads - 1`` extra arrays
    (zero-fill plus one reduction read). Partitioned: every thread walks every element but writes
    only the slots it owns; no extra memory, but each thread repeats the whole hash pass and
    mispredicts the ownership test half the time. Private copies win while the array is no larger
    than the scattered work, ``memory_size <= n * dim``, and fit ``PRIVATE_BYTES`` (measured at 2
    threads on the client case, n * dim = 2.6M: private 1.5 ms vs partitioned 3.5 ms at
    m = 400k, even at m = 2.6M, partitioned 25% faster at m = 4M); past that the array is large
    and sparsely hit and the partitioned pass wins (with one thread it is the plain serial
    scatter). Below ``PARALLEL_MIN_WORK`` elements (a training step's batch) the serial scatter
    runs whatever the thread count. Each slot receives its terms in element order there, as in
    the partitioned pass, so the two give the same bits; the private copies' sum depends on the
    thread count. Every choice is deterministic for a given thread count.
    """
    ka, ks = hashing.keys(seed)
    g = grad_out.detach().numpy()
    ind = indices.detach().numpy()
    off = _as_offsets(offsets, ind.shape[0])
    psw = _psw(per_sample_weights)
    args = (dim, chunk_size, *_slots(memory_size, chunk_size), ka, ks, _signs(g.dtype),
            bool(signed), mode == 1, padding_idx)
    grad_w = np.zeros(memory_size, dtype=g.dtype)
    work = int(off[-1]) * dim
    serial = _serial(work)
    nthreads = 1 if serial else numba.get_num_threads()
    private = (nthreads > 1 and memory_size <= work
               and (nthreads - 1) * memory_size * g.itemsize <= PRIVATE_BYTES)
    if private:
        # Split by element count, not bag count, so threads get equal scatter work.
        targets = int(off[-1]) * np.arange(nthreads + 1, dtype=np.int64) // nthreads
        bounds = np.searchsorted(off, targets).astype(np.int64)
        bounds[0], bounds[-1] = 0, off.shape[0] - 1
        extra = _workspace(nthreads - 1, memory_size, g.dtype)
        _bag_backward_private(serial, g, ind, off, psw, bounds, *args, grad_w, extra)
    else:
        _bag_backward_partitioned(serial, g, ind, off, psw, nthreads, *args, grad_w)
    return torch.from_numpy(grad_w)


# ----------------------------------------------------------------------------------------------
# Slot counts


@njit(cache=True)
def _count_rows(r0, r1, nfull, partial, nslots, magic, ka, full, last, lo, hi):
    """Per slot chunk ``q`` in ``[lo, hi)``: how many rows of ``[r0, r1)`` send a full chunk there
    (``full``) and how many send their partial last chunk there (``last``)."""
    for r in range(r0, r1):
        hr = _row_hash(r, ka)
        for c in range(nfull):
            q = _fastmod(_word(hr, c), magic, nslots)
            if lo <= q < hi:
                full[q] += 1
        if partial:
            q = _fastmod(_word(hr, nfull), magic, nslots)
            if lo <= q < hi:
                last[q] += 1


@_parallel
def _count_private(n, nfull, partial, nslots, magic, ka, full, last):
    """Thread ``t`` counts rows ``[t, t+1) * n / T`` into ``full[t]``, ``last[t]``."""
    ka = np.uint64(ka)
    nthreads = full.shape[0]
    for t in prange(nthreads):
        _count_rows(n * t // nthreads, n * (t + 1) // nthreads, nfull, partial, nslots, magic, ka,
                    full[t], last[t], np.uint64(0), nslots)


@_parallel
def _count_partitioned(n, nfull, partial, nslots, magic, ka, nthreads, full, last):
    """Thread ``t`` hashes every row but counts only slot chunks ``[t, t+1) * nslots / T``."""
    ka = np.uint64(ka)
    total = np.int64(nslots)
    for t in prange(nthreads):
        _count_rows(0, n, nfull, partial, nslots, magic, ka, full[0], last[0],
                    np.uint64(total * t // nthreads), np.uint64(total * (t + 1) // nthreads))


@_parallel
def _expand_counts(full, last, z, rem, cnt):
    """``cnt[Z q + k] = sum_t full[t, q] + (k < rem) sum_t last[t, q]``."""
    for q in prange(full.shape[1]):
        f = np.int64(0)
        p = np.int64(0)
        for t in range(full.shape[0]):
            f += full[t, q]
        if rem > 0:
            for t in range(last.shape[0]):
                p += last[t, q]
        base = np.uint64(z * q)
        for k in range(z):
            cnt[base + np.uint64(k)] = f + p if k < rem else f


def slot_counts(num_embeddings, dim, memory_size, chunk_size, seed, device):
    """``cnt[s] = #{(i, k) : idx(i, k) = s}`` over the whole virtual table (int64).

    Counted per slot chunk (one hash per row and chunk): ``full`` counts whole chunks, ``last``
    the partial last chunk when ``Z`` does not divide ``dim``, and the two expand to slots. Races
    are avoided as in ``bag_backward``: per-thread private histograms while they fit
    ``PRIVATE_BYTES``, otherwise every thread hashes every row and counts only its own slot range.
    """
    ka, _ = hashing.keys(seed)
    z = chunk_size
    nslots = memory_size // z
    nfull, rem = divmod(dim, z)
    partial = rem > 0
    serial = _serial(num_embeddings * dim)
    nthreads = 1 if serial else numba.get_num_threads()
    cnt = np.empty(memory_size, dtype=np.int64)
    copies = nthreads * (2 if partial else 1)
    if nthreads > 1 and copies * nslots * 8 <= PRIVATE_BYTES:
        full = np.zeros((nthreads, nslots), dtype=np.int64)
        last = np.zeros((nthreads, nslots if partial else 0), dtype=np.int64)
        _count_private(serial, num_embeddings, nfull, partial, *_slots(memory_size, z), ka,
                       full, last)
    else:
        full = np.zeros((1, nslots), dtype=np.int64)
        last = np.zeros((1, nslots if partial else 0), dtype=np.int64)
        _count_partitioned(serial, num_embeddings, nfull, partial, *_slots(memory_size, z), ka,
                           nthreads, full, last)
    _expand_counts(_serial(memory_size), full, last, z, rem, cnt)
    return torch.from_numpy(cnt).to(device)


# ----------------------------------------------------------------------------------------------
# Streaming ops: one task per block of the output, positions in ``uint64`` as in the row kernels,
# which here is what lets LLVM vectorise the inner loops (measured: tile 10x faster).


@_parallel
def _fold(w, factor, counts, out):
    """``out[j] = sum_t c[j + t m'] w[j + t m'] / sum_t c[j + t m']`` (0 where the sum is 0).

    Per block of ``j``: the ``factor`` strided segments are read one after another (contiguous
    inner loops) into a float64 numerator and an exact int64 denominator.
    """
    m2 = out.shape[0]
    for blk in prange((m2 + BLOCK - 1) // BLOCK):
        j0 = np.uint64(blk * BLOCK)
        n = np.uint64(min(BLOCK, m2 - blk * BLOCK))
        num = np.zeros(n, dtype=np.float64)
        den = np.zeros(n, dtype=np.int64)
        for t in range(factor):
            src = np.uint64(t * m2) + j0
            for j in range(n):
                c = counts[src + j]
                num[j] += c * np.float64(w[src + j])
                den[j] += c
        for j in range(n):
            out[j0 + j] = num[j] / den[j] if den[j] > 0 else 0


def fold(weight, factor, counts):
    """Count-weighted collapse ``w'[j] = sum_t c[j+tm'] w[j+tm'] / sum_t c[j+tm']`` (0 if empty)."""
    w = weight.detach().numpy()
    out = np.empty(w.shape[0] // factor, dtype=w.dtype)
    _fold(_serial(w.shape[0]), w, factor, counts.detach().numpy(), out)
    return torch.from_numpy(out)


@_parallel
def _tile(w, out):
    """``out[j] = w[j mod m]``, one task per (copy, block of ``w``)."""
    m = w.shape[0]
    nb = (m + BLOCK - 1) // BLOCK
    for task in prange((out.shape[0] // m) * nb):
        t = task // nb
        j0 = (task - t * nb) * BLOCK
        j1 = min(j0 + BLOCK, m)
        out[t * m + j0:t * m + j1] = w[j0:j1]


def tile(weight, factor):
    """The same virtual table in an array ``factor`` times bigger: ``out[j] = w[j mod m]``."""
    w = weight.detach().numpy()
    out = np.empty(w.shape[0] * factor, dtype=w.dtype)
    if w.shape[0] > 0:
        _tile(_serial(out.shape[0]), w, out)
    return torch.from_numpy(out)


@_parallel
def _aggregate(flat, starts, sizes, p, out):
    """``out[j] = sum_i p_i flat[starts_i + j mod sizes_i]``, each block written once.

    The position ``j mod sizes_i`` advances with ``j`` and wraps, so the inner loops are
    contiguous runs with no per-element modulo.
    """
    n = out.shape[0]
    for blk in prange((n + BLOCK - 1) // BLOCK):
        j0 = blk * BLOCK
        nj = min(BLOCK, n - j0)
        acc = np.zeros(nj, dtype=np.float64)
        for i in range(sizes.shape[0]):
            pi = p[i]
            r = j0 % sizes[i]
            j = 0
            while j < nj:
                run = min(nj - j, sizes[i] - r)
                src = np.uint64(starts[i] + r)
                dst = np.uint64(j)
                for u in range(np.uint64(run)):
                    acc[dst + u] += pi * flat[src + u]
                j += run
                r = 0
        o = np.uint64(j0)
        for u in range(np.uint64(nj)):
            out[o + u] = acc[u]


def aggregate(arrays, weights, target_size):
    """``out[j] = sum_i weights[i] * arrays[i][j mod len(arrays[i])]`` (every size divides target).

    The arrays are concatenated into one buffer (one copy of the inputs) so a single compiled
    kernel serves any number of arrays; the output is produced in one pass.
    """
    dtype = arrays[0].dtype
    flat = torch.cat([a.detach().reshape(-1).to(dtype) for a in arrays]).numpy()
    sizes = np.array([a.numel() for a in arrays], dtype=np.int64)
    starts = np.zeros_like(sizes)
    np.cumsum(sizes[:-1], out=starts[1:])
    p = np.array([float(x) for x in weights], dtype=np.float64)
    out = np.empty(target_size, dtype=flat.dtype)
    _aggregate(_serial(target_size * len(arrays)), flat, starts, sizes, p, out)
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------------------------
# k-means and action sharing (``fastfair.kernels.kmeans``; math in ``reference.kmeans_*``).

# numba's ``np.dot`` calls BLAS through scipy. Without scipy the assignment takes the
# register-blocked kernel below it instead.
try:
    import scipy.linalg.cython_blas  # noqa: F401
    KMEANS_BLAS = True
except ImportError:
    KMEANS_BLAS = False

# Rows per block of the BLAS assignment, and the bound on rows x centroids x columns of one BLAS
# call: OpenBLAS runs a gemm with m n k <= 2**18 on the calling thread (its multithreading
# threshold); larger calls wake its own pool, which then fights the numba threads for the cores
# (measured: 2 threads busy at 256 rows x 64 x 64). Centroids go in chunks that respect it.
KMEANS_BLAS_ROWS = 64
KMEANS_BLAS_MNK = 1 << 18
# Rows sharing each centroid load in the register-blocked kernel (20,000 x 64 x 64 on one core,
# distances and argmin: 4 rows 40 GFLOP/s, 2 to 12 rows 33-39; the kernel body is written out
# for 4), and rows per parallel task.
KMEANS_ROWS = 4
KMEANS_TASK_ROWS = 256


@njit(cache=True, inline="always")
def _argmin_row(g, r, cn):
    """The smallest ``k`` minimising ``cn[k] - 2 g[r, k]``."""
    best = np.inf
    bk = 0
    for k in range(cn.shape[0]):
        v = cn[k] - (g[r, k] + g[r, k])
        if v < best:
            best = v
            bk = k
    return bk


@njit(cache=True)
def _argmin_step(g, ck, k, best, bk):
    """``best[r], bk[r] = ck + g[r], k`` where that is strictly smaller: centroids arrive in
    increasing ``k``, so ties keep the smallest. Branch-free across rows, so it vectorises."""
    for r in range(best.shape[0]):
        v = ck + g[r]
        b = best[r]
        better = v < b
        best[r] = v if better else b
        bk[r] = k if better else bk[r]


# Reassociation lets LLVM vectorise the sum; in program order it is a chain of dependent adds.
# Measured on 20,000 x 64 x 64, one core: the distances of an assignment cost 1.2 ms in order
# (float64), 0.3 ms reassociated, less again in the dtype; the init's pass per center 0.21 ms
# (float64) and 0.10 ms (float32). The order is still fixed at compile time, so the result is
# deterministic, and a row equal to its centroid still gives exactly 0.
@njit(cache=True, fastmath={"reassoc"})
def _row_dist2(x, i, c, k):
    """``||x_i - c_k||^2`` from the differences, in the dtype."""
    acc = x.dtype.type(0)
    for j in range(x.shape[1]):
        t = x[i, j] - c[k, j]
        acc += t * t
    return acc


@_parallel
def _kmeans_layout(x, xt):
    """``xt[b, j, r] = x[b R + r, j]`` (``R = KMEANS_BLAS_ROWS``); ``xt`` arrives zeroed, so the
    last block's missing rows read as 0."""
    n, d = x.shape
    rb = xt.shape[2]
    for blk in prange(xt.shape[0]):
        i0 = blk * rb
        for r in range(min(rb, n - i0)):
            for j in range(d):
                xt[blk, j, r] = x[i0 + r, j]


def kmeans_layout(x):
    """The rows in the form the BLAS assignment reads: blocks of ``KMEANS_BLAS_ROWS`` rows, each
    transposed (``[blocks, d, R]``), so BLAS writes ``<c_k, x_r>`` with rows along the fast axis.
    ``kmeans`` builds it once per call and passes it to every ``kmeans_assign``; ``None``
    without BLAS (the register-blocked kernel reads ``x`` itself)."""
    if not KMEANS_BLAS:
        return None
    xs = x.detach().numpy()
    rb = KMEANS_BLAS_ROWS
    xt = np.zeros(((xs.shape[0] + rb - 1) // rb, xs.shape[1], rb), dtype=xs.dtype)
    _kmeans_layout(_serial(xs.size), xs, xt)
    return xt


@_parallel
def _kmeans_assign_blas(x, xt, c, c2, cn, kb, labels, dist2):
    """Per block of rows: ``g = (-2 c) x_block^T`` by BLAS, ``kb`` centroids at a time (the
    scaling by -2 is exact, so ``cn[k] + g[k, r] = ||c_k||^2 - 2 <x_r, c_k>`` to the bit), and
    the running minimum advances one centroid at a time across all rows of the block.

    Measured on 20,000 x 64 x 64, one core: 2.3 ms per call where a row-by-row argmin over
    ``x_block c^T`` took 2.9 ms (the gemm alone 1.5 ms, the rest the scalar argmin); BLAS is
    slower at writing the transposed product itself (9 vs 5.6 us per 64^3 block) than the
    layout's copy, which costs 0.36 ms once per ``kmeans`` call.
    """
    n = x.shape[0]
    kk = c2.shape[0]
    rb = xt.shape[2]
    for blk in prange(xt.shape[0]):
        i0 = blk * rb
        m = min(rb, n - i0)
        g = np.empty((kb, rb), dtype=x.dtype)
        best = np.full(rb, np.inf, dtype=x.dtype)
        bk = np.zeros(rb, dtype=np.int64)
        for k0 in range(0, kk, kb):
            k1 = min(kk, k0 + kb)
            np.dot(c2[k0:k1], xt[blk], g[:k1 - k0])
            for k in range(k0, k1):
                _argmin_step(g[k - k0], cn[k], k, best, bk)
        for r in range(m):
            labels[i0 + r] = bk[r]
            dist2[i0 + r] = _row_dist2(x, i0 + r, c, bk[r])


@_parallel
def _kmeans_assign_blocked(x, c, ct, cn, labels, dist2):
    """``KMEANS_ROWS`` rows at a time: ``acc[r, :] += x[i_r, j] ct[j, :]`` over ``j``, so each
    centroid value loaded serves every row of the block and the inner loop over centroids is
    contiguous (it vectorises without reassociating a reduction). A task takes
    ``KMEANS_TASK_ROWS`` rows and reuses one accumulator for them."""
    n, d = x.shape
    kk = ct.shape[1]
    for task in prange((n + KMEANS_TASK_ROWS - 1) // KMEANS_TASK_ROWS):
        acc = np.empty((KMEANS_ROWS, kk), dtype=x.dtype)
        for i0 in range(task * KMEANS_TASK_ROWS, min(n, (task + 1) * KMEANS_TASK_ROWS),
                        KMEANS_ROWS):
            rows = min(KMEANS_ROWS, n - i0)
            acc[:] = 0
            if rows == KMEANS_ROWS:
                for j in range(d):
                    x0 = x[i0, j]
                    x1 = x[i0 + 1, j]
                    x2 = x[i0 + 2, j]
                    x3 = x[i0 + 3, j]
                    for k in range(kk):
                        cv = ct[j, k]
                        acc[0, k] += x0 * cv
                        acc[1, k] += x1 * cv
                        acc[2, k] += x2 * cv
                        acc[3, k] += x3 * cv
            else:
                for r in range(rows):
                    for j in range(d):
                        xv = x[i0 + r, j]
                        for k in range(kk):
                            acc[r, k] += xv * ct[j, k]
            for r in range(rows):
                k = _argmin_row(acc, r, cn)
                labels[i0 + r] = k
                dist2[i0 + r] = _row_dist2(x, i0 + r, c, k)


def kmeans_assign(x, centroids, layout=None):
    """Fused distances + argmin: ``labels[i] = argmin_k (||c_k||^2 - 2 <x_i, c_k>)`` (ties:
    smallest ``k``), ``dist2[i] = ||x_i - c_{labels[i]}||^2`` from the differences.

    No ``N x K`` distance matrix is built: each block of rows is reduced to its labels while it is
    in cache. ``layout`` is ``kmeans_layout(x)`` (built here when not given). Every row is
    computed by one thread, so the result does not depend on the thread count.
    """
    xs = x.detach().numpy()
    c = centroids.detach().numpy()
    n, d = xs.shape
    k = c.shape[0]
    cn = (c * c).sum(1)
    labels = np.empty(n, dtype=np.int64)
    dist2 = np.empty(n, dtype=xs.dtype)
    serial = _serial(n * k)
    if KMEANS_BLAS:
        xt = kmeans_layout(x) if layout is None else layout
        kb = max(1, min(k, KMEANS_BLAS_MNK // (KMEANS_BLAS_ROWS * max(1, d))))
        _kmeans_assign_blas(serial, xs, xt, c, c * xs.dtype.type(-2), cn, kb, labels, dist2)
    else:
        _kmeans_assign_blocked(serial, xs, c, np.ascontiguousarray(c.T), cn, labels, dist2)
    return torch.from_numpy(labels), torch.from_numpy(dist2)


@njit(cache=True, inline="always")
def _seed_weight(d2, plusplus):
    """The init's draw weight: ``D^2`` (k-means++) or ``[D > 0]`` (random)."""
    if plusplus:
        return d2
    return 1.0 if d2 > 0 else 0.0


@njit(cache=True)
def _seed_draw(d2, part, target, plusplus):
    """The first row whose running weight sum exceeds ``target``, found block by block through
    the blocks' sums ``part``; the last row with positive weight if rounding leaves none."""
    n = d2.shape[0]
    acc = 0.0
    for b in range(part.shape[0]):
        if acc + part[b] > target:
            last = -1
            for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
                w = _seed_weight(d2[i], plusplus)
                if w > 0:
                    last = i
                    acc += w
                    if acc > target:
                        return i
            if last >= 0:
                return last
            break
        acc += part[b]
    for i in range(n - 1, -1, -1):
        if _seed_weight(d2[i], plusplus) > 0:
            return i
    return 0


@_parallel
def _kmeans_seed(x, first, u, plusplus, chosen, d2, labels, part):
    """The whole init in one launch (``reference.seed_loop``): per center, a parallel pass over
    blocks of ``BLOCK`` rows updates ``d2``/``labels`` and sums each block's weights into
    ``part``; the blocks are fixed, so the total (and the draw) does not depend on the thread
    count. Returns how many centers were chosen."""
    n = x.shape[0]
    idx = first
    count = 0
    for step in range(chosen.shape[0]):
        chosen[step] = idx
        count = step + 1
        for b in prange(part.shape[0]):
            s = 0.0
            for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
                dist = np.float64(_row_dist2(x, i, x, idx))
                if dist < d2[i]:
                    d2[i] = dist
                    labels[i] = step
                s += _seed_weight(d2[i], plusplus)
            part[b] = s
        if step == chosen.shape[0] - 1:
            break
        total = 0.0
        for b in range(part.shape[0]):
            total += part[b]
        if total == 0:
            break
        idx = _seed_draw(d2, part, u[step] * total, plusplus)
    return count


def kmeans_seed(x, first, uniforms, plusplus):
    """The k-means init in one compiled call (math in ``reference.kmeans_seed``)."""
    xs = x.detach().numpy()
    n = xs.shape[0]
    u = uniforms.detach().numpy()
    chosen = np.empty(u.shape[0] + 1, dtype=np.int64)
    d2 = np.full(n, np.inf)
    labels = np.zeros(n, dtype=np.int64)
    part = np.empty((n + BLOCK - 1) // BLOCK)
    # Each center is a parallel pass, and at one thread the pass's start-up is pure overhead:
    # 64 centers over 20,000 x 64 took 12.1 ms through the pool and 8.9 ms serially.
    serial = _serial(xs.size) or numba.get_num_threads() == 1
    count = _kmeans_seed(serial, xs, first, u, bool(plusplus), chosen, d2, labels, part)
    return torch.from_numpy(chosen[:count]), torch.from_numpy(labels), torch.from_numpy(d2)


@_parallel
def _kmeans_sums(x, labels, parts, sums, counts):
    """Task ``t`` owns clusters ``[t, t+1) * K / parts`` and adds its rows in row order, so every
    sum is the same sequence of float64 additions whatever the thread count."""
    k = sums.shape[0]
    d = x.shape[1]
    for t in prange(parts):
        lo = k * t // parts
        hi = k * (t + 1) // parts
        for i in range(x.shape[0]):
            c = labels[i]
            if lo <= c < hi:
                counts[c] += 1
                for j in range(d):
                    sums[c, j] += x[i, j]


def kmeans_centroid_sums(x, labels, k):
    """``sums[c] = sum_{labels[i] = c} x_i`` (float64 accumulation, rounded to the dtype) and
    ``counts[c]`` (int64)."""
    xs = x.detach().numpy()
    sums = np.zeros((k, xs.shape[1]), dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    serial = _serial(xs.size)
    parts = 1 if serial else min(k, numba.get_num_threads())
    _kmeans_sums(serial, xs, labels.detach().numpy(), parts, sums, counts)
    return torch.from_numpy(sums.astype(xs.dtype)), torch.from_numpy(counts)


@_parallel
def _kmeans_pack(values, bits, out):
    """Groups of 8 values fill exactly ``bits`` bytes, so groups write disjoint bytes; inside a
    value its bits go to the stream a byte-sized piece at a time (``out`` arrives zeroed)."""
    m = values.shape[0]
    for grp in prange((m + 7) // 8):
        for j in range(grp * 8, min(m, grp * 8 + 8)):
            v = values[j]
            pos = j * bits
            left = bits
            while left > 0:
                off = pos & 7
                take = min(8 - off, left)
                out[pos >> 3] |= np.uint8(((v & ((1 << take) - 1)) << off) & 0xFF)
                v >>= take
                pos += take
                left -= take


def kmeans_pack(values, bits):
    """Little-endian bit stream of ``bits``-bit values (layout in ``reference.kmeans_pack``)."""
    v = values.detach().numpy()
    out = np.zeros((v.shape[0] * bits + 7) // 8, dtype=np.uint8)
    _kmeans_pack(_serial(v.shape[0] * bits), v, bits, out)
    return torch.from_numpy(out)


@_parallel
def _kmeans_unpack(packed, bits, out):
    """``out[j]`` gathered from stream bits ``[j bits, (j + 1) bits)``, a byte piece at a time."""
    for j in prange(out.shape[0]):
        pos = j * bits
        v = 0
        got = 0
        while got < bits:
            off = pos & 7
            take = min(8 - off, bits - got)
            v |= ((np.int64(packed[pos >> 3]) >> off) & ((1 << take) - 1)) << got
            pos += take
            got += take
        out[j] = v


def kmeans_unpack(packed, bits, m):
    """The inverse of ``kmeans_pack``: ``m`` values of ``bits`` bits (int64)."""
    out = np.empty(m, dtype=np.int64)
    _kmeans_unpack(_serial(m * bits), packed.detach().numpy(), bits, out)
    return torch.from_numpy(out)


@_parallel
def _kmeans_rebuild_add(out, rows, c, labels, scales, w):
    """``out[rows[j]] += (w s_j) c[labels[j]]``; rows are distinct, so tasks never share one."""
    for j in prange(rows.shape[0]):
        a = w
        if scales is not None:
            a = w * scales[j]
        r = rows[j]
        k = labels[j]
        for t in range(out.shape[1]):
            out[r, t] += c[k, t] * a


def kmeans_rebuild_add_(out, rows, centroids, labels, scales, weight):
    """``out[rows[j]] += (w s_j) c_{labels[j]}``, ``w`` and ``w s_j`` rounded to ``out``'s dtype
    (so each element gets the reference's one rounded product and one rounded addition)."""
    o = out.detach().numpy()
    w = o.dtype.type(weight)
    s = None if scales is None else scales.detach().numpy()
    _kmeans_rebuild_add(_serial(rows.numel() * o.shape[1]), o, rows.detach().numpy(),
                        centroids.detach().numpy(), labels.detach().numpy(), s, w)
    return out


# ---------------------------------------------------------------- deferred Adam (fastfair.optim)
# The replay of J zero-gradient steps of an element in closed form. From step s (moments m, v,
# x = sqrt(v)) step s + j has m b1^j, sqrt(v_j) = x b2^(j/2), and moves p by
#
#   step_size[s+j] m b1^j / (x b2^(j/2) inv[s+j] + eps)
#     = (m / x) sum_n (-eps / x)^n  step_size[s+j] b1^j / (b2^(j/2) inv[s+j])^(n+1),
#
# a series in r_j = eps / (x b2^(j/2) inv[s+j]) < 1. Summed over j = 1..J = upto - s the
# coefficients are T_n(s) = sum_j step_size[s+j] b1^j / (b2^(j/2) inv[s+j])^(n+1), one table per
# call (they depend on s and upto only, not on the element), so a replay costs O(1) instead of
# O(J). N terms leave a relative error of at most 2 r^N / (1 - r), r = max_j r_j (at j = J; the
# sum is at least 1 / (1 + r) of its first term): each element takes the fewest terms, up to
# REPLAY_TERMS, that bring it below REPLAY_TOL[dtype], the dtype's rounding. That covers r up to
# ~0.6 in float32 (~0.3 in float64), i.e. sqrt(v) down to ~2 eps: the small moments of a table's
# rarely used rows, which four terms (r <= 1e-2) left to the loop. An element with a larger r
# (a yet smaller v) replays step by step. Most elements have a small r: those with r at most
# ``_fast_r(tol)`` take REPLAY_FAST_TERMS terms, a loop of constant length the compiler unrolls,
# instead of counting their own, a data-dependent loop per element (measured on the 2-core VM: a
# flush of 20% pending entries 25 -> 20 ms).
REPLAY_TERMS = 32
REPLAY_TOL = {np.dtype(np.float32): 2.0 ** -24, np.dtype(np.float64): 2.0 ** -53}
REPLAY_FAST_TERMS = 4


@njit(cache=True, inline="always")
def _fast_r(tol):
    """An ``r`` up to which REPLAY_FAST_TERMS terms meet ``tol``: ``(tol / 4)^(1/N)``, as
    ``2 r^N / (1 - r) <= 4 r^N`` for ``r <= 1/2``."""
    return min((tol / 4.0) ** (1.0 / REPLAY_FAST_TERMS), 0.5)


@njit(cache=True)
def _replay_tables(step_size, inv, b1, b2, upto, terms):
    """``tails[s, n] = T_n(s)`` for replays ending at ``upto`` (backward recursion
    ``T_n(s) = rho_n (step_size[s+1] / inv[s+1]^(n+1) + T_n(s+1))``, ``rho_n = b1 /
    b2^((n+1)/2)``), and ``b1^J``, ``b2^J``, ``b2^(J/2)`` for ``J <= upto``."""
    # One start's terms side by side: a replay reads them together.
    tails = np.zeros((upto + 1, terms))
    rho = np.empty(terms)
    for n in range(terms):
        rho[n] = b1 / np.sqrt(b2) ** (n + 1)
    for s in range(upto - 1, -1, -1):
        q = 1.0 / inv[s + 1]
        term = step_size[s + 1] * q
        for n in range(terms):
            tails[s, n] = rho[n] * (term + tails[s + 1, n])
            term *= q
    powers = np.empty((3, upto + 1))
    half = np.sqrt(b2)
    for j in range(upto + 1):
        # pow, not a running product: within an ulp or two for every j
        powers[0, j] = b1 ** j
        powers[1, j] = b2 ** j
        powers[2, j] = half ** j
    return tails, powers


@njit(cache=True, inline="always")
def _adam_entry(pp, mm, vv, start, upto, gg, has_grad, step_size, inv_bc2, b1, b2, eps, tails,
                powers, tol, fast_r):
    """One element's Adam steps ``start + 1 .. upto`` with zero gradient (in closed form where
    exact, see above), then step ``upto + 1`` with gradient ``gg`` if ``has_grad``; returns the
    new ``(p, m, v)``."""
    span = upto - start
    x = np.sqrt(vv)
    terms = tails.shape[1] + 1
    r = 1.0
    if span > 0 and x > 0:
        r = eps / (x * powers[2, span] * inv_bc2[upto])
        if r <= fast_r:
            terms = REPLAY_FAST_TERMS
        elif r < 1:
            bound = 2.0 / (1.0 - r)
            terms = 0
            while bound > tol and terms <= tails.shape[1]:
                bound *= r
                terms += 1
    if span > 0 and x > 0 and terms <= tails.shape[1]:
        z = -eps / x
        acc = 0.0
        if r <= fast_r:
            for n in range(REPLAY_FAST_TERMS - 1, -1, -1):
                acc = tails[start, n] + z * acc
        else:
            for n in range(terms - 1, -1, -1):
                acc = tails[start, n] + z * acc
        pp -= mm / x * acc
        mm *= powers[0, span]
        vv *= powers[1, span]
    else:
        for k in range(start + 1, upto + 1):
            mm *= b1
            vv *= b2
            pp -= step_size[k] * mm / (np.sqrt(vv) * inv_bc2[k] + eps)
    if has_grad:
        k = upto + 1
        mm = b1 * mm + (1 - b1) * gg
        vv = b2 * vv + (1 - b2) * gg * gg
        pp -= step_size[k] * mm / (np.sqrt(vv) * inv_bc2[k] + eps)
    return pp, mm, vv


@_parallel
def _deferred_adam(p, m, v, last, rows, g, has_grad, upto, step_size, inv_bc2, b1, b2, eps,
                   tails, powers, tol):
    fast_r = _fast_r(tol)
    for r in prange(rows.size):
        i = rows[r]
        # A row never used has zero moments: its missed steps move nothing.
        start = last[i] if last[i] > 0 else upto
        for j in range(p.shape[1]):
            gg = g[r, j] if has_grad else 0.0
            p[i, j], m[i, j], v[i, j] = _adam_entry(
                np.float64(p[i, j]), np.float64(m[i, j]), np.float64(v[i, j]), start, upto, gg,
                has_grad, step_size, inv_bc2, b1, b2, eps, tails, powers, tol, fast_r)
        last[i] = upto + 1 if has_grad else upto


def deferred_adam(param, exp_avg, exp_avg_sq, last, rows, grad, upto, step_size, inv_bc2_sqrt,
                  beta1, beta2, eps):
    """See ``reference.deferred_adam``; rows are independent, so they run in parallel. Missed
    steps are replayed in closed form (the series above) where that is exact to the dtype's
    rounding, step by step elsewhere."""
    if rows.numel() == 0:
        return
    w = param.shape[1]
    g = grad if grad is not None else torch.zeros(1, w, dtype=param.dtype)
    sizes, inv = step_size.numpy(), inv_bc2_sqrt.numpy()
    tails, powers = _replay_tables(sizes, inv, float(beta1), float(beta2), upto, REPLAY_TERMS)
    work = rows.numel() * w
    p = param.numpy()
    _deferred_adam(_serial(work), p, exp_avg.numpy(), exp_avg_sq.numpy(), last.numpy(),
                   rows.numpy(), g.contiguous().numpy(), grad is not None, upto, sizes, inv,
                   float(beta1), float(beta2), float(eps), tails, powers, REPLAY_TOL[p.dtype])


@njit(cache=True)
def _coalesce_rows(rows, vals, last, out_rows, out_vals, saved):
    count = 0
    w = vals.shape[1]
    for e in range(rows.size):
        r = rows[e]
        s = last[r]
        if s >= 0:  # first entry of row r: mark the row with its slot, keep its step
            saved[count] = s
            s = count
            last[r] = -1 - s
            out_rows[s] = r
            for j in range(w):
                out_vals[s, j] = vals[e, j]
            count += 1
        else:
            s = -1 - s
            for j in range(w):
                out_vals[s, j] += vals[e, j]
    for s in range(count):
        last[out_rows[s]] = saved[s]
    return count


@_parallel
def _scatter_adam_rows(m, v, rows, g, b1, b2, c1, c2):
    for e in prange(rows.size):
        r = rows[e]
        for j in range(m.shape[1]):
            gj = g[e, j]
            m[r, j] = b1 * m[r, j] + c1 * gj
            # Negated: marks the element as stepped for _scatter_adam_all (negation is exact; a
            # new v of 0 needs no mark, its row has m = 0 and decaying it changes nothing).
            v[r, j] = -(b2 * v[r, j] + c2 * gj * gj)


@_parallel
def _scatter_adam_all(p, m, v, b1, b2, step_size, inv_bc2, eps):
    for r in prange(p.shape[0]):
        for j in range(p.shape[1]):
            vj = v[r, j]
            if vj < 0:
                vj = -vj
            else:
                m[r, j] *= b1
                vj *= b2
            v[r, j] = vj
            p[r, j] -= step_size * m[r, j] / (np.sqrt(vj) * inv_bc2 + eps)


def scatter_adam(param, exp_avg, exp_avg_sq, rows, grad, step_size, inv_bc2_sqrt, beta1, beta2,
                 eps):
    """See ``reference.scatter_adam``: the gradient's rows in one pass, then every element in one
    streaming pass, with no dense gradient or other temporary of the parameter's size."""
    dt = param.numpy().dtype.type
    b1, b2 = dt(beta1), dt(beta2)
    if rows.numel():
        _scatter_adam_rows(_serial(rows.numel() * param.shape[1]), exp_avg.numpy(),
                           exp_avg_sq.numpy(), rows.numpy(), grad.contiguous().numpy(), b1, b2,
                           dt(1 - beta1), dt(1 - beta2))
    _scatter_adam_all(_serial(param.numel()), param.numpy(), exp_avg.numpy(), exp_avg_sq.numpy(),
                      b1, b2, dt(step_size), dt(inv_bc2_sqrt), dt(eps))


@_parallel
def _lazy_adam(p, m, v, rows, g, step_size, c1, c2, eps):
    for e in prange(rows.size):
        r = rows[e]
        for j in range(p.shape[1]):
            gj = g[e, j]
            mj = m[r, j] + (gj - m[r, j]) * c1
            vj = v[r, j] + (gj * gj - v[r, j]) * c2
            m[r, j] = mj
            v[r, j] = vj
            p[r, j] -= step_size * (mj / (np.sqrt(vj) + eps))


def lazy_adam(param, exp_avg, exp_avg_sq, rows, grad, step_size, beta1, beta2, eps):
    """See ``reference.lazy_adam``; rows are distinct and independent, so they run in parallel
    and the thread count changes nothing."""
    if rows.numel() == 0:
        return
    dt = param.numpy().dtype.type
    _lazy_adam(_serial(rows.numel() * param.shape[1]), param.numpy(), exp_avg.numpy(),
               exp_avg_sq.numpy(), rows.numpy(), grad.contiguous().numpy(), dt(step_size),
               dt(1 - beta1), dt(1 - beta2), dt(eps))


def coalesce_rows(rows, values, last):
    """The rows of an uncoalesced sparse gradient made unique, their values summed in entry
    order (deterministic), in one pass without a sort. ``last`` (the non-negative per-row steps
    of ``DeferredAdam``) marks rows already seen during the pass and is restored after it."""
    out_rows = torch.empty_like(rows)
    out_vals = torch.empty_like(values)
    saved = torch.empty(rows.numel(), dtype=last.dtype)
    count = _coalesce_rows(rows.numpy(), values.numpy(), last.numpy(), out_rows.numpy(),
                           out_vals.numpy(), saved.numpy())
    return out_rows[:count], out_vals[:count]


# ----------------------------------------------------------------------------------------------
# LSH output layers (PGHash; ``fastfair.kernels.lsh`` validates and documents every op, the math is
# in ``reference.lsh_*``). Codes and buckets are parallel over blocks of neurons or over tables;
# every neuron (table) is computed by one task, so no result depends on the thread count. The
# selection ops (union, pad, force) are serial: they are a few passes over at most ``n`` ids.


# Neurons (rows) per block of the codes, fold and DWTA kernels, one parallel task per block with
# its own scratch arrays: the block's sketch ``[8, LSH_BLOCK]`` (8 KiB in float32) and its codes
# stay in L1 while all ``L k`` projection rows sweep it. Measured on the 2-core VM, one thread,
# the projection of a [205443, 8] sketch in 50 tables of 8 bits (CPU time, the output
# preallocated): blocks of 128 neurons 20-22 ms, 256 19-20 ms, 512 19 ms; one projection row per
# pass over the block 21 ms, two 19 ms, four 21 ms.
LSH_BLOCK = 256
# Sketch coordinates per pass of the projection loop (written out below): the projection is
# zero-padded to a multiple of it, which adds exact zeros.
_LSH_GROUP = 8
# Row width (elements) below which the fold's halving passes run over the whole block at once.
_LSH_FLAT = 64


@njit(cache=True, inline="always")
def _lsh_fold_widths(d, c):
    """The fold's row widths: ``S = P c`` after the first pass (``P`` the largest power of two
    below ``T = ceil(d / c)``; ``S = d`` when ``T = 1``) and ``Sc``, the width at which the
    halving passes switch from row by row to the whole block (``min(S, max(_LSH_FLAT, c))``)."""
    nt = (d + c - 1) // c
    if nt == 1:
        return d, d
    p = 1
    while 2 * p < nt:
        p *= 2
    s = p * c
    sc = s
    while sc > _LSH_FLAT and sc > c:
        sc //= 2
    return s, sc


@njit(cache=True, inline="always")
def _lsh_fold_block(x, j0, nb, s, c, z, z2, rowbuf):
    """The fold of rows ``j0 .. j0 + nb`` of ``x``: returns ``(buf, width)`` with
    ``y[j0 + r, i] = buf[r width + i]`` for ``i < c``.

    Pairwise over the ``T = ceil(d / c)`` chunks of a row. First pass, row by row: chunk
    ``t < P`` (``P`` the largest power of two below ``T``) adds chunk ``t + P`` when that exists
    (the last chunk's missing tail reads as 0). Then the row halves (chunk ``t`` adds chunk
    ``t + P / 2``, ...) until ``P c`` is at most ``_LSH_FLAT``, and the remaining halvings run
    over the whole block as one flat loop each (``z2[f] = z[f] + z[f + w]``): a position past a
    row's live half reads the next row, but no later pass reads it. Every loop is contiguous and
    vectorised, where summing the chunks in order leaves loops of ``c`` iterations (8 here: too
    short to vectorise; measured 13.4 ms for the fold of [205443, 128] to 8 against 10.5 ms for
    this). Positions are ``uint64``, without which Numba's wraparound test on ``f + w`` keeps
    the flat loops scalar (measured 3x slower). The sums are pairwise rather than in torch's
    order, so the sketch matches the reference's to rounding. ``T = 1`` (``c = d``) is not
    handled here."""
    d = x.shape[1]
    sw, sc = _lsh_fold_widths(d, c)
    us = np.uint64(sw)
    usc = np.uint64(sc)
    lim = np.uint64(d - sw)
    for r in range(nb):
        j = j0 + r
        dst = z if sc == sw else rowbuf
        o = np.uint64(r) * usc if sc == sw else np.uint64(0)
        for e in range(lim):
            if s is not None:
                dst[o + e] = x[j, e] * s[e] + x[j, e + us] * s[e + us]
            else:
                dst[o + e] = x[j, e] + x[j, e + us]
        for e in range(lim, us):
            if s is not None:
                dst[o + e] = x[j, e] * s[e]
            else:
                dst[o + e] = x[j, e]
        if sc < sw:
            w = us
            while w > usc:
                w //= np.uint64(2)
                for e in range(w):
                    rowbuf[e] += rowbuf[e + w]
            o = np.uint64(r) * usc
            for e in range(usc):
                z[o + e] = rowbuf[e]
    a = z
    b = z2
    w = usc
    tot = np.uint64(nb) * usc
    uc = np.uint64(c)
    while w > uc:
        w //= np.uint64(2)
        for f in range(tot - w):
            b[f] = a[f] + a[f + w]
        a, b = b, a
    return a, sc


@njit(cache=True)
def _lsh_block_sketch(x, s, c, fold, j0, nb, yt):
    """``yt[i, r]`` = coordinate ``i`` of the sketch of row ``j0 + r`` (``r < nb``), neuron-minor:
    ``fold(x[j])`` when ``fold`` and ``c < d``, else the signed row's first ``c`` coordinates."""
    d = x.shape[1]
    if not fold or c == d:
        for r in range(np.uint64(nb)):
            j = np.uint64(j0) + r
            for i in range(np.uint64(c)):
                if s is not None:
                    yt[i, r] = x[j, i] * s[i]
                else:
                    yt[i, r] = x[j, i]
        return
    sc = _lsh_fold_widths(d, c)[1]
    z = np.empty(LSH_BLOCK * sc, dtype=x.dtype)
    z2 = np.empty(LSH_BLOCK * sc, dtype=x.dtype)
    rowbuf = np.empty(d, dtype=x.dtype)
    buf, width = _lsh_fold_block(x, j0, nb, s, c, z, z2, rowbuf)
    uw = np.uint64(width)
    for r in range(np.uint64(nb)):
        o = r * uw
        for i in range(np.uint64(c)):
            yt[i, r] = buf[o + i]


@njit(cache=True)
def _lsh_fold_one(x, s, c, out, blk):
    """``out[j] = fold(x[j])`` for the rows of block ``blk``."""
    j0 = blk * LSH_BLOCK
    nb = min(LSH_BLOCK, x.shape[0] - j0)
    yt = np.empty((c, LSH_BLOCK), dtype=x.dtype)
    _lsh_block_sketch(x, s, c, True, j0, nb, yt)
    for r in range(nb):
        for i in range(c):
            out[j0 + r, i] = yt[i, r]


@_parallel
def _lsh_fold(x, s, c, out):
    """``out[j] = fold(x[j])``, one task per block of ``LSH_BLOCK`` rows."""
    for blk in prange((x.shape[0] + LSH_BLOCK - 1) // LSH_BLOCK):
        _lsh_fold_one(x, s, c, out, blk)


def lsh_fold(x, c, signs):
    """The ``[n, c]`` sketch ``y[j, i] = sum_t s_{i + t c} x[j, i + t c]`` (pairwise sums in the
    dtype, see ``_lsh_fold_block``; the reference sums in torch's order, so the two agree to
    rounding)."""
    xs = x.detach().numpy()
    s = None if signs is None else signs.detach().numpy()
    out = np.empty((xs.shape[0], c), dtype=xs.dtype)
    if xs.shape[0]:
        _lsh_fold(_serial(xs.size), xs, s, c, out)
    return torch.from_numpy(out)


@njit(cache=True, fastmath={"contract"})
def _lsh_pg_block(x, proj, s, fold, k, c, out, blk):
    """Sign-bit codes of the ``LSH_BLOCK`` neurons of block ``blk``.

    The block's sketch is built once into ``yt [cp, LSH_BLOCK]``, neuron-minor (``cp`` = ``c``
    rounded up to ``_LSH_GROUP``; the padding rows are 0, as are the columns past ``n`` in the
    last block). Then for every projection row ``(l, b)``: ``dot[r] = sum_i proj[l b, i] yt[i, r]``
    eight coordinates at a time, the eight weights in registers and the loop over the block's
    neurons vectorised, and ``code[r] |= [dot[r] > 0] 2^b``; for ``c <= 8`` two rows share each
    pass (each sketch value loaded serves both). The dot products are in the dtype with fused
    multiply-adds (``contract``; no reassociation): within ``(c + 1) eps |proj_row| |y_j|`` of the
    exact value, so a bit can differ from the reference's float64 sign only for a dot product that
    close to 0."""
    n = x.shape[0]
    nrows = proj.shape[0]
    cp = proj.shape[1]
    ng = cp // _LSH_GROUP
    ntab = nrows // k
    zero = np.int32(0)
    yt = np.zeros((cp, LSH_BLOCK), dtype=x.dtype)
    acc = np.empty(LSH_BLOCK, dtype=x.dtype)
    code = np.empty(LSH_BLOCK, dtype=np.int32)
    j0 = blk * LSH_BLOCK
    nb = min(LSH_BLOCK, n - j0)
    _lsh_block_sketch(x, s, c, fold, j0, nb, yt)
    for tab in range(ntab):
        code[:] = 0
        b = 0
        if ng == 1:
            while b + 2 <= k:
                row = tab * k + b
                bit0 = np.int32(1 << b)
                bit1 = np.int32(2 << b)
                p0 = proj[row, 0]
                p1 = proj[row, 1]
                p2 = proj[row, 2]
                p3 = proj[row, 3]
                p4 = proj[row, 4]
                p5 = proj[row, 5]
                p6 = proj[row, 6]
                p7 = proj[row, 7]
                q0 = proj[row + 1, 0]
                q1 = proj[row + 1, 1]
                q2 = proj[row + 1, 2]
                q3 = proj[row + 1, 3]
                q4 = proj[row + 1, 4]
                q5 = proj[row + 1, 5]
                q6 = proj[row + 1, 6]
                q7 = proj[row + 1, 7]
                for r in range(LSH_BLOCK):
                    y0 = yt[0, r]
                    y1 = yt[1, r]
                    y2 = yt[2, r]
                    y3 = yt[3, r]
                    y4 = yt[4, r]
                    y5 = yt[5, r]
                    y6 = yt[6, r]
                    y7 = yt[7, r]
                    v = (p0 * y0 + p1 * y1 + p2 * y2 + p3 * y3 + p4 * y4 + p5 * y5
                         + p6 * y6 + p7 * y7)
                    u = (q0 * y0 + q1 * y1 + q2 * y2 + q3 * y3 + q4 * y4 + q5 * y5
                         + q6 * y6 + q7 * y7)
                    code[r] |= bit0 if v > 0 else zero
                    code[r] |= bit1 if u > 0 else zero
                b += 2
        while b < k:
            row = tab * k + b
            bit = np.int32(1 << b)
            for g in range(ng):
                i0 = g * _LSH_GROUP
                p0 = proj[row, i0]
                p1 = proj[row, i0 + 1]
                p2 = proj[row, i0 + 2]
                p3 = proj[row, i0 + 3]
                p4 = proj[row, i0 + 4]
                p5 = proj[row, i0 + 5]
                p6 = proj[row, i0 + 6]
                p7 = proj[row, i0 + 7]
                if ng == 1:
                    for r in range(LSH_BLOCK):
                        v = (p0 * yt[0, r] + p1 * yt[1, r] + p2 * yt[2, r]
                             + p3 * yt[3, r] + p4 * yt[4, r] + p5 * yt[5, r]
                             + p6 * yt[6, r] + p7 * yt[7, r])
                        code[r] |= bit if v > 0 else zero
                elif g == 0:
                    for r in range(LSH_BLOCK):
                        acc[r] = (p0 * yt[0, r] + p1 * yt[1, r] + p2 * yt[2, r]
                                  + p3 * yt[3, r] + p4 * yt[4, r] + p5 * yt[5, r]
                                  + p6 * yt[6, r] + p7 * yt[7, r])
                elif g < ng - 1:
                    for r in range(LSH_BLOCK):
                        acc[r] += (p0 * yt[i0, r] + p1 * yt[i0 + 1, r]
                                   + p2 * yt[i0 + 2, r] + p3 * yt[i0 + 3, r]
                                   + p4 * yt[i0 + 4, r] + p5 * yt[i0 + 5, r]
                                   + p6 * yt[i0 + 6, r] + p7 * yt[i0 + 7, r])
                else:
                    for r in range(LSH_BLOCK):
                        v = acc[r] + (p0 * yt[i0, r] + p1 * yt[i0 + 1, r]
                                      + p2 * yt[i0 + 2, r] + p3 * yt[i0 + 3, r]
                                      + p4 * yt[i0 + 4, r] + p5 * yt[i0 + 5, r]
                                      + p6 * yt[i0 + 6, r] + p7 * yt[i0 + 7, r])
                        code[r] |= bit if v > 0 else zero
            b += 1
        dst = np.uint64(j0)
        for r in range(np.uint64(nb)):
            out[tab, dst + r] = code[r]


@_parallel
def _lsh_pg_codes(x, proj, s, fold, k, c, out):
    """``_lsh_pg_block`` for every block. The block's work is a function of its own (not inlined),
    so the parallel and serial builds run the same machine code and give the same bits (LLVM
    decides once which products fuse into FMAs); written inside the parfor body, the same loops
    ran 26 ms where the serial build ran 20 ms (one thread)."""
    for blk in prange((x.shape[0] + LSH_BLOCK - 1) // LSH_BLOCK):
        _lsh_pg_block(x, proj, s, fold, k, c, out, blk)


def lsh_pg_codes(x, proj, signs):
    """``codes[l, j] = sum_b [<proj[l, b], y_j> > 0] 2^b`` (int32 ``[L, n]``), the fold fused in
    (``y = x`` when ``c = d`` and there are no signs). Dot products in the dtype (see
    ``_lsh_pg_codes``): bits can differ from the reference only for dot products within rounding
    of 0."""
    xs = x.detach().numpy()
    L, k, c = proj.shape
    n, d = xs.shape
    cp = -(-c // _LSH_GROUP) * _LSH_GROUP
    pp = np.zeros((L * k, cp), dtype=xs.dtype)
    pp[:, :c] = proj.detach().numpy().reshape(L * k, c)
    fold = not (c == d and signs is None)
    s = None if signs is None else signs.detach().numpy()
    out = np.empty((L, n), dtype=np.int32)
    if n:
        _lsh_pg_codes(_serial(n * (d + L * k * cp)), xs, pp, s, fold, k, c, out)
    return torch.from_numpy(out)


@njit(cache=True)
def _dwta_probes(key, nb, probes):
    """``tbl[b, a] = fmix32((fmix32(b ^ key) + a GOLDEN) mod 2^32) mod nb``: the bin of the same
    table that empty bin ``b`` borrows from at attempt ``a`` (``reference._dwta_probe``)."""
    tbl = np.empty((nb, probes), dtype=np.int64)
    ukey = np.uint64(key)
    for b in range(nb):
        hb = _fmix32(np.uint64(b) ^ ukey)
        for a in range(probes):
            tbl[b, a] = np.int64(_word(hb, a) % np.uint64(nb))
    return tbl


@njit(cache=True, inline="always")
def _dwta_bins(xt, bins, t0, w, b0, b1, best, val, nz):
    """Bins ``b0 .. b1 - 1`` of the table whose bins start at ``bins[t0]``, for every row of the
    block at once (``xt [c, LSH_BLOCK]``: the block's sampled values, row-minor):
    ``val[b, r]`` the position of the first maximum, ``nz[b, r]`` 1 if any value is non-zero,
    else 0 (the bin is empty). Each pass over the block's rows is contiguous and branch-free, so
    it vectorises (flags are int32, the lane width of the winners)."""
    for b in range(b0, b1):
        base = t0 + b * w
        src = bins[base]
        for r in range(LSH_BLOCK):
            v = xt[src, r]
            best[r] = v
            val[b, r] = 0
            nz[b, r] = np.int32(v != 0)
        for p in range(1, w):
            src = bins[base + p]
            pp = np.int32(p)
            for r in range(LSH_BLOCK):
                v = xt[src, r]
                bo = best[r]
                better = np.int32(v > bo)
                best[r] = max(v, bo)
                val[b, r] += better * (pp - val[b, r])
                nz[b, r] |= np.int32(v != 0)


@njit(cache=True, inline="always")
def _dwta_borrow(val, nz, src, todo, fill):
    """Rows still ``todo`` whose bin ``src`` is non-empty take its winner; returns how many rows
    remain ``todo``. One pass over the block in int32 arithmetic (a select written ``a if t else
    b`` kept this loop scalar: 180 against 80 ns per pass)."""
    left = np.int32(0)
    vs = val[src]
    ns = nz[src]
    for r in range(LSH_BLOCK):
        take = todo[r] & ns[r]
        fill[r] += take * (vs[r] - fill[r])
        todo[r] -= take
        left += todo[r]
    return left


# Rows of a block below which an empty bin's densification leaves the vectorised passes (each
# pays for the whole block) and finishes row by row.
_DWTA_ROWWISE = 8


@njit(cache=True)
def _lsh_dwta_block(x, rows, bins, nb, w, logw, used, mask, tbl, out, blk):
    """The codes of the ``LSH_BLOCK`` rows of block ``blk``, the rows as vector lanes: their
    sampled values are gathered once into ``xt``; per table the ``used`` bins that reach the code
    are evaluated for all rows, and the table's other bins only when one of those is empty in some
    row. An empty bin is densified for all rows at once, probe by probe (then the cyclic scan),
    until no row needs it (the probe sequence depends on the bin, not the row); a row whose bins
    in the table are all empty takes 0 at once, so it does not hold the block to every probe.
    Measured on one thread, [205443, 128] float32 in 50 tables of 8 bins of 8 (8 bits): 68 ms
    dense, 210 ms with 90% zeros (most tables have holes); row by row it took 430 and 930 ms."""
    n = x.shape[0]
    c = rows.shape[0]
    ntab = bins.shape[0] // (nb * w)
    probes = tbl.shape[1]
    j0 = blk * LSH_BLOCK
    nr = min(LSH_BLOCK, n - j0)
    xt = np.zeros((c, LSH_BLOCK), dtype=x.dtype)
    for r in range(nr):
        for i in range(c):
            xt[i, r] = x[j0 + r, rows[i]]
    best = np.empty(LSH_BLOCK, dtype=x.dtype)
    val = np.empty((nb, LSH_BLOCK), dtype=np.int32)
    nz = np.empty((nb, LSH_BLOCK), dtype=np.int32)
    code = np.empty(LSH_BLOCK, dtype=np.int32)
    fill = np.empty(LSH_BLOCK, dtype=np.int32)
    todo = np.empty(LSH_BLOCK, dtype=np.int32)
    live = np.empty(LSH_BLOCK, dtype=np.int32)
    for tab in range(ntab):
        t0 = tab * nb * w
        _dwta_bins(xt, bins, t0, w, 0, used, best, val, nz)
        full = 1
        for b in range(used):
            for r in range(nr):
                full &= nz[b, r]
        if not full:
            _dwta_bins(xt, bins, t0, w, used, nb, best, val, nz)
            for r in range(LSH_BLOCK):
                live[r] = 0
            for b in range(nb):
                for r in range(LSH_BLOCK):
                    live[r] |= nz[b, r]
        for r in range(LSH_BLOCK):
            code[r] = 0
        for b in range(used):
            shift = np.int32(b * logw)
            left = 0
            if not full:
                for r in range(LSH_BLOCK):
                    fill[r] = val[b, r] * nz[b, r]
                    todo[r] = live[r] & (nz[b, r] ^ 1) & np.int32(r < nr)
                    left += todo[r]
            if left == 0:
                for r in range(LSH_BLOCK):
                    code[r] |= (val[b, r] if full else fill[r]) << shift
                continue
            t = 0
            while left > _DWTA_ROWWISE and t < probes:
                left = _dwta_borrow(val, nz, tbl[b, t], todo, fill)
                t += 1
            step = 1
            while left > _DWTA_ROWWISE and step < nb:
                left = _dwta_borrow(val, nz, (b + step) % nb, todo, fill)
                step += 1
            if left > 0:
                for r in range(nr):
                    if todo[r]:
                        a = -1
                        for tt in range(t, probes):
                            src = tbl[b, tt]
                            if nz[src, r]:
                                a = val[src, r]
                                break
                        for st in range(step if a < 0 else nb, nb):
                            src = (b + st) % nb
                            if nz[src, r]:
                                a = val[src, r]
                                break
                        fill[r] = max(a, 0)
            for r in range(LSH_BLOCK):
                code[r] |= fill[r] << shift
        dst = np.uint64(j0)
        for r in range(np.uint64(nr)):
            out[tab, dst + r] = code[r] & np.int32(mask)


@_parallel
def _lsh_dwta_codes(x, rows, bins, nb, w, logw, used, mask, tbl, out):
    """``_lsh_dwta_block`` for every block (a function of its own, shared by both builds)."""
    for blk in prange((x.shape[0] + LSH_BLOCK - 1) // LSH_BLOCK):
        _lsh_dwta_block(x, rows, bins, nb, w, logw, used, mask, tbl, out, blk)


def lsh_dwta_codes(x, rows, bins, bits, key, probes):
    """Densified winner-take-all codes (int32 ``[L, n]``; math in ``reference.lsh_dwta_codes``).
    Only the first ``ceil(bits / log2 w)`` bins of a table reach its code, so only theirs are
    densified."""
    xs = x.detach().numpy()
    L, nb, w = bins.shape
    logw = w.bit_length() - 1
    tbl = _dwta_probes(key, nb, probes)
    used = min(nb, -(-bits // logw))
    out = np.empty((L, xs.shape[0]), dtype=np.int32)
    _lsh_dwta_codes(_serial(xs.shape[0] * L * used * w), xs, rows.detach().numpy(),
                    bins.detach().reshape(-1).numpy(), nb, w, logw, used, (1 << bits) - 1, tbl,
                    out)
    return torch.from_numpy(out)


@_parallel
def _lsh_buckets(codes, offsets, members):
    """Counting sort of table ``l`` per task: counts into ``offsets[l, h + 1]`` (zeroed), their
    prefix sums, then the neurons in increasing ``j`` to their bucket's next free place.
    Positions are ``uint64`` (measured on one table set of [50, 205443]: the count pass 5.2 ms
    with signed indices, 3.5 ms without; the scatter 11.9 ms and 9.6 ms)."""
    ntab, n = codes.shape
    nbk = offsets.shape[1] - 1
    one = np.uint64(1)
    for tab in prange(ntab):
        off = offsets[tab]
        row = codes[tab]
        dst = members[tab]
        for j in range(n):
            off[np.uint64(row[j]) + one] += 1
        for h in range(nbk):
            off[h + 1] += off[h]
        pos = off[:nbk].copy()
        for j in range(n):
            h = np.uint64(row[j])
            dst[np.uint64(pos[h])] = j
            pos[h] += 1


def lsh_buckets(codes, bits):
    """CSR buckets of every table (offsets int64 ``[L, 2^bits + 1]``, members int32 ``[L, n]``,
    ascending within a bucket)."""
    cs = codes.detach().numpy()
    L, n = cs.shape
    offsets = np.zeros((L, (1 << bits) + 1), dtype=np.int64)
    members = np.empty((L, n), dtype=np.int32)
    _lsh_buckets(_serial(L * (n + (1 << bits))), cs, offsets, members)
    return torch.from_numpy(offsets), torch.from_numpy(members)


# Buckets of the top bits of the rank's hash in the partial selection of ``_lsh_keep_smallest``.
_RANK_BITS = 16


@njit(cache=True)
def _lsh_keep_smallest(out, start, cnt, need, key):
    """Reorder ``out[start:start + cnt]`` (distinct ids) so that its first ``need`` entries are
    the ``need`` ids of smallest ``lsh_rank = fmix32(j ^ key) 2^31 + j`` (``0 < need < cnt``).

    A histogram of the hashes' top ``_RANK_BITS`` bits finds the bucket where the ``need``-th
    smallest lies; only that bucket's few ranks are sorted, the others are decided by the bucket
    alone. Two passes over the candidates, no full sort."""
    ukey = np.uint64(key)
    hs = np.empty(cnt, dtype=np.int64)
    hist = np.zeros(1 << _RANK_BITS, dtype=np.int64)
    shift = 32 - _RANK_BITS
    for q in range(cnt):
        h = np.int64(_fmix32(np.uint64(out[start + q]) ^ ukey))
        hs[q] = h
        hist[h >> shift] += 1
    below = 0
    cut = 0
    for t in range(1 << _RANK_BITS):
        if below + hist[t] >= need:
            cut = t
            break
        below += hist[t]
    ranks = np.empty(hist[cut], dtype=np.int64)
    i = 0
    for q in range(cnt):
        if hs[q] >> shift == cut:
            ranks[i] = (hs[q] << 31) | out[start + q]
            i += 1
    ranks.sort()
    last = ranks[need - below - 1]
    kept = 0
    for q in range(cnt):
        h = hs[q]
        top = h >> shift
        j = out[start + q]
        if top < cut or (top == cut and ((h << 31) | j) <= last):
            out[start + q] = out[start + kept]
            out[start + kept] = j
            hs[q] = hs[kept]
            hs[kept] = h
            kept += 1


@njit(cache=True)
def _lsh_union(mark, out, count, qcodes, offsets, members, m, key):
    """``reference.lsh_union_``, table by table: the distinct buckets the batch hits (its codes
    sorted), their members not yet marked are marked and appended; the buckets of one table are
    disjoint, so the marks alone dedupe. A table that overshoots ``m`` keeps its ``m - count``
    new ids of smallest rank and unmarks the rest."""
    nq, ntab = qcodes.shape
    n = mark.shape[0]
    hits = np.empty(nq, dtype=np.int64)
    for t in range(ntab):
        if count >= m:
            break
        for q in range(nq):
            hits[q] = qcodes[q, t]
        hits.sort()
        new = 0
        for q in range(nq):
            h = hits[q]
            if q > 0 and h == hits[q - 1]:
                continue
            lo = offsets[t, h]
            hi = offsets[t, h + 1]
            if lo < 0 or hi < lo or hi > members.shape[1]:
                raise ValueError("lsh union: offsets are not those of buckets() for this table")
            for e in range(lo, hi):
                j = members[t, e]
                if j < 0 or j >= n:
                    raise ValueError("lsh union: a bucket member is not a neuron of the set")
                if not mark[j]:
                    mark[j] = True
                    out[count + new] = j
                    new += 1
        if count + new > m:
            need = m - count
            _lsh_keep_smallest(out, count, new, need, key)
            for q in range(count + need, count + new):
                mark[out[q]] = False
            new = need
        count += new
    return count


def lsh_union_(mark, out, count, qcodes, offsets, members, m, key):
    """Add the neurons of the buckets the batch hits, table by table (``reference.lsh_union_``);
    ``mark`` and ``out`` are updated in place, ``out[:count]`` in no particular order."""
    return int(_lsh_union(mark.numpy(), out.numpy(), count, qcodes.detach().numpy(),
                          offsets.detach().long().numpy(), members.detach().numpy(), m, key))


@njit(cache=True)
def _lsh_pad(mark, out, count, m, key):
    """The unmarked ids are listed after ``out[:count]`` (exactly the room ``out`` has left), the
    ``m - count`` of smallest rank moved to the front and marked."""
    n = mark.shape[0]
    free = 0
    for j in range(n):
        if not mark[j]:
            if count + free >= out.shape[0]:
                raise ValueError("lsh pad: count does not match the marks")
            out[count + free] = j
            free += 1
    need = min(m - count, free)
    if need < free:
        _lsh_keep_smallest(out, count, free, need, key)
    for q in range(count, count + need):
        mark[out[q]] = True
    return count + need


def lsh_pad_(mark, out, count, m, key):
    """Fill the set up to ``m`` with the unmarked neurons of smallest ``lsh_rank``."""
    if count >= m:
        return count
    return int(_lsh_pad(mark.numpy(), out.numpy(), count, m, key))


@njit(cache=True)
def _lsh_force(mark, out, count, ids):
    for q in range(ids.shape[0]):
        j = ids[q]
        if not mark[j]:
            mark[j] = True
            out[count] = j
            count += 1
    return count


def lsh_force_(mark, out, count, ids):
    """Add the distinct ``ids`` not yet in the set (in order of first appearance)."""
    return int(_lsh_force(mark.numpy(), out.numpy(), count, ids.detach().long().numpy()))


@njit(cache=True)
def _lsh_softmax_row(z, offsets, pos, nb, per, grad, b):
    """Row ``b``: the maximum, then ``e_p = exp(z_p - max)`` and their sum in one pass (float64),
    the targets' mean, and the gradient row written once."""
    m = z.shape[1]
    cnt = offsets[b + 1] - offsets[b]
    if cnt == 0:
        per[b] = 0.0
        for p in range(m):
            grad[b, p] = 0
        return
    mx = -np.inf
    for p in range(m):
        v = np.float64(z[b, p])
        mx = v if v > mx else mx
    # torch.logsumexp shifts by the maximum only when it is finite.
    shift = mx if np.isfinite(mx) else 0.0
    e = np.empty(m, dtype=np.float64)
    tot = 0.0
    for p in range(m):
        t = np.exp(np.float64(z[b, p]) - shift)
        e[p] = t
        tot += t
    tz = 0.0
    for q in range(offsets[b], offsets[b + 1]):
        tz += np.float64(z[b, pos[q]])
    inv_cnt = 1.0 / cnt
    per[b] = shift + np.log(tot) - tz * inv_cnt
    for p in range(m):
        e[p] /= tot
    for q in range(offsets[b], offsets[b + 1]):
        e[pos[q]] -= inv_cnt
    for p in range(m):
        grad[b, p] = e[p] / nb


@_parallel
def _lsh_softmax_loss(z, offsets, pos, nb, per, grad):
    """``_lsh_softmax_row`` for every row (a function of its own, shared by both builds)."""
    for b in prange(z.shape[0]):
        _lsh_softmax_row(z, offsets, pos, nb, per, grad, b)


def lsh_softmax_loss(logits, tgt_offsets, tgt_pos):
    """Label-normalised softmax cross-entropy over the active set and its gradient
    (``reference.lsh_softmax_loss``), float64 inside; the per-row losses are summed in row
    order."""
    z = logits.detach().numpy()
    B = z.shape[0]
    per = np.empty(B, dtype=np.float64)
    grad = np.empty(z.shape, dtype=z.dtype)
    _lsh_softmax_loss(_serial(z.size), z, tgt_offsets.detach().long().numpy(),
                      tgt_pos.detach().long().numpy(), float(max(B, 1)), per, grad)
    loss = per.sum() / max(B, 1)
    return torch.tensor(loss, dtype=logits.dtype), torch.from_numpy(grad)


# ---------------------------------------------------------------- fused NCF local training
# (fastfair.fl.fused drives these and states the math; its reference is the autograd loop of
# fastfair.fl.runner.train_client.) A table is a flat array ``w`` read through addresses and signs
# computed per looked-up row: ``idx = i d + k`` for a dense table, ``_index_row`` for a hashed one.
# Its Adam state is one ``[size, 3]`` array ``st`` of ``(m, v, last step)`` per address: the
# addresses a step touches are scattered over tables far larger than the caches, and keeping an
# address's state in one 12-byte record makes it one cache miss (two for the records that cross
# a line) beside ``w``'s, not three; 12 bytes, as DeferredAdam's two moments and int32 step, keep
# a small device's memory where it was. ``last`` is stored as a float (``fastfair.fl.fused``
# keeps a round below 2^24 steps, where float32 counts exactly). Small parameters (user vectors,
# head) sit in one flat array ``x`` laid out as ``[p (d) | p' (d) | W (d x 2d) | b (d) | a (2d) |
# c (1)]`` (MF: ``[p]`` only).


@njit(cache=True, inline="always")
def _ncf_index(items, lo, nb, cols, t, hashed, dim, z, nslots, magic, ka, ks, signed, w, stf,
               idx, sgn):
    """Addresses and signs of table ``t``'s rows for the ``nb x cols`` items from row ``lo`` of
    ``items``, each address's value and state prefetched: a batch's gathers then find them in
    the caches instead of waiting on memory one address at a time (``stf`` is the state
    flattened)."""
    for r in range(nb * cols):
        item = items[lo + r // cols, r % cols]
        if hashed:
            _index_row(item, dim, z, nslots, magic, ka, ks, signed, idx[t, r], sgn[t, r])
        else:
            for k in range(dim):
                idx[t, r, k] = item * dim + k
        for k in range(dim):
            a = idx[t, r, k]
            _prefetch(w, a)
            _prefetch(stf, 3 * a)


@njit(cache=True, inline="always")
def _ncf_rows(rows, t, dim, w, st, idx, sgn, q, upto, step_size, inv_bc2, b1, b2, eps, tails,
              powers, tol, fast_r):
    """Values of table ``t``'s ``rows`` rows at the addresses ``_ncf_index`` gave. An address
    read with deferred steps pending takes them first (so the values read are plain Adam's
    after ``upto`` steps)."""
    for r in range(rows):
        for k in range(dim):
            a = idx[t, r, k]
            last = np.int64(st[a, 2])
            if 0 < last < upto:
                w[a], st[a, 0], st[a, 1] = _adam_entry(
                    np.float64(w[a]), np.float64(st[a, 0]), np.float64(st[a, 1]), last, upto,
                    0.0, False, step_size, inv_bc2, b1, b2, eps, tails, powers, tol, fast_r)
                st[a, 2] = upto
            q[t, r, k] = sgn[t, r, k] * np.float64(w[a])


@njit(cache=True, inline="always")
def _ncf_table_step(w, st, idx, sgn, gq, rows, dim, upto, step_size, inv_bc2, b1, b2, eps, tol,
                    fast_r, tails, powers, addr, val, saved):
    """Adam step ``upto + 1`` of one table: the rows' gradients ``sgn * gq`` summed per address
    (entry order; ``last`` marks addresses already met, as ``_coalesce_rows`` does), then each
    address's step (``_ncf_rows`` brought them to step ``upto``)."""
    count = 0
    for r in range(rows):
        for k in range(dim):
            a = idx[r, k]
            g = sgn[r, k] * gq[r, k]
            s = np.int64(st[a, 2])
            if s >= 0:
                saved[count] = s
                st[a, 2] = -1 - count
                addr[count] = a
                val[count] = g
                count += 1
            else:
                val[-1 - s] += g
    for e in range(count):
        a = addr[e]
        start = saved[e] if saved[e] > 0 else upto
        w[a], st[a, 0], st[a, 1] = _adam_entry(
            np.float64(w[a]), np.float64(st[a, 0]), np.float64(st[a, 1]), start, upto, val[e],
            True, step_size, inv_bc2, b1, b2, eps, tails, powers, tol, fast_r)
        st[a, 2] = upto + 1


@njit(cache=True, nogil=True)
def _ncf_epoch(items, batch, neumf, bpr, reg, dim, w0, st0, h0, w1, st1, h1, x, xm, xv, step,
               step_size, inv_bc2, b1, b2, eps, tol):
    """One epoch of local training over ``items`` ``[P, 1 + negatives]`` (positive first), in
    batches of ``batch`` rows from the top; Adam steps ``step + 1 ..``. ``h0``/``h1``: ``(hashed,
    z, nslots, magic, ka, ks, signed)`` of each table (``w1`` unused for MF). Returns the summed
    batch loss times batch size, and the step reached."""
    P, cols = items.shape
    rmax = min(batch, P) * cols
    tabs = 2 if neumf else 1
    idx = np.empty((2, rmax, dim), dtype=np.int64)
    sgn = np.ones((2, rmax, dim), dtype=np.int8)
    q = np.empty((2, rmax, dim))
    gq = np.empty((2, rmax, dim))
    hid = np.empty((rmax, dim))
    s = np.empty(rmax)
    gs = np.empty(rmax)
    gx = np.empty(x.shape[0])
    uz = np.empty(dim)
    # float64 copies of the small parameters for the batch, and the batch sums their gradients
    # need: every row of a batch shares the user vectors, so the user-side terms are summed
    # over rows first and multiplied once.
    wu = np.empty((dim, dim))
    wi = np.empty((dim, dim))
    pg = np.empty(dim)
    pm = np.empty(dim)
    am = np.empty(dim)
    apg = np.empty(dim)
    sq0 = np.empty(dim)
    gam = np.empty(dim)
    sdz = np.empty(dim)
    gwi = np.empty((dim, dim))
    addr = np.empty(rmax * dim, dtype=np.int64)
    val = np.empty(rmax * dim)
    saved = np.empty(rmax * dim, dtype=np.int64)
    ow, ob, oa, oc = 2 * dim, 2 * dim + 2 * dim * dim, 3 * dim + 2 * dim * dim, \
        5 * dim + 2 * dim * dim
    stf0 = st0.reshape(-1)
    stf1 = st1.reshape(-1)
    fast_r = _fast_r(tol)
    total = 0.0
    for lo in range(0, P, batch):
        nb = min(batch, P - lo)
        rows = nb * cols
        tails, powers = _replay_tables(step_size, inv_bc2, b1, b2, step, REPLAY_TERMS)
        _ncf_index(items, lo, nb, cols, 0, h0[0], dim, h0[1], h0[2], h0[3], h0[4], h0[5],
                   h0[6], w0, stf0, idx, sgn)
        if neumf:
            _ncf_index(items, lo, nb, cols, 1, h1[0], dim, h1[1], h1[2], h1[3], h1[4], h1[5],
                       h1[6], w1, stf1, idx, sgn)
        _ncf_rows(rows, 0, dim, w0, st0, idx, sgn, q, step, step_size, inv_bc2, b1, b2, eps,
                  tails, powers, tol, fast_r)
        if neumf:
            _ncf_rows(rows, 1, dim, w1, st1, idx, sgn, q, step, step_size, inv_bc2, b1, b2, eps,
                      tails, powers, tol, fast_r)
        for k in range(dim):
            pg[k] = x[k]
        if neumf:
            for j in range(dim):
                pm[j] = x[dim + j]
                am[j] = x[oa + dim + j]
                apg[j] = np.float64(x[oa + j]) * pg[j]
                for k in range(dim):
                    wu[j, k] = x[ow + j * 2 * dim + k]
                    wi[j, k] = x[ow + j * 2 * dim + dim + k]
            for j in range(dim):
                acc = np.float64(x[ob + j])
                for k in range(dim):
                    acc += wu[j, k] * pm[k]
                uz[j] = acc
        # Scores.
        for r in range(rows):
            if neumf:
                acc = np.float64(x[oc])
                for k in range(dim):
                    acc += apg[k] * q[0, r, k]
                for j in range(dim):
                    zj = uz[j]
                    for k in range(dim):
                        zj += wi[j, k] * q[1, r, k]
                    hid[r, j] = zj
                    if zj > 0:
                        acc += am[j] * zj
                s[r] = acc
            else:
                acc = 0.0
                for k in range(dim):
                    acc += pg[k] * q[0, r, k]
                s[r] = acc
        # Loss and its gradient in the scores.
        loss = 0.0
        if bpr:
            pairs = nb * (cols - 1)
            for r in range(rows):
                gs[r] = 0.0
            for b in range(nb):
                for j in range(1, cols):
                    u = s[b * cols] - s[b * cols + j]
                    # -log sigma(u) = softplus(-u), stably; its derivative is -sigma(-u).
                    if u >= 0:
                        e = np.exp(-u)
                        loss += np.log1p(e)
                        g = -e / (1.0 + e) / pairs
                    else:
                        e = np.exp(u)
                        loss += np.log1p(e) - u
                        g = -1.0 / (1.0 + e) / pairs
                    gs[b * cols] += g
                    gs[b * cols + j] -= g
            loss /= pairs
        else:
            for r in range(rows):
                y = 1.0 if r % cols == 0 else 0.0
                u = s[r]
                # binary cross-entropy with logits: softplus(u) - y u; derivative sigma(u) - y.
                if u >= 0:
                    e = np.exp(-u)
                    loss += u + np.log1p(e) - y * u
                    gs[r] = (1.0 / (1.0 + e) - y) / rows
                else:
                    e = np.exp(u)
                    loss += np.log1p(e) - y * u
                    gs[r] = (e / (1.0 + e) - y) / rows
            loss /= rows
        # Backward: per row the item rows' gradients and the sums over rows; then the small
        # parameters' gradients from the sums.
        for i in range(x.shape[0]):
            gx[i] = 0.0
        sg = 0.0
        for k in range(dim):
            sq0[k] = 0.0
            gam[k] = 0.0
            sdz[k] = 0.0
            for j in range(dim):
                gwi[k, j] = 0.0
        scale = 2.0 * reg / nb
        for r in range(rows):
            g = gs[r]
            sg += g
            for k in range(dim):
                sq0[k] += g * q[0, r, k]
            if neumf:
                for k in range(dim):
                    gq[0, r, k] = g * apg[k]
                    gq[1, r, k] = 0.0
                for j in range(dim):
                    zj = hid[r, j]
                    if zj > 0:
                        gam[j] += g * zj
                        dz = g * am[j]
                        sdz[j] += dz
                        for k in range(dim):
                            gwi[j, k] += dz * q[1, r, k]
                            gq[1, r, k] += dz * wi[j, k]
            else:
                for k in range(dim):
                    gq[0, r, k] = g * pg[k]
            if reg:
                for t in range(tabs):
                    for k in range(dim):
                        gq[t, r, k] += scale * q[t, r, k]
        if neumf:
            gx[oc] = sg
            for j in range(dim):
                gx[oa + j] = pg[j] * sq0[j]
                gx[j] = np.float64(x[oa + j]) * sq0[j]
                gx[oa + dim + j] = gam[j]
                gx[ob + j] = sdz[j]
                acc = 0.0
                for k in range(dim):
                    gx[ow + j * 2 * dim + k] = sdz[j] * pm[k]
                    gx[ow + j * 2 * dim + dim + k] = gwi[j, k]
                    acc += wu[k, j] * sdz[k]
                gx[dim + j] = acc
        else:
            for k in range(dim):
                gx[k] = sq0[k]
        if reg:
            for k in range(tabs * dim):
                gx[k] += scale * x[k]
                loss += reg * np.float64(x[k]) * x[k] / nb
            for t in range(tabs):
                for r in range(rows):
                    for k in range(dim):
                        loss += reg * q[t, r, k] * q[t, r, k] / nb
        total += loss * nb
        # Adam: the tables' rows, then every small parameter.
        _ncf_table_step(w0, st0, idx[0], sgn[0], gq[0], rows, dim, step, step_size, inv_bc2, b1,
                        b2, eps, tol, fast_r, tails, powers, addr, val, saved)
        if neumf:
            _ncf_table_step(w1, st1, idx[1], sgn[1], gq[1], rows, dim, step, step_size, inv_bc2,
                            b1, b2, eps, tol, fast_r, tails, powers, addr, val, saved)
        step += 1
        for i in range(x.shape[0]):
            g = gx[i]
            mm = b1 * xm[i] + (1 - b1) * g
            vv = b2 * xv[i] + (1 - b2) * g * g
            xm[i], xv[i] = mm, vv
            x[i] -= step_size[step] * mm / (np.sqrt(vv) * inv_bc2[step] + eps)
    return total, step


@njit(cache=True, nogil=True)
def _ncf_flush(w, st, upto, step_size, inv_bc2, b1, b2, eps, tol):
    """Every deferred step of a table up to ``upto`` (``DeferredAdam.flush``)."""
    tails, powers = _replay_tables(step_size, inv_bc2, b1, b2, upto, REPLAY_TERMS)
    fast_r = _fast_r(tol)
    # The catch-up is spelled out as in _ncf_rows: one inline helper taking the arrays, shared by
    # both, made this loop 25x slower (3.5 -> 85 ms over 2.9M entries, measured on the 2-core VM).
    for a in range(w.shape[0]):
        last = np.int64(st[a, 2])
        if 0 < last < upto:
            w[a], st[a, 0], st[a, 1] = _adam_entry(
                np.float64(w[a]), np.float64(st[a, 0]), np.float64(st[a, 1]), last, upto, 0.0,
                False, step_size, inv_bc2, b1, b2, eps, tails, powers, tol, fast_r)
            st[a, 2] = upto
