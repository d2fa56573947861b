"""Optimizers for tables trained with sparse gradients.

``DeferredAdam`` is ``torch.optim.Adam`` (no weight decay, no amsgrad) whose zero-gradient steps
are deferred. Adam keeps moving an entry after its gradient stops (``m <- b1 m``, ``v <- b2 v``
and an update every step), so a dense Adam step touches the whole table even when a batch used
a few rows. Here a step touches only the rows in the (sparse) gradient: each row remembers the
last step it reached, and the steps it missed are replayed, in order and with their own bias
corrections, when the row is next stepped, caught up (``catch_up``) or at ``flush()``. Given the
same gradients, every parameter then equals what ``torch.optim.Adam`` would hold after the same
steps, up to float rounding (the kernels evaluate torch's formula, ``p -= lr / (1 - b1^k) * m /
(sqrt(v) / sqrt(1 - b2^k) + eps)``, with the per-step constants in float64). In training the
gradients come from a forward that reads the rows: a row read with steps pending is read without
them, and the trajectory is no longer Adam's. ``track(module)`` catches up the rows each forward
of an embedding module reads before it reads them, which makes training equal Adam's.

A step costs ``O(rows used x (d + steps missed))`` instead of ``O(table)``; the numba kernel
replays the missed steps of an element in closed form (a series in ``eps / sqrt(v)``, exact to
the dtype's rounding; see ``fastfair.kernels.numba_backend``), which makes it ``O(rows used x
d)`` except for elements whose ``v`` is too small for the series. Parameters whose
gradient is dense are treated as fully used (plain Adam). Give it the sparse-gradient tables
(``torch.nn.Embedding(sparse=True)``, ``fastfair.nn.HashedEmbedding(sparse=True)``) and the rest
of the model to ``torch.optim.Adam``; call ``flush()`` before reading or sending the tables.
Like ``torch.optim.Adam`` it does not check gradients: a NaN or Inf propagates into the rows it
touches (``fastfair.fl.runner`` rejects such updates).

``ScatterAdam`` is ``torch.optim.Adam`` that also takes sparse gradients: every entry still
moves every step (the same update as Adam's), but a sparse gradient is scattered into the moments
by one kernel and never made dense, so a step holds nothing of the parameter's size beyond the
parameter and its moments. Dense-gradient parameters step with torch's Adam itself, and the state
and ``state_dict`` are ``torch.optim.Adam``'s (a checkpoint of one loads into the other). It is
for tables too small for ``DeferredAdam``'s extra 4 bytes per row to pay: the tables of the
devices with the least memory.

``LazyAdam`` is ``torch.optim.SparseAdam``'s rule (only the rows in the gradient move, their
moments included; bias corrections from the parameter's own step count) run by one fused kernel
per parameter instead of SparseAdam's chain of sparse-masked tensor ops. It is what
``fastfair.nn.LSHOutputLayer`` trains with: inactive neurons keep their weights and moments.
"""
from __future__ import annotations

import functools
import math

import torch

from .kernels import backends
from .kernels import reference
from .kernels.functional import hash_index


def _check_row_sparse(p) -> None:
    """A sparse gradient must be row-sparse (one sparse dimension, what
    ``torch.nn.Embedding(sparse=True)`` and ``HashedEmbedding(sparse=True)`` give): the kernels
    take whole rows."""
    if p.grad.sparse_dim() != 1:
        raise ValueError(f"sparse gradients must have one sparse dimension (rows), got "
                         f"sparse_dim={p.grad.sparse_dim()} for a parameter of shape "
                         f"{tuple(p.shape)}")


def _closure_loss(closure):
    """The loss ``closure`` returns, evaluated with gradients on as torch's optimizers do (None
    without a closure)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class _RowAdam(torch.optim.Optimizer):
    """What the Adam variants below share: checked hyperparameters, float parameters seen as
    ``[rows, w]``, each parameter's gradient as (rows, their values), and the step loop, which
    hands every parameter with a gradient to ``_update(group, p)``."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 backend: str = "auto"):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        backends.check_name(backend)
        super().__init__(params, dict(lr=float(lr), betas=tuple(map(float, betas)),
                                      eps=float(eps), backend=backend))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in (torch.float32, torch.float64):
                    raise TypeError(f"{type(self).__name__} needs float32 or float64 "
                                    f"parameters, got {p.dtype}")

    @staticmethod
    def _rows(t):
        return t.reshape(t.shape[0] if t.dim() else 1, -1)

    def _moments(self, p) -> dict:
        """``p``'s state, with zero moments on first use."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state

    def _sparse_rows(self, group, p):
        """The distinct rows of ``p``'s sparse gradient and their summed values ``[rows, w]``."""
        grad = p.grad.coalesce()
        values = grad.values()
        return grad.indices()[0], values.reshape(values.shape[0], -1)

    def _grad_rows(self, group, p):
        """The rows of ``p.grad`` and their values ``[rows, w]`` (every row of a dense one)."""
        if p.grad.is_sparse:
            _check_row_sparse(p)
            return self._sparse_rows(group, p)
        return torch.arange(self._rows(p).shape[0], device=p.device), self._rows(p.grad)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(group, p)
        return loss


@functools.lru_cache(maxsize=16)
def _adam_constants(lr: float, b1: float, b2: float, length: int, device: str, dtype):
    k = torch.arange(length, dtype=torch.float64)
    k[0] = 1  # index 0 is never used; keeps the division finite
    step_size = lr / (1 - b1 ** k)
    inv_bc2_sqrt = 1 / torch.sqrt(1 - b2 ** k)
    return step_size.to(device, dtype), inv_bc2_sqrt.to(device, dtype)


class DeferredAdam(_RowAdam):
    """Adam with deferred zero-gradient steps (see the module doc)."""

    def _state(self, p):
        state = self._moments(p)
        if "last" not in state:
            # int32: 4 bytes per row on top of Adam's 8 (a hashed array's row is one entry)
            state["last"] = torch.zeros(self._rows(p).shape[0], dtype=torch.int32,
                                        device=p.device)
        return state

    @staticmethod
    def _constants(group, upto: int, device, dtype=torch.float64):
        """``step_size[k]`` and ``inv_bc2_sqrt[k]`` for ``k <= upto`` (the kernels only read
        them). Tables are kept per setting, a power-of-two length at a time: each step would
        otherwise rebuild ``upto + 1`` entries."""
        b1, b2 = group["betas"]
        length = max(64, 1 << upto.bit_length())
        step_size, inv = _adam_constants(group["lr"], b1, b2, length, str(device), dtype)
        return step_size[:upto + 1], inv[:upto + 1]

    @staticmethod
    def _backend(group, device):
        """The backend module for ``device``, and its deferred-Adam kernel (the reference's
        where it has none)."""
        mod = backends.resolve(group["backend"], device)
        return mod, getattr(mod, "deferred_adam", reference.deferred_adam)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts every state tensor but "step" to the parameter's dtype; "last" counts steps.
        for state in self.state.values():
            if "last" in state:
                state["last"] = state["last"].to(torch.int32)

    def _sparse_rows(self, group, p):
        # The backend's one-pass dedupe (no sort; "last" serves as marks) where it has one.
        coalesce = getattr(self._backend(group, p.device)[0], "coalesce_rows", None)
        if coalesce is None or p.grad.is_coalesced():
            return super()._sparse_rows(group, p)
        values = p.grad._values()
        return coalesce(p.grad._indices()[0].contiguous(),
                        values.reshape(values.shape[0], -1).contiguous(), self._state(p)["last"])

    def _update(self, group, p) -> None:
        b1, b2 = group["betas"]
        state = self._state(p)
        t = state["step"]
        kernel = self._backend(group, p.device)[1]
        rows, values = self._grad_rows(group, p)
        step_size, inv = self._constants(group, t + 1, p.device)
        kernel(
            self._rows(p.data), self._rows(state["exp_avg"]),
            self._rows(state["exp_avg_sq"]), state["last"], rows,
            values.to(p.dtype).contiguous(), t, step_size, inv, b1, b2, group["eps"])
        state["step"] = t + 1

    def _replay(self, group, p, state, rows) -> None:
        """Replay the pending zero-gradient steps of ``p``'s ``rows`` (each with
        ``0 < last < step``) up to the current step."""
        if rows.numel() == 0:
            return
        b1, b2 = group["betas"]
        t = state["step"]
        step_size, inv = self._constants(group, t, p.device)
        self._backend(group, p.device)[1](
            self._rows(p.data), self._rows(state["exp_avg"]), self._rows(state["exp_avg_sq"]),
            state["last"], rows, None, t, step_size, inv, b1, b2, group["eps"])

    @torch.no_grad()
    def catch_up(self, p, rows) -> None:
        """Take the pending zero-gradient steps of rows ``rows`` (distinct, along ``p``'s first
        dimension) now, so that reading them gives ``torch.optim.Adam``'s values."""
        state = self.state.get(p)
        if not state or rows.numel() == 0:
            return
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        last = state["last"][rows]
        self._replay(group, p, state, rows[(last > 0) & (last < state["step"])])

    def track(self, module):
        """Catch up, before each forward of ``module`` (a ``torch.nn.Embedding``,
        ``fastfair.nn.HashedEmbedding`` or ``HashedEmbeddingBag`` whose ``weight`` this optimizer
        steps), the rows of ``weight`` that forward reads. Returns the hook's handle
        (``handle.remove()`` stops it)."""
        weight = getattr(module, "weight", None)
        if not any(weight is q for g in self.param_groups for q in g["params"]):
            raise ValueError(f"track: this optimizer does not step {type(module).__name__}'s "
                             "weight")
        spec = getattr(module, "spec", None)
        if spec is None and weight.dim() != 2:
            raise ValueError("track: expected an embedding module (a 2-D weight, or a hashed "
                             f"module with a spec), got {type(module).__name__}")

        def before_forward(mod, args):
            ids = args[0].detach().reshape(-1).unique()
            if spec is not None:
                ids = hash_index(ids, spec, mod.backend)[0].reshape(-1).unique()
            self.catch_up(weight, ids)

        return module.register_forward_pre_hook(before_forward)

    @torch.no_grad()
    def flush(self) -> None:
        """Replay every deferred step, so the parameters hold plain Adam's values."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                last = state["last"]
                # Rows never used have zero moments: their deferred steps move nothing.
                self._replay(group, p, state,
                             torch.nonzero((last > 0) & (last < state["step"])).flatten())


class ScatterAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (``lr``, ``betas``, ``eps``, ``fused``) that also takes sparse
    gradients (see the module doc); ``backend`` runs the sparse steps."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 fused=None, backend: str = "auto"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, fused=fused)
        backends.check_name(backend)
        self.backend = backend  # not a group option: the state_dict stays torch's

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        sparse = [(group, p) for group in self.param_groups for p in group["params"]
                  if p.grad is not None and p.grad.is_sparse]
        for _, p in sparse:  # before anything moves
            _check_row_sparse(p)
        grads = [p.grad for _, p in sparse]
        for _, p in sparse:
            p.grad = None  # torch's Adam refuses sparse gradients: it steps the dense ones
        try:
            super().step()
        finally:
            for (_, p), g in zip(sparse, grads):
                p.grad = g
        for group, p in sparse:
            self._sparse_step(group, p)
        return loss

    def _sparse_step(self, group, p) -> None:
        b1, b2 = group["betas"]
        state = self.state[p]
        if not state:  # the state torch's Adam creates
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = float(state["step"])
        grad = p.grad.coalesce()
        values = grad.values()
        mod = backends.resolve(self.backend, p.device)
        kernel = getattr(mod, "scatter_adam", reference.scatter_adam)
        kernel(_RowAdam._rows(p.data), _RowAdam._rows(state["exp_avg"]),
               _RowAdam._rows(state["exp_avg_sq"]), grad.indices()[0],
               values.reshape(values.shape[0], -1).to(p.dtype).contiguous(),
               group["lr"] / (1 - b1 ** t), 1 / math.sqrt(1 - b2 ** t), b1, b2, group["eps"])


class LazyAdam(_RowAdam):
    """``torch.optim.SparseAdam``'s update (see the module doc), fused; also takes dense
    gradients (every row moves, as in SparseAdam given a gradient with every row)."""

    def _update(self, group, p) -> None:
        b1, b2 = group["betas"]
        rows, values = self._grad_rows(group, p)
        if rows.numel() == 0:
            return
        state = self._moments(p)
        state["step"] += 1
        t = state["step"]
        step_size = group["lr"] * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        mod = backends.resolve(group["backend"], p.device)
        kernel = getattr(mod, "lazy_adam", reference.lazy_adam)
        kernel(self._rows(p.data), self._rows(state["exp_avg"]),
               self._rows(state["exp_avg_sq"]), rows, values.to(p.dtype).contiguous(),
               step_size, b1, b2, group["eps"])
