"""``replace_embeddings``: swap every ``torch.nn.Embedding`` / ``EmbeddingBag`` of a model for its
hashed equivalent in one call, and report the memory before and after.

Each replaced table keeps its module's configuration (``mode``, ``padding_idx``,
``include_last_offset``, ``sparse``, ``scale_grad_by_freq``, device, dtype, training mode and
whether its weight requires a gradient), so the model's forward is unchanged in signature and
semantics; only the table becomes the virtual table of a ``compression``-sized array. Build the
optimiser after replacing: the old weights are no longer parameters of the model.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from torch import nn

from ..kernels import backends
from ..kernels import functional as F
from .modules import HashedEmbedding, HashedEmbeddingBag

INITS = ("project", "random")
_TORCH_TABLES = {nn.Embedding: HashedEmbedding, nn.EmbeddingBag: HashedEmbeddingBag}


@dataclasses.dataclass(frozen=True)
class TableReport:
    """One embedding table of the model: its size, its parameter bytes before and after, and
    ``reason`` saying why it stayed dense (empty when it was replaced)."""

    name: str
    kind: str
    rows: int
    dim: int
    bytes_before: int
    bytes_after: int
    replaced: bool
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class ReplaceReport:
    """What ``replace_embeddings`` did, table by table, with totals over the embedding tables and
    over every parameter of the model (``model_bytes_*``)."""

    tables: tuple
    model_bytes_before: int
    model_bytes_after: int

    @property
    def bytes_before(self) -> int:
        return sum(t.bytes_before for t in self.tables)

    @property
    def bytes_after(self) -> int:
        return sum(t.bytes_after for t in self.tables)

    @property
    def replaced(self) -> list:
        return [t.name for t in self.tables if t.replaced]

    def __str__(self) -> str:
        lines = ["| table | kind | rows | dim | bytes before | bytes after | replaced |",
                 "|---|---|---|---|---|---|---|"]
        for t in self.tables:
            done = "yes" if t.replaced else f"no: {t.reason}"
            lines.append(f"| {t.name} | {t.kind} | {t.rows} | {t.dim} | {t.bytes_before} | "
                         f"{t.bytes_after} | {done} |")
        lines.append(f"| embeddings total | | | | {self.bytes_before} | {self.bytes_after} | |")
        lines.append(f"| model total | | | | {self.model_bytes_before} | "
                     f"{self.model_bytes_after} | |")
        return "\n".join(lines)


def _parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _hashed_twin(old: nn.Module, spec: F.HashSpec, init: str, sparse: Optional[bool],
                 backend: str, validate: bool) -> nn.Module:
    """The hashed module standing in for ``old``, configured as ``old`` and initialised."""
    weight = old.weight
    kwargs = dict(memory_size=spec.memory_size, chunk_size=spec.chunk_size, seed=spec.seed,
                  signed=spec.signed, padding_idx=old.padding_idx,
                  scale_grad_by_freq=old.scale_grad_by_freq,
                  sparse=old.sparse if sparse is None else sparse, backend=backend,
                  validate=validate, dtype=weight.dtype, device=weight.device)
    if isinstance(old, nn.EmbeddingBag):
        kwargs.update(mode=old.mode, include_last_offset=old.include_last_offset)
    new = _TORCH_TABLES[type(old)](spec.num_embeddings, spec.embedding_dim, **kwargs)
    if init == "project":
        new.load_dense(weight.detach())
    new.weight.requires_grad_(weight.requires_grad)
    new.train(old.training)
    return new


def replace_embeddings(model: nn.Module, *, compression: float, chunk_size: int = 1,
                       seed: int = 0, min_rows: int = 0, init: str = "project",
                       sparse: Optional[bool] = None, signed: bool = True,
                       backend: str = "auto", validate: bool = True) -> ReplaceReport:
    """Replace, in place, every ``torch.nn.Embedding`` and ``torch.nn.EmbeddingBag`` of ``model``
    with at least ``min_rows`` rows by a ``HashedEmbedding`` / ``HashedEmbeddingBag`` of
    ``memory_size = fastfair.nested_size(compression * rows * dim, chunk_size)`` parameters.

    ``init="project"``: the hashed array is the least-squares fit of the existing table
    (``fastfair.project_dense``), so the virtual table is the orthogonal projection of the dense
    one onto the hashed subspace (the dense table's own initialisation, shrunk by the averaging
    of about ``1 / compression`` entries per slot). ``init="random"``: a fresh ``N(0, 1)`` array,
    the default initialisation of torch's tables. Every table uses the same ``seed``; each has its
    own array, so they do not share slots. ``sparse=None`` keeps each table's ``sparse`` flag;
    ``True`` / ``False`` sets it for every hashed table (a hashed array is ``1 / compression``
    times smaller than its table, so a dense gradient and a fused dense optimiser step can cost
    less than the sparse gradient, which holds one entry per element and column of the batch).

    Tables of exactly torch's two types are replaced (a subclass may have its own forward and is
    left dense, with the reason in the report); a module reachable under several names is
    replaced once and stays shared. Everything is checked before anything is changed, so a
    ``ValueError`` / ``TypeError`` (naming the module) leaves the model as it was: ``max_norm``
    (see ``fastfair.nn.modules``) and dtypes other than float32/float64 cannot be hashed.

    Returns a ``ReplaceReport``: per table (replaced or kept) rows, dim, parameter bytes before
    and after, and totals.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, tuple(_TORCH_TABLES)):
        raise ValueError(f"model is itself a table ({type(model).__name__}): it cannot replace "
                         "itself in place; build a HashedEmbedding / HashedEmbeddingBag directly "
                         "or pass the model that holds the table")
    min_rows = F._int("min_rows", min_rows, 0)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    backends.check_name(backend)
    F._flag("signed", signed)
    F._flag("validate", validate)
    if sparse is not None:
        F._flag("sparse", sparse)
    # Validates compression, chunk_size and seed once, even for a model without tables.
    F.HashSpec.from_compression(1, 1, compression, chunk_size, seed, signed)

    bytes_before = _parameter_bytes(model)
    reports, plan, seen = [], [], {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, tuple(_TORCH_TABLES)):
            continue
        rows, dim = module.num_embeddings, module.embedding_dim
        size = module.weight.numel() * module.weight.element_size()
        kind = type(module).__name__
        parent_name, _, attr = name.rpartition(".")
        if id(module) in seen:  # a second name for a module already planned or kept
            if seen[id(module)] is not None:
                plan.append((parent_name, attr, seen[id(module)]))
            continue
        reason = ""
        if type(module) not in _TORCH_TABLES:
            base = "EmbeddingBag" if isinstance(module, nn.EmbeddingBag) else "Embedding"
            reason = f"{kind} subclasses torch.nn.{base} and may have its own forward"
        elif rows < min_rows:
            reason = f"{rows} rows < min_rows={min_rows}"
        if reason:
            seen[id(module)] = None
            reports.append(TableReport(name, kind, rows, dim, size, size, False, reason))
            continue
        if module.max_norm is not None:
            raise ValueError(f"{name}: max_norm={module.max_norm} cannot be hashed (a hashed row "
                             "shares its slots with other rows, so renormalising it in place "
                             "would change rows never looked up); set max_norm=None first")
        if module.weight.dtype not in F.FLOAT_DTYPES:
            raise TypeError(f"{name}: weight is {module.weight.dtype}; hashed tables hold float32 "
                            "or float64 (convert the module first)")
        spec = F.HashSpec.from_compression(rows, dim, compression, chunk_size, seed, signed)
        seen[id(module)] = (module, spec)
        plan.append((parent_name, attr, seen[id(module)]))
        reports.append(TableReport(name, kind, rows, dim, size,
                                   spec.memory_size * module.weight.element_size(), True))

    built = {}
    for parent_name, attr, (module, spec) in plan:
        if id(module) not in built:
            built[id(module)] = _hashed_twin(module, spec, init, sparse, backend, validate)
        setattr(model.get_submodule(parent_name), attr, built[id(module)])
    return ReplaceReport(tuple(reports), bytes_before, _parameter_bytes(model))
