"""``HashedEmbeddingBagCollection``: TorchRec's ``EmbeddingBagCollection`` over hashed arrays.

It takes the same ``EmbeddingBagConfig`` list, ``is_weighted`` and ``device`` as
``torchrec.EmbeddingBagCollection``, plus the hashing settings, and has its interface
(``forward(KeyedJaggedTensor) -> KeyedTensor`` keyed by the embedding names, i.e. the feature
names, ``feature@table`` for a feature shared by two tables; ``embedding_bag_configs()``;
``is_weighted()``), so swapping it in is a one-line change. For feature ``f`` of table ``t`` and
batch row ``b`` the output is TorchRec's pooled bag over the virtual table ``V_t``:

    out[f][b] = sum_{j in bag(f, b)} a_j V_t[i_j]        (SUM; MEAN divides by the bag's length)

with ``a_j`` the KJT's weights when ``is_weighted`` else 1, and empty bags giving zeros.

Two layouts:

* ``batched=True`` (default): **one** 1-D array ``weight`` holds every table. Tables of one
  ``(embedding_dim, pooling)`` group are stacked into one virtual table of ``sum n_t`` rows (table
  ``t``'s row ``i`` is row ``offset_t + i``), hashed by one ``HashSpec`` of seed ``seed + g`` for
  group ``g``; all groups address the same array. A forward is one ``fastfair.embedding_bag``
  launch per group over all of the group's features and bags (one launch when, as usual, all
  tables share their dimension and pooling). Rows of different tables get independent hash
  values, so tables do not collide more than rows of one table do. Size:
  ``nested_size(compression * sum_t n_t d_t, chunk_size)`` or ``memory_size``.
* ``batched=False``: one ``fastfair.nn.HashedEmbeddingBag`` per table (``embedding_bags[name]``),
  seed ``seed + t``, sized by ``compression`` or a ``memory_size`` dict ``{table name: size}``;
  one launch per table.

Initialisation: per table, its config's ``init_fn`` on its array (TorchRec's default is
``U(weight_init_min, weight_init_max)``). In the batched layout a slot is shared by all tables,
so the array is drawn from ``U(c - a, c + a)`` with ``c`` and ``a^2`` the means of the tables'
``(min + max) / 2`` and ``((max - min) / 2)^2`` weighted by ``n_t d_t`` (exactly the table's
uniform for a single table; a custom ``init_fn`` is not used there). With ``signed=True`` a virtual
entry is ``+-`` a slot, so a non-centred range is symmetrised.

An unsharded module: under ``torchrec.distributed.DistributedModelParallel`` (or DDP) it is
replicated and its arrays' gradients all-reduced like any dense parameter, which suits arrays
``1 / compression`` times smaller than the tables. Float32 tables only; KJTs whose features have
different batch sizes (variable batch, ``variable_stride_per_key``) are refused.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor, nn

try:
    from torchrec.modules.embedding_configs import (DataType, EmbeddingBagConfig, PoolingType,
                                                    pooling_type_to_str)
    from torchrec.modules.embedding_modules import (EmbeddingBagCollectionInterface,
                                                    get_embedding_names_by_table)
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
except (ImportError, OSError) as err:  # pragma: no cover - exercised only without torchrec
    # FBGEMM raises OSError when its kernels were built against another torch.
    raise ImportError(
        "fastfair.integrations.torchrec needs TorchRec and FBGEMM's CPU build, e.g. "
        "pip install --no-deps torchrec==1.9.2 fbgemm-gpu-cpu==1.8.0 (with torch 2.13; see "
        f"docs/integrations.md for the versions that load): {err}") from err

from ..kernels import backends
from ..kernels import functional as F
from ..kernels.hashing import HASH_VERSION
from ..nn import HashedEmbeddingBag

__all__ = ["HashedEmbeddingBagCollection"]


@dataclasses.dataclass(frozen=True)
class _Group:
    """Tables hashed together: their features in launch order, each with its table's row
    offset and size in the group's virtual table."""

    spec: F.HashSpec
    mode: str
    tables: tuple       # table names
    features: tuple     # (feature name, embedding name, row offset, table rows) per launch slot


class HashedEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """``torchrec.EmbeddingBagCollection`` over hashed arrays (see the module doc).

    Give exactly one of ``compression`` (fraction of the tables' ``n d`` kept, in (0, 1]) or
    ``memory_size`` (batched: the array's size; per table: ``{table name: size}``).
    ``chunk_size``, ``seed``, ``signed``, ``backend``, ``validate`` as for
    ``fastfair.nn.HashedEmbeddingBag``; ``validate`` also checks every id against its own
    table's size (in the batched layout an id past its table would read the next table).
    """

    def __init__(self, tables: List[EmbeddingBagConfig], is_weighted: bool = False,
                 device: Optional[torch.device] = None, *, compression: Optional[float] = None,
                 memory_size: Union[None, int, Dict[str, int]] = None, chunk_size: int = 1,
                 seed: int = 0, signed: bool = True, batched: bool = True,
                 backend: str = "auto", validate: bool = True):
        super().__init__()
        self._check_tables(tables)
        for name, value in (("is_weighted", is_weighted), ("batched", batched),
                            ("signed", signed), ("validate", validate)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if (compression is None) == (memory_size is None):
            raise ValueError("give exactly one of compression= or memory_size= (got "
                             f"compression={compression!r}, memory_size={memory_size!r})")
        if is_weighted:
            mean = [t.name for t in tables if t.pooling != PoolingType.SUM]
            if mean:
                raise ValueError(f"is_weighted needs SUM pooling (per-sample weights are only "
                                 f"defined for sums, as in torch); tables {mean} are not")
        self._is_weighted = is_weighted
        self._embedding_bag_configs = tables
        self.batched, self.backend, self.validate = batched, backends.check_name(backend), validate
        self.chunk_size, self.seed, self.signed = chunk_size, seed, signed
        names = get_embedding_names_by_table(tables)
        self._embedding_names: List[str] = [n for per_table in names for n in per_table]
        self._lengths_per_embedding: List[int] = [t.embedding_dim for t in tables
                                                  for _ in t.feature_names]
        if batched:
            self._groups = self._batched_groups(tables, names, compression, memory_size)
            size = self._groups[0].spec.memory_size
            self.weight = nn.Parameter(torch.empty(size, device=device))
            self.embedding_bags = None
        else:
            self.embedding_bags = self._per_table(tables, compression, memory_size, device)
            self._groups = tuple(
                _Group(self.embedding_bags[t.name].spec, pooling_type_to_str(t.pooling),
                       (t.name,), tuple((f, e, 0, t.num_embeddings)
                                        for f, e in zip(t.feature_names, names[k])))
                for k, t in enumerate(tables))
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _check_tables(tables) -> None:
        if not isinstance(tables, (list, tuple)) or not tables:
            raise ValueError(f"tables must be a non-empty list of EmbeddingBagConfig, got "
                             f"{tables!r}")
        seen = set()
        for t in tables:
            if not isinstance(t, EmbeddingBagConfig):
                raise TypeError(f"every table must be a torchrec EmbeddingBagConfig, got "
                                f"{type(t).__name__}")
            if t.name in seen:
                raise ValueError(f"Duplicate table name {t.name!r}")
            seen.add(t.name)
            if t.data_type != DataType.FP32:
                raise TypeError(f"table {t.name!r}: data_type {t.data_type} is not supported "
                                "(float32 tables only)")
            if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise ValueError(f"table {t.name!r}: pooling {t.pooling} is not supported "
                                 "(SUM or MEAN)")
            if not t.feature_names:
                # TorchRec's own collection names the feature after the table.
                t.feature_names = [t.name]

    def _batched_groups(self, tables, names, compression, memory_size) -> tuple:
        virtual = sum(t.num_embeddings * t.embedding_dim for t in tables)
        if compression is not None:
            if isinstance(compression, bool) or not isinstance(compression, (int, float)) \
                    or not 0 < compression <= 1:
                raise ValueError(f"compression must be a number in (0, 1], got {compression!r}")
            size = F.nested_size(compression * virtual, self.chunk_size)
        else:
            if isinstance(memory_size, bool) or not isinstance(memory_size, int):
                raise TypeError(f"batched: memory_size must be an int (the one array's size), "
                                f"got {memory_size!r}")
            size = memory_size
        keys: list = []
        members: dict = {}
        for k, t in enumerate(tables):
            key = (t.embedding_dim, pooling_type_to_str(t.pooling))
            if key not in members:
                keys.append(key)
                members[key] = []
            members[key].append(k)
        groups = []
        for g, key in enumerate(keys):
            rows, features = 0, []
            for k in members[key]:
                t = tables[k]
                features += [(f, e, rows, t.num_embeddings)
                             for f, e in zip(t.feature_names, names[k])]
                rows += t.num_embeddings
            spec = F.HashSpec(rows, key[0], size, self.chunk_size, self.seed + g, self.signed)
            groups.append(_Group(spec, key[1], tuple(tables[k].name for k in members[key]),
                                 tuple(features)))
        return tuple(groups)

    def _per_table(self, tables, compression, memory_size, device) -> nn.ModuleDict:
        if memory_size is not None:
            if not isinstance(memory_size, dict) or set(memory_size) != {t.name for t in tables}:
                raise ValueError("batched=False: memory_size must be a dict with one size per "
                                 f"table name {[t.name for t in tables]}, got {memory_size!r}")
        bags = nn.ModuleDict()
        for k, t in enumerate(tables):
            size = {"compression": compression} if memory_size is None else \
                {"memory_size": memory_size[t.name]}
            bags[t.name] = HashedEmbeddingBag(
                t.num_embeddings, t.embedding_dim, mode=pooling_type_to_str(t.pooling),
                include_last_offset=True, chunk_size=self.chunk_size, seed=self.seed + k,
                signed=self.signed, backend=self.backend, validate=self.validate,
                device=device, **size)
        return bags

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the arrays as the module doc says."""
        if not self.batched:
            for t in self._embedding_bag_configs:
                t.init_fn(self.embedding_bags[t.name].weight)
            return
        if self.weight.device.type == "meta":
            return
        sizes = [t.num_embeddings * t.embedding_dim for t in self._embedding_bag_configs]
        lo = [t.get_weight_init_min() for t in self._embedding_bag_configs]
        hi = [t.get_weight_init_max() for t in self._embedding_bag_configs]
        total = sum(sizes)
        centre = sum(s * (a + b) / 2 for s, a, b in zip(sizes, lo, hi)) / total
        half = math.sqrt(sum(s * ((b - a) / 2) ** 2 for s, a, b in zip(sizes, lo, hi)) / total)
        self.weight.uniform_(centre - half, centre + half)

    # ------------------------------------------------------------------ TorchRec interface
    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self._array(self._groups[0]).device

    def specs(self) -> Dict[str, F.HashSpec]:
        """Each table's hash: its group's spec (batched: the stacked virtual table)."""
        return {name: g.spec for g in self._groups for name in g.tables}

    def _array(self, group: _Group) -> Tensor:
        return self.weight if self.batched else self.embedding_bags[group.tables[0]].weight

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(f"features must be a torchrec KeyedJaggedTensor, got "
                            f"{type(features).__name__}")
        if features.variable_stride_per_key():
            raise ValueError("KeyedJaggedTensors with a different batch size per feature "
                             "(variable_stride_per_key) are not supported")
        keys = features.keys()
        position = {k: i for i, k in enumerate(keys)}
        missing = sorted({f for g in self._groups for f, *_ in g.features} - set(position))
        if missing:
            raise ValueError(f"features {missing} are not in the KeyedJaggedTensor (keys "
                             f"{keys})")
        batch = features.stride()
        pooled = {}
        for group in self._groups:
            order = [position[f] for f, *_ in group.features]
            kjt = features if order == list(range(len(keys))) else features.permute(order)
            out = self._launch(group, kjt)
            for (_, name, _, _), rows in zip(group.features,
                                             out.view(len(group.features), batch, -1)):
                pooled[name] = rows
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._lengths_per_embedding,
                           values=torch.cat([pooled[n] for n in self._embedding_names], dim=1))

    def _launch(self, group: _Group, kjt: KeyedJaggedTensor) -> Tensor:
        """One ``embedding_bag`` over every bag of ``kjt``, whose keys are ``group.features``."""
        values = kjt.values()
        lengths = kjt.length_per_key()
        if len(group.tables) > 1 or self.validate:
            counts = torch.tensor(lengths, device=values.device)
            shift = torch.tensor([r for _, _, r, _ in group.features], device=values.device)
            if self.validate:
                self._check_ids(group, values, counts)
            values = values.long() + torch.repeat_interleave(shift, counts,
                                                             output_size=values.numel())
        weights = None
        if self._is_weighted:
            weights = kjt.weights_or_none()
            if weights is None:
                raise ValueError("is_weighted=True but the KeyedJaggedTensor has no weights")
        return F.embedding_bag(values, self._array(group), group.spec, kjt.offsets(),
                               group.mode, weights, include_last_offset=True,
                               backend=self.backend, validate=self.validate)

    @staticmethod
    def _check_ids(group: _Group, values: Tensor, counts: Tensor) -> None:
        limit = torch.tensor([n for *_, n in group.features], device=values.device)
        bad = (values < 0) | (values >= torch.repeat_interleave(limit, counts,
                                                                output_size=values.numel()))
        if bool(bad.any()):
            j = int(torch.nonzero(bad)[0, 0])
            k = int(torch.searchsorted(torch.cumsum(counts, 0), j, right=True))
            feature, _, _, rows = group.features[k]
            raise IndexError(f"feature {feature!r}: id {int(values[j])} is out of range for "
                             f"its table of {rows} rows")

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self):
        return {"hash_version": HASH_VERSION,
                "specs": {name: dataclasses.asdict(s) for name, s in self.specs().items()}}

    def set_extra_state(self, state) -> None:
        mine = self.get_extra_state()
        if state != mine:
            raise ValueError(f"checkpoint was saved with a different hash configuration: "
                             f"{state} vs this module's {mine}")

    def extra_repr(self) -> str:
        total = sum(self._array(g).numel() for g in
                    (self._groups[:1] if self.batched else self._groups))
        virtual = sum(t.num_embeddings * t.embedding_dim for t in self._embedding_bag_configs)
        return (f"tables={[t.name for t in self._embedding_bag_configs]}, "
                f"batched={self.batched}, parameters={total:,} of {virtual:,} "
                f"(compression={total / virtual:.3g}), launches={len(self._groups)}")
