"""k-means and the kernels of action sharing (FedRAS): validated ops, backend dispatch, the driver.

Ops (every one validated here, then run by the backend ``backends`` picks; the math of each is in
``reference.kmeans_*``; none is differentiable):

* ``assign(x, centroids)``: ``labels[i] = argmin_k ||x_i - c_k||^2`` (ties: smallest ``k``),
  distances and argmin fused, and ``dist2[i]`` that minimum.
* ``centroid_sums(x, labels, k)``: per-cluster sums and counts (segment sums).
* ``pack_indices(values, bits)`` / ``unpack_indices(packed, bits, m)``: a little-endian bit stream
  of ``bits``-bit values and its exact inverse.
* ``rebuild_add_(out, rows, centroids, labels, scales, weight)``: the server's fused rebuild and
  aggregate, ``out[rows[j]] += weight * s_j * c_{labels[j]}``.

``kmeans(x, k, ...)`` is Lloyd's algorithm in torch over those ops (``KMeansResult``) and two
more that every backend provides for it: ``kmeans_seed`` (the whole init in one call, its random
numbers drawn here, so every backend consumes the same stream) and ``kmeans_layout`` (the form of
``x`` the backend's assignment reads fastest, built once per call: ``numba`` transposes blocks of
rows for BLAS, the others read ``x`` itself).

Backends: ``auto`` takes, in ``backends``' order for the device, the first live backend that has
the op (``numba`` on CPU; ``triton`` on CUDA, which has every op but the bit packing, whose
fallback there is ``reference``). A backend named explicitly, or forced with
``FASTFAIR_BACKEND``, that lacks the op raises ``BackendUnavailableError`` saying so.

Precision. ``assign`` picks the label by ``||c_k||^2 - 2 <x_i, c_k>`` (``||x_i||^2`` is constant
in ``k``), whose rounding depends on the backend's summation order, so two backends can pick
different labels where two centroids are within rounding of equally near; ``dist2`` is not read
off that expansion but summed from the differences (in the dtype), so it is never negative and is
exactly 0 where a row equals its centroid. Centroid sums accumulate in float64. Every backend is
deterministic: no op of ``numba`` depends on its thread count (rows are independent, sums are
split by cluster, the init's weights by fixed blocks), and ``triton`` orders its sums by a stable
sort instead of using atomics.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import backends
from .functional import FLOAT_DTYPES, _check_finite, _int

INITS = ("k-means++", "random")


# ---------------------------------------------------------------- backend choice
def _kernel(op: str, backend: str, device: torch.device):
    """The function ``kmeans_<op>`` of the backend that runs it on ``device``."""
    return backends.kernel(f"kmeans_{op}", backend, device)


# ---------------------------------------------------------------- validation
def _float2d(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, d], got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    return t


def _index1d(name: str, t, length: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if length is not None and t.numel() != length:
        raise ValueError(f"{name} has {t.numel()} entries, expected {length}")
    return t


def _same(name: str, t: Tensor, ref_name: str, ref: Tensor, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} is {t.dtype} but {ref_name} is {ref.dtype}")


def _check_range(name: str, t: Tensor, hi: int, what: str) -> None:
    """Every entry of ``t`` in ``[0, hi)``, or a ValueError naming the first that is not."""
    if t.numel() == 0:
        return
    bad = (t < 0) | (t >= hi)
    if bool(bad.any()):
        pos = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"{name}[{pos}] = {int(t[pos])} is out of range: {what} [0, {hi})")


def _bits(bits) -> int:
    return _int("bits", bits, 1, 63)


# ---------------------------------------------------------------- ops
def assign(x: Tensor, centroids: Tensor, *, backend: str = "auto",
           validate: bool = True) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every row: ``labels[i] = argmin_k ||x_i - c_k||^2`` (int64; ties go
    to the smallest ``k``) and ``dist2[i] = ||x_i - c_{labels[i]}||^2`` (``x``'s dtype).

    ``x`` is ``[N, d]`` (``N = 0`` gives empty results), ``centroids`` ``[K, d]`` with ``K >= 1``,
    float32 or float64, on one device. ``validate=False`` skips the check that both are finite
    (one pass over each).
    """
    _float2d("x", x)
    _float2d("centroids", centroids)
    _same("centroids", centroids, "x", x)
    if centroids.shape[0] < 1:
        raise ValueError("centroids must have at least one row")
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids have {centroids.shape[1]} columns but x has {x.shape[1]}")
    if validate:
        _check_finite("x", x)
        _check_finite("centroids", centroids)
    with torch.no_grad():
        return _kernel("assign", backend, x.device)(x.contiguous(), centroids.contiguous())


def centroid_sums(x: Tensor, labels: Tensor, k: int, *, backend: str = "auto",
                  validate: bool = True) -> tuple[Tensor, Tensor]:
    """Segment sums ``sums[c] = sum_{i : labels[i] = c} x_i`` (``[k, d]``, ``x``'s dtype,
    accumulated in float64) and ``counts[c] = #{i : labels[i] = c}`` (int64 ``[k]``).
    ``validate=False`` skips the check that every label is in ``[0, k)``."""
    _float2d("x", x)
    _index1d("labels", labels, x.shape[0])
    _same("labels", labels, "x", x, dtype=False)
    k = _int("k", k, 1)
    if validate:
        _check_range("labels", labels, k, "labels must be in")
    with torch.no_grad():
        return _kernel("centroid_sums", backend, x.device)(x.contiguous(), labels.contiguous(), k)


def pack_indices(values: Tensor, bits: int, *, backend: str = "auto") -> Tensor:
    """``values`` (int64 ``[m]``, each in ``[0, 2**bits)``) as a little-endian bit stream of
    ``ceil(m bits / 8)`` bytes (uint8): bit ``t`` of ``values[j]`` is bit ``(j bits + t) mod 8``
    of byte ``(j bits + t) // 8``; unused high bits of the last byte are 0. ``1 <= bits <= 63``."""
    bits = _bits(bits)
    _index1d("values", values)
    if values.numel():
        lo, hi = (int(v) for v in torch.aminmax(values))
        if lo < 0 or hi >= 1 << bits:
            bad = (values < 0) | (values >= 1 << bits)
            pos = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"values[{pos}] = {int(values[pos])} does not fit in {bits} bits "
                             f"(values must be in [0, {1 << bits}))")
    return _kernel("pack", backend, values.device)(values.contiguous(), bits)


def unpack_indices(packed: Tensor, bits: int, m: int, *, backend: str = "auto") -> Tensor:
    """The ``m`` values (int64) that ``pack_indices(values, bits)`` turned into ``packed``."""
    bits = _bits(bits)
    m = _int("m", m, 0)
    if not isinstance(packed, Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} of shape "
                        f"{tuple(packed.shape)}")
    want = (m * bits + 7) // 8
    if packed.numel() != want:
        raise ValueError(f"packed has {packed.numel()} bytes but {m} values of {bits} bits take "
                         f"{want}")
    return _kernel("unpack", backend, packed.device)(packed.contiguous(), bits, m)


def rebuild_add_(out: Tensor, rows: Tensor, centroids: Tensor, labels: Tensor,
                 scales: Optional[Tensor], weight: float, *, backend: str = "auto",
                 validate: bool = True) -> Tensor:
    """The server's fused rebuild + aggregate, in place: ``out[rows[j]] += (w s_j)
    c_{labels[j]}`` for ``j < m`` (``s_j = 1`` when ``scales`` is None); returns ``out``.

    ``out`` ``[N, d]`` and ``centroids`` ``[K, d]`` (and ``scales`` ``[m]``) share a float
    dtype; ``rows`` and ``labels`` are int64 ``[m]``, ``rows`` without repeats (rows may repeat
    across calls). ``w`` and then ``w s_j`` are rounded to the dtype and each element gets one
    rounded product and one rounded addition, on every backend: with ``scales=None`` and a
    centroid equal to a row ``g`` the result is bit-identical to ``out[r] += w * g`` done in
    torch. ``validate=False`` skips the range and no-repeat checks of ``rows`` and ``labels``
    (a sort of ``rows``).
    """
    _float2d("out", out)
    _float2d("centroids", centroids)
    _same("centroids", centroids, "out", out)
    if centroids.shape[1] != out.shape[1]:
        raise ValueError(f"centroids have {centroids.shape[1]} columns but out has "
                         f"{out.shape[1]}")
    _index1d("rows", rows)
    m = rows.numel()
    _index1d("labels", labels, m)
    _same("rows", rows, "out", out, dtype=False)
    _same("labels", labels, "out", out, dtype=False)
    if scales is not None:
        if not isinstance(scales, Tensor) or scales.dim() != 1 or scales.numel() != m:
            raise ValueError(f"scales must be None or a 1-D tensor of {m} entries, got "
                             f"{getattr(scales, 'shape', scales)!r}")
        _same("scales", scales, "out", out)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"weight must be a real number, got {type(weight).__name__} {weight!r}")
    if not math.isfinite(weight):
        raise ValueError(f"weight must be finite, got {weight}")
    if validate and m:
        _check_range("rows", rows, out.shape[0], "rows must be in")
        _check_range("labels", labels, centroids.shape[0], "labels must be in")
        srt = torch.sort(rows).values
        dup = srt[1:] == srt[:-1]
        if bool(dup.any()):
            raise ValueError(f"rows holds {int(srt[1:][dup][0])} more than once; each call must "
                             f"add to distinct rows")
    fn = _kernel("rebuild_add_", backend, out.device)
    with torch.no_grad():
        dst = out if out.is_contiguous() else out.contiguous()
        fn(dst, rows.contiguous(), centroids.contiguous(), labels.contiguous(),
           None if scales is None else scales.contiguous(), float(weight))
        if dst is not out:
            out.copy_(dst)
    return out


# ---------------------------------------------------------------- the driver
class KMeansResult(NamedTuple):
    """``centroids`` ``[k', d]``, ``labels`` int64 ``[N]``, ``scales`` ``[N]`` (spherical) or
    None, the Lloyd ``iterations`` run, and ``inertia = sum_i ||x_i - xhat_i||^2`` (float64) with
    ``xhat_i = s_i c_{labels[i]}`` (``s_i = 1`` unless spherical): the reconstruction error."""

    centroids: Tensor
    labels: Tensor
    scales: Optional[Tensor]
    iterations: int
    inertia: float


class _Ops(NamedTuple):
    layout: object
    assign: object
    sums: object
    seed: object


def kmeans(x: Tensor, k: int, *, iters: int = 20, tol: float = 1e-4, init: str = "k-means++",
           spherical: bool = False, seed: int = 0, backend: str = "auto") -> KMeansResult:
    """Cluster the rows of ``x`` (``[N, d]``, ``N >= 1``, finite float32/float64) into at most
    ``k`` clusters by Lloyd's algorithm.

    Init: the first center is a uniformly drawn row; each next one is a row drawn with
    probability proportional to ``D(x_i)^2``, its squared distance to the nearest center chosen
    so far (``init="k-means++"``), or uniformly among the rows with ``D(x_i) > 0``
    (``init="random"``): the first row whose running sum of weights exceeds ``u`` times their
    total, for a uniform ``u``. The first row and the ``k - 1`` uniforms come from a
    ``torch.Generator`` seeded with ``seed`` (on the CPU, whatever the device), so a result is
    deterministic for a given input, seed and backend.
    Centers are distinct rows, and when every row coincides with a chosen center (at most ``k``
    distinct rows) the init stops there: ``k' = min(k, number of distinct rows)``.

    Lloyd: up to ``iters`` updates ``c_j = mean of its rows``, each followed by a new
    ``assign`` (``iterations`` counts them; the labels returned are those of the centroids
    returned); it stops early when the inertia drops by less than ``tol`` times its previous
    value (``tol = 0``: never) or reaches 0. A cluster left empty is re-seeded with the row
    farthest from its centroid (the next farthest for the next empty one), never left as NaN.

    Exactness: when the rows take at most ``k`` distinct values, no Lloyd step runs and the
    centroids are bit-exact copies of rows with ``centroids[labels] == x`` exactly (and inertia
    0), so rebuilding the rows from their actions reproduces ``x`` bit for bit.

    ``spherical=True`` clusters the directions ``u_i = x_i / ||x_i||`` of the non-zero rows (the
    same algorithm on ``u``, then each centroid renormalised to unit length: cosine k-means) and
    returns the least-squares scales ``s_i = <x_i, c_{a(i)}>``, so ``x_i ~ s_i c_{a(i)}``; zero
    rows get label 0 and scale 0 (with only zero rows, one centroid ``e_0``). Its exactness: when
    the directions take at most ``k`` distinct values, every centroid is one of the computed
    ``u_i`` (unit up to rounding) and ``s_i c_{a(i)}`` equals ``x_i`` up to the rounding of the
    norm, the division and the dot product: a relative error of the order of ``d`` float
    epsilons at worst, a few in practice (zero rows are rebuilt exactly). Directions count as
    equal when the computed ``u_i`` are: ``x`` and ``2 x`` give the same ``u``, ``x`` and
    ``3 x`` may differ in the last bit.
    """
    _float2d("x", x)
    n, d = x.shape
    if n == 0:
        raise ValueError("x has no rows: there is nothing to cluster")
    if d == 0:
        raise ValueError("x has no columns")
    k = _int("k", k, 1)
    iters = _int("iters", iters, 0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"tol must be a real number, got {type(tol).__name__} {tol!r}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be finite and >= 0, got {tol}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(spherical, bool):
        raise TypeError(f"spherical must be a bool, got {spherical!r}")
    seed = _int("seed", seed, 0, 2**64 - 1)
    _check_finite("x", x)
    ops = _Ops(*(_kernel(op, backend, x.device) for op in ("layout", "assign", "centroid_sums",
                                                           "seed")))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = x.detach().contiguous()
        if not spherical:
            c, labels, iterations, dist2 = _lloyd(x, k, iters, tol, init, False, gen, ops)
            return KMeansResult(c, labels, None, iterations, float(dist2.sum(dtype=torch.float64)))
        return _spherical(x, k, iters, tol, init, gen, ops)


def _spherical(x, k, iters, tol, init, gen, ops) -> KMeansResult:
    n, d = x.shape
    norms = torch.linalg.vector_norm(x, dim=1)
    live = norms > 0
    labels = torch.zeros(n, dtype=torch.int64, device=x.device)
    scales = torch.zeros(n, dtype=x.dtype, device=x.device)
    if not bool(live.any()):
        c = torch.zeros(1, d, dtype=x.dtype, device=x.device)
        c[0, 0] = 1
        return KMeansResult(c, labels, scales, 0, 0.0)
    xs = x[live]
    u = xs / norms[live, None]
    c, lab, iterations, _ = _lloyd(u, k, iters, tol, init, True, gen, ops)
    labels[live] = lab
    scales[live] = (xs.to(torch.float64) * c[lab]).sum(1).to(x.dtype)
    err = x.to(torch.float64) - scales[:, None].to(torch.float64) * c[labels]
    return KMeansResult(c, labels, scales, iterations, float((err * err).sum()))


def _exact(z, k, chosen, labels, gen):
    """``(centroids, labels)`` when the init left every row at distance 0 from a center, or
    ``(None, chosen)`` with ``chosen`` completed to ``k`` distinct rows when it only seemed to.

    A distance is 0 for equal rows, and also where every difference squares to 0 (below ~1e-23
    in float32, ~1e-162 in float64), so equality is checked; if it fails, the distinct rows are
    found by sorting, and if there are more than ``k`` of them the init is completed with distinct
    rows not yet chosen, in random order, and Lloyd runs.
    """
    c = z[torch.tensor(chosen, device=z.device)]
    if torch.equal(c[labels], z):
        return c, labels
    uniq, inverse = torch.unique(z, dim=0, return_inverse=True)
    if uniq.shape[0] <= k:
        return uniq, inverse
    rep = torch.full((uniq.shape[0],), z.shape[0], dtype=torch.int64, device=z.device)
    rep.scatter_reduce_(0, inverse, torch.arange(z.shape[0], device=z.device), "amin")
    taken = torch.zeros(uniq.shape[0], dtype=torch.bool, device=z.device)
    taken[inverse[torch.tensor(chosen, device=z.device)]] = True
    rest = rep[~taken]
    order = torch.randperm(rest.numel(), generator=gen).to(z.device)
    return None, chosen + rest[order[:k - len(chosen)]].tolist()


def _lloyd(z, k, iters, tol, init, spherical, gen, ops):
    """``(centroids, labels, iterations, dist2)`` for the rows ``z`` (unit rows if spherical)."""
    first = int(torch.randint(z.shape[0], (), generator=gen))
    uniforms = torch.rand(k - 1, generator=gen, dtype=torch.float64)
    chosen, labels, d2 = ops.seed(z, first, uniforms, init == "k-means++")
    chosen = chosen.tolist()
    completed = False
    if float(d2.sum()) == 0:
        c, found = _exact(z, k, chosen, labels, gen)
        if c is not None:
            return c.clone(), found, 0, torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        chosen, completed = found, True
    # The form of z the backend's assignment reads fastest, built once for every iteration.
    layout = ops.layout(z)
    c = z[torch.tensor(chosen, device=z.device)].clone()
    if completed:
        labels, d2 = ops.assign(z, c, layout)
    dist2 = d2.to(z.dtype)
    inertia = float(d2.sum(dtype=torch.float64))
    iterations = 0
    while iterations < iters and inertia > 0:
        sums, counts = ops.sums(z, labels, c.shape[0])
        c = _update(z, sums, counts, dist2, spherical)
        labels, dist2 = ops.assign(z, c, layout)
        iterations += 1
        prev, inertia = inertia, float(dist2.sum(dtype=torch.float64))
        if tol > 0 and prev - inertia < tol * prev:
            break
    return c, labels, iterations, dist2


def _update(z, sums, counts, dist2, spherical):
    """New centroids from the sums: means (or unit directions of the sums if spherical); a
    cluster with no rows (or, spherical, whose rows' directions cancel) takes the farthest rows."""
    if spherical:
        norms = torch.linalg.vector_norm(sums, dim=1)
        empty = norms == 0
        c = sums / torch.where(empty, 1, norms)[:, None]
    else:
        empty = counts == 0
        c = sums / counts.clamp(min=1).to(sums.dtype)[:, None]
    if bool(empty.any()):
        idx = torch.nonzero(empty)[:, 0]
        far = torch.sort(dist2, descending=True, stable=True).indices[:idx.numel()]
        c[idx] = z[far]
    return c
