"""A client's local round in one compiled kernel per epoch (CPU, Numba).

``train`` computes what ``fastfair.fl.runner.train_client`` computes with autograd and Adam for
a ``ClientModel`` whose item tables are dense ``nn.Embedding``s or ``HashedEmbedding``s: the same
batches in the same order, the same loss and gradients, the same Adam steps. Per batch of
``b`` positives ``i`` with negatives ``j`` (rows ``q = V[i]`` read as ``g(i, k) w[idx(i, k)]``,
``g = 1`` and ``idx = i d + k`` for a dense table):

    NeuMF  s = a_g . (p * q) + a_m . relu(W_u p' + W_i q' + b) + c        MF  s = p . q
    BPR    L = mean_{b, j} softplus(-(s_b - s_bj))      dL/ds_b = -sum_j sigma(s_bj - s_b) / (b n)
    BCE    L = mean_rows softplus(s) - y s              dL/ds = (sigma(s) - y) / rows
    reg    L += reg (sum_rows ||q||^2 + ||q'||^2 + ||p||^2 + ||p'||^2) / b

and back through the layers by hand (``relu``'s derivative is taken as 0 at 0, as torch does).
Each table's gradient ``sum_rows g(i, k) dL/dq[k]`` is summed per address and stepped with
deferred Adam (``fastfair.optim.DeferredAdam``: the addresses a batch touched take their missed
zero-gradient steps, then this one; every address catches up at the end), the small parameters
with plain Adam every step, as ``ScatterAdam`` does. Values are computed in float64 and stored
in the model's dtype, so results agree with the autograd loop to rounding, not bit for bit.

What a round costs without autograd: per row, ``2 d`` scattered loads and ``~3 d^2``
multiply-adds for NeuMF (the user-side gradients are products of sums over the batch), and per
touched address one Adam update. On Goodreads-100 (d = 8, batches of 1024 rows) that is about
2 x 10^5 multiply-adds and 16K updates a step, against the autograd loop's ~20 kernel launches
and a sparse gradient per table. The scattered loads are what the kernel waits on, so it
computes a batch's addresses first and prefetches them: their misses overlap (measured on the
2-core VM, one thread: a round's epochs 20-25% faster).
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

from ..kernels import hashing
from ..kernels import numba_backend as nb
from ..nn import HashedEmbedding
from ..optim import DeferredAdam

BETAS = (0.9, 0.999)
EPS = 1e-8
# The state records count steps in the parameters' dtype: exact up to these.
MAX_STEPS = {np.dtype(np.float32): 2 ** 24, np.dtype(np.float64): 2 ** 53}


def _table_reason(name: str, table: nn.Module) -> Optional[str]:
    if type(table) is nn.Embedding:
        if (table.padding_idx is not None or table.max_norm is not None
                or table.scale_grad_by_freq):
            return f"item table {name} uses padding_idx, max_norm or scale_grad_by_freq"
        return None
    if type(table) is HashedEmbedding:
        if table.padding_idx is not None or table.scale_grad_by_freq:
            return f"item table {name} uses padding_idx or scale_grad_by_freq"
        return None
    return f"item table {name} is a {type(table).__name__} (dense or hashed tables only)"


def unsupported(model: nn.Module) -> Optional[str]:
    """Why ``train`` cannot run ``model`` (``None`` when it can)."""
    for name in model.table_names():
        reason = _table_reason(name, getattr(model, f"item_{name}"))
        if reason is not None:
            return reason
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1 or dtypes.pop() not in (torch.float32, torch.float64):
        return "parameters are not all float32 or all float64"
    if any(p.device.type != "cpu" for p in model.parameters()):
        return "parameters are not on the CPU"
    return None


def _small_params(model: nn.Module) -> list:
    """The parameters held in the kernel's flat array, in its layout order."""
    if model.arch == "mf":
        return [model.user_gmf]
    head = model.head
    return [model.user_gmf, model.user_mlp, head.mlp.weight, head.mlp.bias, head.predict.weight,
            head.predict.bias]


def _table(table: nn.Module):
    """The table's flat array and its address description for the kernel."""
    w = table.weight.detach().numpy().reshape(-1)
    if type(table) is HashedEmbedding:
        spec = table.spec
        ka, ks = hashing.keys(spec.seed)
        nslots, magic = nb._slots(spec.memory_size, spec.chunk_size)
        return w, (True, spec.chunk_size, nslots, magic, np.uint64(ka), np.uint64(ks),
                   bool(spec.signed))
    return w, (False, 1, np.uint64(1), np.uint64(0), np.uint64(0), np.uint64(0), False)


def state_bytes(model: nn.Module) -> int:
    """Bytes of optimizer state ``train`` holds for ``model``: a 3-number record per item-table
    entry, two moments per other parameter."""
    tables = [getattr(model, f"item_{name}") for name in model.table_names()]
    small = _small_params(model)
    return (sum(3 * t.weight.numel() * t.weight.element_size() for t in tables)
            + sum(2 * p.numel() * p.element_size() for p in small))


def _adam_constants(lr: float, steps: int) -> tuple:
    """``lr / (1 - b1^k)`` and ``1 / sqrt(1 - b2^k)`` for ``k <= steps`` (float64; entry 0
    unused): ``DeferredAdam``'s own tables."""
    step_size, inv = DeferredAdam._constants({"lr": lr, "betas": BETAS}, steps, "cpu")
    return step_size.numpy(), inv.numpy()


def train(model: nn.Module, epochs: Iterable, batch_size: int, loss: str, reg: float,
          lr: float) -> float:
    """Train ``model`` in place over ``epochs``, an iterable of ``(order, negatives)`` per epoch
    (``[P]`` positives in batch order and ``[P, n]`` negatives paired with them), with a fresh
    Adam (``lr``, betas ``BETAS``, eps ``EPS``). Returns the last epoch's mean loss."""
    reason = unsupported(model)
    if reason is not None:
        raise ValueError(f"fused local training cannot run this model: {reason}")
    if loss not in ("bpr", "bce"):
        raise ValueError(f"loss must be 'bpr' or 'bce', got {loss!r}")
    neumf = model.arch == "neumf"
    with torch.no_grad():
        small = _small_params(model)
        dtype = small[0].dtype
        x = torch.cat([p.detach().reshape(-1) for p in small]).numpy()
        xm, xv = np.zeros_like(x), np.zeros_like(x)
        w0, h0 = _table(model.item_gmf)
        w1, h1 = _table(model.item_mlp) if neumf else (w0[:0], h0)
        # np.zeros maps zeroed pages lazily: only the pages a round touches are ever written.
        st0, st1 = (np.zeros((w.shape[0], 3), dtype=w.dtype) for w in (w0, w1))
        tol = nb.REPLAY_TOL[np.dtype(w0.dtype)]
        step, last = 0, 0.0
        for order, negs in epochs:
            items = torch.cat([order[:, None], negs], 1).to(torch.int64).numpy()
            upto = step + -(-items.shape[0] // batch_size)
            if upto > MAX_STEPS[np.dtype(w0.dtype)]:
                raise ValueError(f"a local round of more than {MAX_STEPS[np.dtype(w0.dtype)]} "
                                 f"steps in {w0.dtype} is beyond the kernel's step counter; "
                                 "use a larger batch, fewer epochs, or --local-kernel autograd")
            step_size, inv_bc2 = _adam_constants(lr, upto)
            total, step = nb._ncf_epoch(
                items, batch_size, neumf, loss == "bpr", float(reg), model.item_gmf.embedding_dim,
                w0, st0, h0, w1, st1, h1, x, xm, xv, step, step_size, inv_bc2, BETAS[0],
                BETAS[1], EPS, tol)
            last = total / max(items.shape[0], 1)
        step_size, inv_bc2 = _adam_constants(lr, step)
        for w, st in ((w0, st0), (w1, st1)):
            if w.shape[0]:
                nb._ncf_flush(w, st, step, step_size, inv_bc2, BETAS[0], BETAS[1], EPS, tol)
        offset = 0
        for p in small:
            p.copy_(torch.from_numpy(x[offset:offset + p.numel()]).view_as(p).to(dtype))
            offset += p.numel()
    return last
