"""``LSHOutputLayer``: a huge output layer that trains only the neurons a batch activates (PGHash).

The layer is ``z = x W^T + b`` with ``W [n, d]`` (``torch.nn.Linear``'s layout). In training, a
batch activates the set ``A`` of neurons whose hash codes collide with the batch's in some table
(``fastfair.kernels.lsh`` defines the selection: labels forced in, union of hit buckets table by
table, trimmed or padded to the budget ``m = floor(budget n)``); forward returns the logits of
``A`` only, ``[B, |A|]``, and backward touches only ``A``'s rows of ``W`` and ``b``. Every sample of
a batch sees the batch's whole active set (one dense ``[B, d] x [d, |A|]`` product, as the
reference code does). In eval mode forward returns the full logits; ``topk`` finds the best
``k`` neurons in chunks without materialising ``[B, n]``.

Hash families (``LSHFamily``; all parameters private, drawn from ``seed``):

* ``pg``: periodic Gaussian. Neurons are hashed from the sketch ``y_j = B w_j`` (``c`` =
  ``sketch_dim`` dims; ``(B w)_i = sum_t s_{i+tc} w_{i+tc}``, ``s`` random signs when
  ``signed_fold`` else 1) and table ``l``'s Gaussian ``S_l [k, c]``: ``code = bits(S_l y > 0)``.
  Queries fold ``x`` the same way, so this is SimHash under the periodic projection ``S_l B``.
  A device needs only the ``[n, c]`` sketch, ``d / c`` times smaller than ``W``.
* ``dwta``: ``c`` sampled coordinates (drawn once; each table's bins pick ``w`` of them), densified
  winner-take-all codes; a device needs ``W``'s ``c`` sampled columns.
* ``simhash``: full ``[k, d]`` Gaussians (the SLIDE-style baseline; ``pg`` with ``c = d``).
* ``random``: no hashing: the labels plus random neurons up to the budget (sampled softmax).

Tables are rebuilt from the current weights every ``rehash_every`` training steps and kept, or,
with ``serial=True``, generated one at a time from the sketch at every step, used and discarded
(stopping at the first table that fills the budget): peak memory one table plus the sketch instead
of ``L`` tables plus ``W``. Both give the same active set from the same weights.

Gradients: ``sparse=True`` (default) gives ``weight.grad`` and ``bias.grad`` as sparse COO tensors
of the active rows, for ``fastfair.optim.LazyAdam`` (or ``torch.optim.SparseAdam``, the same rule,
slower), so inactive neurons' optimizer state does not move (dense Adam would decay their moments and keep moving them, as the reference code does).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..kernels import backends, hashing, lsh
from ..kernels.functional import _int

HASHES = ("pg", "dwta", "simhash", "random")
_TABLE_SALT = 0x13198A2E
_SIGN_SALT = 0x03707344
_ROWS_SALT = 0xA4093822
_STEP_SALT = 0x299F31D0


def _gen(seed: int, salt: int, index: int = 0) -> torch.Generator:
    key = hashing.fmix32_int((hashing.fmix32_int(seed ^ salt) + index * hashing.GOLDEN)
                             & hashing.MASK32)
    return torch.Generator().manual_seed(key)


class LSHFamily:
    """The private hash functions of one device: ``tables`` tables of ``bits``-bit codes.

    ``source(W)`` is what the device needs of the weight to hash neurons (the ``[n, c]`` sketch,
    the sampled columns, or ``W`` itself for ``simhash``); ``codes(src, t0, t1)`` hashes neurons
    from it in tables ``t0..t1-1`` (int32 ``[t1 - t0, n]``); ``query(x, t0, t1)`` hashes a batch
    of hidden vectors (int32 ``[B, t1 - t0]``) with the same functions. Every parameter is a
    function of ``seed`` and the table's index, so a table can be regenerated alone."""

    def __init__(self, kind: str, in_features: int, *, sketch_dim: int = 8, bits: int = 8,
                 tables: int = 50, signed_fold: bool = False, seed: int = 0, dwta_width: int = 4,
                 backend: str = "auto"):
        if kind not in HASHES:
            raise ValueError(f"hash must be one of {HASHES}, got {kind!r}")
        self.kind = kind
        self.in_features = _int("in_features", in_features, 1)
        self.bits = _int("bits", bits, 1, lsh.MAX_BITS)
        if self.bits > lsh.MAX_TABLE_BITS and kind != "random":
            raise ValueError(f"bits={self.bits}: a table of more than {lsh.MAX_TABLE_BITS} bits "
                             f"would keep 2^bits bucket offsets")
        self.tables = _int("tables", tables, 1)
        self.seed = _int("seed", seed, 0, hashing.MAX_SEED - 1)
        self.backend = backends.check_name(backend)
        c = _int("sketch_dim", sketch_dim, 1)
        if kind in ("pg", "dwta") and c > self.in_features:
            raise ValueError(f"sketch_dim={c} exceeds in_features={self.in_features}")
        self.sketch_dim = self.in_features if kind == "simhash" else c
        self.signed_fold = bool(signed_fold) and kind == "pg"
        if signed_fold and kind != "pg":
            raise ValueError(f"signed_fold applies to hash='pg' only, got hash={kind!r}")
        self.width = _int("dwta_width", dwta_width, 2)
        if self.width & (self.width - 1):
            raise ValueError(f"dwta_width must be a power of two, got {self.width}")
        self.bins = -(-self.bits // (self.width.bit_length() - 1))
        self.signs = None
        if self.signed_fold:
            g = _gen(self.seed, _SIGN_SALT)
            self.signs = torch.randint(0, 2, (self.in_features,), generator=g).float() * 2 - 1
        self.rows = None
        if kind == "dwta":
            self.rows = torch.randperm(self.in_features, generator=_gen(self.seed, _ROWS_SALT))[:c]

    def _proj(self, t0: int, t1: int, dtype, device) -> Tensor:
        c = self.sketch_dim
        p = torch.stack([torch.randn(self.bits, c, generator=_gen(self.seed, _TABLE_SALT, t))
                         for t in range(t0, t1)])
        return p.to(device, dtype)

    def _bins(self, t0: int, t1: int, device) -> Tensor:
        c, w = self.sketch_dim, self.width
        out = []
        for t in range(t0, t1):
            g = _gen(self.seed, _TABLE_SALT, t)
            if w <= c:
                out.append(torch.stack([torch.randperm(c, generator=g)[:w]
                                        for _ in range(self.bins)]))
            else:
                out.append(torch.randint(0, c, (self.bins, w), generator=g))
        return torch.stack(out).to(device)

    def source_dim(self) -> int:
        return self.sketch_dim

    def source(self, weight: Tensor) -> Tensor:
        """What hashing the neurons needs of ``weight [n, d]``: ``[n, c]`` (``[n, d]`` for simhash)."""
        if self.kind == "pg":
            s = None if self.signs is None else self.signs.to(weight.device)
            return lsh.fold(weight, self.sketch_dim, s, backend=self.backend)
        if self.kind == "dwta":
            return weight[:, self.rows.to(weight.device)].contiguous()
        return weight

    def codes(self, src: Tensor, t0: int, t1: int) -> Tensor:
        """Codes of every neuron in tables ``t0..t1-1`` from ``source(W)``."""
        if self.kind in ("pg", "simhash"):
            return lsh.pg_codes(src, self._proj(t0, t1, src.dtype, src.device),
                                backend=self.backend)
        if self.kind == "dwta":
            rows = torch.arange(src.shape[1], device=src.device)
            return lsh.dwta_codes(src, rows, self._bins(t0, t1, src.device), self.bits, self.seed,
                                  backend=self.backend)
        raise ValueError("hash='random' has no tables")

    def query(self, x: Tensor, t0: int, t1: int) -> Tensor:
        """Codes ``[B, t1 - t0]`` of the hidden vectors ``x [B, d]``."""
        if self.kind in ("pg", "simhash"):
            s = None if self.signs is None else self.signs.to(x.device)
            codes = lsh.pg_codes(x, self._proj(t0, t1, x.dtype, x.device), s, backend=self.backend)
        elif self.kind == "dwta":
            codes = lsh.dwta_codes(x, self.rows.to(x.device), self._bins(t0, t1, x.device),
                                   self.bits, self.seed, backend=self.backend)
        else:
            raise ValueError("hash='random' has no tables")
        return codes.T.contiguous()

    def build(self, src: Tensor, t0: int = 0, t1: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """Buckets ``(offsets, members)`` of tables ``t0..t1-1`` (all by default)."""
        t1 = self.tables if t1 is None else t1
        return lsh.buckets(self.codes(src, t0, t1), self.bits, backend=self.backend)

    def config(self) -> dict:
        return {"hash": self.kind, "in_features": self.in_features, "sketch_dim": self.sketch_dim,
                "bits": self.bits, "tables": self.tables, "signed_fold": self.signed_fold,
                "seed": self.seed, "dwta_width": self.width}


def select(family: LSHFamily, x: Tensor, n: int, m: int, *, source: Optional[Tensor] = None,
           tables: Optional[tuple] = None, labels: Optional[Tensor] = None, seed: int = 0,
           backend: str = "auto") -> Tensor:
    """The sorted active set of a batch (``fastfair.kernels.lsh`` states the rule).

    Give either ``tables`` (prebuilt ``(offsets, members)`` for all tables) or ``source`` (then
    each table is built from it, used and discarded: serial mode). ``labels``: ids forced in."""
    aset = lsh.ActiveSet(n, m, seed, device=x.device, backend=backend)
    if labels is not None and labels.numel():
        aset.force(labels)
    if family.kind != "random" and not aset.full:
        if tables is not None:
            aset.add(family.query(x, 0, family.tables), *tables)
        elif source is not None:
            for t in range(family.tables):
                if aset.add(family.query(x, t, t + 1), *family.build(source, t, t + 1)):
                    break
        else:
            raise ValueError("select needs the prebuilt tables or the hash source")
    return aset.pad().ids()


class LSHOutput(NamedTuple):
    logits: Tensor   # [B, |A|]
    active: Tensor   # [|A|] sorted neuron ids


class LSHOutputLayer(nn.Module):
    """Output layer ``in_features -> out_features`` trained on LSH-selected neurons.

    Training ``forward(x, label_offsets, label_ids)`` returns ``LSHOutput(logits, active)``; the
    labels (CSR over the batch) are forced into the active set when ``force_labels``, and
    ``loss(out, label_offsets, label_ids)`` is the label-normalised softmax over ``active``. Eval
    ``forward(x)`` returns the full ``[B, n]`` logits; ``topk(x, k)`` the best ``k`` in chunks."""

    def __init__(self, in_features: int, out_features: int, *, hash: str = "pg",
                 sketch_dim: int = 8, bits: int = 8, tables: int = 50, budget: float = 1.0,
                 rehash_every: int = 1, force_labels: bool = True, signed_fold: bool = False,
                 seed: int = 0, bias: bool = True, sparse: bool = True, serial: bool = False,
                 dwta_width: int = 4, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.in_features = _int("in_features", in_features, 1)
        self.out_features = _int("out_features", out_features, 1, lsh.MAX_NEURONS)
        self.m = lsh.budget_size(budget, self.out_features)
        self.budget = float(budget)
        self.rehash_every = _int("rehash_every", rehash_every, 1)
        self.serial = bool(serial)
        if self.serial and self.rehash_every != 1:
            raise ValueError(f"serial=True rebuilds every table when it is used, so it needs "
                             f"rehash_every=1, got {self.rehash_every}")
        self.force_labels = bool(force_labels)
        self.sparse = bool(sparse)
        self.family = LSHFamily(hash, self.in_features, sketch_dim=sketch_dim, bits=bits,
                                tables=tables, signed_fold=signed_fold, seed=seed,
                                dwta_width=dwta_width, backend=backend)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, **kw))
        self.bias = nn.Parameter(torch.empty(self.out_features, **kw)) if bias else None
        self._tables: Optional[tuple] = None
        self.steps = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``torch.nn.Linear``'s initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self._tables = None

    @property
    def seed(self) -> int:
        return self.family.seed

    def rehash(self) -> None:
        """Rebuild every table from the current weights."""
        with torch.no_grad():
            self._tables = self.family.build(self.family.source(self.weight.detach()))

    def select(self, x: Tensor, label_ids: Optional[Tensor] = None) -> Tensor:
        """The batch's sorted active set; advances the rehash schedule."""
        n = self.out_features
        step_seed = hashing.fmix32_int((self.seed ^ _STEP_SALT) + self.steps * hashing.GOLDEN
                                       & hashing.MASK32)
        if self.m == n:
            active = torch.arange(n, device=x.device)
        else:
            labels = label_ids if self.force_labels else None
            with torch.no_grad():
                if self.family.kind == "random":
                    active = select(self.family, x, n, self.m, labels=labels, seed=step_seed,
                                    backend=self.family.backend)
                elif self.serial:
                    src = self.family.source(self.weight.detach())
                    active = select(self.family, x.detach(), n, self.m, source=src,
                                    labels=labels, seed=step_seed, backend=self.family.backend)
                else:
                    if self._tables is None or self.steps % self.rehash_every == 0:
                        self.rehash()
                    active = select(self.family, x.detach(), n, self.m, tables=self._tables,
                                    labels=labels, seed=step_seed, backend=self.family.backend)
        self.steps += 1
        return active

    def forward(self, x: Tensor, label_offsets: Optional[Tensor] = None,
                label_ids: Optional[Tensor] = None, *, active: Optional[Tensor] = None):
        """Eval: ``[B, n]`` logits. Training: ``LSHOutput`` over the batch's active set, or over
        ``active`` when given (sorted distinct ids, e.g. a federated device's selection)."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must be [batch, {self.in_features}], got {tuple(x.shape)}")
        if not self.training:
            return nn.functional.linear(x, self.weight, self.bias)
        if label_ids is not None:
            lsh._labels(label_offsets, label_ids, x.shape[0], self.out_features)
        if active is None:
            active = self.select(x, label_ids)
        return LSHOutput(lsh.lsh_linear(x, self.weight, self.bias, active, sparse=self.sparse),
                         active)

    def loss(self, out: LSHOutput, label_offsets: Tensor, label_ids: Tensor) -> Tensor:
        return lsh.softmax_loss(out.logits, out.active, label_offsets, label_ids,
                                backend=self.family.backend)

    @torch.no_grad()
    def topk(self, x: Tensor, k: int, chunk: int = 1 << 16) -> tuple[Tensor, Tensor]:
        """The ``k`` largest logits of every row of ``x`` and their neuron ids, computed over
        ``chunk`` neurons at a time (memory ``[B, chunk + k]``)."""
        k = _int("k", k, 1, self.out_features)
        chunk = _int("chunk", chunk, 1)
        B = x.shape[0]
        best_v = x.new_empty(B, 0)
        best_i = torch.empty(B, 0, dtype=torch.int64, device=x.device)
        for c0 in range(0, self.out_features, chunk):
            z = x @ self.weight[c0:c0 + chunk].T
            if self.bias is not None:
                z += self.bias[c0:c0 + chunk]
            ids = torch.arange(c0, c0 + z.shape[1], device=x.device).expand(B, -1)
            v, j = torch.topk(torch.cat([best_v, z], 1), min(k, best_v.shape[1] + z.shape[1]),
                              dim=1)
            best_v, best_i = v, torch.cat([best_i, ids], 1).gather(1, j)
        return best_v, best_i

    def get_extra_state(self):
        state = {**self.family.config(), "budget": self.budget, "steps": self.steps}
        if self._tables is not None:
            state["tables_offsets"], state["tables_members"] = self._tables
        return state

    def set_extra_state(self, state) -> None:
        mine = self.family.config()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            parts = ", ".join(f"{k}: checkpoint {a!r} vs module {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"checkpoint was saved with a different hash configuration ({parts})")
        self.steps = int(state["steps"])
        self._tables = ((state["tables_offsets"], state["tables_members"])
                        if "tables_offsets" in state else None)

    def extra_repr(self) -> str:
        f = self.family
        s = (f"in_features={self.in_features}, out_features={self.out_features}, hash={f.kind!r}, "
             f"budget={self.budget}")
        if f.kind != "random":
            s += f", sketch_dim={f.sketch_dim}, bits={f.bits}, tables={f.tables}"
            s += ", serial=True" if self.serial else f", rehash_every={self.rehash_every}"
        return s + f", seed={f.seed}"
