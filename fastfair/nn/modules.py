"""Drop-in hashed replacements for ``torch.nn.Embedding`` and ``torch.nn.EmbeddingBag``.

The module holds a 1-D array ``weight`` of ``memory_size`` parameters and represents the virtual
``num_embeddings x embedding_dim`` table ``V[i, k] = g(i, k) weight[idx(i, k)]`` (see
``fastfair.HashSpec``); nothing of the virtual table's size is allocated by forward or backward.

Sizing: give exactly one of ``compression`` (fraction of ``num_embeddings * embedding_dim``; the
size is ``fastfair.nested_size(compression * n * d, chunk_size)``: within 0.4% of the request and
collapsible by large powers of two) or ``memory_size`` (used as is; a multiple of ``chunk_size``).

Every constructor argument of the torch counterpart is accepted (by keyword) and either works as
in torch or raises saying why:

* ``sparse=True``: ``weight.grad`` is an uncoalesced sparse COO ``[memory_size]`` tensor with
  one entry per (non-padding element, column) of the batch, for ``torch.optim.SGD`` and
  ``torch.optim.SparseAdam`` (which then updates only the slots the batch touched).
* ``scale_grad_by_freq=True``: each element's contribution to the weight's gradient is divided
  by how often its index occurs in the batch (in bags), as torch documents; also with
  ``sparse=True``, which torch refuses.
* ``_weight``: a 1-D ``[memory_size]`` tensor becomes ``weight`` itself (as torch wraps the
  tensor it is given), or a dense ``[num_embeddings, embedding_dim]`` table is replaced by its
  least-squares fit (``fastfair.project_dense``). ``weight`` takes ``_weight``'s dtype and
  device; a ``dtype=``/``device=`` that disagrees raises. ``_freeze`` (``HashedEmbedding``) as in
  torch.
* ``max_norm`` raises: torch renormalises each looked-up row in place, but a hashed row shares
  its slots with other rows (and may hit one slot twice), so rescaling it would change rows that
  were never looked up. ``norm_type`` only matters with ``max_norm`` (as in torch).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..kernels import backends
from ..kernels import functional as F
from ..kernels.hashing import HASH_VERSION

_SPEC_FIELDS = ("num_embeddings", "embedding_dim", "memory_size", "chunk_size", "seed", "signed")


def _check_max_norm(max_norm, norm_type) -> float:
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
        raise TypeError(f"norm_type must be a number, got {norm_type!r}")
    if max_norm is not None:
        raise ValueError(
            f"max_norm={max_norm!r} is not supported by hashed embeddings: torch renormalises "
            "each looked-up row in place, but a hashed row shares its slots with other rows, so "
            "rescaling it would change rows that were never looked up; leave max_norm=None")
    return float(norm_type)


class _Hashed(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, *, compression=None,
                 memory_size=None, chunk_size: int = 1, signed: bool = True, seed: int = 0,
                 padding_idx: Optional[int] = None, max_norm: Optional[float] = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False,
                 _weight: Optional[Tensor] = None, backend: str = "auto", validate: bool = True,
                 dtype=None, device=None):
        super().__init__()
        if (compression is None) == (memory_size is None):
            raise ValueError("give exactly one of compression= or memory_size= "
                             f"(got compression={compression!r}, memory_size={memory_size!r})")
        if compression is not None:
            spec = F.HashSpec.from_compression(num_embeddings, embedding_dim, compression,
                                               chunk_size, seed, signed)
        else:
            spec = F.HashSpec(num_embeddings, embedding_dim, memory_size, chunk_size, seed, signed)
        self._set_spec(spec)
        self.padding_idx = None if padding_idx is None else F._padding(padding_idx,
                                                                       spec.num_embeddings)
        self.max_norm = None
        self.norm_type = _check_max_norm(max_norm, norm_type)
        self.scale_grad_by_freq = F._flag("scale_grad_by_freq", scale_grad_by_freq)
        self.sparse = F._flag("sparse", sparse)
        self.backend = backends.check_name(backend)
        self.validate = bool(validate)
        if _weight is None:
            dtype = torch.get_default_dtype() if dtype is None else dtype
            if dtype not in F.FLOAT_DTYPES:
                raise TypeError(f"dtype must be float32 or float64, got {dtype}")
            self.weight = nn.Parameter(torch.empty(spec.memory_size, dtype=dtype, device=device))
            self.reset_parameters()
        else:
            self.weight = nn.Parameter(self._initial_array(_weight, dtype, device))

    def _initial_array(self, given, dtype, device) -> Tensor:
        """``_weight`` as the array: itself if 1-D, its least-squares fit if a dense table."""
        if not isinstance(given, Tensor):
            raise TypeError(f"_weight must be a Tensor, got {type(given).__name__}")
        if given.dtype not in F.FLOAT_DTYPES:
            raise TypeError(f"_weight must be float32 or float64, got {given.dtype}")
        if dtype is not None and dtype != given.dtype:
            raise ValueError(f"dtype={dtype} disagrees with _weight's dtype {given.dtype}; the "
                             "weight takes _weight's dtype (leave dtype=None or convert _weight)")
        if device is not None and torch.device(device) != given.device:
            raise ValueError(f"device={device} disagrees with _weight's device {given.device}; "
                             "the weight takes _weight's device")
        dense = (self.num_embeddings, self.embedding_dim)
        if given.dim() == 1 and given.shape[0] == self.memory_size:
            return given
        if tuple(given.shape) == dense:
            return F.project_dense(given.detach(), self.spec, backend=self.backend)
        raise ValueError(f"_weight must be the 1-D array [memory_size={self.memory_size}] or a "
                         f"dense table {list(dense)} to fit, got shape {list(given.shape)}")

    def _set_spec(self, spec: F.HashSpec) -> None:
        self.spec = spec
        for name in _SPEC_FIELDS:
            setattr(self, name, getattr(spec, name))

    @property
    def compression(self) -> float:
        return self.spec.compression

    def reset_parameters(self) -> None:
        """``weight ~ N(0, 1)``, so every virtual entry is N(0, 1) as in ``torch.nn.Embedding``."""
        nn.init.normal_(self.weight)

    def virtual_weight(self) -> Tensor:
        """The dense ``[num_embeddings, embedding_dim]`` table this module represents."""
        return F.expand_dense(self.weight, self.spec, self.backend)

    def _like(self, spec: F.HashSpec, weight: Tensor):
        clone = self.__class__.__new__(self.__class__)
        nn.Module.__init__(clone)
        for k, v in self.__dict__.items():
            if not k.startswith("_"):
                clone.__dict__[k] = v
        clone._set_spec(spec)
        clone.weight = nn.Parameter(weight.detach().clone(),
                                    requires_grad=self.weight.requires_grad)
        return clone

    def collapse(self, factor: int):
        """A module ``factor`` times smaller whose table is the least-squares projection of this
        one onto the smaller (nested) subspace: the count-weighted fold of ``weight``."""
        spec = self.spec.collapse(factor)
        counts = F.slot_counts(self.spec, self.weight.device, self.backend)
        return self._like(spec, F.fold(self.weight.detach(), factor, counts, self.backend))

    def expand(self, factor: int):
        """A module ``factor`` times bigger representing exactly the same table (tiled weight)."""
        spec = self.spec.expand(factor)
        return self._like(spec, F.tile(self.weight.detach(), factor, self.backend))

    def load_dense(self, dense: Tensor) -> None:
        """Set ``weight`` to the least-squares fit of a dense table (``fastfair.project_dense``)."""
        with torch.no_grad():
            self.weight.copy_(F.project_dense(dense.to(self.weight), self.spec,
                                              backend=self.backend))

    @classmethod
    def from_pretrained(cls, embeddings: Tensor, freeze: bool = True, **kwargs):
        """A module whose table is the least-squares fit of ``embeddings`` (``n x d``); keyword
        arguments as for the constructor (one of ``compression``/``memory_size`` is required)."""
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
            raise ValueError("embeddings must be a 2-D Tensor")
        kwargs.setdefault("dtype", embeddings.dtype)
        kwargs.setdefault("device", embeddings.device)
        module = cls(embeddings.shape[0], embeddings.shape[1], **kwargs)
        module.load_dense(embeddings)
        module.weight.requires_grad_(not freeze)
        return module

    # The hash configuration travels with the weights: loading an array into a module that
    # hashes differently would silently scramble the table.
    def get_extra_state(self):
        return {"hash_version": HASH_VERSION, **{k: getattr(self.spec, k) for k in _SPEC_FIELDS}}

    def set_extra_state(self, state) -> None:
        mine = self.get_extra_state()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            parts = ", ".join(f"{k}: checkpoint {a!r} vs module {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"checkpoint was saved with a different hash configuration ({parts})")

    def _extra_repr_common(self) -> str:
        s = (f"{self.num_embeddings}, {self.embedding_dim}, memory_size={self.memory_size} "
             f"(compression={self.compression:.3g}), chunk_size={self.chunk_size}, "
             f"seed={self.seed}")
        if not self.signed:
            s += ", signed=False"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.scale_grad_by_freq:
            s += ", scale_grad_by_freq=True"
        if self.sparse:
            s += ", sparse=True"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


class HashedEmbedding(_Hashed):
    """``torch.nn.Embedding`` over a hashed virtual table.

    ``forward(input)``: ``input`` int64 or int32 of any shape -> ``[*input.shape, embedding_dim]``,
    ``out[..., k] = g(i, k) weight[idx(i, k)]``; ``padding_idx`` rows are zeros with no gradient.
    ``_freeze=True`` (as in torch) makes ``weight`` not require a gradient.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, _freeze: bool = False,
                 **kwargs):
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.weight.requires_grad_(not F._flag("_freeze", _freeze))

    def forward(self, input: Tensor) -> Tensor:
        return F.embedding(input, self.weight, self.spec, self.padding_idx, self.backend,
                           self.validate, self.sparse, self.scale_grad_by_freq)

    def extra_repr(self) -> str:
        return self._extra_repr_common()


class HashedEmbeddingBag(_Hashed):
    """``torch.nn.EmbeddingBag`` over a hashed virtual table (same forward semantics).

    ``forward(input, offsets=None, per_sample_weights=None)``: bags of rows reduced by ``mode``
    ("sum" or "mean", default "mean" as in torch): ``out[b] = sum_j a_j V[input[j]]`` over the bag,
    divided by its non-padding count for "mean"; empty bags give zeros.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, mode: str = "mean",
                 include_last_offset: bool = False, **kwargs):
        F._check_mode(mode)
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.mode = mode
        self.include_last_offset = bool(include_last_offset)

    def forward(self, input: Tensor, offsets: Optional[Tensor] = None,
                per_sample_weights: Optional[Tensor] = None) -> Tensor:
        return F.embedding_bag(input, self.weight, self.spec, offsets, self.mode,
                               per_sample_weights, self.include_last_offset, self.padding_idx,
                               self.backend, self.validate, self.sparse, self.scale_grad_by_freq)

    def extra_repr(self) -> str:
        s = self._extra_repr_common() + f", mode={self.mode!r}"
        if self.include_last_offset:
            s += ", include_last_offset=True"
        return s
