"""Upload compressors for item-table updates: action sharing (FedRAS) and the baselines.

A client's update of an item table is ``G = V_local - V_downloaded``, seen as ``R`` rows of ``d``
numbers (a dense table's rows, or a hashed array cut into rows of ``d``, zero-padded). Rows the
client never touched are exactly zero; every encoding sends *which* rows were touched (a bitmap
of ``R`` bits, or int32 row ids) and something for the ``m`` touched rows only:

* ``full``: the touched rows as float32 (lossless; the uncompressed baseline in delta form).
* ``actions``: action sharing as described in the FedRAS abstract (Lu et al., KDD 2025; only the
  abstract is public, this is an implementation of the described method, not a reproduction of
  its code or numbers). The touched rows are clustered with k-means into ``K`` actions
  (centroids); the client sends the centroids and one action index per touched row, and the
  server rebuilds ``G_hat[i] = c[a(i)]``. ``spherical``: directions are clustered and one float32
  scale per row is sent, ``G_hat[i] = s_i c[a(i)]`` with ``s_i = <g_i, c[a(i)]>``.
* ``topk``: the ``k`` entries of ``G`` largest in magnitude, with their positions.
* ``quant8`` / ``quant4``: every entry of the touched rows uniformly quantised to 8 / 4 bits
  between their minimum and maximum (round to nearest).
* ``svd``: the touched rows ``G_T`` [m, d] at rank ``r``: ``U_r S_r`` [m, r] and ``V_r^T`` [r, d].

Payloads are counted exactly in bits, two ways: ``bits`` packs every index to the bits it needs
(the touched set as a bitmap, action indices in ``ceil(log2 K)`` bits, top-k positions in
``ceil(log2 (R d))`` bits) and ``bits_int32`` sends every index as an int32. Floats are float32.
``reference_bits(R, d) = 32 R d`` is what uploading the whole table costs: ratios are against it.

Budgets: given ``budget`` bits, ``topk`` and ``svd`` take the largest ``k`` / ``r`` that fits and
``actions`` the largest ``K`` on the doubling grid ``1, 2, 4, ..., max_actions`` that fits
(``payload_bits`` is known before clustering); when nothing fits the smallest is used and the
payload is over budget (the stats say so). ``quant*`` and ``full`` ignore budgets.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ..kernels import kmeans as km

COMPRESSORS = ("none", "full", "actions", "topk", "quant8", "quant4", "svd")
FLOAT_BITS = 32
INDEX_BITS = 32


def reference_bits(rows: int, dim: int) -> int:
    """Bits of uploading the whole ``rows x dim`` table as float32."""
    return FLOAT_BITS * rows * dim


def _index_bits(count: int) -> int:
    """Bits that tell apart ``count`` values (0 when there is only one)."""
    return max(count - 1, 0).bit_length()


def action_bits(k: int, touched: int, rows: int, dim: int, spherical: bool) -> tuple:
    """``(bits, bits_int32)`` of an actions payload: bitmap (or row ids) + K centroids + one
    action index per touched row (+ one scale per touched row when spherical)."""
    body = FLOAT_BITS * k * dim + (FLOAT_BITS * touched if spherical else 0)
    return (rows + touched * _index_bits(k) + body,
            INDEX_BITS * touched + INDEX_BITS * touched + body)


def doubling_grid(max_k: int) -> list:
    """``1, 2, 4, ...`` up to ``max_k`` (``max_k`` itself last even when not a power of two)."""
    grid, k = [], 1
    while k < max_k:
        grid.append(k)
        k *= 2
    return grid + [max_k]


@dataclasses.dataclass
class Encoded:
    """One compressed table update as it travels: ``parts`` holds only what is sent."""

    kind: str
    rows: int
    dim: int
    parts: dict
    bits: int
    bits_int32: int
    size: int = 0          # the K, k or r used (0 where it does not apply)
    error: float = 0.0     # ||G - G_hat||_F / ||G||_F, measured by the client


@dataclasses.dataclass(frozen=True)
class Compressor:
    """How a client encodes a table update; see the module doc.

    ``actions``: a fixed K, or None to choose by ``budget`` (bits) per call. ``iters``/``tol``:
    Lloyd's cap and relative-inertia stop. ``backend``: the k-means kernels' backend.
    """

    kind: str
    actions: Optional[int] = None
    max_actions: int = 256
    spherical: bool = False
    iters: int = 20
    tol: float = 1e-4
    backend: str = "auto"

    def __post_init__(self):
        if self.kind not in COMPRESSORS or self.kind == "none":
            raise ValueError(f"compressor must be one of {COMPRESSORS[1:]}, got {self.kind!r}")
        if self.actions is not None and (isinstance(self.actions, bool)
                                         or not isinstance(self.actions, int) or self.actions < 1):
            raise ValueError(f"actions (K) must be a positive int, got {self.actions!r}")
        for name in ("max_actions", "iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.tol, (int, float)) and 0 <= self.tol < 1):
            raise ValueError(f"tol must be in [0, 1), got {self.tol!r}")

    # ------------------------------------------------------------------ client side
    def encode(self, delta: Tensor, *, budget: Optional[int] = None, k: Optional[int] = None,
               seed: int = 0) -> Encoded:
        """Encode ``delta`` [R, d] (float32). ``k`` overrides the number of actions for this call
        (the adaptive rule's choice); ``budget`` in bits sizes topk, svd and budgeted actions."""
        if delta.dim() != 2 or delta.dtype != torch.float32:
            raise ValueError(f"delta must be a 2-D float32 tensor, got {tuple(delta.shape)} "
                             f"{delta.dtype}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                                   or budget < 1):
            raise ValueError(f"budget must be a positive number of bits, got {budget!r}")
        rows, dim = delta.shape
        mask = (delta != 0).any(1)
        touched = torch.nonzero(mask).flatten()
        m = touched.numel()
        g = delta[touched]
        bitmap = km.pack_indices(mask.long(), 1)
        parts = {"bitmap": bitmap}
        kind = self.kind
        if kind == "full":
            parts["values"] = g.clone()
            bits, bits32 = rows + FLOAT_BITS * m * dim, INDEX_BITS * m + FLOAT_BITS * m * dim
            return Encoded(kind, rows, dim, parts, bits, bits32)
        if kind == "actions":
            return self._encode_actions(delta, mask, touched, g, parts, budget, k, seed)
        if kind == "topk":
            pos_bits = _index_bits(rows * dim)
            count = delta.numel() if budget is None else budget // (FLOAT_BITS + pos_bits)
            count = max(1, min(count, m * dim))
            flat = delta.flatten()
            top = torch.topk(flat.abs(), count, sorted=False).indices if m else flat[:0].long()
            top = top[flat[top] != 0]
            parts = {"positions": top, "values": flat[top].clone()}
            n = top.numel()
            enc = Encoded(kind, rows, dim, parts, n * (FLOAT_BITS + pos_bits),
                          n * (FLOAT_BITS + INDEX_BITS), size=n)
        elif kind in ("quant8", "quant4"):
            levels = (1 << int(kind[5:])) - 1
            lo = g.min() if m else delta.new_zeros(())
            hi = g.max() if m else delta.new_zeros(())
            step = (hi - lo) / levels
            codes = torch.zeros_like(g, dtype=torch.int64) if float(step) == 0 else \
                torch.round((g - lo) / step).long()
            parts.update(lo=lo.reshape(1), step=step.reshape(1),
                         codes=km.pack_indices(codes.flatten(), int(kind[5:])))
            body = (2 * FLOAT_BITS + m * dim * int(kind[5:])) if m else 0
            enc = Encoded(kind, rows, dim, parts, rows + body, INDEX_BITS * m + body,
                          size=int(kind[5:]))
        else:  # svd
            r_max = min(m, dim)
            if budget is None:
                r = r_max
            else:
                r = (budget - rows) // (FLOAT_BITS * (m + dim)) if m + dim else 0
                r = max(1, min(r, r_max))
            if m == 0:
                r = 0
            u, s, vh = torch.linalg.svd(g, full_matrices=False)
            parts.update(left=(u[:, :r] * s[:r]).contiguous(), right=vh[:r].contiguous())
            body = FLOAT_BITS * r * (m + dim)
            enc = Encoded(kind, rows, dim, parts, rows + body, INDEX_BITS * m + body, size=r)
        enc.error = _relative_error(delta, decode(enc))
        return enc

    def _encode_actions(self, delta, mask, touched, g, parts, budget, k, seed) -> Encoded:
        rows, dim = delta.shape
        m = touched.numel()
        if k is None:
            k = self.actions
        if k is None:
            if budget is None:
                raise ValueError("actions: give a fixed K or a payload budget")
            grid = doubling_grid(self.max_actions)
            fits = [c for c in grid
                    if action_bits(c, m, rows, dim, self.spherical)[0] <= budget]
            k = fits[-1] if fits else grid[0]
        if m == 0:
            parts.update(centroids=delta.new_zeros(0, dim), labels=km.pack_indices(
                torch.zeros(0, dtype=torch.int64), 1))
            return Encoded("actions", rows, dim, parts, rows, 0, size=0)
        res = km.kmeans(g, k, iters=self.iters, tol=self.tol, spherical=self.spherical,
                        seed=seed, backend=self.backend)
        used = res.centroids.shape[0]
        bits = max(_index_bits(used), 1)  # a 0-bit stream cannot be packed; counted as 0 below
        parts.update(centroids=res.centroids, labels=km.pack_indices(res.labels, bits))
        if self.spherical:
            parts["scales"] = res.scales
        b, b32 = action_bits(used, m, rows, dim, self.spherical)
        enc = Encoded("actions", rows, dim, parts, b, b32, size=used)
        enc.error = _relative_error(delta, decode(enc))
        return enc


def decode(enc: Encoded) -> Tensor:
    """Rebuild ``G_hat`` [R, d] from an ``Encoded`` payload's parts alone."""
    rows, dim, parts = enc.rows, enc.dim, enc.parts
    out = torch.zeros(rows, dim)
    if enc.kind == "topk":
        out.view(-1)[parts["positions"]] = parts["values"]
        return out
    if enc.kind in ("full", "actions"):
        touched, centroids, labels, scales = _row_changes(enc)
        if touched.numel():
            km.rebuild_add_(out, touched, centroids, labels, scales, 1.0)
        return out
    touched = torch.nonzero(km.unpack_indices(parts["bitmap"], 1, rows)).flatten()
    m = touched.numel()
    if enc.kind in ("quant8", "quant4"):
        codes = km.unpack_indices(parts["codes"], int(enc.kind[5:]), m * dim).view(m, dim)
        out[touched] = parts["lo"] + codes.to(out.dtype) * parts["step"]
    else:
        out[touched] = parts["left"] @ parts["right"]
    return out


@dataclasses.dataclass
class Received:
    """An item table as the server receives it: the array the device downloaded (``start``,
    the view's own shape) and the encoded change. ``dense()`` materialises ``start + G_hat``;
    ``add_to(acc, w)`` adds ``w (start + G_hat)`` into a dense accumulator, and for a dense
    table's ``actions`` or ``full`` upload does so without forming it: ``acc += w start``, then
    the touched rows' changes are gathered (centroid per action index, times the row's scale),
    scaled by ``w`` and scattered into ``acc`` by ``fastfair.kernels.kmeans.rebuild_add_``."""

    start: Tensor
    enc: Encoded

    def check(self) -> Optional[str]:
        """Why the payload cannot be rebuilt onto ``start``, or None: its rows must cover the
        table and every float it carries be finite."""
        enc = self.enc
        if enc.rows * enc.dim < self.start.numel() or enc.dim < 1:
            return (f"a {enc.rows} x {enc.dim} payload cannot cover a table of "
                    f"{self.start.numel()} entries")
        for name, part in enc.parts.items():
            if part.is_floating_point() and not bool(torch.isfinite(part).all()):
                return f"payload part {name!r} has NaN or Inf values"
        try:
            if enc.kind not in ("actions", "full"):
                decode(enc)
                return None
            rows, centroids, labels, scales = _row_changes(enc)
        except (ValueError, RuntimeError, KeyError, IndexError) as err:
            return f"payload cannot be decoded: {err}"
        if centroids.dim() != 2 or centroids.shape[1] != enc.dim:
            return f"centroids of shape {tuple(centroids.shape)}, expected [K, {enc.dim}]"
        if labels.numel() and int(labels.max()) >= centroids.shape[0]:
            return f"an action index {int(labels.max())} names no centroid"
        if scales is not None and scales.shape != rows.shape:
            return f"{scales.numel()} scales for {rows.numel()} touched rows"
        return None

    def dense(self) -> Tensor:
        flat = decode(self.enc).reshape(-1)[:self.start.numel()]
        return self.start + flat.view_as(self.start)

    def add_to(self, acc: Tensor, weight: float) -> None:
        enc = self.enc
        if (enc.kind not in ("actions", "full") or self.start.dim() != 2
                or tuple(self.start.shape) != (enc.rows, enc.dim)):
            acc.add_(self.dense(), alpha=weight)
            return
        acc.add_(self.start, alpha=weight)
        rows, centroids, labels, scales = _row_changes(enc)
        if rows.numel():
            km.rebuild_add_(acc, rows, centroids, labels, scales, weight)


def _row_changes(enc: Encoded) -> tuple:
    """``(rows, centroids, labels, scales)`` with ``G_hat[rows[j]] = scales[j] *
    centroids[labels[j]]`` for an ``actions`` or ``full`` payload (``full``: every touched row
    is its own centroid)."""
    parts = enc.parts
    rows = torch.nonzero(km.unpack_indices(parts["bitmap"], 1, enc.rows)).flatten()
    if enc.kind == "full":
        return rows, parts["values"], torch.arange(rows.numel()), None
    k = parts["centroids"].shape[0]
    labels = (km.unpack_indices(parts["labels"], max(_index_bits(k), 1), rows.numel())
              if rows.numel() else rows)
    return rows, parts["centroids"], labels, parts.get("scales")


def _relative_error(delta: Tensor, rebuilt: Tensor) -> float:
    norm = float(torch.linalg.vector_norm(delta))
    return float(torch.linalg.vector_norm(delta - rebuilt)) / norm if norm > 0 else 0.0
