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
from numba import njit, prange

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


@_parallel
def _hash_index(rows, dim, z, nslots, magic, ka, ks, signed, idx, sign):
    """``idx[r, k] = Z (addr_hash(i, k // Z) mod m/Z) + k mod Z`` and, if signed,
    ``sign[r, k] = 1 - 2 bit_{k mod 32}(sign_word(i, k // 32))`` for ``i = rows[r]``."""
    ka = np.uint64(ka)
    ks = np.uint64(ks)
    for r in prange(rows.shape[0]):
        hr = _row_hash(rows[r], ka)
        hs = _row_hash(rows[r], ks)
        for c in range((dim + z - 1) // z):
            k0 = c * z
            base = z * np.int64(_fastmod(_word(hr, c), magic, nslots)) - k0
            for k in range(k0, min(k0 + z, dim)):
                idx[r, k] = base + k
        if signed:
            for wi in range((dim + 31) >> 5):
                sw = _word(hs, wi)
                for k in range(wi << 5, min((wi + 1) << 5, dim)):
                    sign[r, k] = 1 - 2 * np.int8((sw >> np.uint64(k & 31)) & _U1)


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
@_parallel
def _deferred_adam(p, m, v, last, rows, g, has_grad, upto, step_size, inv_bc2, b1, b2, eps):
    for r in prange(rows.size):
        i = rows[r]
        # A row never used has zero moments: its missed steps move nothing.
        start = last[i] if last[i] > 0 else upto
        for j in range(p.shape[1]):
            mm, vv, pp = m[i, j], v[i, j], p[i, j]
            for k in range(start + 1, upto + 1):
                mm *= b1
                vv *= b2
                pp -= step_size[k] * mm / (np.sqrt(vv) * inv_bc2[k] + eps)
            if has_grad:
                k = upto + 1
                gg = g[r, j]
                mm = b1 * mm + (1 - b1) * gg
                vv = b2 * vv + (1 - b2) * gg * gg
                pp -= step_size[k] * mm / (np.sqrt(vv) * inv_bc2[k] + eps)
            m[i, j], v[i, j], p[i, j] = mm, vv, pp
        last[i] = upto + 1 if has_grad else upto


def deferred_adam(param, exp_avg, exp_avg_sq, last, rows, grad, upto, step_size, inv_bc2_sqrt,
                  beta1, beta2, eps):
    """See ``reference.deferred_adam``; rows are independent, so they run in parallel."""
    if rows.numel() == 0:
        return
    w = param.shape[1]
    g = grad if grad is not None else torch.zeros(1, w, dtype=param.dtype)
    work = rows.numel() * w
    _deferred_adam(_serial(work), param.numpy(), exp_avg.numpy(), exp_avg_sq.numpy(),
                   last.numpy(), rows.numpy(), g.contiguous().numpy(), grad is not None, upto,
                   step_size.numpy(), inv_bc2_sqrt.numpy(), float(beta1), float(beta2),
                   float(eps))


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
