"""Ops of on-device LSH for huge output layers (PGHash): hash codes, buckets, selection, loss.

Rows are neurons or samples: a weight is ``[n, d]`` as in ``torch.nn.Linear``, a batch of hidden
activations ``[B, d]``; the same code ops hash both. Every op is validated here, then run by the
backend ``backends.kernel`` picks (``numba`` on CPU; the math of each is in
``reference.lsh_*``):

* ``fold(x, c, signs)``: ``y[j, i] = sum_{t : i + t c < d} s_{i + t c} x[j, i + t c]``, the
  ``c``-dimensional sketch of every row (``s`` random signs, or 1).
* ``pg_codes(x, proj, signs)``: periodic Gaussian (``c < d``) or SimHash (``c = d``) codes,
  ``codes[l, j] = sum_b [<proj[l, b], fold(x)_j> > 0] 2^b`` for every table ``l`` of
  ``proj [L, k, c]``, the fold fused in (the sketch of the weight is never stored, unless the
  caller passes it as ``x``: a ``[n, c]`` input is hashed as is).
* ``dwta_codes(x, rows, bins, bits, seed)``: densified winner-take-all codes over the sampled
  coordinates ``rows``; each table's ``nb`` bins of ``w`` (a power of two) coordinates give
  ``log2 w`` bits each (``reference.lsh_dwta_codes`` states the densification).
* ``buckets(codes, bits)``: per table, a counting sort of the codes into CSR buckets (at most
  ``MAX_TABLE_BITS`` = 20 bits: a table keeps ``2^bits + 1`` offsets).
* ``ActiveSet``: the neurons a batch activates: labels forced in, then table by table the union of
  the buckets the batch hits, trimmed at the budget ``m`` by a seeded random order, padded to
  ``m`` by that order when the tables run out; one mark per neuron dedupes.
* ``lsh_linear(x, weight, bias, active)``: logits of the active neurons (autograd; the weight
  gradient touches the active rows only, dense or as a sparse COO tensor).
* ``softmax_loss(logits, active, label_offsets, label_ids)``: label-normalised softmax
  cross-entropy over the active set (autograd; loss and gradient in one pass).

Selection as sets, so every backend returns the same sorted ids: with ``F`` the forced labels,
``A = F``; for each table ``t`` while ``|A| < m``: ``N_t`` = members of the buckets hit by any
sample, minus ``A``; all join if ``|A| + |N_t| <= m``, else the ``m - |A|`` of ``N_t`` first in
the order ``rank(j) = (fmix32(j ^ k_trim), j)``. Then, if ``|A| < m``, the ``m - |A|`` unmarked
neurons first in the order of ``k_pad``. Building the tables one at a time (serial mode) gives
the same set as building them all first.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import backends, hashing, reference
from .functional import FLOAT_DTYPES, _check_finite, _int

MAX_BITS = 31
# Buckets keep 2^bits + 1 offsets per table (int64): 8 MB per table at 20 bits.
MAX_TABLE_BITS = 20
# Neuron ids are int32 in the buckets and 31-bit in the selection order.
MAX_NEURONS = 2**31 - 1
DWTA_SALT = 0x5851F42D
TRIM_SALT = 0x4C957F2D
PAD_SALT = 0x2545F491
# Random probes of DWTA densification before the cyclic scan that always ends it.
DWTA_PROBES = 32


def _kernel(op: str, backend: str, device: torch.device):
    return backends.kernel(f"lsh_{op}", backend, device)


def _tensor(name: str, t, dim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t


def _float(name: str, t, dim: int) -> Tensor:
    _tensor(name, t, dim)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    return t


def _index(name: str, t, dim: int, hi: int, what: str) -> Tensor:
    _tensor(name, t, dim)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.numel():
        lo, top = torch.aminmax(t)
        if int(lo) < 0 or int(top) >= hi:
            bad = torch.nonzero((t < 0) | (t >= hi))[0].tolist()
            raise ValueError(f"{name}{bad} = {int(t[tuple(bad)])} is out of range: "
                             f"{what} [0, {hi})")
    return t


def _same_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _signs(signs, d: int, x: Tensor) -> Optional[Tensor]:
    if signs is None:
        return None
    _tensor("signs", signs, 1)
    if signs.numel() != d:
        raise ValueError(f"signs has {signs.numel()} entries, expected in_features={d}")
    _same_device("signs", signs, "x", x)
    return signs.to(x.dtype).contiguous()


def trim_key(seed: int) -> int:
    return hashing.fmix32_int(seed ^ TRIM_SALT)


def pad_key(seed: int) -> int:
    return hashing.fmix32_int(seed ^ PAD_SALT)


def dwta_key(seed: int) -> int:
    return hashing.fmix32_int(seed ^ DWTA_SALT)


# ---------------------------------------------------------------- codes
def fold(x: Tensor, sketch_dim: int, signs: Optional[Tensor] = None, *,
         backend: str = "auto") -> Tensor:
    """The ``[n, c]`` sketch ``y[j, i] = sum_{t : i + t c < d} s_i' x[j, i + t c]`` of every row of
    ``x [n, d]`` (``s`` = ``signs [d]`` of +-1, or 1): what a server sends instead of the weight,
    ``d / c`` times smaller. ``1 <= c <= d``."""
    _float("x", x, 2)
    c = _int("sketch_dim", sketch_dim, 1)
    if c > x.shape[1]:
        raise ValueError(f"sketch_dim={c} exceeds in_features={x.shape[1]}")
    _check_finite("x", x)
    s = _signs(signs, x.shape[1], x)
    return _kernel("fold", backend, x.device)(x.contiguous(), c, s)


def pg_codes(x: Tensor, proj: Tensor, signs: Optional[Tensor] = None, *,
             backend: str = "auto") -> Tensor:
    """Sign-bit codes of every row of ``x [n, d]`` in every table of ``proj [L, k, c]``:
    ``codes[l, j] = sum_{b < k} [<proj[l, b], y_j> > 0] 2^b`` (int32 ``[L, n]``), where ``y`` is
    the fold of ``x`` to ``c`` dims (``signs`` applied first), or ``x`` itself when ``c = d`` and
    there are no signs. Periodic Gaussian hashing: ``proj_l B`` is ``proj_l`` repeated ``d / c``
    times, so this is SimHash of the full rows under a periodic projection. A dot product of
    exactly 0 gives bit 0; ones within rounding of 0 may differ between backends."""
    _float("x", x, 2)
    _float("proj", proj, 3)
    _same_device("proj", proj, "x", x)
    L, k, c = proj.shape
    if L < 1:
        raise ValueError("proj must hold at least one table")
    _int("bits (proj.shape[1])", k, 1, MAX_BITS)
    if c < 1 or c > x.shape[1]:
        raise ValueError(f"sketch_dim (proj.shape[2]) = {c} must be in [1, in_features="
                         f"{x.shape[1]}]")
    if x.shape[0] > MAX_NEURONS:
        raise ValueError(f"x has {x.shape[0]} rows; at most {MAX_NEURONS} are supported")
    _check_finite("x", x)
    _check_finite("proj", proj)
    s = _signs(signs, x.shape[1], x)
    return _kernel("pg_codes", backend, x.device)(x.contiguous(), proj.to(x.dtype).contiguous(), s)


def dwta_codes(x: Tensor, rows: Tensor, bins: Tensor, bits: int, seed: int, *,
               backend: str = "auto") -> Tensor:
    """Densified winner-take-all codes (int32 ``[L, n]``) of every row of ``x [n, d]``.

    ``rows [c]`` are the sampled coordinates (the only ones a device receives); ``bins [L, nb, w]``
    index into them. A bin's value is the position of the largest of its ``w`` values (the first on
    ties); a bin whose values are all 0 is empty and borrows the value of another bin of the same
    row and table (random probes keyed by ``seed``, then a cyclic scan), so each table's codes
    do not depend on the other tables. Table code: the ``nb`` values of
    ``log2 w`` bits each, concatenated, kept to ``bits`` bits (``nb log2 w >= bits``)."""
    _float("x", x, 2)
    d = x.shape[1]
    _index("rows", rows, 1, d, "coordinates of in_features")
    _same_device("rows", rows, "x", x)
    c = rows.numel()
    if c < 1:
        raise ValueError("rows must hold at least one sampled coordinate")
    _index("bins", bins, 3, c, "positions in rows")
    _same_device("bins", bins, "x", x)
    L, nb, w = bins.shape
    if L < 1 or nb < 1:
        raise ValueError(f"bins must hold at least one table and one bin, got shape {tuple(bins.shape)}")
    if w < 2 or w & (w - 1):
        raise ValueError(f"bin width (bins.shape[2]) = {w} must be a power of two >= 2")
    k = _int("bits", bits, 1, MAX_BITS)
    if nb * (w.bit_length() - 1) < k:
        raise ValueError(f"{nb} bins of width {w} give {nb * (w.bit_length() - 1)} bits, "
                         f"fewer than bits={k}")
    seed = _int("seed", seed, 0, hashing.MAX_SEED - 1)
    _check_finite("x", x)
    return _kernel("dwta_codes", backend, x.device)(
        x.contiguous(), rows.long().contiguous(), bins.long().contiguous(), k, dwta_key(seed),
        DWTA_PROBES)


def buckets(codes: Tensor, bits: int, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """CSR buckets of every table: ``members[l, offsets[l, h]:offsets[l, h + 1]]`` are the
    neurons whose code in table ``l`` is ``h``, ascending (offsets int64 ``[L, 2^bits + 1]``,
    members int32 ``[L, n]``)."""
    k = _int("bits", bits, 1, MAX_TABLE_BITS)
    _index("codes", codes, 2, 1 << k, f"codes of {k} bits")
    if codes.dtype != torch.int32:
        codes = codes.to(torch.int32)
    return _kernel("buckets", backend, codes.device)(codes.contiguous(), k)


# ---------------------------------------------------------------- selection
class ActiveSet:
    """The active neurons of one batch, built up as the module's docstring defines.

    ``n`` neurons, budget ``m`` (``1 <= m <= n``), ``seed`` keys the random trim and pad. Use:
    ``force(labels)`` (optional), ``add(qcodes, offsets, members)`` once per table or group of
    tables (returns True once the budget is reached), ``pad()``, then ``ids()`` (sorted int64)."""

    def __init__(self, n: int, m: int, seed: int = 0, *, device=None, backend: str = "auto"):
        self.n = _int("n", n, 1, MAX_NEURONS)
        self.m = _int("m", m, 1, self.n)
        seed = _int("seed", seed, 0, hashing.MAX_SEED - 1)
        self.device = torch.device(device if device is not None else "cpu")
        self.backend = backends.check_name(backend)
        self._trim, self._pad = trim_key(seed), pad_key(seed)
        self.mark = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        self.out = torch.empty(self.n, dtype=torch.int64, device=self.device)
        self.count = 0

    @property
    def full(self) -> bool:
        return self.count >= self.m

    def force(self, ids: Tensor) -> "ActiveSet":
        """Put ``ids`` (labels) in the set, even beyond the budget."""
        _index("label ids", ids, 1, self.n, "labels of the layer")
        self.count = _kernel("force_", self.backend, self.device)(
            self.mark, self.out, self.count, ids.to(self.device, torch.int64))
        return self

    def add(self, qcodes: Tensor, offsets: Tensor, members: Tensor) -> bool:
        """Union of the buckets the batch hits in tables ``0..T-1`` of ``(offsets, members)``
        (from ``buckets``), ``qcodes [B, T]`` being the batch's codes in those tables."""
        _tensor("qcodes", qcodes, 2)
        _tensor("offsets", offsets, 2)
        _tensor("members", members, 2)
        T = qcodes.shape[1]
        if offsets.shape[0] != T or members.shape != (T, self.n):
            raise ValueError(f"qcodes has {T} tables; offsets {tuple(offsets.shape)} and members "
                             f"{tuple(members.shape)} must be [{T}, 2^bits + 1] and [{T}, {self.n}]")
        nbuckets = offsets.shape[1] - 1
        _index("qcodes", qcodes, 2, nbuckets, f"bucket ids of {nbuckets} buckets")
        for name, t in (("qcodes", qcodes), ("offsets", offsets), ("members", members)):
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device} but the set is on {self.device}")
        if not self.full:
            self.count = _kernel("union_", self.backend, self.device)(
                self.mark, self.out, self.count, qcodes.to(torch.int32).contiguous(),
                offsets.contiguous(), members.to(torch.int32).contiguous(), self.m, self._trim)
        return self.full

    def pad(self) -> "ActiveSet":
        """Fill the set up to the budget with neurons no table selected (random negatives)."""
        self.count = _kernel("pad_", self.backend, self.device)(
            self.mark, self.out, self.count, self.m, self._pad)
        return self

    def ids(self) -> Tensor:
        return torch.sort(self.out[:self.count]).values


def budget_size(budget: float, n: int) -> int:
    """``m = max(1, floor(budget n))`` for ``budget`` in ``(0, 1]``."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a number in (0, 1], got {budget!r}")
    if not (0.0 < float(budget) <= 1.0) or math.isnan(budget):
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    return max(1, int(math.floor(float(budget) * n)))


# ---------------------------------------------------------------- sparse forward / backward
def _labels(label_offsets, label_ids, batch: int, n: int) -> tuple[Tensor, Tensor]:
    _index("label_offsets", label_offsets, 1, 2**62, "offsets")
    if label_offsets.numel() != batch + 1:
        raise ValueError(f"label_offsets has {label_offsets.numel()} entries, expected batch + 1 "
                         f"= {batch + 1}")
    _index("label ids", label_ids, 1, n, "labels of the layer")
    lo = label_offsets.long()
    if int(lo[0]) != 0 or int(lo[-1]) != label_ids.numel() or bool((lo[1:] < lo[:-1]).any()):
        raise ValueError(f"label_offsets must rise from 0 to len(label_ids)={label_ids.numel()}, "
                         f"got {lo.tolist() if lo.numel() <= 8 else '...'}")
    return lo, label_ids.long()


class _LSHLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, active, sparse):
        w = weight.index_select(0, active)
        ctx.save_for_backward(x, w, active)
        ctx.shape, ctx.has_bias, ctx.sparse = weight.shape, bias is not None, sparse
        out = x @ w.T
        return out + bias.index_select(0, active) if bias is not None else out

    @staticmethod
    def backward(ctx, g):
        x, w, active = ctx.saved_tensors
        gx = g @ w if ctx.needs_input_grad[0] else None
        gw = gb = None
        n, d = ctx.shape
        if ctx.needs_input_grad[1]:
            rows = g.T @ x
            if ctx.sparse:
                gw = torch.sparse_coo_tensor(active[None], rows, (n, d), is_coalesced=True,
                                             check_invariants=False)
            else:
                gw = rows.new_zeros(n, d).index_copy_(0, active, rows)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            cols = g.sum(0)
            if ctx.sparse:
                gb = torch.sparse_coo_tensor(active[None], cols, (n,), is_coalesced=True,
                                             check_invariants=False)
            else:
                gb = cols.new_zeros(n).index_copy_(0, active, cols)
        return gx, gw, gb, None, None


def lsh_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], active: Tensor, *,
               sparse: bool = False) -> Tensor:
    """``z[b, p] = <x_b, W[active[p]]> + bias[active[p]]`` (``[B, M]``). Backward writes only
    the ``active`` rows of the weight's and bias' gradients: zeros elsewhere, or a coalesced sparse
    COO tensor of those rows (``sparse=True``, for ``fastfair.optim.LazyAdam`` or
    ``torch.optim.SparseAdam``: inactive neurons' optimizer state then does not move). ``active`` must be sorted and distinct (``ActiveSet.ids``)."""
    _float("x", x, 2)
    _float("weight", weight, 2)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but weight expects {weight.shape[1]}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but weight is {weight.dtype}")
    _index("active", active, 1, weight.shape[0], "neurons of the layer")
    _same_device("weight", weight, "x", x)
    _same_device("active", active, "x", x)
    if bias is not None:
        _float("bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries, weight {weight.shape[0]} rows")
    active = active.long()
    if active.numel() > 1 and not bool((active[1:] > active[:-1]).all()):
        raise ValueError("active must be sorted and distinct (ActiveSet.ids gives that)")
    return _LSHLinear.apply(x, weight, bias, active, bool(sparse))


class _SoftmaxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, offsets, pos, backend):
        loss, grad = _kernel("softmax_loss", backend, logits.device)(logits.contiguous(), offsets,
                                                                     pos)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g, None, None, None


def softmax_loss(logits: Tensor, active: Tensor, label_offsets: Tensor, label_ids: Tensor, *,
                 backend: str = "auto") -> Tensor:
    """Label-normalised softmax cross-entropy over the active set, averaged over the batch.

    With ``P_b`` the positions in ``active`` of sample ``b``'s labels that are active::

        loss = (1/B) sum_{b : P_b nonempty} [ logsumexp_p z_bp - (1/|P_b|) sum_{p in P_b} z_bp ]

    A sample none of whose labels is active contributes nothing (no gradient), as in the reference
    code; forcing labels into the set (``ActiveSet.force``) avoids that. ``label_offsets [B + 1]``
    and ``label_ids`` are each sample's labels as CSR."""
    _float("logits", logits, 2)
    B, M = logits.shape
    _index("active", active, 1, MAX_NEURONS, "neuron ids")
    if active.numel() != M:
        raise ValueError(f"logits has {M} columns but active has {active.numel()} neurons")
    if M > 1 and not bool((active[1:] > active[:-1]).all()):
        raise ValueError("active must be sorted and distinct (ActiveSet.ids gives that)")
    lo, ids = _labels(label_offsets, label_ids, B, MAX_NEURONS)
    offsets, pos = reference.lsh_targets(active.long(), lo.to(logits.device),
                                         ids.to(logits.device))
    return _SoftmaxLoss.apply(logits, offsets, pos, backends.check_name(backend))
