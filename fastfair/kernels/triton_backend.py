"""Triton backend: every op of ``reference`` as Triton kernels (GPU; CPU under TRITON_INTERPRET=1).

Hashing happens in registers with the uint32 arithmetic of ``hashing`` (bit-exact); no index or sign
tensor is ever written except by ``hash_index``, whose job it is.

Column tiling (hash_index, bag_forward, bag_backward). A program owns ``NCH`` whole chunks of
columns laid out as an ``[NCH, ZP]`` tile, ``ZP = next_pow2(Z)``: row ``r`` is chunk ``c``, lane
``l`` is column ``c Z + l`` (lanes ``l >= Z`` are masked). The address hash is evaluated on the
``[.., NCH, 1]`` slice, once per (virtual row, chunk), and each chunk is one contiguous,
``Z``-aligned load. Gathers load whole chunks, also the last one past ``dim`` (its ``Z`` slots lie
inside the array), so the load mask is constant over a chunk and the loads vectorise; stores and
atomics mask columns ``>= dim``. The sign word ``sign_word(i, w)`` is evaluated per (row, chunk)
for each of the at most ``NWC`` words a chunk overlaps (``NWC = 1`` when ``Z | 32``, 2 for
``Z = 64`` and most other ``Z``), then selected per column. On SIMT hardware a thread evaluates
these hashes only for the chunks its lanes fall in: one address hash and ``NWC`` sign words per
chunk, never one per column (except ``Z = 1``), and no shuffles.

``h mod (m / Z)`` (``m / Z <= 2**32``) uses a multiply-high by a host-computed reciprocal
(Granlund & Montgomery 1994, fig. 4.1): with ``l = ceil(log2 d)``,
``M = floor(2**32 (2**l - d) / d) + 1``, ``t = umulhi(h, M)``,
``q = (t + ((h - t) >> min(l, 1))) >> max(l - 1, 0)`` and ``h mod d = h - q d``, exact for every
uint32 ``h`` and ``1 <= d <= 2**32`` (``d = 2**32`` is passed as its uint32 truncation 0, where
``q = 0``). It costs a handful of integer ops instead of a 32-bit division.

Per op:

* ``hash_index``: grid ``(ceil(N / BR), col blocks)``, tile ``[BR, NCH, ZP]``; writes int64
  addresses and int8 signs.
* ``bag_forward`` pooled: grid ``(B, col blocks)``; the program loops over its bag ``BL`` elements
  at a time (``BL`` independent gathers in flight), accumulating a ``[BL, NCH, ZP]`` tile that is
  reduced over ``BL`` once after the loop; per-sample weights, signs, padding and the mean fused.
  ``offsets=None``: grid ``(ceil(N / BL), col blocks)``, every lane row is one output row.
* ``bag_backward``: the same grids; each program reads its ``grad_out`` row(s) once and
  scatter-adds ``sign * a_j * g`` with ``tl.atomic_add(sem="relaxed")`` (non-deterministic order).
* ``bag_backward_deterministic`` (taken under ``torch.use_deterministic_algorithms``, see
  ``backends``): the same sum, bit-identical from run to run. (1) ``_slot_keys_kernel``, on the
  forward's grids, writes one key per (element ``j``, chunk ``c``): ``key[j C + c]`` = the chunk
  slot ``r = addr_hash(i_j, c) mod (m / Z)``, or ``m / Z`` for padding and elements after the last
  offset; plus ``a_j`` (mean's ``1 / count`` folded in) and the bag of each element. That is
  ``N C`` keys (``C = ceil(dim / Z)``), never ``N dim``. (2) ``torch.sort(stable=True)`` orders
  them by slot, ties by ``(j, c)``; ``searchsorted`` finds where each block of ``BS`` slots starts.
  (3) ``_segment_sum_kernel``, grid ``(ceil((m / Z) / BS), lane blocks)``: a program owns ``BS``
  chunk slots and walks their sorted entries ``BE`` at a time, adding ``sign a_j g`` into a
  ``[BS, LB]`` accumulator through a one-hot ``[BE, BS]`` match (a fixed-shape reduction), then
  writes its ``BS Z`` gradient values once, hit or not (no zero-fill, no atomics). One owner and a
  fixed order per slot make the bits independent of scheduling. ``BS`` grows to 16 when slots are
  sparsely hit, so a program still sees about 8 entries; a hot slot is walked by one program.
* ``slot_counts``: element ``(i, k)`` lands in slot ``Z s + (k mod Z)`` with ``s`` the slot of its
  chunk, so the kernel counts chunks, not elements: grid ``(ceil(n / BR), ceil(n_chunks / NCH))``,
  one int64 atomic per (row, chunk) into ``hits[s]`` (full chunks) or ``hits[m/Z + s]`` (the last,
  partial chunk when ``Z`` does not divide ``dim``); a second streaming kernel expands
  ``cnt[Z s + l] = hits[s] + [l < dim mod Z] hits[m/Z + s]``. ``Z`` times fewer atomics than per
  element; for ``Z = 1`` the hits are the counts and no expansion runs. Never builds ``n x d``.
* ``fold``: grid ``ceil(m' / BLOCK)``, each program loops over the ``f`` folds of its block.
* ``tile``: grid ``(ceil(m / BLOCK), G)``; program ``(b, p)`` loads block ``b`` of ``w`` once and
  stores it into copies ``t = p, p + G, p + 2G, ...`` (``G`` spreads a small ``m`` with a large
  factor over the GPU).
* ``aggregate``: grid ``ceil(target / BLOCK)``; a launch takes up to ``AGG_GROUP`` (8) arrays as a
  tuple argument, so up to 8 arrays are summed in one pass over the output; more arrays take
  further launches that add into it (one extra read and write of the output per 8 arrays).
  ``j mod m_i`` is one 64-bit remainder per program; per element it is nothing when
  ``BLOCK | m_i`` (aligned loads), a conditional subtract when ``m_i > BLOCK``, and a 32-bit
  remainder when ``m_i < BLOCK``.

Limits: indices int32/int64, offsets int64 (int32 loads too); weights float32/float64 (float16
and bfloat16 accumulate in float32, but the backward's atomics add in the weight's own type);
``m / Z <= 2**32`` (the contract), with int32 address arithmetic when ``m < 2**31`` and int64
otherwise (the deterministic backward's keys: int32 when ``m / Z < 2**31``); rows ``< 2**32``
(the contract); ``ceil(dim / (NCH Z)) <= 65535`` (grid axis 1);
``B``, ``ceil(N / BL)``, ``ceil(n / BR)`` and ``ceil(size / BLOCK)`` ``< 2**31`` (grid axis 0).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from . import hashing
from .reference import seed_loop

NAME = "triton"

_M1 = tl.constexpr(hashing.M1)
_M2 = tl.constexpr(hashing.M2)
_GOLDEN = tl.constexpr(hashing.GOLDEN)

# Lanes (columns, padded to whole chunks) per program and elements per tile; a starting point that
# keeps a tile at about 16 values per thread with 4 warps.
LANES = 128
TILE = 2048
BLOCK = 1024
AGG_GROUP = 8
# Most chunk slots one program of the deterministic backward's segment sum owns.
SEGMENT_SLOTS = 16
# Programs the tile kernel aims for, enough to fill a large GPU several times over.
TILE_PROGRAMS = 4096

# Runtime scalars that must never be turned into compile-time constants (a value of 1 would be) or
# specialised on divisibility: they change with the seed and the array size.
_HASH_ARGS = ("ka", "ks", "nslots", "magic", "sh1", "sh2")


def available(device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type == "cuda":
        return (True, "") if torch.cuda.is_available() else (False, "CUDA is not available")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return False, "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        # Triton reads the variable once, when it decorates the kernels (at import).
        if not isinstance(_bag_forward_kernel, InterpretedFunction):
            return False, ("TRITON_INTERPRET=1 was set after fastfair's Triton kernels were built; "
                           "set it before importing fastfair")
        return True, ""
    return False, f"Triton kernels do not run on {device.type} devices"


# ---------------------------------------------------------------- host-side parameters
def _hash_scalars(memory_size: int, chunk_size: int, seed: int) -> tuple[int, ...]:
    """``(ka, ks, d, M, sh1, sh2)``: the keys and the reciprocal of ``d = m // Z`` (module doc)."""
    d = memory_size // chunk_size
    if d < 1:
        raise ValueError(f"memory_size ({memory_size}) must be at least chunk_size ({chunk_size})")
    if d > hashing.MAX_SLOTS_PER_CHUNK:
        raise ValueError(f"memory_size // chunk_size = {d} exceeds the hash contract's "
                         f"{hashing.MAX_SLOTS_PER_CHUNK} slots")
    ka, ks = hashing.keys(seed)
    l = (d - 1).bit_length()
    magic = ((1 << 32) * ((1 << l) - d)) // d + 1
    return ka, ks, d, magic, min(l, 1), max(l - 1, 0)


@functools.lru_cache(maxsize=None)
def _column_tiling(dim: int, chunk_size: int) -> tuple[int, int, int, int]:
    """``(ZP, NCH, column blocks, NWC)`` for ``dim`` columns in chunks of ``chunk_size``."""
    z = chunk_size
    zp = triton.next_power_of_2(z)
    n_chunks = triton.cdiv(dim, z)
    nch = min(triton.next_power_of_2(n_chunks), max(1, LANES // zp))
    # The word span of a chunk depends on (c Z mod 32), whose pattern repeats within 32 chunks; and
    # when there are more than 32 chunks the first 32 are full-width, so this max is exact.
    nwc = max((min(c * z + z, dim) - 1) // 32 - (c * z) // 32 + 1
              for c in range(min(n_chunks, 32)))
    return zp, nch, triton.cdiv(n_chunks, nch), nwc


def _warps(tile: int) -> int:
    return 4 if tile >= 512 else (2 if tile >= 128 else 1)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---------------------------------------------------------------- hashing in registers
@triton.jit
def _fmix32(x):
    x ^= x >> 16
    x *= _M1
    x ^= x >> 13
    x *= _M2
    x ^= x >> 16
    return x


@triton.jit
def _hash_keys(ka, ks, nslots, magic, sh1, sh2):
    # Python ints of 2**31 and above arrive as int64: truncation keeps the low 32 bits.
    return (ka.to(tl.uint32), ks.to(tl.uint32), nslots.to(tl.uint32), magic.to(tl.uint32),
            sh1.to(tl.uint32), sh2.to(tl.uint32))


@triton.jit
def _chunk_tile(pid_c, dim, Z: tl.constexpr, ZP: tl.constexpr, NCH: tl.constexpr):
    """Column block ``pid_c`` as ``[NCH, ZP]``: column ``c Z + l`` for chunk ``c``, lane ``l``.

    Returns the columns; the mask of columns ``< dim``; the mask of whole chunks (a chunk's ``Z``
    slots all lie inside the array even past ``dim``, so gathers load whole chunks and stay
    vectorisable); the lanes; ``c * GOLDEN``; ``w0 * GOLDEN`` with ``w0 = (c Z) // 32`` the first
    sign word a chunk overlaps; and ``k // 32 - w0`` per column.
    """
    ch = pid_c * NCH + tl.arange(0, NCH)[:, None]
    lane = tl.arange(0, ZP)[None, :]
    col = ch * Z + lane
    if Z == ZP:
        chunk_mask = tl.broadcast_to(ch < tl.cdiv(dim, Z), [NCH, ZP])
    else:
        chunk_mask = (ch < tl.cdiv(dim, Z)) & (lane < Z)
    w0 = (ch * Z) // 32
    return (col, chunk_mask & (col < dim), chunk_mask, lane, ch.to(tl.uint32) * _GOLDEN,
            w0.to(tl.uint32) * _GOLDEN, col // 32 - w0)


@triton.jit
def _address(ua, cg, lane, d, magic, sh1, sh2, Z: tl.constexpr, IDX64: tl.constexpr):
    """``Z * (fmix32(ua + c GOLDEN) mod d) + l`` with ``ua = fmix32(i ^ ka)``."""
    h = _fmix32(ua + cg)
    t = tl.umulhi(h, magic)
    q = (t + ((h - t) >> sh1)) >> sh2
    slot = h - q * d
    if IDX64:
        addr = slot.to(tl.int64) * Z + lane
    else:
        addr = slot.to(tl.int32) * Z + lane
    return addr


@triton.jit
def _negative(us, wg0, wsel, col, NWC: tl.constexpr):
    """Bit ``k mod 32`` of ``sign_word(i, k // 32)`` with ``us = fmix32(i ^ ks)``: true for -1."""
    sw = _fmix32(us + wg0)
    wg = wg0
    for t in tl.static_range(1, NWC):
        wg += _GOLDEN
        sw = tl.where(wsel == t, _fmix32(us + wg), sw)
    return ((sw >> (col % 32).to(tl.uint32)) & 1) != 0


@triton.jit
def _signed_rows(w_ptr, rows, live, col, chunk_mask, lane, cg, wg0, wsel, ka, ks, d, magic, sh1,
                 sh2, Z: tl.constexpr, NWC: tl.constexpr, SIGNED: tl.constexpr,
                 IDX64: tl.constexpr, ACC: tl.constexpr):
    """The virtual rows ``v(rows)`` on the tile's whole chunks: ``[BL, NCH, ZP]`` (0 where masked).

    Columns ``>= dim`` of the last chunk hold values too; callers mask them when storing.
    """
    r = rows.to(tl.uint32)[:, None, None]
    addr = _address(_fmix32(r ^ ka), cg, lane, d, magic, sh1, sh2, Z, IDX64)
    v = tl.load(w_ptr + addr, mask=live[:, None, None] & chunk_mask, other=0.0).to(ACC)
    if SIGNED:
        v = tl.where(_negative(_fmix32(r ^ ks), wg0, wsel, col, NWC), -v, v)
    return v


@triton.jit
def _scatter_rows(gw_ptr, g, rows, live, col, colmask, lane, cg, wg0, wsel, ka, ks, d, magic,
                  sh1, sh2, Z: tl.constexpr, NWC: tl.constexpr, SIGNED: tl.constexpr,
                  IDX64: tl.constexpr):
    """``grad_w[idx(rows, k)] += sign(rows, k) * g`` for the tile's columns (``g`` broadcasts)."""
    r = rows.to(tl.uint32)[:, None, None]
    addr = _address(_fmix32(r ^ ka), cg, lane, d, magic, sh1, sh2, Z, IDX64)
    if SIGNED:
        g = tl.where(_negative(_fmix32(r ^ ks), wg0, wsel, col, NWC), -g, g)
    tl.atomic_add(gw_ptr + addr, g.to(gw_ptr.dtype.element_ty),
                  mask=live[:, None, None] & colmask, sem="relaxed")


# ---------------------------------------------------------------- hash_index
@triton.jit(do_not_specialize=_HASH_ARGS)
def _hash_index_kernel(rows_ptr, idx_ptr, sign_ptr, n_rows, dim, ka, ks, nslots, magic, sh1, sh2,
                       Z: tl.constexpr, ZP: tl.constexpr, NCH: tl.constexpr, BR: tl.constexpr,
                       NWC: tl.constexpr, SIGNED: tl.constexpr, IDX64: tl.constexpr):
    ka, ks, d, magic, sh1, sh2 = _hash_keys(ka, ks, nslots, magic, sh1, sh2)
    col, colmask, _, lane, cg, wg0, wsel = _chunk_tile(tl.program_id(1), dim, Z, ZP, NCH)
    j = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    live = j < n_rows
    r = tl.load(rows_ptr + j, mask=live, other=0).to(tl.uint32)[:, None, None]
    mask = live[:, None, None] & colmask
    out = j[:, None, None] * dim + col
    addr = _address(_fmix32(r ^ ka), cg, lane, d, magic, sh1, sh2, Z, IDX64)
    tl.store(idx_ptr + out, addr.to(tl.int64), mask=mask)
    if SIGNED:
        sign = tl.where(_negative(_fmix32(r ^ ks), wg0, wsel, col, NWC), -1, 1)
    else:
        sign = tl.full(out.shape, 1, tl.int32)
    tl.store(sign_ptr + out, sign.to(tl.int8), mask=mask)


def hash_index(rows, dim, memory_size, chunk_size, seed, signed):
    """Materialised addresses (int64) and signs (int8) of ``rows`` ``[N] -> [N, dim]``."""
    hk = _hash_scalars(memory_size, chunk_size, seed)
    n = rows.numel()
    idx = torch.empty(n, dim, dtype=torch.int64, device=rows.device)
    sign = torch.empty(n, dim, dtype=torch.int8, device=rows.device)
    if n == 0 or dim == 0:
        return idx, sign
    zp, nch, ncb, nwc = _column_tiling(dim, chunk_size)
    br = max(1, TILE // (nch * zp))
    _hash_index_kernel[(triton.cdiv(n, br), ncb)](
        rows, idx, sign, n, dim, *hk, Z=chunk_size, ZP=zp, NCH=nch, BR=br, NWC=nwc,
        SIGNED=bool(signed), IDX64=memory_size >= 2**31, num_warps=_warps(br * nch * zp))
    return idx, sign


# ---------------------------------------------------------------- embedding bag
@triton.jit(do_not_specialize=_HASH_ARGS + ("padding_idx",))
def _bag_forward_kernel(w_ptr, ind_ptr, off_ptr, psw_ptr, out_ptr, n_items, dim,
                        ka, ks, nslots, magic, sh1, sh2, padding_idx,
                        Z: tl.constexpr, ZP: tl.constexpr, NCH: tl.constexpr, BL: tl.constexpr,
                        NWC: tl.constexpr, SIGNED: tl.constexpr, POOLED: tl.constexpr,
                        MEAN: tl.constexpr, HAS_PSW: tl.constexpr, HAS_PAD: tl.constexpr,
                        IDX64: tl.constexpr, ACC: tl.constexpr):
    ka, ks, d, magic, sh1, sh2 = _hash_keys(ka, ks, nslots, magic, sh1, sh2)
    col, colmask, chunk_mask, lane, cg, wg0, wsel = _chunk_tile(tl.program_id(1), dim, Z, ZP, NCH)
    pid = tl.program_id(0).to(tl.int64)
    if POOLED:
        start = tl.load(off_ptr + pid).to(tl.int64)
        end = tl.load(off_ptr + pid + 1).to(tl.int64)
        acc = tl.zeros([BL, NCH, ZP], ACC)
        cnt = tl.zeros([BL], tl.int32)
        for base in range(start, end, BL):
            j = base + tl.arange(0, BL)
            live = j < end
            rows = tl.load(ind_ptr + j, mask=live, other=0)
            if HAS_PAD:
                live = live & (rows != padding_idx)
            cnt += live.to(tl.int32)
            v = _signed_rows(w_ptr, rows, live, col, chunk_mask, lane, cg, wg0, wsel, ka, ks, d,
                             magic, sh1, sh2, Z, NWC, SIGNED, IDX64, ACC)
            if HAS_PSW:
                v *= tl.load(psw_ptr + j, mask=live, other=0.0).to(ACC)[:, None, None]
            acc += v
        res = tl.sum(acc, axis=0)
        if MEAN:
            res = res / tl.maximum(tl.sum(cnt, axis=0), 1).to(ACC)
        tl.store(out_ptr + pid * dim + col, res.to(out_ptr.dtype.element_ty), mask=colmask)
    else:
        j = pid * BL + tl.arange(0, BL)
        live = j < n_items
        rows = tl.load(ind_ptr + j, mask=live, other=0)
        read = live
        if HAS_PAD:
            # Padding rows come out as zeros, but they are still output rows (stored via `live`).
            read = live & (rows != padding_idx)
        v = _signed_rows(w_ptr, rows, read, col, chunk_mask, lane, cg, wg0, wsel, ka, ks, d,
                         magic, sh1, sh2, Z, NWC, SIGNED, IDX64, ACC)
        if HAS_PSW:
            v *= tl.load(psw_ptr + j, mask=live, other=0.0).to(ACC)[:, None, None]
        tl.store(out_ptr + j[:, None, None] * dim + col, v.to(out_ptr.dtype.element_ty),
                 mask=live[:, None, None] & colmask)


@triton.jit
def _live_count(ind_ptr, start, end, padding_idx, BL: tl.constexpr, HAS_PAD: tl.constexpr):
    """``max(1, #{j in [start, end) : indices[j] != padding_idx})``, the mean's divisor."""
    if HAS_PAD:
        # One pass over the bag's indices before the pass that uses the count.
        cnt = tl.zeros([BL], tl.int32)
        for base in range(start, end, BL):
            j = base + tl.arange(0, BL)
            rows = tl.load(ind_ptr + j, mask=j < end, other=padding_idx)
            cnt += (rows != padding_idx).to(tl.int32)
        n_live = tl.sum(cnt, axis=0)
    else:
        n_live = (end - start).to(tl.int32)
    return tl.maximum(n_live, 1)


@triton.jit(do_not_specialize=_HASH_ARGS + ("padding_idx",))
def _bag_backward_kernel(g_ptr, ind_ptr, off_ptr, psw_ptr, gw_ptr, n_items, dim,
                         ka, ks, nslots, magic, sh1, sh2, padding_idx,
                         Z: tl.constexpr, ZP: tl.constexpr, NCH: tl.constexpr, BL: tl.constexpr,
                         NWC: tl.constexpr, SIGNED: tl.constexpr, POOLED: tl.constexpr,
                         MEAN: tl.constexpr, HAS_PSW: tl.constexpr, HAS_PAD: tl.constexpr,
                         IDX64: tl.constexpr, ACC: tl.constexpr):
    ka, ks, d, magic, sh1, sh2 = _hash_keys(ka, ks, nslots, magic, sh1, sh2)
    col, colmask, _, lane, cg, wg0, wsel = _chunk_tile(tl.program_id(1), dim, Z, ZP, NCH)
    pid = tl.program_id(0).to(tl.int64)
    if POOLED:
        start = tl.load(off_ptr + pid).to(tl.int64)
        end = tl.load(off_ptr + pid + 1).to(tl.int64)
        g = tl.load(g_ptr + pid * dim + col, mask=colmask, other=0.0).to(ACC)
        if MEAN:
            g = g / _live_count(ind_ptr, start, end, padding_idx, BL, HAS_PAD).to(ACC)
        for base in range(start, end, BL):
            j = base + tl.arange(0, BL)
            live = j < end
            rows = tl.load(ind_ptr + j, mask=live, other=0)
            if HAS_PAD:
                live = live & (rows != padding_idx)
            if HAS_PSW:
                a = tl.load(psw_ptr + j, mask=live, other=0.0).to(ACC)
                gj = g[None, :, :] * a[:, None, None]
            else:
                gj = tl.broadcast_to(g[None, :, :], [BL, NCH, ZP])
            _scatter_rows(gw_ptr, gj, rows, live, col, colmask, lane, cg, wg0, wsel, ka, ks, d,
                          magic, sh1, sh2, Z, NWC, SIGNED, IDX64)
    else:
        j = pid * BL + tl.arange(0, BL)
        live = j < n_items
        rows = tl.load(ind_ptr + j, mask=live, other=0)
        if HAS_PAD:
            live = live & (rows != padding_idx)
        gj = tl.load(g_ptr + j[:, None, None] * dim + col, mask=live[:, None, None] & colmask,
                     other=0.0).to(ACC)
        if HAS_PSW:
            gj *= tl.load(psw_ptr + j, mask=live, other=0.0).to(ACC)[:, None, None]
        _scatter_rows(gw_ptr, gj, rows, live, col, colmask, lane, cg, wg0, wsel, ka, ks, d, magic,
                      sh1, sh2, Z, NWC, SIGNED, IDX64)


def _bag_launch(indices, offsets, dim, chunk_size):
    """Grid, ``BL`` and column tiling shared by the forward and the backward."""
    zp, nch, ncb, nwc = _column_tiling(dim, chunk_size)
    cap = max(1, TILE // (nch * zp))
    n = indices.numel()
    if offsets is None:
        bl = cap
        n_prog = triton.cdiv(n, bl)
    else:
        n_prog = offsets.numel() - 1
        # The mean bag length (no host sync: offsets[-1] <= n) sets how many gathers go in flight.
        bl = min(cap, triton.next_power_of_2(max(1, triton.cdiv(n, max(n_prog, 1)))))
    return (n_prog, ncb), dict(Z=chunk_size, ZP=zp, NCH=nch, BL=bl, NWC=nwc,
                               num_warps=_warps(bl * nch * zp))


def bag_forward(weight, indices, offsets, per_sample_weights, dim, chunk_size, seed, signed,
                mode, padding_idx):
    hk = _hash_scalars(weight.numel(), chunk_size, seed)
    rows = indices.numel() if offsets is None else offsets.numel() - 1
    out = torch.empty(rows, dim, dtype=weight.dtype, device=weight.device)
    if rows == 0 or dim == 0:
        return out
    grid, tiling = _bag_launch(indices, offsets, dim, chunk_size)
    _bag_forward_kernel[grid](
        weight, indices, indices if offsets is None else offsets,
        weight if per_sample_weights is None else per_sample_weights, out, indices.numel(), dim,
        *hk, padding_idx, SIGNED=bool(signed), POOLED=offsets is not None, MEAN=mode == 1,
        HAS_PSW=per_sample_weights is not None, HAS_PAD=padding_idx >= 0,
        IDX64=weight.numel() >= 2**31, ACC=_acc_dtype(weight.dtype), **tiling)
    return out


def bag_backward(grad_out, indices, offsets, per_sample_weights, memory_size, dim, chunk_size,
                 seed, signed, mode, padding_idx):
    hk = _hash_scalars(memory_size, chunk_size, seed)
    grad_w = torch.zeros(memory_size, dtype=grad_out.dtype, device=grad_out.device)
    rows = indices.numel() if offsets is None else offsets.numel() - 1
    if rows == 0 or dim == 0:
        return grad_w
    grid, tiling = _bag_launch(indices, offsets, dim, chunk_size)
    _bag_backward_kernel[grid](
        grad_out, indices, indices if offsets is None else offsets,
        grad_out if per_sample_weights is None else per_sample_weights, grad_w, indices.numel(),
        dim, *hk, padding_idx, SIGNED=bool(signed), POOLED=offsets is not None, MEAN=mode == 1,
        HAS_PSW=per_sample_weights is not None, HAS_PAD=padding_idx >= 0,
        IDX64=memory_size >= 2**31, ACC=_acc_dtype(grad_out.dtype), **tiling)
    return grad_w


# ---------------------------------------------------------------- deterministic bag backward
@triton.jit(do_not_specialize=("ka", "nslots", "magic", "sh1", "sh2", "padding_idx"))
def _slot_keys_kernel(ind_ptr, off_ptr, psw_ptr, key_ptr, coef_ptr, bag_ptr, n_items, n_chunks,
                      ka, nslots, magic, sh1, sh2, padding_idx,
                      BL: tl.constexpr, CB: tl.constexpr, POOLED: tl.constexpr,
                      MEAN: tl.constexpr, HAS_PSW: tl.constexpr, HAS_PAD: tl.constexpr,
                      KEY64: tl.constexpr, ACC: tl.constexpr):
    """``key[j C + c]`` = chunk slot of ``(i_j, c)`` (``nslots`` when element ``j`` adds nothing:
    padding, or past the last offset), ``coef[j] = a_j`` (mean's ``1 / count`` included) and,
    pooled, ``bag[j]``. Pooled: one program per bag; the last also marks the elements after it."""
    ka = ka.to(tl.uint32)
    d = nslots.to(tl.uint32)
    magic = magic.to(tl.uint32)
    sh1 = sh1.to(tl.uint32)
    sh2 = sh2.to(tl.uint32)
    pid = tl.program_id(0).to(tl.int64)
    if POOLED:
        start = tl.load(off_ptr + pid).to(tl.int64)
        end = tl.load(off_ptr + pid + 1).to(tl.int64)
        inv = 1.0
        if MEAN:
            inv = 1.0 / _live_count(ind_ptr, start, end, padding_idx, BL, HAS_PAD).to(ACC)
        for base in range(start, end, BL):
            _chunk_keys(ind_ptr, psw_ptr, key_ptr, coef_ptr, bag_ptr, base, end, pid, inv,
                        n_chunks, ka, d, magic, sh1, sh2, nslots, padding_idx, BL, CB, True,
                        HAS_PSW, HAS_PAD, KEY64, ACC)
        if pid == tl.num_programs(0) - 1:
            for base in range(end, n_items, BL):
                _chunk_keys(ind_ptr, psw_ptr, key_ptr, coef_ptr, bag_ptr, base, n_items, pid, 0.0,
                            n_chunks, ka, d, magic, sh1, sh2, nslots, padding_idx, BL, CB, False,
                            HAS_PSW, HAS_PAD, KEY64, ACC)
    else:
        _chunk_keys(ind_ptr, psw_ptr, key_ptr, coef_ptr, bag_ptr, pid * BL, n_items, pid, 1.0,
                    n_chunks, ka, d, magic, sh1, sh2, nslots, padding_idx, BL, CB, True,
                    HAS_PSW, HAS_PAD, KEY64, ACC)


@triton.jit
def _chunk_keys(ind_ptr, psw_ptr, key_ptr, coef_ptr, bag_ptr, base, end, bag, inv, n_chunks, ka,
                d, magic, sh1, sh2, nslots, padding_idx, BL: tl.constexpr, CB: tl.constexpr,
                LIVE: tl.constexpr, HAS_PSW: tl.constexpr, HAS_PAD: tl.constexpr,
                KEY64: tl.constexpr, ACC: tl.constexpr):
    """Keys, coefficients and bag ids of elements ``[base, min(base + BL, end))``; ``LIVE=False``
    marks them all dead (elements outside every bag)."""
    j = base + tl.arange(0, BL)
    inside = j < end
    rows = tl.load(ind_ptr + j, mask=inside, other=0)
    if LIVE:
        live = inside
        if HAS_PAD:
            live = live & (rows != padding_idx)
    else:
        live = j < base
    a = tl.full([BL], 1.0, ACC) * inv
    if HAS_PSW:
        a = a * tl.load(psw_ptr + j, mask=inside, other=0.0).to(ACC)
    tl.store(coef_ptr + j, a, mask=inside)
    if bag_ptr is not None:
        tl.store(bag_ptr + j, tl.full([BL], 0, tl.int64) + bag, mask=inside)
    ua = _fmix32(rows.to(tl.uint32) ^ ka)[:, None]
    for c0 in range(0, n_chunks, CB):
        ch = c0 + tl.arange(0, CB)[None, :]
        slot = _address(ua, ch.to(tl.uint32) * _GOLDEN, 0, d, magic, sh1, sh2, Z=1, IDX64=KEY64)
        key = tl.where(live[:, None], slot, nslots)
        tl.store(key_ptr + j[:, None] * n_chunks + ch, key.to(key_ptr.dtype.element_ty),
                 mask=inside[:, None] & (ch < n_chunks))


@triton.jit(do_not_specialize=("ks", "nslots", "n_chunks"))
def _segment_sum_kernel(g_ptr, ind_ptr, bag_ptr, coef_ptr, skey_ptr, perm_ptr, bounds_ptr, gw_ptr,
                        dim, n_chunks, ks, nslots, Z: tl.constexpr, LB: tl.constexpr,
                        BS: tl.constexpr, BE: tl.constexpr, SIGNED: tl.constexpr,
                        ACC: tl.constexpr):
    """``grad_w[Z r + l] = sum_{(j, c) sorted with slot r} sign a_j grad_out[bag(j), c Z + l]`` for
    the ``BS`` chunk slots ``r`` of this program and lanes ``l`` of its lane block, summed in sorted
    order ``BE`` entries at a time; every slot is written, hit or not."""
    r = tl.program_id(0).to(tl.int64) * BS + tl.arange(0, BS)
    lane = tl.program_id(1) * LB + tl.arange(0, LB)
    lo = tl.load(bounds_ptr + tl.program_id(0))
    hi = tl.load(bounds_ptr + tl.program_id(0) + 1)
    acc = tl.zeros([BS, LB], ACC)
    for base in range(lo, hi, BE):
        p = base + tl.arange(0, BE)
        live = p < hi
        key = tl.load(skey_ptr + p, mask=live, other=-1).to(tl.int64)
        e = tl.load(perm_ptr + p, mask=live, other=0)
        j = e // n_chunks
        col = (e - j * n_chunks)[:, None] * Z + lane[None, :]
        if bag_ptr is not None:
            b = tl.load(bag_ptr + j, mask=live, other=0)
        else:
            b = j
        g = tl.load(g_ptr + b[:, None] * dim + col,
                    mask=live[:, None] & (lane < Z)[None, :] & (col < dim), other=0.0).to(ACC)
        g *= tl.load(coef_ptr + j, mask=live, other=0.0)[:, None]
        if SIGNED:
            rows = tl.load(ind_ptr + j, mask=live, other=0).to(tl.uint32)
            us = _fmix32(rows ^ ks.to(tl.uint32))[:, None]
            word = _fmix32(us + (col // 32).to(tl.uint32) * _GOLDEN)
            g = tl.where(((word >> (col % 32).to(tl.uint32)) & 1) != 0, -g, g)
        hit = key[:, None] == r[None, :]
        acc += tl.sum(tl.where(hit[:, :, None], g[:, None, :], 0.0), axis=0)
    tl.store(gw_ptr + r[:, None] * Z + lane[None, :], acc.to(gw_ptr.dtype.element_ty),
             mask=(r < nslots)[:, None] & (lane < Z)[None, :])


def _segment_tiling(n_keys: int, nslots: int, chunk_size: int) -> tuple[int, int, int]:
    """``(LB, BS, BE)``: lanes of a chunk, chunk slots and sorted entries per program."""
    lb = min(triton.next_power_of_2(chunk_size), LANES)
    # Enough slots per program that a sparsely hit array still gives each program about 8
    # entries, no more than SEGMENT_SLOTS (the one-hot reduction costs BS multiply-adds per
    # value), and few enough programs for grid axis 0.
    want = triton.next_power_of_2(triton.cdiv(8 * nslots, max(n_keys, 1)))
    bs = min(want, SEGMENT_SLOTS, max(1, TILE // (8 * lb)))
    bs = max(bs, triton.next_power_of_2(triton.cdiv(nslots, 2**31 - 1)))
    return lb, bs, max(1, TILE // (bs * lb))


def bag_backward_deterministic(grad_out, indices, offsets, per_sample_weights, memory_size, dim,
                               chunk_size, seed, signed, mode, padding_idx):
    """``bag_backward`` by sort and segment sum: bit-identical from run to run (module doc)."""
    ka, ks, d, magic, sh1, sh2 = _hash_scalars(memory_size, chunk_size, seed)
    device = grad_out.device
    n = indices.numel()
    rows = n if offsets is None else offsets.numel() - 1
    if rows == 0 or dim == 0 or n == 0:
        return torch.zeros(memory_size, dtype=grad_out.dtype, device=device)
    n_chunks = triton.cdiv(dim, chunk_size)
    key64 = d >= 2**31
    keys = torch.empty(n * n_chunks, dtype=torch.int64 if key64 else torch.int32, device=device)
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    coef = torch.empty(n, dtype=acc, device=device)
    bag = None if offsets is None else torch.empty(n, dtype=torch.int64, device=device)
    cb = min(triton.next_power_of_2(n_chunks), LANES)
    bl = max(1, TILE // cb)
    if offsets is not None:
        bl = min(bl, triton.next_power_of_2(max(1, triton.cdiv(n, rows))))
    _slot_keys_kernel[(rows if offsets is not None else triton.cdiv(n, bl),)](
        indices, indices if offsets is None else offsets,
        coef if per_sample_weights is None else per_sample_weights, keys, coef, bag, n, n_chunks,
        ka, d, magic, sh1, sh2, padding_idx, BL=bl, CB=cb, POOLED=offsets is not None,
        MEAN=mode == 1, HAS_PSW=per_sample_weights is not None, HAS_PAD=padding_idx >= 0,
        KEY64=key64, ACC=_acc_dtype(grad_out.dtype), num_warps=_warps(bl * cb))
    # A stable sort fixes the order inside a slot (by element, then chunk), so the sums below
    # add the same values in the same order on every run.
    skeys, perm = torch.sort(keys, stable=True)
    lb, bs, be = _segment_tiling(keys.numel(), d, chunk_size)
    n_blocks = triton.cdiv(d, bs)
    # Block ends are clamped to nslots, so the dead entries' key (nslots) falls in no block.
    starts = (torch.arange(n_blocks + 1, device=device) * bs).clamp_(max=d).to(keys.dtype)
    bounds = torch.searchsorted(skeys, starts)
    grad_w = torch.empty(memory_size, dtype=grad_out.dtype, device=device)
    _segment_sum_kernel[(n_blocks, triton.cdiv(chunk_size, lb))](
        grad_out, indices, bag, coef, skeys, perm, bounds, grad_w, dim, n_chunks, ks, d,
        Z=chunk_size, LB=lb, BS=bs, BE=be, SIGNED=bool(signed), ACC=_acc_dtype(grad_out.dtype),
        num_warps=_warps(be * bs * lb))
    return grad_w


# ---------------------------------------------------------------- slot counts
@triton.jit(do_not_specialize=("ka", "nslots", "magic", "sh1", "sh2"))
def _chunk_hits_kernel(hits_ptr, n_rows, n_chunks, ka, nslots, magic, sh1, sh2,
                       BR: tl.constexpr, NCH: tl.constexpr, PARTIAL: tl.constexpr):
    """``hits[s] += 1`` per full chunk in slot ``s``; ``hits[d + s] += 1`` per partial one."""
    ka = ka.to(tl.uint32)
    d = nslots.to(tl.uint32)
    magic = magic.to(tl.uint32)
    sh1 = sh1.to(tl.uint32)
    sh2 = sh2.to(tl.uint32)
    i = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)[:, None]
    ch = tl.program_id(1) * NCH + tl.arange(0, NCH)[None, :]
    slot = _address(_fmix32(i.to(tl.uint32) ^ ka), ch.to(tl.uint32) * _GOLDEN, 0, d, magic, sh1,
                    sh2, Z=1, IDX64=True)
    if PARTIAL:
        slot += tl.where(ch == n_chunks - 1, nslots, 0)
    tl.atomic_add(hits_ptr + slot, tl.full(slot.shape, 1, tl.int64),
                  mask=(i < n_rows) & (ch < n_chunks), sem="relaxed")


@triton.jit(do_not_specialize=("nslots",))
def _expand_hits_kernel(cnt_ptr, hits_ptr, nslots, Z: tl.constexpr, ZP: tl.constexpr,
                        BS: tl.constexpr, PARTIAL: tl.constexpr, REM: tl.constexpr):
    """``cnt[Z s + l] = hits[s] + [l < REM] hits[d + s]`` for ``BS`` slots, one chunk per row."""
    s = tl.program_id(0).to(tl.int64) * BS + tl.arange(0, BS)[:, None]
    lane = tl.arange(0, ZP)[None, :]
    live = s < nslots
    c = tl.load(hits_ptr + s, mask=live, other=0)
    if PARTIAL:
        c += tl.where(lane < REM, tl.load(hits_ptr + nslots + s, mask=live, other=0), 0)
    tl.store(cnt_ptr + s * Z + lane, c, mask=live & (lane < Z))


def slot_counts(num_embeddings, dim, memory_size, chunk_size, seed, device):
    """cnt[s] = #{(i, k) : idx(i, k) = s} over the whole virtual table (int64)."""
    device = torch.device(device)
    ka, _, d, magic, sh1, sh2 = _hash_scalars(memory_size, chunk_size, seed)
    n_chunks = triton.cdiv(dim, chunk_size)
    partial = dim % chunk_size != 0
    if chunk_size == 1:
        cnt = hits = torch.zeros(memory_size, dtype=torch.int64, device=device)
    else:
        cnt = torch.empty(memory_size, dtype=torch.int64, device=device)
        cnt[d * chunk_size:] = 0
        hits = torch.zeros((2 if partial else 1) * d, dtype=torch.int64, device=device)
    if num_embeddings > 0 and dim > 0:
        nch = min(triton.next_power_of_2(n_chunks), LANES)
        br = max(1, TILE // nch)
        _chunk_hits_kernel[(triton.cdiv(num_embeddings, br), triton.cdiv(n_chunks, nch))](
            hits, num_embeddings, n_chunks, ka, d, magic, sh1, sh2, BR=br, NCH=nch,
            PARTIAL=partial, num_warps=_warps(br * nch))
    if chunk_size > 1:
        zp = triton.next_power_of_2(chunk_size)
        bs = max(1, BLOCK // zp)
        _expand_hits_kernel[(triton.cdiv(d, bs),)](
            cnt, hits, d, Z=chunk_size, ZP=zp, BS=bs, PARTIAL=partial, REM=dim % chunk_size,
            num_warps=_warps(bs * zp))
    return cnt


# ---------------------------------------------------------------- fold / tile / aggregate
@triton.jit
def _fold_kernel(w_ptr, c_ptr, out_ptr, m2, factor, BLOCK: tl.constexpr, ACC: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = j < m2
    num = tl.zeros([BLOCK], ACC)
    den = tl.zeros([BLOCK], ACC)
    # A running int64 offset: t * m2 could overflow int32 for the last folds of a huge array.
    p = j
    for _ in range(factor):
        c = tl.load(c_ptr + p, mask=live, other=0).to(ACC)
        num += c * tl.load(w_ptr + p, mask=live, other=0.0).to(ACC)
        den += c
        p += m2
    res = tl.where(den > 0, num / tl.maximum(den, 1.0), 0.0)
    tl.store(out_ptr + j, res.to(out_ptr.dtype.element_ty), mask=live)


def fold(weight, factor, counts):
    """Count-weighted collapse ``w'[j] = sum_t c[j+tm'] w[j+tm'] / sum_t c[j+tm']`` (0 if empty)."""
    m2 = weight.numel() // factor
    out = torch.empty(m2, dtype=weight.dtype, device=weight.device)
    if m2 > 0:
        _fold_kernel[(triton.cdiv(m2, BLOCK),)](weight, counts, out, m2, factor, BLOCK=BLOCK,
                                                 ACC=_acc_dtype(weight.dtype), num_warps=4)
    return out


@triton.jit
def _tile_kernel(w_ptr, out_ptr, m, factor, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = j < m
    v = tl.load(w_ptr + j, mask=live)
    o = tl.program_id(1).to(tl.int64) * m + j
    step = tl.num_programs(1).to(tl.int64) * m
    for _ in range(tl.program_id(1), factor, tl.num_programs(1)):
        tl.store(out_ptr + o, v, mask=live)
        o += step


def tile(weight, factor):
    """The same virtual table in an array ``factor`` times bigger: ``out[j] = w[j mod m]``."""
    m = weight.numel()
    out = torch.empty(m * factor, dtype=weight.dtype, device=weight.device)
    if m * factor > 0:
        nb = triton.cdiv(m, BLOCK)
        copies = max(1, min(factor, 65535, triton.cdiv(TILE_PROGRAMS, nb)))
        _tile_kernel[(nb, copies)](weight, out, m, factor, BLOCK=BLOCK, num_warps=4)
    return out


@triton.jit
def _aggregate_kernel(out_ptr, arrays, sizes, p_ptr, n, ACCUM: tl.constexpr,
                      BLOCK: tl.constexpr, ACC: tl.constexpr):
    """``out[j] (+)= sum_k p[k] a_k[j mod m_k]`` over the arrays of one group."""
    j0 = tl.program_id(0).to(tl.int64) * BLOCK
    ar = tl.arange(0, BLOCK)
    live = ar < n - j0
    if ACCUM:
        acc = tl.load(out_ptr + j0 + ar, mask=live, other=0.0).to(ACC)
    else:
        acc = tl.zeros([BLOCK], ACC)
    for k in tl.static_range(len(arrays)):
        m = sizes[k]
        if m % BLOCK == 0:
            # The block never wraps: contiguous, aligned (vectorisable) loads.
            r = tl.multiple_of(j0 % m, BLOCK) + ar
        elif m >= BLOCK:
            r = j0 % m + ar
            r = tl.where(r >= m, r - m, r)
        else:
            # m < BLOCK, so a 32-bit remainder suffices.
            r = ((j0 % m + ar).to(tl.int32) % m).to(tl.int64)
        a = tl.load(arrays[k] + r, mask=live, other=0.0).to(ACC)
        acc += tl.load(p_ptr + k).to(ACC) * a
    tl.store(out_ptr + j0 + ar, acc.to(out_ptr.dtype.element_ty), mask=live)


def aggregate(arrays, weights, target_size):
    """``out[j] = sum_i weights[i] arrays[i][j mod len(arrays[i])]`` (every size divides target)."""
    dtype, device = arrays[0].dtype, arrays[0].device
    out = torch.empty(target_size, dtype=dtype, device=device)
    if target_size == 0:
        return out
    p = torch.tensor([float(w) for w in weights], dtype=dtype, device=device)
    grid = (triton.cdiv(target_size, BLOCK),)
    for g in range(0, len(arrays), AGG_GROUP):
        group = tuple(arrays[g:g + AGG_GROUP])
        _aggregate_kernel[grid](out, group, tuple(a.numel() for a in group), p[g:], target_size,
                                ACCUM=g > 0, BLOCK=BLOCK, ACC=_acc_dtype(dtype), num_warps=4)
    return out


# ---------------------------------------------------------------- k-means and action sharing
# The ops of ``fastfair.kernels.kmeans`` (math in ``reference.kmeans_*``); bit packing has no
# Triton kernel (its ``auto`` fallback is ``reference``).
#
# * ``kmeans_assign``: grid ``ceil(N / BR)``; a program holds ``BR`` rows and walks the centroids
#   ``BK`` at a time, the columns ``BD`` at a time: a ``[BR, BK]`` tile of ``<x_i, c_k>``
#   (``tl.dot`` with ``input_precision="ieee"`` in float32, never TF32, since near-ties decide
#   labels; float64, which ``tl.dot`` does not take, as a broadcast product summed over ``BD``),
#   then ``||c_k||^2 - 2 <x_i, c_k>``, the tile's argmin (leftmost on ties) and a running
#   minimum that only a strictly smaller value replaces. No ``N x K`` matrix is written. A second
#   pass over the row's columns sums ``(x_i - c_label)^2``.
# * ``kmeans_centroid_sums``: a stable sort of the labels, then grid ``(K, ceil(d / BD))``: program
#   ``c`` adds its rows in sorted (row) order ``BE`` at a time into a float64 ``[BE, BD]`` tile
#   reduced once at the end. One owner per sum and a fixed order: deterministic, no atomics.
# * ``kmeans_rebuild_add_``: grid ``(ceil(m / BJ), ceil(d / BD))``; rows are distinct within a
#   call, so each output element is read, added to once and written by one program. Launched
#   with ``enable_fp_fusion=False``: a fused multiply-add would round once where torch's
#   ``out + c * coef`` rounds twice.
# * ``kmeans_seed``: the reference's init loop; its per-center distance update is a kernel, grid
#   ``ceil(N / BR)``.
KMEANS_ROWS = 32
KMEANS_ROWS_F64 = 16
KMEANS_SEGMENT = 32


def _kmeans_tiles(k: int, d: int, f64: bool) -> tuple[int, int, int]:
    """``(BR, BK, BD)`` of the assignment; ``tl.dot`` needs every side of a tile >= 16."""
    # float64 multiplies a [BR, BD, BK] broadcast in registers: smaller tiles.
    cap = 16 if f64 else 64
    bk = max(16, min(cap, triton.next_power_of_2(k)))
    bd = max(16, min(cap, triton.next_power_of_2(d)))
    return (KMEANS_ROWS_F64 if f64 else KMEANS_ROWS), bk, bd


@triton.jit
def _kmeans_assign_kernel(x_ptr, c_ptr, cn_ptr, labels_ptr, dist2_ptr, n, k, d,
                          BR: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                          USE_DOT: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    live = r < n
    best = tl.full([BR], float("inf"), cn_ptr.dtype.element_ty)
    bk = tl.zeros([BR], tl.int64)
    for k0 in range(0, k, BK):
        kk = k0 + tl.arange(0, BK)
        acc = tl.zeros([BR, BK], cn_ptr.dtype.element_ty)
        for j0 in range(0, d, BD):
            jj = j0 + tl.arange(0, BD)
            xt = tl.load(x_ptr + r[:, None] * d + jj[None, :],
                         mask=live[:, None] & (jj < d)[None, :], other=0.0)
            ct = tl.load(c_ptr + kk[None, :].to(tl.int64) * d + jj[:, None],
                         mask=(kk < k)[None, :] & (jj < d)[:, None], other=0.0)
            if USE_DOT:
                acc += tl.dot(xt, ct, input_precision="ieee")
            else:
                acc += tl.sum(xt[:, :, None] * ct[None, :, :], axis=1)
        cn = tl.load(cn_ptr + kk, mask=kk < k, other=0.0)
        dist = tl.where((kk < k)[None, :], cn[None, :] - (acc + acc), float("inf"))
        tmin = tl.min(dist, axis=1)
        targ = tl.argmin(dist, axis=1, tie_break_left=True).to(tl.int64) + k0
        better = tmin < best
        best = tl.where(better, tmin, best)
        bk = tl.where(better, targ, bk)
    tl.store(labels_ptr + r, bk, mask=live)
    sq = tl.zeros([BR], cn_ptr.dtype.element_ty)
    for j0 in range(0, d, BD):
        jj = j0 + tl.arange(0, BD)
        m = live[:, None] & (jj < d)[None, :]
        xt = tl.load(x_ptr + r[:, None] * d + jj[None, :], mask=m, other=0.0)
        cg = tl.load(c_ptr + bk[:, None] * d + jj[None, :], mask=m, other=0.0)
        t = xt - cg
        sq += tl.sum(t * t, axis=1)
    tl.store(dist2_ptr + r, sq, mask=live)


def kmeans_layout(x):
    """The assignment reads ``x`` itself (``None``)."""
    return None


def kmeans_assign(x, centroids, layout=None):
    """Fused distances + argmin (module notes above; math in ``reference.kmeans_assign``)."""
    n, d = x.shape
    k = centroids.shape[0]
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    dist2 = torch.empty(n, dtype=x.dtype, device=x.device)
    if n == 0:
        return labels, dist2
    f64 = x.dtype == torch.float64
    br, bk, bd = _kmeans_tiles(k, d, f64)
    cn = (centroids * centroids).sum(1)
    _kmeans_assign_kernel[(triton.cdiv(n, br),)](
        x, centroids, cn, labels, dist2, n, k, d, BR=br, BK=bk, BD=bd, USE_DOT=not f64,
        num_warps=4)
    return labels, dist2


@triton.jit
def _kmeans_sums_kernel(x_ptr, perm_ptr, bounds_ptr, sums_ptr, d, BE: tl.constexpr,
                        BD: tl.constexpr):
    c = tl.program_id(0)
    jj = tl.program_id(1) * BD + tl.arange(0, BD)
    lo = tl.load(bounds_ptr + c)
    hi = tl.load(bounds_ptr + c + 1)
    acc = tl.zeros([BE, BD], tl.float64)
    for base in range(lo, hi, BE):
        p = base + tl.arange(0, BE)
        live = p < hi
        rows = tl.load(perm_ptr + p, mask=live, other=0)
        acc += tl.load(x_ptr + rows[:, None] * d + jj[None, :],
                       mask=live[:, None] & (jj < d)[None, :], other=0.0).to(tl.float64)
    tl.store(sums_ptr + c.to(tl.int64) * d + jj,
             tl.sum(acc, axis=0).to(sums_ptr.dtype.element_ty), mask=jj < d)


def kmeans_centroid_sums(x, labels, k):
    """Segment sums by sorted labels (module notes above), float64 accumulation."""
    n, d = x.shape
    sorted_labels, perm = torch.sort(labels, stable=True)
    bounds = torch.searchsorted(sorted_labels, torch.arange(k + 1, device=x.device))
    sums = torch.empty(k, d, dtype=x.dtype, device=x.device)
    if d > 0:
        bd = min(LANES, triton.next_power_of_2(d))
        _kmeans_sums_kernel[(k, triton.cdiv(d, bd))](x, perm, bounds, sums, d,
                                                      BE=KMEANS_SEGMENT, BD=bd, num_warps=4)
    return sums, bounds[1:] - bounds[:-1]


@triton.jit
def _kmeans_rebuild_kernel(out_ptr, rows_ptr, c_ptr, labels_ptr, scales_ptr, w_ptr, m, d,
                           HAS_SCALES: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BJ + tl.arange(0, BJ)
    jj = tl.program_id(1) * BD + tl.arange(0, BD)
    live = j < m
    mask = live[:, None] & (jj < d)[None, :]
    coef = tl.zeros([BJ], out_ptr.dtype.element_ty) + tl.load(w_ptr)
    if HAS_SCALES:
        coef = coef * tl.load(scales_ptr + j, mask=live, other=0.0)
    rows = tl.load(rows_ptr + j, mask=live, other=0)
    lab = tl.load(labels_ptr + j, mask=live, other=0)
    cv = tl.load(c_ptr + lab[:, None] * d + jj[None, :], mask=mask, other=0.0)
    dst = out_ptr + rows[:, None] * d + jj[None, :]
    tl.store(dst, tl.load(dst, mask=mask, other=0.0) + cv * coef[:, None], mask=mask)


def kmeans_rebuild_add_(out, rows, centroids, labels, scales, weight):
    """``out[rows[j]] += (w s_j) c_{labels[j]}`` (module notes above)."""
    m, d = rows.numel(), out.shape[1]
    if m == 0 or d == 0:
        return out
    w = torch.tensor([weight], dtype=out.dtype, device=out.device)
    bd = min(LANES, triton.next_power_of_2(d))
    bj = max(1, TILE // bd)
    _kmeans_rebuild_kernel[(triton.cdiv(m, bj), triton.cdiv(d, bd))](
        out, rows, centroids, labels, w if scales is None else scales, w, m, d,
        HAS_SCALES=scales is not None, BJ=bj, BD=bd, num_warps=_warps(bj * bd),
        enable_fp_fusion=False)
    return out


@triton.jit
def _kmeans_nearest_kernel(x_ptr, center_ptr, d2_ptr, labels_ptr, n, d, j,
                           BR: tl.constexpr, BD: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    live = r < n
    sq = tl.zeros([BR], x_ptr.dtype.element_ty)
    for j0 in range(0, d, BD):
        jj = j0 + tl.arange(0, BD)
        xt = tl.load(x_ptr + r[:, None] * d + jj[None, :],
                     mask=live[:, None] & (jj < d)[None, :], other=0.0)
        cv = tl.load(center_ptr + jj, mask=jj < d, other=0.0)
        t = xt - cv[None, :]
        sq += tl.sum(t * t, axis=1)
    sq = sq.to(tl.float64)
    old = tl.load(d2_ptr + r, mask=live, other=0.0)
    closer = live & (sq < old)
    tl.store(d2_ptr + r, sq, mask=closer)
    tl.store(labels_ptr + r, tl.zeros([BR], tl.int64) + j, mask=closer)


def _nearest_(x, center, d2, labels, j):
    """One init step: ``d2[i], labels[i] = ||x_i - center||^2, j`` where that is smaller."""
    n, d = x.shape
    bd = min(LANES, triton.next_power_of_2(d))
    br = max(1, TILE // bd)
    _kmeans_nearest_kernel[(triton.cdiv(n, br),)](x, center, d2, labels, n, d, j, BR=br, BD=bd,
                                                  num_warps=_warps(br * bd))


def kmeans_seed(x, first, uniforms, plusplus):
    """The k-means init (math in ``reference.kmeans_seed``): its loop with this backend's step."""
    return seed_loop(x, first, uniforms, plusplus, _nearest_)


# ---------------------------------------------------------------- LSH output layers (PGHash)
# The code and loss ops of ``fastfair.kernels.lsh`` (math in ``reference.lsh_*``); buckets and the
# selection (force / union / pad) are in the section "LSH buckets and selection" below.
#
# * ``lsh_fold``: grid ``(ceil(n / BR), ceil(c / BC))``; a program folds ``BR`` rows on ``BC``
#   sketch columns, reading the row ``NF`` folds at a time as an ``[BR, NF, BC]`` tile
#   (element ``(r, t, i)`` is ``x[r, t c + i]``: for a power-of-two ``c`` one contiguous span of
#   ``NF c`` values per row) summed over ``NF``; signs applied in registers.
# * ``lsh_pg_codes``: grid ``ceil(n / BR)``, one program per block of ``BR`` neurons computing all
#   ``L k`` sign bits. The fold is fused: when ``c <= BC`` (``ONE_CHUNK``) the ``[BR, c]`` sketch
#   is built once in registers and reused for every table; otherwise it is rebuilt chunk by chunk
#   for every block of tables (re-reads of ``x`` hit the cache). No ``[n, c]`` array is written.
#   Tables go ``TB`` at a time as ``TB KP`` projections (``KP = next_pow2(k)``, padded ones masked):
#   dots ``[BR, TB KP]`` by ``tl.dot(input_precision="ieee")`` in float32 when every side is
#   >= 16 (never TF32: the sign of a near-zero dot is the output), else as a broadcast product
#   summed over ``BC``; then ``[dot > 0] 2^b`` summed per table (distinct powers of two: no carry)
#   and ``TB`` int32 codes stored per row, each table's ``BR`` codes contiguous in ``[L, n]``.
#   Accumulation in float32 (float64 for float64 inputs): bits can differ from the float64
#   reference only where the dot is within rounding of 0.
# * ``lsh_dwta_codes``: grid ``ceil(n / BR)``; tables ``TBL`` at a time, a ``[BR, TBL NBP, w]``
#   tile of gathered values ``x[j, rows[bins[l, b, p]]]`` (``rows[bins]`` resolved once on the
#   host, ``NBP = next_pow2(nb)``), ``tl.argmax(tie_break_left=True)`` and the all-zero test per
#   bin. Densification within each table, in registers: the probe ``fmix32(fmix32(b ^ key) +
#   a GOLDEN) mod nb`` (uint32 wrap-around arithmetic with the ``_fmix32`` above) and then the
#   cyclic scan ``(b + s) mod nb`` depend only on the bin's index ``b``, so each step gathers the
#   source bins' ``w`` values (masked to the bins still empty) and recomputes their argmax; both
#   loops stop as soon as no bin of the tile is left. A (row, table) whose bins are all empty
#   (code 0) never enters them. Codes are built in int64 (``a << (b log2 w)`` only for
#   ``b log2 w < bits <= 31``), masked to ``bits`` and stored as int32.
# * ``lsh_softmax_loss``: grid ``B``, one program per row: an online max / sum-exp over ``M`` in
#   blocks of ``BM`` (float32, float64 for float64 logits), the targets' logits read through the
#   CSR, then a second pass writes ``(softmax - t) / B`` with ``t`` built per block from the
#   row's target positions (an ``[BT, BM]`` equality count: repeated positions add up as in the
#   reference, no atomics, deterministic). Per-row losses go to a ``[B]`` buffer summed in float64
#   by torch.
# Values per tile (4 warps): about 16 per thread for gathered / folded values, 32 for the
# projection's broadcast product; half that in float64. Larger tiles spill or cut occupancy.
LSH_FOLD_TILE = 2048
LSH_PG_TILE = 4096
LSH_DWTA_TILE = 1024
LSH_SOFTMAX_BLOCK = 1024
LSH_SOFTMAX_TARGETS = 8


@triton.jit
def _lsh_fold_block(x_ptr, s_ptr, r, live, c0, d, c, BR: tl.constexpr, BC: tl.constexpr,
                    NF: tl.constexpr, SIGNED: tl.constexpr, ACC: tl.constexpr):
    """Sketch columns ``c0 .. c0 + BC`` of rows ``r`` (int64 ``[BR]``): ``[BR, BC]`` in ``ACC``,
    0 where masked. Fold ``t`` of column ``i`` is ``x[r, t c + i]``; folds past ``d`` are masked
    (``t c + i >= d`` for every ``t >= ceil(d / c)``)."""
    i = c0 + tl.arange(0, BC)
    t = tl.arange(0, NF)
    acc = tl.zeros([BR, BC], ACC)
    for base in range(0, d, NF * c):
        col = base + t[:, None] * c + i[None, :]
        m = (i < c)[None, :] & (col < d)
        v = tl.load(x_ptr + r[:, None, None] * d + col[None, :, :],
                    mask=live[:, None, None] & m[None, :, :], other=0.0).to(ACC)
        if SIGNED:
            v = v * tl.load(s_ptr + col, mask=m, other=0.0).to(ACC)[None, :, :]
        acc += tl.sum(v, axis=1)
    return acc


@triton.jit
def _lsh_fold_kernel(x_ptr, s_ptr, out_ptr, n, d, c, BR: tl.constexpr, BC: tl.constexpr,
                     NF: tl.constexpr, SIGNED: tl.constexpr, ACC: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    live = r < n
    c0 = tl.program_id(1) * BC
    y = _lsh_fold_block(x_ptr, s_ptr, r, live, c0, d, c, BR, BC, NF, SIGNED, ACC)
    i = c0 + tl.arange(0, BC)
    tl.store(out_ptr + r[:, None] * c + i[None, :], y.to(out_ptr.dtype.element_ty),
             mask=live[:, None] & (i < c)[None, :])


def _lsh_folds(d: int, c: int, br: int, bc: int, f64: bool) -> int:
    """``NF``: folds per tile, so that ``[BR, NF, BC]`` stays near ``LSH_FOLD_TILE`` values."""
    budget = LSH_FOLD_TILE // 2 if f64 else LSH_FOLD_TILE
    return max(1, min(triton.next_power_of_2(triton.cdiv(d, c)), budget // (br * bc)))


def lsh_fold(x, c, signs):
    """``[n, c]`` sketch of every row (module notes above; math in ``reference.lsh_fold``)."""
    x = x.contiguous()
    n, d = x.shape
    out = torch.empty(n, c, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    f64 = x.dtype == torch.float64
    bc = min(triton.next_power_of_2(c), LANES)
    br = max(1, min(32, (LSH_FOLD_TILE // 2 if f64 else LSH_FOLD_TILE) // bc))
    _lsh_fold_kernel[(triton.cdiv(n, br), triton.cdiv(c, bc))](
        x, x if signs is None else signs.contiguous(), out, n, d, c, BR=br, BC=bc,
        NF=_lsh_folds(d, c, br, bc, f64), SIGNED=signs is not None, ACC=_acc_dtype(x.dtype),
        num_warps=_warps(br * bc))
    return out


@triton.jit
def _lsh_pg_codes_kernel(x_ptr, s_ptr, p_ptr, codes_ptr, n, d, c, L, k,
                         BR: tl.constexpr, BC: tl.constexpr, NF: tl.constexpr,
                         KP: tl.constexpr, TB: tl.constexpr, ONE_CHUNK: tl.constexpr,
                         SIGNED: tl.constexpr, USE_DOT: tl.constexpr, ACC: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    live = r < n
    # Projection q of a block: table l0 + q // KP, bit q % KP (row (l k + b) of proj [L k, c]).
    q = tl.arange(0, TB * KP)
    tq = q // KP
    bq = q % KP
    one = tl.full([TB * KP], 1, tl.int32)
    if ONE_CHUNK:
        y = _lsh_fold_block(x_ptr, s_ptr, r, live, 0, d, c, BR, BC, NF, SIGNED, ACC)
    for l0 in range(0, L, TB):
        tab = l0 + tq
        qlive = (tab < L) & (bq < k)
        prow = (tab * k + bq).to(tl.int64) * c
        acc = tl.zeros([BR, TB * KP], ACC)
        for c0 in range(0, c, BC):
            if not ONE_CHUNK:
                y = _lsh_fold_block(x_ptr, s_ptr, r, live, c0, d, c, BR, BC, NF, SIGNED, ACC)
            i = c0 + tl.arange(0, BC)
            if USE_DOT:
                pt = tl.load(p_ptr + prow[None, :] + i[:, None],
                             mask=qlive[None, :] & (i < c)[:, None], other=0.0).to(ACC)
                acc += tl.dot(y, pt, input_precision="ieee")
            else:
                pv = tl.load(p_ptr + prow[:, None] + i[None, :],
                             mask=qlive[:, None] & (i < c)[None, :], other=0.0).to(ACC)
                acc += tl.sum(y[:, None, :] * pv[None, :, :], axis=2)
        # Masked projections are all-zero rows: their dot is 0, so their bit is 0.
        bits = tl.where(acc > 0, (one << bq)[None, :], 0)
        code = tl.sum(tl.reshape(bits, [BR, TB, KP]), axis=2)
        tt = l0 + tl.arange(0, TB)
        tl.store(codes_ptr + tt[None, :].to(tl.int64) * n + r[:, None], code.to(tl.int32),
                 mask=live[:, None] & (tt < L)[None, :])


def _lsh_pg_tiles(L: int, k: int, c: int, f64: bool) -> tuple[int, int, int, int, bool]:
    """``(BR, BC, KP, TB, USE_DOT)`` of ``lsh_pg_codes`` (``tl.dot`` needs every side >= 16)."""
    kp = triton.next_power_of_2(k)
    cp = triton.next_power_of_2(c)
    lp = triton.next_power_of_2(L)
    if not f64 and cp >= 16:
        # [32, 32] dot tiles, TB KP >= 16 projections (KP <= 32).
        return 32, min(cp, 32), kp, min(max(1, 32 // kp), max(lp, triton.cdiv(16, kp))), True
    # Broadcast product [BR, TB KP, BC] in registers: about LSH_PG_TILE values (half in float64).
    budget = LSH_PG_TILE // 2 if f64 else LSH_PG_TILE
    bc = min(cp, 8)
    tb = max(1, min(lp, budget // (16 * bc * kp)))
    br = max(4, min(16, budget // (tb * kp * bc)))
    return br, bc, kp, tb, False


def lsh_pg_codes(x, proj, signs):
    """Sign-bit codes int32 ``[L, n]``, fold fused (module notes above; math in
    ``reference.lsh_pg_codes``)."""
    x = x.contiguous()
    proj = proj.to(x.dtype).contiguous()
    n, d = x.shape
    L, k, c = proj.shape
    codes = torch.empty(L, n, dtype=torch.int32, device=x.device)
    if n == 0:
        return codes
    br, bc, kp, tb, use_dot = _lsh_pg_tiles(L, k, c, x.dtype == torch.float64)
    _lsh_pg_codes_kernel[(triton.cdiv(n, br),)](
        x, x if signs is None else signs.contiguous(), proj, codes, n, d, c, L, k, BR=br, BC=bc,
        NF=_lsh_folds(d, c, br, bc, x.dtype == torch.float64), KP=kp, TB=tb, ONE_CHUNK=c <= bc,
        SIGNED=signs is not None, USE_DOT=use_dot, ACC=_acc_dtype(x.dtype), num_warps=4)
    return codes


@triton.jit
def _lsh_wta(x_ptr, xoff, cols_ptr, g, gmask, m2, W: tl.constexpr):
    """Bins ``g`` (``[BB]``) of rows at ``xoff`` (``[BR]``): ``(argmax, empty)``, ``[BR, BB]``
    each; ``m2`` masks the (row, bin) pairs read (the others come out empty)."""
    p = tl.arange(0, W)
    col = tl.load(cols_ptr + g[:, None].to(tl.int64) * W + p[None, :], mask=gmask[:, None],
                  other=0)
    v = tl.load(x_ptr + xoff[:, None, None] + col[None, :, :], mask=m2[:, :, None], other=0.0)
    empty = tl.max((v != 0).to(tl.int32), axis=2) == 0
    return tl.argmax(v, axis=2, tie_break_left=True).to(tl.int32), empty


@triton.jit
def _lsh_any_bin(todo):
    """Whether any (row, bin) pair of a tile is still to densify: a scalar, int32 0 or 1."""
    return tl.max(tl.max(todo.to(tl.int32), axis=1), axis=0)


@triton.jit
def _lsh_borrow(x_ptr, xoff, cols_ptr, src, gvalid, todo, val, W: tl.constexpr):
    """Bins still ``todo`` take the value of bins ``src`` where those are not empty; returns the
    new ``(val, todo)``."""
    sval, sempty = _lsh_wta(x_ptr, xoff, cols_ptr, src, gvalid, todo, W)
    take = todo & ~sempty
    return tl.where(take, sval, val), todo & ~take


@triton.jit(do_not_specialize=("key", "nb", "probes"))
def _lsh_dwta_kernel(x_ptr, cols_ptr, codes_ptr, n, d, L, nb, key, probes, bits, keep,
                     BR: tl.constexpr, TBL: tl.constexpr, NBP: tl.constexpr, W: tl.constexpr,
                     LOG2W: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    live = r < n
    xoff = r * d
    ukey = key.to(tl.uint32)
    unb = nb.to(tl.uint32)
    # Bin q of a tile: table l0 + q // NBP, bin b = q % NBP of that table (masked when b >= nb).
    q = tl.arange(0, TBL * NBP)
    tq = q // NBP
    bq = q % NBP
    sh = bq * LOG2W
    # The probe sequence depends on the bin's index b in its table only.
    hb = _fmix32(bq.to(tl.uint32) ^ ukey)
    for l0 in range(0, L, TBL):
        tab = l0 + tq
        gvalid = (tab < L) & (bq < nb)
        base = tab * nb
        val, empty = _lsh_wta(x_ptr, xoff, cols_ptr, base + bq, gvalid,
                              live[:, None] & gvalid[None, :], W)
        # A (row, table) whose bins are all empty stays all 0: it never enters the loops.
        dead = tl.reshape(empty | ~gvalid[None, :], [BR, TBL, NBP])
        dead = tl.min(dead.to(tl.int32), axis=2)
        dead = tl.reshape(tl.broadcast_to(dead[:, :, None], [BR, TBL, NBP]), [BR, TBL * NBP])
        todo = empty & (dead == 0) & live[:, None] & gvalid[None, :]
        # Random probes: bin fmix32(fmix32(b ^ key) + a GOLDEN) mod nb of the same table, in
        # uint32 wrap-around arithmetic as hashing.fmix32.
        a = tl.full([], 0, tl.int32)
        go = _lsh_any_bin(todo) * (probes > 0).to(tl.int32)
        while go > 0:
            src = (_fmix32(hb + a.to(tl.uint32) * _GOLDEN) % unb).to(tl.int32)
            val, todo = _lsh_borrow(x_ptr, xoff, cols_ptr, base + src, gvalid, todo, val, W)
            a += 1
            go = _lsh_any_bin(todo) * (a < probes).to(tl.int32)
        # Then the first non-empty bin after b in the table, cyclically (one exists: not dead).
        s = tl.full([], 1, tl.int32)
        go = _lsh_any_bin(todo) * (nb > 1).to(tl.int32)
        while go > 0:
            src = bq + s
            src = tl.where(src >= nb, src - nb, src)
            val, todo = _lsh_borrow(x_ptr, xoff, cols_ptr, base + src, gvalid, todo, val, W)
            s += 1
            go = _lsh_any_bin(todo) * (s < nb).to(tl.int32)
        # Bins of dead tables keep argmax = 0 (all their values are 0), the reference's 0.
        # Shifts only below ``bits`` (<= 31): higher fields are masked off anyway.
        part = val.to(tl.int64) << tl.minimum(sh, 31).to(tl.int64)[None, :]
        part = tl.where((gvalid & (sh < bits))[None, :], part & keep, 0)
        code = tl.sum(tl.reshape(part, [BR, TBL, NBP]), axis=2)
        tt = l0 + tl.arange(0, TBL)
        tl.store(codes_ptr + tt[None, :].to(tl.int64) * n + r[:, None], code.to(tl.int32),
                 mask=live[:, None] & (tt < L)[None, :])


def lsh_dwta_codes(x, rows, bins, bits, key, probes):
    """Densified winner-take-all codes int32 ``[L, n]`` (module notes above; math in
    ``reference.lsh_dwta_codes``), bit-identical to the reference."""
    x = x.contiguous()
    n, d = x.shape
    L, nb, w = bins.shape
    codes = torch.empty(L, n, dtype=torch.int32, device=x.device)
    if n == 0:
        return codes
    # The column each (table, bin, slot) reads: rows[bins], resolved once.
    cols = rows.long()[bins.long().reshape(-1)].contiguous()
    nbp = triton.next_power_of_2(nb)
    per_row = nbp * w
    br = max(1, min(32, LSH_DWTA_TILE // per_row))
    tbl = max(1, min(triton.next_power_of_2(L), LSH_DWTA_TILE // (br * per_row)))
    _lsh_dwta_kernel[(triton.cdiv(n, br),)](
        x, cols, codes, n, d, L, nb, key, probes, bits, (1 << bits) - 1, BR=br, TBL=tbl,
        NBP=nbp, W=w, LOG2W=w.bit_length() - 1, num_warps=_warps(br * tbl * per_row))
    return codes


@triton.jit(do_not_specialize=("B",))
def _lsh_softmax_kernel(z_ptr, off_ptr, pos_ptr, grad_ptr, per_ptr, M, B, BM: tl.constexpr,
                        BT: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    row = z_ptr + b * M
    out = grad_ptr + b * M
    lo = tl.load(off_ptr + b).to(tl.int64)
    hi = tl.load(off_ptr + b + 1).to(tl.int64)
    has = hi > lo
    inv_cnt = 1.0 / tl.maximum(hi - lo, 1).to(ACC)
    scale = tl.maximum(B, 1).to(ACC)
    cols = tl.arange(0, BM)
    # Online max / sum of exp over the row.
    mx = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    for m0 in range(0, M, BM):
        z = tl.load(row + m0 + cols, mask=m0 + cols < M, other=float("-inf")).to(ACC)
        nm = tl.maximum(mx, tl.max(z, axis=0))
        s = s * tl.exp(mx - nm) + tl.sum(tl.exp(z - nm), axis=0)
        mx = nm
    # The targets' logits through the CSR.
    tsum = tl.zeros([], ACC)
    tk = tl.arange(0, BT)
    for t0 in range(lo, hi, BT):
        live = t0 + tk < hi
        pp = tl.load(pos_ptr + t0 + tk, mask=live, other=0)
        tsum += tl.sum(tl.load(row + pp, mask=live, other=0.0).to(ACC), axis=0)
    per = tl.where(has, mx + tl.log(s) - tsum * inv_cnt, 0.0)
    tl.store(per_ptr + b, per)
    for m0 in range(0, M, BM):
        cm = m0 + cols
        z = tl.load(row + cm, mask=cm < M, other=float("-inf")).to(ACC)
        hits = tl.zeros([BM], tl.int32)
        for t0 in range(lo, hi, BT):
            live = t0 + tk < hi
            pp = tl.load(pos_ptr + t0 + tk, mask=live, other=-1)
            hits += tl.sum((pp[:, None] == cm[None, :]).to(tl.int32), axis=0)
        g = (tl.exp(z - mx) / s - hits.to(ACC) * inv_cnt) / scale
        g = tl.where(has, g, 0.0)
        tl.store(out + cm, g.to(grad_ptr.dtype.element_ty), mask=cm < M)


def lsh_softmax_loss(logits, tgt_offsets, tgt_pos):
    """``(loss, grad)`` of the label-normalised softmax cross-entropy (module notes above; math
    in ``reference.lsh_softmax_loss``)."""
    logits = logits.contiguous()
    B, M = logits.shape
    grad = torch.zeros(B, M, dtype=logits.dtype, device=logits.device)
    if B == 0 or M == 0:
        # No column: no sample can have an active label, so every term is 0.
        return torch.zeros((), dtype=logits.dtype, device=logits.device), grad
    f64 = logits.dtype == torch.float64
    per = torch.empty(B, dtype=torch.float64 if f64 else torch.float32, device=logits.device)
    _lsh_softmax_kernel[(B,)](
        logits, tgt_offsets.contiguous(), tgt_pos.contiguous(), grad, per, M, B,
        BM=min(LSH_SOFTMAX_BLOCK, triton.next_power_of_2(M)), BT=LSH_SOFTMAX_TARGETS,
        ACC=_acc_dtype(logits.dtype), num_warps=4)
    loss = per.double().sum() / B
    return loss.to(logits.dtype), grad


# ---------------------------------------------------------------- LSH buckets and selection
# ``lsh_buckets``, ``lsh_union_``, ``lsh_pad_`` and ``lsh_force_`` (math in ``reference.lsh_*``).
#
# * ``lsh_buckets``: a counting sort in two kernels and torch glue, deterministic (members
#   ascending within a bucket, bit-identical to the reference). Each table is cut into ``S``
#   segments of ``SEG`` neurons. (1) ``_lsh_bucket_count_kernel``, grid ``(ceil(n / BC), L)``:
#   integer atomics count the codes per (table, segment, bucket); integer adds commute, so the
#   counts do not depend on scheduling. (2) torch: the per-table counts' cumsum gives the offsets,
#   and each (table, segment) starts its cursor of bucket ``h`` at ``offsets[h]`` plus the counts
#   of ``h`` in the earlier segments. (3) ``_lsh_bucket_scatter_kernel``, grid ``(S, L)``: a
#   program walks its segment ``BS`` neurons at a time in increasing order; a neuron goes to
#   ``cursor[h] +`` the number of earlier neurons of the block with the same code (a ``[BS, BS]``
#   comparison), and the last neuron of each code in the block advances ``cursor[h]``. Why this
#   design: a scatter through atomic cursors would be faster but puts a bucket's members in
#   scheduling order (then each bucket needs a sort), while per-(block, bucket) count prefixes for
#   every block need ``L n 2^bits / BS`` counters; segments bound that table at
#   ``LSH_BUCKET_CELLS`` counters (``S`` as large as fits, at most one segment per block: the
#   target shape, 50 tables of 2^8 buckets over 205,443 neurons, gets 321 segments per table,
#   each 10 blocks of 64), and within a segment the walk is sequential, so the order comes for
#   free. ``BS = 64`` with 4 warps: the ``[BS, BS]`` comparison at 128 needs 255 registers and
#   spills on sm_90a (offline compile), at 64 it takes 96 and none.
#   When ``L 2^bits`` alone exceeds the cap (many tables of 16+ bits) ``S = 1``: one program per
#   table walks all its neurons (``n / BS`` sequential blocks; slower, still correct, and the
#   counters stay no larger than the offsets). No host sync: every size is known.
#   The cursor's load and its update by the last lane of a code are separated by CTA barriers
#   (``tl.debug_barrier``): other warps of the program read and write the same cursors.
# * ``lsh_union_``: tables in order (the budget rule is sequential), each table in parallel:
#   ``_lsh_union_kernel``, grid ``B``, program ``q`` takes the ``q``-th of the batch's codes for the
#   table sorted (torch, once for all tables); a code equal to the one before it is a duplicate and
#   does nothing, so every hit bucket is walked once. Buckets of one table are disjoint, so each
#   neuron is seen by one lane at most: that lane tests and sets its mark without atomics, and the
#   new ids are appended to ``out[count:]`` at a block offset taken from one integer atomic counter
#   per block (``tl.cumsum`` places the block's ids; order across blocks is free, as the contract
#   allows). One host sync per table, reading that counter: the Python loop must know whether the
#   budget is reached (to stop, and to return the count as an int). The overshooting table (at
#   most one per call) is trimmed by ``_lsh_rank_kernel`` (``lsh_rank`` bit-exact: ``_fmix32`` in
#   uint32, then ``h 2^31 | j`` in int64) and ``torch.topk`` of the ``m - count`` smallest ranks;
#   the others are unmarked. No further sync.
# * ``lsh_pad_``: ``_lsh_rank_kernel`` over all ``n`` neurons (marked ones get the largest int64,
#   so they come last), ``torch.topk`` of the ``m - count`` smallest: no host sync (the set has
#   ``n - count >= m - count`` unmarked neurons, as ``ActiveSet`` keeps ``count`` = marks).
# * ``lsh_force_``: the ids sorted (torch), then ``_lsh_force_kernel`` appends the first of each
#   run of equal ids if unmarked, as the union does; one host sync (the new count).
LSH_BUCKET_CELLS = 1 << 22
LSH_BUCKET_COUNT_BLOCK = 1024
LSH_BUCKET_SCATTER_BLOCK = 64
LSH_SELECT_BLOCK = 256
_INT64_MAX = tl.constexpr(2**63 - 1)


@triton.jit
def _lsh_bucket_count_kernel(codes_ptr, cnt_ptr, n, nbk, S, SEG, BC: tl.constexpr):
    tab = tl.program_id(1).to(tl.int64)
    j = tl.program_id(0).to(tl.int64) * BC + tl.arange(0, BC)
    live = j < n
    h = tl.load(codes_ptr + tab * n + j, mask=live, other=0).to(tl.int64)
    seg = j // SEG
    tl.atomic_add(cnt_ptr + (tab * S + seg) * nbk + h, 1, mask=live, sem="relaxed")


@triton.jit
def _lsh_bucket_scatter_kernel(codes_ptr, cur_ptr, mem_ptr, n, nbk, S, SEG, BS: tl.constexpr):
    seg = tl.program_id(0).to(tl.int64)
    tab = tl.program_id(1).to(tl.int64)
    cur = cur_ptr + (tab * S + seg) * nbk
    row = codes_ptr + tab * n
    dst_row = mem_ptr + tab * n
    i = tl.arange(0, BS)
    earlier = i[None, :] < i[:, None]
    later = i[None, :] > i[:, None]
    lo = seg * SEG
    hi = tl.minimum(lo + SEG, n)
    for j0 in range(lo, hi, BS):
        j = j0 + i
        live = j < hi
        # Codes are >= 0: masked lanes (-1) match nobody.
        h = tl.load(row + j, mask=live, other=-1)
        eq = h[:, None] == h[None, :]
        rank = tl.sum((eq & earlier).to(tl.int32), axis=1)
        last = tl.sum((eq & later).to(tl.int32), axis=1) == 0
        hh = tl.maximum(h, 0).to(tl.int64)
        # volatile: the cursor is rewritten by other warps of this program between blocks.
        base = tl.load(cur + hh, mask=live, other=0, volatile=True)
        # Every lane has read its cursor before any is advanced, and the advances are visible
        # before the next block reads them.
        tl.debug_barrier()
        dst = base + rank
        tl.store(dst_row + dst.to(tl.int64), j.to(tl.int32), mask=live)
        tl.store(cur + hh, dst + 1, mask=live & last)
        tl.debug_barrier()


def lsh_buckets(codes, bits):
    """CSR buckets of every table (offsets int64 ``[L, 2^bits + 1]``, members int32 ``[L, n]``,
    ascending within a bucket); notes above, math in ``reference.lsh_buckets``."""
    codes = codes.to(torch.int32).contiguous()
    L, n = codes.shape
    nbk = 1 << bits
    dev = codes.device
    offsets = torch.zeros(L, nbk + 1, dtype=torch.int64, device=dev)
    members = torch.empty(L, n, dtype=torch.int32, device=dev)
    if L == 0 or n == 0:
        return offsets, members
    bs = LSH_BUCKET_SCATTER_BLOCK
    nblk = triton.cdiv(n, bs)
    S = max(1, min(nblk, LSH_BUCKET_CELLS // (L * nbk)))
    seg = triton.cdiv(nblk, S) * bs
    S = triton.cdiv(n, seg)
    cnt = torch.zeros(L, S, nbk, dtype=torch.int32, device=dev)
    _lsh_bucket_count_kernel[(triton.cdiv(n, LSH_BUCKET_COUNT_BLOCK), L)](
        codes, cnt, n, nbk, S, seg, BC=LSH_BUCKET_COUNT_BLOCK, num_warps=4)
    offsets[:, 1:] = torch.cumsum(cnt.sum(1, dtype=torch.int64), 1)
    cur = (offsets[:, None, :-1] + torch.cumsum(cnt, 1, dtype=torch.int64) - cnt).to(torch.int32)
    _lsh_bucket_scatter_kernel[(S, L)](codes, cur.contiguous(), members, n, nbk, S, seg, BS=bs,
                                       num_warps=4)
    return offsets, members


@triton.jit
def _lsh_append(ids, new, mark_ptr, out_ptr, ctr_ptr, base):
    """Mark the ``new`` lanes' ``ids`` and append them to ``out[base + ctr:]`` (``ctr`` an int32
    counter advanced by one atomic per block; order across blocks is free)."""
    tl.store(mark_ptr + ids, tl.full(ids.shape, 1, tl.uint8), mask=new)
    flag = new.to(tl.int32)
    tot = tl.sum(flag, axis=0)
    start = tl.atomic_add(ctr_ptr, tot)
    pos = tl.cumsum(flag, axis=0) - flag
    tl.store(out_ptr + base + (start + pos).to(tl.int64), ids, mask=new)


@triton.jit(do_not_specialize=("base",))
def _lsh_union_kernel(q_ptr, off_ptr, mem_ptr, mark_ptr, out_ptr, ctr_ptr, base, n,
                      BLK: tl.constexpr):
    q = tl.program_id(0)
    h = tl.load(q_ptr + q).to(tl.int64)
    prev = tl.load(q_ptr + tl.maximum(q - 1, 0)).to(tl.int64)
    lo = tl.load(off_ptr + h)
    hi = tl.load(off_ptr + h + 1)
    # A code equal to the one before it (codes sorted) was already walked: its bucket is empty here.
    hi = tl.where((q == 0) | (prev != h), hi, lo)
    e = tl.arange(0, BLK)
    for e0 in range(lo, hi, BLK):
        live = e0 + e < hi
        j = tl.load(mem_ptr + e0 + e, mask=live, other=0).to(tl.int64)
        live = live & (j >= 0) & (j < n)
        seen = tl.load(mark_ptr + j, mask=live, other=1)
        _lsh_append(j, live & (seen == 0), mark_ptr, out_ptr, ctr_ptr, base)


@triton.jit(do_not_specialize=("base",))
def _lsh_force_kernel(ids_ptr, mark_ptr, out_ptr, ctr_ptr, base, k, BLK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLK + tl.arange(0, BLK)
    live = p < k
    j = tl.load(ids_ptr + p, mask=live, other=0)
    prev = tl.load(ids_ptr + tl.maximum(p - 1, 0), mask=live, other=-1)
    # ids sorted: only the first of a run of equal ids may join.
    live = live & ((p == 0) | (prev != j))
    seen = tl.load(mark_ptr + j, mask=live, other=1)
    _lsh_append(j, live & (seen == 0), mark_ptr, out_ptr, ctr_ptr, base)


@triton.jit(do_not_specialize=("key",))
def _lsh_rank_kernel(ids_ptr, mark_ptr, rank_ptr, k, key, BLK: tl.constexpr,
                     ALL: tl.constexpr):
    """``lsh_rank(j, key) = fmix32(j ^ key) 2^31 | j`` of ``ids[:k]``, or (``ALL``) of every
    ``j < k`` with the marked ones ranked last (int64 max)."""
    p = tl.program_id(0).to(tl.int64) * BLK + tl.arange(0, BLK)
    live = p < k
    if ALL:
        j = p
    else:
        j = tl.load(ids_ptr + p, mask=live, other=0).to(tl.int64)
    hsh = _fmix32(j.to(tl.uint32) ^ key.to(tl.uint32))
    r = (hsh.to(tl.int64) << 31) | j
    if ALL:
        seen = tl.load(mark_ptr + p, mask=live, other=1)
        r = tl.where(seen != 0, _INT64_MAX, r)
    tl.store(rank_ptr + p, r, mask=live)


def _lsh_ranks(ids, mark, k, key, all_ids):
    rank = torch.empty(k, dtype=torch.int64, device=mark.device)
    if k:
        _lsh_rank_kernel[(triton.cdiv(k, LSH_SELECT_BLOCK),)](
            ids, mark, rank, k, key, BLK=LSH_SELECT_BLOCK, ALL=all_ids, num_warps=4)
    return rank


def lsh_union_(mark, out, count, qcodes, offsets, members, m, key):
    """Add the neurons of the buckets the batch hits, table by table (notes above; math in
    ``reference.lsh_union_``); ``out[:count]`` in no particular order."""
    B, T = qcodes.shape
    if count >= m or B == 0 or T == 0:
        return count
    n = mark.shape[0]
    flags = mark.view(torch.uint8)
    qs = torch.sort(qcodes.to(torch.int32), dim=0).values.t().contiguous()
    offsets = offsets.to(torch.int64).contiguous()
    members = members.to(torch.int32).contiguous()
    ctr = torch.zeros(T, dtype=torch.int32, device=mark.device)
    for t in range(T):
        if count >= m:
            break
        _lsh_union_kernel[(B,)](qs[t], offsets[t], members[t], flags, out, ctr[t:t + 1], count,
                                n, BLK=LSH_SELECT_BLOCK, num_warps=4)
        new = int(ctr[t])  # the host sync of this table
        if count + new > m:
            need = m - count
            cand = out[count:count + new].clone()
            rank = _lsh_ranks(cand, flags, new, key, False)
            keep = cand[torch.topk(rank, need, largest=False, sorted=False).indices]
            mark[cand] = False
            mark[keep] = True
            out[count:count + need] = keep
            new = need
        count += new
    return count


def lsh_pad_(mark, out, count, m, key):
    """Fill the set up to ``m`` with the unmarked neurons of smallest ``lsh_rank`` (notes above;
    math in ``reference.lsh_pad_``)."""
    if count >= m:
        return count
    n = mark.shape[0]
    flags = mark.view(torch.uint8)
    rank = _lsh_ranks(flags, flags, n, key, True)
    pick = torch.topk(rank, m - count, largest=False, sorted=False).indices
    mark[pick] = True
    out[count:m] = pick
    return m


def lsh_force_(mark, out, count, ids):
    """Add the distinct ``ids`` not yet in the set (notes above; math in
    ``reference.lsh_force_``)."""
    k = ids.numel()
    if k == 0:
        return count
    s = torch.sort(ids.to(torch.int64).reshape(-1)).values
    ctr = torch.zeros(1, dtype=torch.int32, device=mark.device)
    _lsh_force_kernel[(triton.cdiv(k, LSH_SELECT_BLOCK),)](
        s, mark.view(torch.uint8), out, ctr, count, k, BLK=LSH_SELECT_BLOCK, num_warps=4)
    return count + int(ctr[0])
