"""Public, validated functions over the ``fastfair::*`` ops, and ``HashSpec``.

A hashed array ``w`` of length ``m`` represents the virtual table ``V[i, k] = g(i, k) w[idx(i, k)]``
of shape ``num_embeddings x embedding_dim`` (``idx`` and ``g`` from ``hashing``). Every function
here checks shapes, dtypes and parameters and raises ``TypeError``/``ValueError`` naming the bad
value; index values are checked inside the ops (``IndexError``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import backends, hashing, ops

FLOAT_DTYPES = (torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
# Leading bits kept by ``nested_size``: the size is within 2**-SIZE_BITS of the request.
SIZE_BITS = 8


def _check_finite(name: str, t: Tensor) -> None:
    # min and max propagate NaN, so both are finite only if every entry is; measured 0.13 ms for
    # 20,000 x 64 float32 on one core where torch.isfinite(t).all() took 2.9 ms.
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if math.isfinite(float(lo)) and math.isfinite(float(hi)):
        return
    pos = torch.nonzero(~torch.isfinite(t))[0].tolist()
    raise ValueError(f"{name} holds a non-finite value {t[tuple(pos)].item()} at {tuple(pos)}")


def _int(name: str, value, lo: int, hi: Optional[int] = None) -> int:
    """``value`` as an int in ``[lo, hi]``, or a TypeError/ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.Tensor) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        value = int(value.__index__())
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return value


def nested_size(target: float, chunk_size: int = 1) -> int:
    """A memory size near ``target`` parameters that collapses deeply.

    The number of chunks ``T = round(target / chunk_size)`` (at least 1) is rounded to its
    ``SIZE_BITS`` = 8 leading bits: ``m = chunk_size * q * 2**p`` with ``q < 2**8``. So ``m`` is
    within 0.4% of the request and ``collapse(f)`` works for every power of two ``f <= 2**p``
    (and any ``f`` dividing ``q * 2**p``).
    """
    chunk_size = _int("chunk_size", chunk_size, 1)
    chunks = max(1, round(target / chunk_size))
    p = max(0, chunks.bit_length() - SIZE_BITS)
    return chunk_size * (round(chunks / 2**p) << p)


@dataclasses.dataclass(frozen=True)
class HashSpec:
    """Everything the hash of a virtual table depends on (the array itself aside).

    ``idx(i, k) = chunk_size * (h(seed, i, k // chunk_size) mod (memory_size // chunk_size))
    + k mod chunk_size``; sizes nest: for ``m' = m / f`` with ``chunk_size | m'``,
    ``idx_{m'} = idx_m mod m'``.
    """

    num_embeddings: int
    embedding_dim: int
    memory_size: int
    chunk_size: int = 1
    seed: int = 0
    signed: bool = True

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "num_embeddings", _int("num_embeddings", self.num_embeddings, 1,
                                          hashing.MAX_ROWS))
        set_(self, "embedding_dim", _int("embedding_dim", self.embedding_dim, 1))
        set_(self, "chunk_size", _int("chunk_size", self.chunk_size, 1))
        set_(self, "memory_size", _int("memory_size", self.memory_size, self.chunk_size))
        set_(self, "seed", _int("seed", self.seed, 0, hashing.MAX_SEED - 1))
        if not isinstance(self.signed, bool):
            raise TypeError(f"signed must be a bool, got {self.signed!r}")
        if self.memory_size % self.chunk_size:
            raise ValueError(f"memory_size {self.memory_size} is not a multiple of chunk_size "
                             f"{self.chunk_size}")
        if self.memory_size // self.chunk_size > hashing.MAX_SLOTS_PER_CHUNK:
            raise ValueError(f"memory_size // chunk_size = {self.memory_size // self.chunk_size} "
                             f"exceeds the 32-bit hash range {hashing.MAX_SLOTS_PER_CHUNK}")

    @classmethod
    def from_compression(cls, num_embeddings: int, embedding_dim: int, compression: float,
                         chunk_size: int = 1, seed: int = 0, signed: bool = True) -> "HashSpec":
        """``memory_size = nested_size(compression * num_embeddings * embedding_dim)``."""
        if isinstance(compression, bool) or not isinstance(compression, (int, float)):
            raise TypeError(f"compression must be a number, got {compression!r}")
        if not (0 < compression <= 1) or math.isnan(compression):
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        n = _int("num_embeddings", num_embeddings, 1, hashing.MAX_ROWS)
        d = _int("embedding_dim", embedding_dim, 1)
        return cls(n, d, nested_size(compression * n * d, chunk_size), chunk_size, seed, signed)

    @property
    def compression(self) -> float:
        """``memory_size / (num_embeddings * embedding_dim)``."""
        return self.memory_size / (self.num_embeddings * self.embedding_dim)

    @property
    def max_collapse(self) -> int:
        """The largest power of two this array can collapse by in whole chunks."""
        chunks = self.memory_size // self.chunk_size
        return chunks & -chunks

    def collapse(self, factor: int) -> "HashSpec":
        """The spec of the array ``factor`` times smaller (its subspace nests in this one)."""
        f = _int("factor", factor, 1)
        if self.memory_size % (f * self.chunk_size):
            raise ValueError(f"collapse factor {f} does not divide memory_size {self.memory_size} "
                             f"in whole chunks of {self.chunk_size} (possible powers of two: up to "
                             f"{self.max_collapse})")
        return dataclasses.replace(self, memory_size=self.memory_size // f)

    def expand(self, factor: int) -> "HashSpec":
        """The spec of the array ``factor`` times bigger that contains this subspace."""
        return dataclasses.replace(self, memory_size=self.memory_size * _int("factor", factor, 1))


def _check_spec(spec) -> HashSpec:
    if not isinstance(spec, HashSpec):
        raise TypeError(f"spec must be a fastfair.HashSpec, got {type(spec).__name__}")
    return spec


def _check_weight(weight, spec: HashSpec, name: str = "weight") -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {weight.dtype}")
    if weight.dim() != 1 or weight.shape[0] != spec.memory_size:
        raise ValueError(f"{name} must be 1-D of length memory_size={spec.memory_size}, "
                         f"got shape {tuple(weight.shape)}")
    return weight.contiguous()


def _check_indices(input, device: torch.device, name: str = "input") -> Tensor:
    if not isinstance(input, Tensor):
        raise TypeError(f"{name} must be a Tensor of indices, got {type(input).__name__}")
    if input.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must hold int64 or int32 indices, got {input.dtype}")
    if input.device != device:
        raise ValueError(f"{name} is on {input.device} but the weight is on {device}")
    return input


def _padding(padding_idx, n: int) -> int:
    """torch's rule: ``padding_idx`` in ``[-n, n)``, negative counts from the end; -1 = none."""
    if padding_idx is None:
        return -1
    p = _int("padding_idx", padding_idx, -n, n - 1)
    return p + n if p < 0 else p


def _check_mode(mode) -> int:
    if mode == "max":
        raise ValueError("mode='max' is not supported by hashed embedding bags yet; use 'sum' or "
                         "'mean'")
    if mode not in ops.MODES:
        raise ValueError(f"mode must be one of {tuple(ops.MODES)}, got {mode!r}")
    return ops.MODES[mode]


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def embedding(input: Tensor, weight: Tensor, spec: HashSpec, padding_idx: Optional[int] = None,
              backend: str = "auto", validate: bool = True, sparse: bool = False,
              scale_grad_by_freq: bool = False) -> Tensor:
    """``out[..., k] = g(i, k) w[idx(i, k)]`` for every index ``i`` of ``input``: shape
    ``[*input.shape, embedding_dim]``; rows equal to ``padding_idx`` give zeros (and no gradient).

    ``sparse=True``: the weight's gradient is an uncoalesced sparse COO ``[memory_size]`` tensor
    with an entry per (non-padding element, column). ``scale_grad_by_freq=True``: element ``j``'s
    contribution to the weight's gradient is divided by the number of times ``input[j]`` occurs
    in ``input``.
    """
    spec = _check_spec(spec)
    weight = _check_weight(weight, spec)
    input = _check_indices(input, weight.device)
    flat = input.reshape(-1).contiguous()
    out = ops.embedding_bag_op(weight, flat, None, None, spec.num_embeddings, spec.embedding_dim,
                               spec.chunk_size, spec.seed, spec.signed, 0,
                               _padding(padding_idx, spec.num_embeddings),
                               backends.check_name(backend), bool(validate),
                               _flag("sparse", sparse),
                               _flag("scale_grad_by_freq", scale_grad_by_freq))
    return out.view(*input.shape, spec.embedding_dim)


def embedding_bag(input: Tensor, weight: Tensor, spec: HashSpec, offsets: Optional[Tensor] = None,
                  mode: str = "mean", per_sample_weights: Optional[Tensor] = None,
                  include_last_offset: bool = False, padding_idx: Optional[int] = None,
                  backend: str = "auto", validate: bool = True, sparse: bool = False,
                  scale_grad_by_freq: bool = False) -> Tensor:
    """``torch.nn.functional.embedding_bag`` over the virtual table of ``(weight, spec)``.

    ``out[b, k] = sum_{j in bag b, input[j] != padding_idx} a_j g(i_j, k) w[idx(i_j, k)]``,
    ``a_j = per_sample_weights[j]`` (mode "sum" only) or 1; "mean" divides by the number of
    non-padding entries. 1-D ``input`` needs ``offsets`` (bag starts, or bag boundaries with
    ``include_last_offset``); 2-D ``input`` is ``B`` bags of equal length and takes no offsets.
    Empty bags give zeros.

    ``sparse=True``: the weight's gradient is an uncoalesced sparse COO ``[memory_size]`` tensor
    with an entry per (bagged non-padding element, column), for ``torch.optim.SGD`` /
    ``SparseAdam``. ``scale_grad_by_freq=True``: element ``j``'s contribution to the weight's
    gradient is divided by the number of bagged elements with index ``input[j]`` (torch's
    documented rule; its own CPU kernel miscounts in 2.13, pytorch/pytorch#190063).
    """
    spec = _check_spec(spec)
    weight = _check_weight(weight, spec)
    input = _check_indices(input, weight.device)
    mode_id = _check_mode(mode)
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("offsets must be None when input is 2-D (B bags of equal length)")
        nbags, length = input.shape
        offsets = torch.arange(nbags + 1, device=input.device, dtype=torch.int64) * length
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets is required when input is 1-D")
        offsets = _check_indices(offsets, weight.device, "offsets")
        if offsets.dim() != 1:
            raise ValueError(f"offsets must be 1-D, got shape {tuple(offsets.shape)}")
        offsets = offsets.to(torch.int64)
        if include_last_offset:
            if offsets.shape[0] == 0:
                raise ValueError("offsets must hold at least one element with include_last_offset")
        else:
            offsets = torch.cat([offsets, offsets.new_full((1,), input.shape[0])])
    else:
        raise ValueError(f"input must be 1-D or 2-D, got shape {tuple(input.shape)}")
    psw = None
    if per_sample_weights is not None:
        if mode != "sum":
            raise ValueError(f"per_sample_weights is only supported with mode='sum', got "
                             f"mode={mode!r}")
        if not isinstance(per_sample_weights, Tensor) or not per_sample_weights.is_floating_point():
            raise TypeError("per_sample_weights must be a floating-point Tensor")
        if per_sample_weights.shape != input.shape:
            raise ValueError(f"per_sample_weights must have the shape of input "
                             f"{tuple(input.shape)}, got {tuple(per_sample_weights.shape)}")
        psw = per_sample_weights.to(weight.dtype).reshape(-1).contiguous()
    return ops.embedding_bag_op(weight, input.reshape(-1).contiguous(), offsets.contiguous(), psw,
                                spec.num_embeddings, spec.embedding_dim, spec.chunk_size,
                                spec.seed, spec.signed, mode_id,
                                _padding(padding_idx, spec.num_embeddings),
                                backends.check_name(backend), bool(validate),
                                _flag("sparse", sparse),
                                _flag("scale_grad_by_freq", scale_grad_by_freq))


def hash_index(rows: Tensor, spec: HashSpec, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Addresses ``idx(i, k)`` (int64) and signs ``g(i, k)`` (int8) of 1-D ``rows``:
    two ``[len(rows), embedding_dim]`` tensors. Meant for tests and the stored-index baseline."""
    spec = _check_spec(spec)
    if not isinstance(rows, Tensor) or rows.dtype not in INDEX_DTYPES or rows.dim() != 1:
        raise TypeError("rows must be a 1-D int32/int64 Tensor")
    ops._check_indices(rows, spec.num_embeddings)
    return ops.hash_index_op(rows.contiguous(), spec.embedding_dim, spec.memory_size,
                             spec.chunk_size, spec.seed, spec.signed, backends.check_name(backend))


def slot_counts(spec: HashSpec, device=None, backend: str = "auto") -> Tensor:
    """``cnt[s] = #{(i, k) : idx(i, k) = s}`` over the whole virtual table: int64 ``[memory_size]``,
    computed without materialising anything of size ``num_embeddings x embedding_dim``."""
    spec = _check_spec(spec)
    device = torch.device("cpu" if device is None else device)
    return ops.slot_counts_op(spec.num_embeddings, spec.embedding_dim, spec.memory_size,
                              spec.chunk_size, spec.seed, device, backends.check_name(backend))


def _check_array(weight, name: str = "weight") -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {weight.dtype}")
    if weight.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(weight.shape)}")
    return weight.contiguous()


def fold(weight: Tensor, factor: int, counts: Tensor, backend: str = "auto") -> Tensor:
    """Least-squares collapse of ``weight`` (length ``m``) to ``m' = m / factor``::

        w'[j] = sum_t c[j + t m'] w[j + t m'] / sum_t c[j + t m']      (0 where the sum of c is 0)

    with ``c = slot_counts`` at size ``m``. ``expand(w')`` is then the orthogonal projection of
    ``expand(w)`` onto the smaller subspace. Use ``HashSpec.collapse`` to check chunk alignment.
    """
    weight = _check_array(weight)
    f = _int("factor", factor, 1)
    if weight.shape[0] % f:
        raise ValueError(f"fold factor {f} does not divide the array length {weight.shape[0]}")
    if not isinstance(counts, Tensor) or counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise TypeError("counts must be an integer Tensor (fastfair.slot_counts)")
    if counts.shape != weight.shape or counts.device != weight.device:
        raise ValueError(f"counts must match weight ({tuple(weight.shape)} on {weight.device}), "
                         f"got {tuple(counts.shape)} on {counts.device}")
    return ops.fold_op(weight, f, counts.to(torch.int64).contiguous(), backends.check_name(backend))


def tile(weight: Tensor, factor: int, backend: str = "auto") -> Tensor:
    """``out[j] = w[j mod m]`` for ``j < factor * m``: the same virtual table held in the bigger
    array (``A_m w = A_{fm} tile(w)``)."""
    weight = _check_array(weight)
    return ops.tile_op(weight, _int("factor", factor, 1), backends.check_name(backend))


def aggregate(arrays: Sequence[Tensor], weights: Sequence[float], target_size: int,
              backend: str = "auto") -> Tensor:
    """``out[j] = sum_i weights[i] * arrays[i][j mod len(arrays[i])]`` in one pass.

    Every array length must divide ``target_size`` (nested sizes): the result is the weighted
    sum of the arrays' virtual tables, held at ``target_size``. Fold bigger arrays first.
    """
    arrays = [_check_array(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    if not arrays:
        raise ValueError("aggregate needs at least one array")
    weights = [float(w) for w in weights]
    if len(weights) != len(arrays):
        raise ValueError(f"got {len(arrays)} arrays but {len(weights)} weights")
    t = _int("target_size", target_size, 1)
    for i, a in enumerate(arrays):
        if a.dtype != arrays[0].dtype or a.device != arrays[0].device:
            raise TypeError(f"arrays[{i}] is {a.dtype} on {a.device}; arrays[0] is "
                            f"{arrays[0].dtype} on {arrays[0].device}")
        if a.shape[0] == 0 or t % a.shape[0]:
            raise ValueError(f"arrays[{i}] has length {a.shape[0]}, which does not divide "
                             f"target_size {t}; fold it first")
    return ops.aggregate_op(arrays, weights, t, backends.check_name(backend))


def expand_dense(weight: Tensor, spec: HashSpec, backend: str = "auto") -> Tensor:
    """The dense virtual table ``V[i, k] = g(i, k) w[idx(i, k)]``, ``[num_embeddings, dim]``."""
    spec = _check_spec(spec)
    weight = _check_weight(weight, spec)
    rows = torch.arange(spec.num_embeddings, device=weight.device)
    return embedding(rows, weight, spec, backend=backend, validate=False)


def project_dense(dense: Tensor, spec: HashSpec, counts: Optional[Tensor] = None,
                  backend: str = "auto", row_weights: Optional[Tensor] = None) -> Tensor:
    """Dense table to array: ``w[s] = sum_{idx(i,k)=s} g(i, k) D[i, k] / cnt[s]`` (0 if empty).

    ``w`` is the least-squares fit of ``D`` in the subspace, so ``expand_dense(project_dense(D))``
    is the orthogonal projection of ``D``. ``counts`` (``slot_counts(spec)``) is computed if absent.

    With ``row_weights`` ``a`` (``[num_embeddings]``, >= 0) it is the weighted least-squares fit,
    ``argmin_w sum_{i,k} a_i (g(i, k) w[idx(i, k)] - D[i, k])^2``:
    ``w[s] = sum_{idx(i,k)=s} a_i g(i, k) D[i, k] / sum_{idx(i,k)=s} a_i`` (0 where that sum is
    0). A slot shared by heavy and light rows then reproduces the heavy ones; ``a = 1`` gives the
    plain fit, and ``counts`` is not needed.
    """
    spec = _check_spec(spec)
    if not isinstance(dense, Tensor) or dense.dtype not in FLOAT_DTYPES:
        raise TypeError("dense must be a float32 or float64 Tensor")
    shape = (spec.num_embeddings, spec.embedding_dim)
    if tuple(dense.shape) != shape:
        raise ValueError(f"dense must have shape {shape}, got {tuple(dense.shape)}")
    name = backends.check_name(backend)
    rows = torch.arange(spec.num_embeddings, device=dense.device)

    def slot_sums(table: Tensor, signed: bool) -> Tensor:
        return ops.embedding_bag_backward_op(table.contiguous(), rows, None, None,
                                             spec.memory_size, spec.embedding_dim,
                                             spec.chunk_size, spec.seed, signed, 0, -1, name)

    if row_weights is not None:
        a = _check_row_weights(row_weights, dense)
        # The unsigned sums of the same slots give each slot's total weight.
        mass = slot_sums(a[:, None].expand(shape), False)
        sums = slot_sums(dense * a[:, None], spec.signed)
        return sums.div_(torch.where(mass > 0, mass, torch.ones_like(mass)))
    if counts is None:
        counts = slot_counts(spec, dense.device, backend)
    elif tuple(counts.shape) != (spec.memory_size,):
        raise ValueError(f"counts must have shape ({spec.memory_size},), got {tuple(counts.shape)}")
    sums = slot_sums(dense, spec.signed)
    # An empty slot received no term, so its sum is exactly 0 and dividing by max(cnt, 1) leaves
    # it 0: the same bits as masking with ``cnt > 0``, in place, with one temporary of the
    # array's size instead of six (measured at m = 1.43M, 1 thread: 1.9 ms instead of 4.5 ms, of
    # a ~26 ms projection).
    return sums.div_(counts.clamp(min=1))


def _check_row_weights(row_weights, dense: Tensor) -> Tensor:
    n = dense.shape[0]
    if not isinstance(row_weights, Tensor) or row_weights.dtype not in FLOAT_DTYPES:
        raise TypeError("row_weights must be a float32 or float64 Tensor")
    if tuple(row_weights.shape) != (n,):
        raise ValueError(f"row_weights must have shape ({n},), got {tuple(row_weights.shape)}")
    if row_weights.device != dense.device:
        raise ValueError(f"row_weights is on {row_weights.device}, dense on {dense.device}")
    _check_finite("row_weights", row_weights)
    if bool((row_weights < 0).any()):
        raise ValueError(f"row_weights must be >= 0, got {float(row_weights.min())} at row "
                         f"{int(row_weights.argmin())}")
    return row_weights.to(dense.dtype)
