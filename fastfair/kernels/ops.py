"""The ``fastfair::*`` custom ops: one name per op, a fake (meta) implementation, one backward,
and the backend chosen at run time by ``backends.resolve``.

The ops trust the shapes and dtypes their callers (``fastfair.kernels.functional``) checked, and
check the *values* of indices and offsets themselves (when ``validate`` is true): an op body runs
eagerly even inside a ``torch.compile`` graph, so the checks cost no graph break. On CUDA they cost
one host synchronisation; ``validate=False`` skips them.

Modes are ints in the schema: 0 = sum, 1 = mean. ``padding_idx`` is -1 for none.

``embedding_bag``'s last two arguments only change its backward: ``sparse`` returns the weight's
gradient as an uncoalesced sparse COO tensor built by ``embedding_bag_sparse_backward`` (one
entry per element and column of the batch, as ``torch.nn.EmbeddingBag(sparse=True)`` does for its
rows), and ``scale_grad_by_freq`` divides each element's contribution to the weight's gradient by
the number of times its index occurs among the batch's bagged elements.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from .reference import _element_scale, bag_of_element

MODES = {"sum": 0, "mean": 1}


def _check_indices(indices: Tensor, num_embeddings: int) -> None:
    if indices.numel() == 0:
        return
    lo, hi = torch.aminmax(indices)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_embeddings:
        bad = lo if lo < 0 else hi
        raise IndexError(f"index {bad} is out of range: indices must be in [0, {num_embeddings})")


def _check_offsets(offsets: Tensor, n: int) -> None:
    """``offsets`` (length B + 1) must start at 0, never decrease, and end inside the input."""
    first, top = int(offsets[0]), int(offsets.max())
    if first != 0:
        raise ValueError(f"offsets[0] must be 0, got {first}")
    if top > n:
        raise ValueError(f"offsets go past the end of input: offset {top} > input length {n}")
    if offsets.numel() > 1:
        steps = offsets[1:] - offsets[:-1]
        if bool((steps < 0).any()):
            pos = int(torch.nonzero(steps < 0)[0, 0]) + 1
            raise ValueError(f"offsets must be non-decreasing: offsets[{pos}] = {int(offsets[pos])} "
                             f"< offsets[{pos - 1}] = {int(offsets[pos - 1])}")


# ---------------------------------------------------------------- embedding bag (and embedding)
@torch.library.custom_op("fastfair::embedding_bag", mutates_args=())
def embedding_bag_op(weight: Tensor, indices: Tensor, offsets: Optional[Tensor],
                     per_sample_weights: Optional[Tensor], num_embeddings: int, dim: int,
                     chunk_size: int, seed: int, signed: bool, mode: int, padding_idx: int,
                     backend: str, validate: bool, sparse: bool = False,
                     scale_grad_by_freq: bool = False) -> Tensor:
    """``out[b] = reduce_{j in bag b} a_j v(indices[j])``; ``offsets=None`` means one index per bag."""
    if validate:
        _check_indices(indices, num_embeddings)
        if offsets is not None:
            _check_offsets(offsets, indices.numel())
    be = backends.resolve(backend, weight.device)
    return be.bag_forward(weight, indices, offsets, per_sample_weights, dim, chunk_size, seed,
                          signed, mode, padding_idx)


@embedding_bag_op.register_fake
def _(weight, indices, offsets, per_sample_weights, num_embeddings, dim, chunk_size, seed, signed,
      mode, padding_idx, backend, validate, sparse=False, scale_grad_by_freq=False):
    rows = indices.shape[0] if offsets is None else offsets.shape[0] - 1
    return weight.new_empty(rows, dim)


@torch.library.custom_op("fastfair::embedding_bag_backward", mutates_args=())
def embedding_bag_backward_op(grad_out: Tensor, indices: Tensor, offsets: Optional[Tensor],
                              per_sample_weights: Optional[Tensor], memory_size: int, dim: int,
                              chunk_size: int, seed: int, signed: bool, mode: int,
                              padding_idx: int, backend: str) -> Tensor:
    """The adjoint of ``embedding_bag`` in the weight: a signed scatter-add into ``[memory_size]``;
    bit-identical from run to run under ``torch.use_deterministic_algorithms`` (see ``backends``)."""
    be = backends.resolve(backend, grad_out.device)
    return backends.bag_backward_fn(be)(grad_out, indices, offsets, per_sample_weights,
                                        memory_size, dim, chunk_size, seed, signed, mode,
                                        padding_idx)


@embedding_bag_backward_op.register_fake
def _(grad_out, indices, offsets, per_sample_weights, memory_size, dim, chunk_size, seed, signed,
      mode, padding_idx, backend):
    return grad_out.new_empty(memory_size)


# Both ops take (tensor, indices, offsets, per_sample_weights, size, dim, chunk_size, seed,
# signed, mode, padding_idx, backend, ...): their backwards share the hash configuration.
def _hash_config(inputs) -> tuple:
    return tuple(inputs[5:12])


def _bag_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.cfg = _hash_config(inputs)
    ctx.sparse, ctx.scale_grad_by_freq = inputs[13:15]


def _grad_psw(table, indices, offsets, psw, per_bag, cfg):
    """``d <per_bag, out> / d a_j = <v(indices[j]), per_bag[bag(j)]>`` where ``v`` reads ``table``
    (padding rows read as zeros); elements after the last offset get 0."""
    dim, chunk_size, seed, signed, _, padding_idx, backend = cfg
    rows = embedding_bag_op(table, indices, None, None, 0, dim, chunk_size, seed, signed, 0,
                            padding_idx, backend, False)
    g = per_bag if offsets is None else per_bag[bag_of_element(offsets)]
    out = torch.zeros_like(psw)
    out[:g.shape[0]] = (rows[:g.shape[0]] * g).sum(-1)
    return out


def _inverse_frequency(indices: Tensor, offsets: Optional[Tensor], dtype) -> Tensor:
    """``1 / #{l bagged : indices[l] = indices[j]}`` for every bagged element ``j`` (elements
    past the last offset, which no bag holds, get an unused value).

    Counted with a sort and two binary searches rather than ``unique``, so every shape is known
    before the data: a compiled backward needs no dynamic shapes."""
    key = indices.to(torch.int64)
    if offsets is not None:
        position = torch.arange(key.numel(), device=key.device)
        key = torch.where(position < offsets[-1], key, torch.full_like(key, -1))
    ordered = torch.sort(key).values
    count = torch.searchsorted(ordered, key, right=True) - torch.searchsorted(ordered, key)
    return 1.0 / count.to(dtype)


def _bag_backward(ctx, grad):
    weight, indices, offsets, psw = ctx.saved_tensors
    grad, cfg = grad.contiguous(), ctx.cfg
    grad_w = grad_psw = None
    if ctx.needs_input_grad[0]:
        # Scaling by frequency multiplies each element's a_j, so both weight-gradient ops
        # apply it through their per-sample-weight argument; the a_j gradient is not scaled
        # (torch does not scale it either).
        scaled = psw
        if ctx.scale_grad_by_freq:
            scaled = _inverse_frequency(indices, offsets, grad.dtype)
            if psw is not None:
                scaled = scaled * psw
        if ctx.sparse:
            if torch.is_grad_enabled() and grad.requires_grad:
                raise RuntimeError("embedding bags with sparse=True have no double backward "
                                   "(torch's sparse embedding gradients have none either); use "
                                   "sparse=False to differentiate the gradient again")
            slots, values = embedding_bag_sparse_backward_op(grad, indices, offsets, scaled,
                                                             weight.numel(), *cfg)
            grad_w = torch.sparse_coo_tensor(slots[None], values, weight.shape,
                                             is_coalesced=False, check_invariants=False)
        else:
            grad_w = embedding_bag_backward_op(grad, indices, offsets, scaled, weight.numel(),
                                               *cfg)
    if ctx.needs_input_grad[3]:
        grad_psw = _grad_psw(weight, indices, offsets, psw, grad, cfg)
    return grad_w, None, None, grad_psw, *([None] * 11)


embedding_bag_op.register_autograd(_bag_backward, setup_context=_bag_setup)


def _bag_bwd_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.cfg = _hash_config(inputs)


def _bag_bwd_backward(ctx, grad):
    # The backward is linear in grad_out and its adjoint is the forward itself; in a_j it is the
    # same inner product as the forward's per-sample-weight gradient, with the roles swapped.
    grad_out, indices, offsets, psw = ctx.saved_tensors
    grad, cfg = grad.contiguous(), ctx.cfg
    g_out = g_psw = None
    if ctx.needs_input_grad[0]:
        # num_embeddings (0) is unused: the indices were validated by the forward that led here.
        g_out = embedding_bag_op(grad, indices, offsets, psw, 0, *cfg, False)
    if ctx.needs_input_grad[3]:
        g_psw = _grad_psw(grad, indices, offsets, psw, grad_out, cfg)
    return g_out, None, None, g_psw, *([None] * 8)


embedding_bag_backward_op.register_autograd(_bag_bwd_backward, setup_context=_bag_bwd_setup)


@torch.library.custom_op("fastfair::embedding_bag_sparse_backward", mutates_args=())
def embedding_bag_sparse_backward_op(grad_out: Tensor, indices: Tensor, offsets: Optional[Tensor],
                                     per_sample_weights: Optional[Tensor], memory_size: int,
                                     dim: int, chunk_size: int, seed: int, signed: bool, mode: int,
                                     padding_idx: int, backend: str) -> tuple[Tensor, Tensor]:
    """``embedding_bag_backward`` as uncoalesced COO entries ``(slots, values)``, both 1-D of
    length ``N * dim`` for the ``N`` bagged elements whose index is not ``padding_idx``:

        slots[(j, k)] = idx(i_j, k),   values[(j, k)] = g(i_j, k) a_j grad_out[bag(j), k]

    (``a_j`` includes mean's ``1 / count``), so ``index_add`` of ``values`` at ``slots`` is the
    dense gradient. Padding and unbagged elements are left out, as torch leaves the padding row
    out of its sparse gradient: an optimiser that updates only the entries present (SparseAdam)
    then leaves their slots alone. Costs ``N * dim`` int64 addresses and values, not
    ``memory_size``: the addresses come from the backend's ``hash_index``.
    """
    scale, seg, used = _element_scale(indices, offsets, per_sample_weights, mode, padding_idx,
                                      grad_out.dtype)
    rows = indices[:used]
    g = grad_out if seg is None else grad_out[seg]
    if padding_idx >= 0:
        keep = rows != padding_idx
        rows, scale, g = rows[keep], scale[keep], g[keep]
    be = backends.resolve(backend, grad_out.device)
    slots, sign = be.hash_index(rows.contiguous(), dim, memory_size, chunk_size, seed, signed)
    values = g * (sign.to(g.dtype) * scale[:, None])
    return slots.reshape(-1), values.reshape(-1)


@embedding_bag_sparse_backward_op.register_fake
def _(grad_out, indices, offsets, per_sample_weights, memory_size, dim, chunk_size, seed, signed,
      mode, padding_idx, backend):
    # How many elements survive the padding filter is only known from the data.
    n = torch.library.get_ctx().new_dynamic_size() * dim
    return indices.new_empty(n, dtype=torch.int64), grad_out.new_empty(n)


# ---------------------------------------------------------------- hashing and slot counts
@torch.library.custom_op("fastfair::hash_index", mutates_args=())
def hash_index_op(rows: Tensor, dim: int, memory_size: int, chunk_size: int, seed: int,
                  signed: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Addresses ``idx(i, k)`` (int64) and signs ``g(i, k)`` (int8) of rows ``[N] -> [N, dim]``."""
    be = backends.resolve(backend, rows.device)
    return be.hash_index(rows, dim, memory_size, chunk_size, seed, signed)


@hash_index_op.register_fake
def _(rows, dim, memory_size, chunk_size, seed, signed, backend):
    n = rows.shape[0]
    return rows.new_empty(n, dim, dtype=torch.int64), rows.new_empty(n, dim, dtype=torch.int8)


@torch.library.custom_op("fastfair::slot_counts", mutates_args=())
def slot_counts_op(num_embeddings: int, dim: int, memory_size: int, chunk_size: int, seed: int,
                   device: torch.device, backend: str) -> Tensor:
    """``cnt[s] = #{(i, k) in [0, n) x [0, d) : idx(i, k) = s}`` (int64 ``[memory_size]``)."""
    if device.type == "meta":  # no tensor argument routes a meta call to the fake implementation
        return torch.empty(memory_size, dtype=torch.int64, device=device)
    be = backends.resolve(backend, device)
    return be.slot_counts(num_embeddings, dim, memory_size, chunk_size, seed, device)


@slot_counts_op.register_fake
def _(num_embeddings, dim, memory_size, chunk_size, seed, device, backend):
    return torch.empty(memory_size, dtype=torch.int64, device=device)


# ---------------------------------------------------------------- fold / tile / aggregate
@torch.library.custom_op("fastfair::fold", mutates_args=())
def fold_op(weight: Tensor, factor: int, counts: Tensor, backend: str) -> Tensor:
    """Least-squares collapse to ``m' = m / f``: ``w'[j] = sum_t c_t w_t / sum_t c_t`` over
    ``t`` with slot ``j + t m'`` (0 where every such slot is empty)."""
    be = backends.resolve(backend, weight.device)
    return be.fold(weight, factor, counts)


@fold_op.register_fake
def _(weight, factor, counts, backend):
    return weight.new_empty(weight.shape[0] // factor)


def _fold_setup(ctx, inputs, output):
    weight, factor, counts, _ = inputs
    ctx.factor = factor
    ctx.save_for_backward(counts)


def _fold_backward(ctx, grad):
    (counts,) = ctx.saved_tensors
    c = counts.to(grad.dtype).view(ctx.factor, -1)
    den = c.sum(0)
    share = torch.where(den > 0, c / den.clamp(min=1), torch.zeros_like(c))
    return (share * grad).reshape(-1), None, None, None


fold_op.register_autograd(_fold_backward, setup_context=_fold_setup)


@torch.library.custom_op("fastfair::tile", mutates_args=())
def tile_op(weight: Tensor, factor: int, backend: str) -> Tensor:
    """The same virtual table in an array ``f`` times bigger: ``out[j] = w[j mod m]``."""
    be = backends.resolve(backend, weight.device)
    return be.tile(weight, factor)


@tile_op.register_fake
def _(weight, factor, backend):
    return weight.new_empty(weight.shape[0] * factor)


def _tile_setup(ctx, inputs, output):
    ctx.factor = inputs[1]


def _tile_backward(ctx, grad):
    return grad.reshape(ctx.factor, -1).sum(0), None, None


tile_op.register_autograd(_tile_backward, setup_context=_tile_setup)


@torch.library.custom_op("fastfair::aggregate", mutates_args=())
def aggregate_op(arrays: list[Tensor], weights: list[float], target_size: int,
                 backend: str) -> Tensor:
    """``out[j] = sum_i p_i a_i[j mod m_i]``: arrays of nested sizes summed at ``target_size``."""
    be = backends.resolve(backend, arrays[0].device)
    return be.aggregate(arrays, weights, target_size)


@aggregate_op.register_fake
def _(arrays, weights, target_size, backend):
    return arrays[0].new_empty(target_size)


def _aggregate_setup(ctx, inputs, output):
    arrays, ctx.weights, _, _ = inputs
    ctx.sizes = [a.shape[0] for a in arrays]


def _aggregate_backward(ctx, grad):
    grads = [p * grad.reshape(-1, m).sum(0) for p, m in zip(ctx.weights, ctx.sizes)]
    return grads, None, None, None


aggregate_op.register_autograd(_aggregate_backward, setup_context=_aggregate_setup)
