"""Federated training of a recommender with heterogeneous item-table sizes (FAIR and baselines).

One client per user. The server keeps the global model: dense ``num_items x d`` item tables and
the shared head. A round samples ``K`` clients without replacement; each downloads its view of the
item tables, trains ``E`` local epochs on its own interactions, and uploads its tables and head.
A client's user vectors are private state: they stay on the client across rounds and are never
averaged or sent.

Views of an item table ``T`` for a device of capacity ``c`` (a fraction of ``n d``), by method:

* ``fedavg-full``: every device holds the dense table (the upper bound that ignores memory).
* ``exclusion``: only devices of full capacity are sampled; they hold the dense table.
* ``fair``: full-capacity devices hold the dense table, the others a hashed array of their tier's
  size; every hashed size divides the largest one ``M`` and all share one seed, so subspaces nest.
  Download is the least-squares projection ``w = project_dense(T)`` (with ``fit="energy"``, the
  fit weighted by each row's energy, see ``Config``); the server aggregates::

      T <- sum_{dense c} p_c T_c  +  expand_dense( aggregate([w_c], [p_c], M) )

  i.e. every hashed upload is tiled to ``M`` and summed in one pass, then expanded once: no
  per-client dense temporary beyond the one accumulator. With ``subspace="round"`` the shared
  seed is drawn afresh every round (``round_seed``), so the subspaces nest within a round and
  change between rounds.
* ``fair-inconsistent``: as ``fair`` but every device hashes with its own seed (the ablation), so
  each upload is expanded on its own.
* ``fedhm``: the device holds ``T ~ L R`` of rank ``r = floor(n d c / (n + d))`` (the same
  parameter count), downloaded as the truncated SVD ``L = U_r S_r^(1/2)``, ``R = S_r^(1/2) V_r^T``;
  the server adds ``p_c L_c R_c`` into the accumulator (one fused ``addmm``). Tiers with ``r = 0``
  cannot be represented: their devices sit out and ``unsupported`` names them.
* ``heterofl``: the device holds the first ``w = floor(d c)`` columns of ``T``; each column is
  averaged over the devices that hold it (weights renormalised per column), columns nobody
  uploaded keep their value. Tiers with ``w = 0`` sit out like FedHM's.

``p_c`` is proportional to the client's number of training interactions, over the clients whose
update arrived and passed the checks (see ``check_update``): a client drops out of a round with
probability ``dropout`` after its download, and an update with a missing or extra tensor, a wrong
shape or dtype, or a NaN/Inf is rejected and counted, never averaged in. The head is averaged with
the same weights.

``save``/``load`` checkpoint everything a later round depends on (global model, private user
vectors, persistent optimizer states, the random generator, counters), so a resumed run continues
bit-identically; checkpoints hold only tensors and plain containers and load with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import aggregate, expand_dense, project_dense, slot_counts
from ..kernels import hashing
from ..kernels.functional import HashSpec
from ..nn import HashedEmbedding
from ..optim import DeferredAdam, ScatterAdam
from . import fused, metrics, parallel, serve
from .data import InteractionData
from .compress import (COMPRESSORS, Compressor, Received, action_bits, doubling_grid,
                       reference_bits)
from .model import (ARCHS, HEAD_INITS, ClientModel, Head, LowRankEmbedding, SlicedEmbedding, score,
                    score_all_items)
from .profiles import cluster_flops, load_profile, train_flops
from .rounds import RoundRunner, check_tensors
from .tiers import Tier, assign_tiers, parse_tiers, tier_specs

METHODS = ("fair", "fedavg-full", "exclusion", "fedhm", "heterofl", "fair-inconsistent")
# Methods whose item tables are dense or hashed arrays, the views a compressor encodes.
COMPRESSIBLE = ("fair", "fair-inconsistent", "fedavg-full", "exclusion")
OPTIMIZERS = ("adam", "sgd")
OPTIMIZER_STATES = ("fresh", "persistent")
LOSSES = ("bpr", "bce")
ASSIGNMENTS = ("random", "activity", "id")
AGGREGATIONS = ("model", "delta", "item-mean", "nested")
WEIGHTINGS = ("data", "capacity")
NEGATIVE_SAMPLINGS = ("uniform", "unseen")
LOCAL_KERNELS = ("auto", "fused", "autograd")
FITS = ("plain", "energy")
SUBSPACES = ("fixed", "round")
# Methods that give some device a hashed array (fedavg-full and exclusion only with
# full_table="hashed"): the views ``fit`` applies to.
HASHED_METHODS = ("fair", "fair-inconsistent")
# The value of ``Config.user_step`` that makes each client's step its share of the round's data.
DATA_STEP = "data"
# item-mean averages each item's row over the devices that changed it: rows must be the same
# rows on every device, i.e. every view dense.
ITEM_MEAN_METHODS = ("fedavg-full", "exclusion")
FULL_TABLES = ("dense", "hashed")
# Methods whose full-capacity devices may hold a hashed array instead of the dense table.
HASHED_FULL_METHODS = ("fair", "fair-inconsistent", "fedavg-full", "exclusion")
BYTES_PER_PARAM = 4  # float32 on the wire
INIT_STD = 0.01
# Seeds of the inconsistent ablation: far from the shared seed so no device reuses it.
INCONSISTENT_SEED_BASE = 1 << 20
# Mixed into the seeds of ``subspace="round"``, so a round's seed is no fixed run's seed.
SUBSPACE_SALT = 0x2B7E1516
CHECKPOINT_FORMAT = 1
# Item tables (sparse gradients under Adam) of at least this many parameters train with
# DeferredAdam, the smaller ones with ScatterAdam (Adam's dense step, the gradient scattered in,
# never made dense). A dense step costs ~1 ns per entry here, a deferred one ~3 ns per entry used
# and per step it replays: on Goodreads-100 (8,192 entries used per step, a few steps replayed)
# they break even near 300k entries, and below that DeferredAdam's 4 bytes per row would only add
# memory to the devices that have least.
DEFERRED_MIN_ENTRIES = 1 << 19
# Device classes are drawn from their own stream so a profile does not change which clients train.
PROFILE_SEED = 7919


@dataclasses.dataclass
class Config:
    """One federated experiment. ``tiers`` uses ``fastfair.fl.tiers.parse_tiers`` notation.

    ``head_init``: how NeuMF's dense layers start (``fastfair.fl.model.Head``): ``"ncf"``,
    NeuMF's usual initialisation, or ``"torch"``, ``nn.Linear``'s default (fastfair's before the
    setting existed).
    ``optimizer_state``: ``"fresh"`` gives a client a new optimizer every round (the reference
    code), ``"persistent"`` keeps each client's optimizer state on the client across rounds.
    ``dropout``: probability that a sampled client never returns its update.
    ``aggregation``: ``"model"`` averages what the clients hold, expanded (the FAIR reference
    code: ``W <- sum_c p_c expand_c(w_c)``); ``"delta"`` averages what they changed,
    ``W <- W + sum_c p_c (expand_c(w_c) - expand_c(w_c^0))`` with ``w_c^0`` the download, so the
    part of ``W`` a small view cannot represent is kept instead of being replaced by its
    projection every round. The two agree for dense views and HeteroFL's column slices.
    ``"nested"`` is the delta rule with each part of the table averaged over the devices whose
    view holds it, HeteroFL's per-coordinate mean carried over to FAIR's nested subspaces. The
    round's consistent hashed views span subspaces ``S_1 < S_2 < ... < S_L`` (the dense table,
    if a full device took part, is the largest); their orthogonal layers ``L_l = S_l - S_{l-1}``
    are held by the devices of size ``l`` and above, of total weight ``W_l``. With ``Delta =
    sum_c p_c Delta_c`` the delta rule's change (``p`` summing to 1) and ``P_l`` the projection
    onto ``S_l`` (``expand(project(.))``), the table moves by ``sum_l (P_l - P_{l-1}) Delta /
    W_l``: the least-squares change ``argmin sum_c p_c ||P_c X - Delta_c||^2`` with each layer
    no device held left unchanged. Under the delta rule a layer is scaled by ``W_l`` instead,
    so a full device's change outside the small arrays' subspaces arrives at ``W_L`` of itself
    (about 0.6 with half of each Goodreads round's clients small). Low-rank views (FedHM) can
    change any entry and count as holding the whole table, and HeteroFL's columns are averaged
    per column as always, so for them, as for dense views, it is the delta rule.
    ``"item-mean"`` (dense views only: ``fedavg-full``, ``exclusion``) moves each item's rows by
    the mean change over the devices that changed that row, ``W[i] <- W[i] + mean_{c: G_c[i] !=
    0} G_c[i]``, instead of a data-size weighted mean in which devices that never saw the item
    count as zero change; the head keeps data-size weights.
    ``reg``: L2 weight on the embeddings a batch uses: ``reg * sum ||row||^2 / batch`` over the
    looked-up item rows and the user vectors is added to the loss.

    Upload compression (``fastfair.fl.compress``): ``compressor`` encodes each item-table update
    ``G = V_local - V_downloaded`` (``"none"`` uploads the tables as they are). ``ratio`` > 0 is
    a payload budget per table, as a fraction of uploading the whole table as float32.
    ``actions``: a fixed K (``"16"``) or ``"adaptive"``: the largest K on the doubling grid up to
    ``max_actions`` whose payload fits ``ratio`` and whose simulated round time fits the
    ``profile``'s deadline (``deadline`` > 0 overrides it); with ``error_bound`` > 0, the smallest
    of those whose relative reconstruction error is at most the bound. No K meeting the deadline
    falls back to K = 1 and the client is counted late. ``profile`` (a name in
    ``fastfair.fl.profiles.PROFILES`` or a JSON file) also gives every round its simulated time.
    ``server_lr``: the server moves ``eta`` of the way to the aggregate,
    ``W <- W + eta (aggregate - W)``.

    ``full_table``: what a full-capacity device (fraction 1; every device under
    ``fedavg-full``) holds of each item table: the dense table, or ``"hashed"``: a hashed array
    of about ``n d`` slots, the largest of the nested chain, as an early version of the FAIR
    reference code gives compression 1 (an array the size of the table, with collisions; the
    version its README documents keeps compression 1 dense).
    Methods ``HASHED_FULL_METHODS`` only.

    ``user_step``: a device keeps this fraction of its private vectors' change in a round,
    ``u <- u + user_step (u_local - u)``. The reference code averages every user row over the
    round's K clients, so a user keeps about 1/K of its change (``user_step = 1/K`` with the
    vectors still private). ``"data"`` is that average's own step: client ``u`` keeps
    ``p_u = weight(u) / sum_c weight(c)`` of its change, the sum over the clients whose update
    the round aggregates (dropped and rejected clients are out of the sum, and a rejected client
    keeps nothing: its row is not in the average); it is applied once the round's clients have
    all returned.

    ``local_kernel``: ``"fused"`` runs a client's local round in compiled kernels
    (``fastfair.fl.fused``) where it can (Adam with a fresh state, dense or hashed item tables,
    parameters on the CPU), the autograd loop elsewhere; ``"autograd"`` always runs the autograd
    loop; ``"auto"`` runs the fused kernel for item tables of ``DEFERRED_MIN_ENTRIES`` or more
    and the autograd loop for smaller ones, where ``ScatterAdam`` holds 12 bytes per entry
    against the kernel's 16 and ~1 MB of batch buffers (a small device's memory matters more
    than its speed). All compute the same round, to float rounding.

    ``negative_sampling``: ``"uniform"`` draws each negative uniformly over the whole catalogue
    (a negative may be one of the client's positives); ``"unseen"`` uniformly over the items
    that are not among the client's training positives (the reference code), by redrawing, from
    the same generator, the draws that hit a positive until none does.

    ``fit``: how the server fits a hashed device's array to the global table ``T`` at download.
    ``"plain"`` is the least-squares fit (FAIR): ``w[s] = sum_{idx(i,k)=s} g T[i,k] / cnt[s]``,
    so an entry whose slot it shares with ``c - 1`` others arrives at about ``1/c`` of its value.
    ``"energy"`` weights each row by its energy, ``a_i = ||T_i||^2 + fit_floor mean_j
    ||T_j||^2``: ``w[s] = sum a_i g T[i,k] / sum a_i``, the fit ``argmin_w sum a_i (V[i,k] -
    T[i,k])^2``. Rows that training has moved (used items) then arrive close to their value and
    the rows sharing their slots carry the error instead. Uploads and aggregation are unchanged;
    with delta aggregation the server adds each device's change to what it downloaded.

    ``subspace``: which random subspace a hashed array spans. ``"fixed"`` (FAIR, the reference
    code): one hash seed for the whole run, so an entry shares its slot with the same entries
    every round, and whatever a device's change does to a slot's other entries (the rows it
    never used) it does to the same rows, with the same signs, round after round. ``"round"``:
    every round draws a fresh seed, ``seed_r = fmix32(fmix32(seed ^ SALT) ^ r)`` for the
    table's seed ``seed`` and round index ``r``, the same for every device of the round. Arrays
    of one round still nest and fold, so downloads and aggregation are unchanged; but the
    change a collision carries to an unused row now points a new way every round and
    averages out, while the change to the rows a device trained adds up. It costs one pass
    over the ``n d`` entries a round per hashed size (the slot counts) and a seed sent with
    each round's task.

    Serving (``fastfair.fl.serve``): with ``refit_epochs`` > 0 every user is evaluated with
    vectors refit to the current global model (``refit_epochs`` full-batch Adam steps at
    ``refit_lr`` from zero, on at most ``refit_sample`` of its positives, 0: all) instead of its
    private training vectors, which training keeps as they are. It applies to every method alike.
    """

    method: str = "fair"
    arch: str = "neumf"
    head_init: str = "ncf"
    full_table: str = "dense"
    dim: int = 8
    tiers: str = "2:0-1"
    assignment: str = "random"
    clients_per_round: int = 10
    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 512
    lr: float = 1e-3
    optimizer: str = "adam"
    optimizer_state: str = "fresh"
    loss: str = "bpr"
    negatives: int = 1
    negative_sampling: str = "uniform"
    local_kernel: str = "auto"
    reg: float = 0.0
    chunk_size: int = 1
    dropout: float = 0.0
    aggregation: str = "model"
    weighting: str = "data"
    seed: int = 0
    eval_every: int = 5
    ks: tuple = (10,)
    compressor: str = "none"
    ratio: float = 0.0
    actions: str = "adaptive"
    max_actions: int = 256
    spherical: bool = False
    kmeans_iters: int = 20
    error_bound: float = 0.0
    profile: str = ""
    deadline: float = 0.0
    server_lr: float = 1.0
    user_step: Union[float, str] = 1.0
    refit_epochs: int = 0
    refit_lr: float = 0.01
    refit_sample: int = 256
    fit: str = "plain"
    fit_floor: float = 0.1
    subspace: str = "fixed"

    def check(self, data: InteractionData) -> None:
        """A clear ValueError for the first bad setting."""
        for name, allowed in (("method", METHODS), ("arch", ARCHS), ("head_init", HEAD_INITS),
                              ("full_table", FULL_TABLES),
                              ("optimizer", OPTIMIZERS),
                              ("optimizer_state", OPTIMIZER_STATES), ("loss", LOSSES),
                              ("assignment", ASSIGNMENTS), ("aggregation", AGGREGATIONS),
                              ("weighting", WEIGHTINGS), ("fit", FITS),
                              ("subspace", SUBSPACES),
                              ("negative_sampling", NEGATIVE_SAMPLINGS),
                              ("local_kernel", LOCAL_KERNELS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("dim", "clients_per_round", "rounds", "local_epochs", "batch_size",
                     "negatives", "chunk_size", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("seed", "refit_epochs", "refit_sample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        for name in ("lr", "refit_lr", "fit_floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0
                                               and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.user_step != DATA_STEP and (
                isinstance(self.user_step, bool)
                or not (isinstance(self.user_step, (int, float)) and 0 < self.user_step <= 1)):
            raise ValueError(f"user_step must be a float in (0, 1] or {DATA_STEP!r}, "
                             f"got {self.user_step!r}")
        for name, default in (("fit", "plain"), ("subspace", "fixed")):
            value = getattr(self, name)
            if value != default and not self.has_hashed_arrays():
                raise ValueError(f"{name} {value!r} applies to hashed arrays: methods "
                                 f"{', '.join(HASHED_METHODS)}, or "
                                 f"{', '.join(HASHED_FULL_METHODS)} with full_table 'hashed'; "
                                 f"method {self.method!r} has none")
        if isinstance(self.reg, bool) or not (isinstance(self.reg, (int, float))
                                              and math.isfinite(self.reg) and self.reg >= 0):
            raise ValueError(f"reg must be a number >= 0, got {self.reg!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        ks = self.ks if isinstance(self.ks, (tuple, list)) else (self.ks,)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"ks must be positive ints, got {self.ks!r}")
        self._check_compression()
        if self.full_table == "hashed" and self.method not in HASHED_FULL_METHODS:
            raise ValueError(f"full_table 'hashed' applies to methods "
                             f"{', '.join(HASHED_FULL_METHODS)}, not {self.method!r}")
        if self.full_table == "hashed" and self.aggregation == "item-mean":
            raise ValueError("aggregation 'item-mean' needs dense views, not full_table 'hashed'")
        if self.aggregation == "item-mean" and self.method not in ITEM_MEAN_METHODS:
            raise ValueError(f"aggregation 'item-mean' needs every view dense (methods "
                             f"{', '.join(ITEM_MEAN_METHODS)}), not method {self.method!r}")
        if self.aggregation == "nested" and self.method == "fair-inconsistent":
            raise ValueError("aggregation 'nested' needs consistent hashing: the per-device "
                             "subspaces of method 'fair-inconsistent' do not nest")
        if self.clients_per_round > data.num_users:
            raise ValueError(f"clients_per_round={self.clients_per_round} is larger than the "
                             f"number of clients ({data.num_users} users)")
        if self.negative_sampling == "unseen":
            # A user's training items are sorted and unique: covering the catalogue is a count.
            full = torch.nonzero(data.train_counts() >= data.num_items).flatten()
            if full.numel():
                raise ValueError(f"negative_sampling 'unseen': user {int(full[0])}'s training "
                                 f"items cover all {data.num_items} items, so it has no unseen "
                                 f"item to draw negatives from ({full.numel()} such user(s))")

    def has_hashed_arrays(self) -> bool:
        """Whether ``method`` and ``full_table`` give some device a hashed array."""
        return self.method in HASHED_METHODS or (self.full_table == "hashed"
                                                 and self.method in HASHED_FULL_METHODS)

    def _check_compression(self) -> None:
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {COMPRESSORS}, got {self.compressor!r}")
        if self.compressor != "none" and self.method not in COMPRESSIBLE:
            raise ValueError(f"compressor {self.compressor!r} applies to methods "
                             f"{', '.join(COMPRESSIBLE)}, not {self.method!r}")
        for name in ("ratio", "error_bound"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        for name in ("max_actions", "kmeans_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.spherical, bool):
            raise ValueError(f"spherical must be a bool, got {self.spherical!r}")
        if not (isinstance(self.deadline, (int, float)) and math.isfinite(self.deadline)
                and self.deadline >= 0):
            raise ValueError(f"deadline must be a number of seconds >= 0, got {self.deadline!r}")
        if not (isinstance(self.server_lr, (int, float)) and math.isfinite(self.server_lr)
                and self.server_lr > 0):
            raise ValueError(f"server_lr must be a positive number, got {self.server_lr!r}")
        if self.profile:
            load_profile(self.profile)
        elif self.deadline:
            raise ValueError("deadline needs a profile (devices' compute and bandwidth)")
        k = self.fixed_actions()
        if self.compressor == "actions" and k is None and not (self.ratio or self.profile):
            raise ValueError("actions='adaptive' needs a payload budget (ratio) or a profile "
                             "(deadline); or give a fixed K")
        if k is not None and self.error_bound:
            raise ValueError("error_bound chooses K: it needs actions='adaptive'")

    def fixed_actions(self) -> Optional[int]:
        """The fixed K of ``actions``, or None when it is ``"adaptive"``."""
        text = str(self.actions).strip()
        if text == "adaptive":
            return None
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"actions must be a positive int or 'adaptive', got {self.actions!r}")
        return int(text)


@dataclasses.dataclass(frozen=True)
class LowRank:
    """FedHM's view of a table: rank ``rank`` factors."""

    rank: int


@dataclasses.dataclass(frozen=True)
class Slice:
    """HeteroFL's view of a table: its first ``width`` columns."""

    width: int


TableView = Union[None, HashSpec, LowRank, Slice]  # None: the dense table


@dataclasses.dataclass
class ClientView:
    """What one device holds: the view of each item table."""

    tier: int
    specs: dict


class FederatedRunner(RoundRunner):
    """Runs ``Config`` on ``InteractionData``; ``run_round()`` then ``evaluate()``."""

    def __init__(self, data: InteractionData, config: Config, workers: int = 1,
                 pool: str = "auto"):
        config.check(data)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        if pool not in parallel.POOLS:
            raise ValueError(f"pool must be one of {parallel.POOLS}, got {pool!r}")
        self.workers = workers
        self.pool = pool
        self._pool = None
        self._trained: Optional[dict] = None
        self.data, self.cfg = data, config
        n, d = data.num_items, config.dim
        self.tiers = parse_tiers(config.tiers)
        activity = data.train_counts() if config.assignment == "activity" else None
        self.tier_of = assign_tiers(data.num_users, self.tiers, seed=config.seed,
                                    by_activity=activity, by_id=config.assignment == "id")
        hash_full = config.full_table == "hashed"
        if config.method == "fedavg-full":
            # Every device is full-capacity: the dense table, or one hashed array of about
            # n d slots, for all.
            base = tier_specs(n, d, [Tier(1.0, 1.0)], chunk_size=config.chunk_size,
                              seed=config.seed, hash_full=hash_full) * len(self.tiers)
        else:
            base = tier_specs(n, d, self.tiers, chunk_size=config.chunk_size, seed=config.seed,
                              hash_full=hash_full)
        # One hash per table kind; the MLP table's seed differs from the GMF table's.
        self.tier_specs = {name: [None if s is None else dataclasses.replace(s, seed=s.seed + k)
                                  for s in base]
                           for k, name in enumerate(self._table_names())}
        self.layout = {name: [self._tier_view(name, t) for t in range(len(self.tiers))]
                       for name in self._table_names()}
        # A tier the method cannot represent has no view of its first table.
        self.unsupported = [t for t in range(len(self.tiers))
                            if self.layout[self._table_names()[0]][t] is _EXCLUDED]
        supported = [t for t in range(len(self.tiers)) if t not in self.unsupported]
        if not supported:
            raise ValueError(f"method {config.method!r} cannot represent any tier of "
                             f"{config.tiers!r}: {self._why_unsupported()}")
        eligible = torch.nonzero(torch.isin(self.tier_of, torch.tensor(supported))).flatten()
        if config.clients_per_round > eligible.numel():
            raise ValueError(f"clients_per_round={config.clients_per_round} is larger than the "
                             f"{eligible.numel()} clients method {config.method!r} can train")
        super().__init__(config.seed, eligible, config.clients_per_round, config.dropout)
        self.tables = {name: torch.randn(n, d, generator=self.gen) * INIT_STD
                       for name in self._table_names()}
        # Private per-client state, kept here only because clients are simulated in-process.
        self.user_vectors = {name: torch.randn(data.num_users, d, generator=self.gen) * INIT_STD
                             for name in self._table_names()}
        self.optimizer_states: dict = {}
        self._served: Optional[tuple] = None
        self.head = None
        if config.arch == "neumf":
            with torch.random.fork_rng():
                torch.manual_seed(config.seed)
                self.head = Head(d, init=config.head_init)
        self._counts: dict = {}
        self._cached_round: Optional[int] = None
        self._trained_vectors: dict = {}
        self._svd: dict = {}
        self._projections: dict = {}
        self.compressor = None
        if config.compressor != "none":
            self.compressor = Compressor(config.compressor, actions=config.fixed_actions(),
                                         max_actions=config.max_actions,
                                         spherical=config.spherical, iters=config.kmeans_iters)
        self.profile = load_profile(config.profile) if config.profile else None
        self.device_class = (None if self.profile is None else
                             self.profile.assign(data.num_users, config.seed + PROFILE_SEED))
        self.deadline = config.deadline or (self.profile.deadline if self.profile else 0.0)

    def _table_names(self) -> tuple:
        return ("gmf",) if self.cfg.arch == "mf" else ("gmf", "mlp")

    # ------------------------------------------------------------------ what each device holds
    def _tier_view(self, name: str, t: int):
        """The view every device of tier ``t`` gets of table ``name`` (before per-device seeds)."""
        n, d = self.data.num_items, self.cfg.dim
        method, fraction = self.cfg.method, self.tiers[t].fraction
        if method == "fedavg-full" or fraction == 1:
            return self.tier_specs[name][t]  # None: the dense table
        if method == "exclusion":
            return _EXCLUDED
        if method == "fedhm":
            rank = math.floor(n * d * fraction / (n + d))
            return LowRank(rank) if rank >= 1 else _EXCLUDED
        if method == "heterofl":
            width = math.floor(d * fraction)
            return Slice(width) if width >= 1 else _EXCLUDED
        return self.tier_specs[name][t]

    def _why_unsupported(self) -> str:
        n, d = self.data.num_items, self.cfg.dim
        reason = {"exclusion": "only full-capacity devices train",
                  "fedhm": f"rank floor(n d c / (n + d)) is 0 for n={n}, d={d}",
                  "heterofl": f"width floor(d c) is 0 for d={d}"}.get(self.cfg.method, "")
        fractions = ", ".join(self.tiers[t].label for t in self.unsupported)
        return f"tiers with capacity {fractions} sit out ({reason})"

    def describe(self) -> list:
        """One row per tier: capacity, share, devices, what a device holds of each table, the
        bytes of one download (= one upload), and whether the method can train it."""
        rows = []
        counts = torch.bincount(self.tier_of, minlength=len(self.tiers)).tolist()
        for t, tier in enumerate(self.tiers):
            supported = t not in self.unsupported
            holds = {name: _view_name(self.layout[name][t]) for name in self._table_names()}
            rows.append({"tier": t, "fraction": tier.fraction, "label": tier.label,
                         "share": tier.share, "clients": counts[t],
                         "supported": supported, "holds": holds,
                         "payload_bytes": (self.payload_bytes(ClientView(t, {
                             name: self.layout[name][t] for name in self._table_names()}))
                             if supported else 0)})
        return rows

    def unsupported_message(self) -> Optional[str]:
        """Which tiers this method cannot train and why, or None."""
        return self._why_unsupported() if self.unsupported else None

    def view(self, client: int) -> ClientView:
        tier = int(self.tier_of[client])
        if tier in self.unsupported:
            raise ValueError(f"client {client} is in tier {tier}, which method "
                             f"{self.cfg.method!r} cannot train")
        specs = {}
        for k, name in enumerate(self._table_names()):
            spec = self.layout[name][tier]
            if self.cfg.method == "fair-inconsistent" and spec is not None:
                spec = dataclasses.replace(spec, seed=INCONSISTENT_SEED_BASE + 2 * client + k)
            specs[name] = self._this_round(spec)
        return ClientView(tier, specs)

    def _this_round(self, spec: TableView) -> TableView:
        """``spec`` as this round's devices hash it: with ``subspace="round"`` a hashed view
        takes the round's seed (see ``Config``); any other view is returned as it is."""
        if self.cfg.subspace == "fixed" or not isinstance(spec, HashSpec):
            return spec
        return dataclasses.replace(spec, seed=round_seed(spec.seed, self.round_index))

    def _drop_earlier_rounds(self) -> None:
        """With ``subspace="round"`` a round's seeds are never used again: forget the slot
        counts and downloads cached for an earlier round. Every path that builds a round's
        views comes through here (the loop, the worker plan, a Flower node, which never runs
        ``begin_round``), so no cache grows with the rounds."""
        if self.cfg.subspace == "round" and self._cached_round != self.round_index:
            self._counts.clear()
            self._projections.clear()
            self._cached_round = self.round_index

    def counts(self, spec: HashSpec) -> Tensor:
        self._drop_earlier_rounds()
        if spec not in self._counts:
            self._counts[spec] = slot_counts(spec)
        return self._counts[spec]

    def _table_shapes(self, name: str, spec: TableView) -> dict:
        n, d = self.data.num_items, self.cfg.dim
        key = f"item_{name}"
        if spec is None:
            return {f"{key}.weight": (n, d)}
        if isinstance(spec, HashSpec):
            return {f"{key}.weight": (spec.memory_size,)}
        if isinstance(spec, LowRank):
            return {f"{key}.left": (n, spec.rank), f"{key}.right": (spec.rank, d)}
        return {f"{key}.weight": (n, spec.width)}

    def expected_update(self, view: ClientView) -> dict:
        """Name -> shape of every tensor a client with ``view`` uploads (float32)."""
        shapes = {}
        for name, spec in view.specs.items():
            shapes.update(self._table_shapes(name, spec))
        if self.head is not None:
            shapes.update({f"head.{k}": tuple(v.shape) for k, v in self.head.state_dict().items()})
        return shapes

    def payload_bytes(self, view: ClientView) -> int:
        """Bytes of one download (= one upload): the item tables and the head."""
        return BYTES_PER_PARAM * sum(math.prod(s) for s in self.expected_update(view).values())

    # ------------------------------------------------------------------ download / train / upload
    def _factors(self, name: str, rank: int) -> tuple:
        if name not in self._svd:
            self._svd[name] = torch.linalg.svd(self.tables[name], full_matrices=False)
        u, s, vh = self._svd[name]
        root = s[:rank].sqrt()
        return u[:, :rank] * root, root[:, None] * vh[:rank]

    def _projection(self, name: str, spec: HashSpec) -> Tensor:
        """``project_dense`` of table ``name`` for ``spec``, once per round: every device of a
        tier (every one, when hashing is consistent) downloads the same array."""
        self._drop_earlier_rounds()
        key = (name, spec)
        if key not in self._projections:
            weights = self._fit_weights(name)
            # The weighted fit divides by the slots' weights, not their counts.
            counts = self.counts(spec) if weights is None else None
            self._projections[key] = project_dense(self.tables[name], spec, counts,
                                                   row_weights=weights)
        return self._projections[key]

    def _fit_weights(self, name: str) -> Optional[Tensor]:
        """``Config.fit``'s row weights for table ``name`` (None: the plain fit), once per round."""
        if self.cfg.fit == "plain":
            return None
        key = (name, "fit")
        if key not in self._projections:
            energy = self.tables[name].square().sum(1)
            self._projections[key] = energy.add_(energy.mean() * self.cfg.fit_floor)
        return self._projections[key]

    def download(self, client: int, view: ClientView) -> ClientModel:
        """The device's model: its view of each global table, the head, and the client's own
        private user vectors. In a round whose clients a thread pool trained, the model that
        thread downloaded and trained (``local_train`` then takes it as it is), unless a
        compressor needs the download itself (``snapshot``)."""
        done = self._trained.get(client) if self._trained is not None else None
        if done is not None and done.model is not None and self.compressor is None:
            return done.model
        n, d = self.data.num_items, self.cfg.dim
        adam = self.cfg.optimizer == "adam"

        def make_table(name):
            spec = view.specs[name]
            table = self.tables[name]
            if spec is None:
                return nn.Embedding.from_pretrained(table.clone(), freeze=False, sparse=adam)
            if isinstance(spec, LowRank):
                module = LowRankEmbedding(n, d, spec.rank)
                left, right = self._factors(name, spec.rank)
                with torch.no_grad():
                    module.left.copy_(left)
                    module.right.copy_(right)
                return module
            if isinstance(spec, Slice):
                module = SlicedEmbedding(n, d, spec.width)
                with torch.no_grad():
                    module.weight.copy_(table[:, :spec.width])
                return module
            # The array given directly: an initialised one would be overwritten.
            return HashedEmbedding(n, d, memory_size=spec.memory_size,
                                   chunk_size=spec.chunk_size, seed=spec.seed,
                                   signed=spec.signed, sparse=adam,
                                   _weight=self._projection(name, spec).clone())

        model = ClientModel(self.cfg.arch, n, d, make_table)
        with torch.no_grad():
            model.user_gmf.copy_(self.user_vectors["gmf"][client])
            if self.head is not None:
                model.user_mlp.copy_(self.user_vectors["mlp"][client])
                model.head.load_state_dict(self.head.state_dict())
        return model

    def local_train(self, client: int, model: ClientModel, gen: torch.Generator) -> float:
        """``train_client`` on the client's positives; with workers, the result a worker
        computed from the same generator state (``_train_in_workers``)."""
        if self._trained is not None:
            return self._take_trained(client, model, gen)
        persistent = self.cfg.optimizer_state == "persistent"
        loss, state = train_client(self.cfg, self.data.user_items(client), self.data.num_items,
                                   model, gen, self.optimizer_states.get(client)
                                   if persistent else None)
        if persistent:
            self.optimizer_states[client] = state
        return loss

    # ------------------------------------------------------------------ clients in workers
    def run_round(self) -> dict:
        """``RoundRunner.run_round``; with ``workers`` > 1 the round's clients train in the pool
        first (threads or processes, ``pool_kind``), each from the generator state the
        sequential loop would give it."""
        if self.workers == 1:
            return super().run_round()
        self._trained = self._train_in_workers()
        try:
            return super().run_round()
        finally:
            self._trained = None

    def plan_clients(self, download: bool = True) -> list:
        """``(client, view, downloaded model, generator state before its local round, after
        it)`` for each client the next round trains, as ``run_round`` will meet them (the draws
        of ``train_client`` are known in advance: ``replay_local_train``). The generator is
        left where it was. With ``download=False`` the model is None, and the downloads'
        shared parts (projections, factors) are computed, so that threads can build them."""
        saved = self.gen.get_state()
        self.begin_round()
        clients, drops = self.draw_clients()
        plan = []
        for client, dropped in zip(clients, drops):
            if dropped:
                continue
            view = self.view(client)
            if download:
                model = FederatedRunner.download(self, client, view)
            else:
                model = None
                self._cache_views(view)
            start = self.gen.get_state()
            replay_local_train(self.gen, self.data.user_items(client), self.cfg,
                               self.data.num_items)
            plan.append((client, view, model, start, self.gen.get_state()))
        self.gen.set_state(saved)
        return plan

    def pool_kind(self) -> str:
        """``"threads"`` or ``"processes"``: ``pool``, with ``"auto"`` resolved to threads when
        the full-capacity clients train in the fused kernel (it releases the GIL, and their
        tables then stay in this process) and to processes when they run the autograd loop."""
        if self.pool != "auto":
            return self.pool
        full = self.data.num_items * self.cfg.dim
        fused_full = _settings_reason(self.cfg, self.cfg.local_kernel, [full]) is None
        return "threads" if fused_full else "processes"

    def _cache_views(self, view: ClientView) -> None:
        """Compute what downloads of ``view`` share (read-only afterwards: threads may then
        build them at once)."""
        for name, spec in view.specs.items():
            if isinstance(spec, HashSpec):
                self._projection(name, spec)
            elif isinstance(spec, LowRank):
                self._factors(name, spec.rank)

    def _train_in_workers(self) -> dict:
        """``{client: parallel.Trained}`` for the clients of ``plan_clients``, trained by the
        pool. Threads build each client's download themselves."""
        threads = self.pool_kind() == "threads"
        if self._pool is None:
            kind = parallel.ThreadClientPool if threads else parallel.ClientPool
            self._pool = kind(self.data, self.cfg, self.workers)
        persistent = self.cfg.optimizer_state == "persistent"
        jobs = [parallel.Job(client, model, start, end,
                             self.optimizer_states.get(client) if persistent else None,
                             functools.partial(FederatedRunner.download, self, client, view)
                             if threads else None)
                for client, view, model, start, end in self.plan_clients(not threads)]
        # Largest first: the pool hands jobs out in order, so the longest do not come last.
        jobs.sort(key=lambda job: -int(self.data.user_items(job.client).numel()))
        return {done.client: done for done in self._pool.train(jobs)}

    def _take_trained(self, client: int, model: ClientModel, gen: torch.Generator) -> float:
        done = self._trained.get(client)
        if done is None or not torch.equal(gen.get_state(), done.start):
            raise RuntimeError(f"client {client} was not trained from the generator state the "
                               "round reaches: _train_in_workers no longer matches run_round")
        with torch.no_grad():
            for key, param in model.named_parameters():
                if param.data_ptr() != done.params[key].data_ptr():  # not the trained model
                    param.copy_(done.params[key])
        gen.set_state(done.end)
        if done.optimizer_state is not None:
            self.optimizer_states[client] = done.optimizer_state
        return done.loss

    def close(self) -> None:
        """Stop the worker processes (a later round starts them again)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "FederatedRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def upload(self, client: int, model: ClientModel, view: ClientView) -> dict:
        """What the client sends: every shared parameter (never its user vectors)."""
        return {k: v.detach() for k, v in model.named_parameters() if not k.startswith("user_")}

    # ------------------------------------------------------------------ compressed uploads
    def _deltas(self, update: dict, start: dict) -> dict:
        """Each item table's update ``V_local - V_downloaded`` as rows of ``d`` (a hashed
        array cut into rows, zero-padded)."""
        d, out = self.cfg.dim, {}
        for name in self._table_names():
            key = f"item_{name}.weight"
            flat = (update[key] - start[key]).reshape(-1)
            rows = -(-flat.numel() // d)
            out[key] = F.pad(flat, (0, rows * d - flat.numel())).view(rows, d)
        return out

    def _head_bits(self) -> int:
        return 0 if self.head is None else 8 * BYTES_PER_PARAM * sum(
            p.numel() for p in self.head.parameters())

    def _candidates(self, client: int, view: ClientView, deltas: dict, touched: dict,
                    budgets: dict) -> tuple:
        """The K values the adaptive rule allows for this client, ascending, and whether the
        client is late (no K fits; it falls back to K = 1). ``touched``: rows changed, per
        table."""
        grid = doubling_grid(self.cfg.max_actions)

        def bits(k):
            return {key: action_bits(k, touched[key], *g.shape, self.cfg.spherical)[0]
                    for key, g in deltas.items()}

        ok = [k for k in grid if all(budgets[key] is None or b <= budgets[key]
                                     for key, b in bits(k).items())]
        if self.profile is not None:
            fits = []
            for k in ok:
                sent = {"bits": sum(bits(k).values()) + self._head_bits(), "actions": k,
                        "touched": sum(touched.values())}
                if self._simulate(client, self.payload_bytes(view),
                                  sent)["seconds"] <= self.deadline:
                    fits.append(k)
            ok = fits
        return (ok, False) if ok else ([grid[0]], True)

    def compress(self, client: int, update: dict, start: dict, view: ClientView) -> tuple:
        """Encode the item-table updates with the configured compressor. Returns what the
        server receives, a ``fastfair.fl.compress.Received`` (download + encoded change) per
        item table and the head as uploaded, and the payload's accounting (exact bits, packed
        and int32; K; error)."""
        cfg = self.cfg
        deltas = self._deltas(update, start)
        budgets = {key: max(1, int(cfg.ratio * reference_bits(*g.shape))) if cfg.ratio else None
                   for key, g in deltas.items()}
        touched = {key: int((g != 0).any(1).sum()) for key, g in deltas.items()}
        late, choices = False, [None]
        if self.compressor.kind == "actions" and cfg.fixed_actions() is None:
            choices, late = self._candidates(client, view, deltas, touched, budgets)
            if not cfg.error_bound:
                choices = choices[-1:]
        # Distinct per client, round and table, and independent of the runner's generator.
        seed = ((cfg.seed * 1_000_003 + self.round_index) * 1_000_003 + client) * 4
        for i, k in enumerate(choices):
            encoded = {key: self.compressor.encode(g, budget=budgets[key], k=k, seed=seed + j)
                       for j, (key, g) in enumerate(deltas.items())}
            err = max(e.error for e in encoded.values())
            if not cfg.error_bound or err <= cfg.error_bound or i == len(choices) - 1:
                break
        received = dict(update)
        for key, enc in encoded.items():
            received[key] = Received(start[key], enc)
        head = self._head_bits()
        item_bits = sum(e.bits for e in encoded.values())
        return received, {
            "bits": item_bits + head,
            "bits_int32": sum(e.bits_int32 for e in encoded.values()) + head,
            "item_bits": item_bits,
            "item_bits_int32": sum(e.bits_int32 for e in encoded.values()),
            "item_reference_bits": sum(reference_bits(*g.shape) for g in deltas.values()),
            "actions": max(e.size for e in encoded.values()) if self.compressor.kind == "actions"
            else 0,
            "touched": sum(touched.values()),
            "error": err, "late": late}

    def _simulate(self, client: int, nbytes: int, sent: dict) -> dict:
        """The client's simulated round time under the profile (see ``fastfair.fl.profiles``)."""
        cfg = self.cfg
        device = self.profile.classes[int(self.device_class[client])]
        flops = train_flops(cfg.arch, cfg.dim, int(self.data.user_items(client).numel()),
                            cfg.local_epochs, cfg.negatives)
        if sent.get("actions"):
            flops += cluster_flops(sent["touched"], sent["actions"], cfg.dim, cfg.kmeans_iters)
        seconds = device.seconds(8 * nbytes, flops, sent["bits"])
        return {"seconds": seconds,
                "late": bool(sent.get("late")) or seconds > self.deadline}

    def check_update(self, update, view: ClientView) -> Optional[str]:
        """Why ``update`` must be rejected, or None when it is well-formed and finite (a
        compressed table: its payload well-formed, its download of the table's shape)."""
        if isinstance(update, dict):
            plain = {}
            for key, t in update.items():
                if isinstance(t, Received):
                    reason = t.check()
                    if reason is not None:
                        return f"{key}: {reason}"
                    t = t.start
                plain[key] = t
            update = plain
        return check_tensors(update, self.expected_update(view))

    def aggregate_uploads(self, uploads: list) -> None:
        """Weighted average of the accepted uploads ``(update, view, weight)`` into the global
        tables and head (see module doc)."""
        n, d = self.data.num_items, self.cfg.dim
        total = sum(w for _, _, w in uploads)
        for name in self._table_names():
            key = f"item_{name}"
            if self.cfg.aggregation == "item-mean":
                tables = [_dense(u[f"{key}.weight"]) for u, _, _ in uploads]
                self.tables[name] = self._server_step(self.tables[name],
                                                      _item_mean(self.tables[name], tables))
                continue
            acc = torch.zeros(n, d)
            column_weight = torch.zeros(d, dtype=torch.float64)
            arrays, weights = [], []  # consistent hashed uploads, summed at the largest size
            for update, view, w in uploads:
                p = w / total
                spec = view.specs[name]
                if isinstance(spec, Slice):
                    acc[:, :spec.width] += p * update[f"{key}.weight"]
                    column_weight[:spec.width] += p
                    continue
                column_weight += p
                table = update.get(f"{key}.weight")
                if spec is None:
                    if isinstance(table, Received):
                        table.add_to(acc, p)  # the fused rebuild into the accumulator
                    else:
                        acc += p * table
                elif isinstance(spec, LowRank):
                    acc.addmm_(update[f"{key}.left"], update[f"{key}.right"], alpha=p)
                elif self.cfg.method == "fair":
                    arrays.append(_dense(table))
                    weights.append(p)
                else:
                    acc += p * expand_dense(_dense(table), spec)
            if arrays:
                big = self._this_round(max((s for s in self.tier_specs[name] if s is not None),
                                           key=lambda s: s.memory_size))
                acc += expand_dense(aggregate(arrays, weights, big.memory_size), big)
            views = [(view.specs[name], w / total) for _, view, w in uploads]
            if self.cfg.aggregation in ("delta", "nested"):
                self._add_lost_part(name, acc, views)
            if self.cfg.aggregation == "nested" and self.cfg.method != "heterofl":
                acc = self._nested_mean(name, acc, views)
            if self.cfg.method == "heterofl":
                held = column_weight > 0
                acc[:, held] /= column_weight[held].float()
                acc[:, ~held] = self.tables[name][:, ~held]
            self.tables[name] = self._server_step(self.tables[name], acc)
        if self.head is not None:
            before = self.head.state_dict()
            state = {k: torch.zeros_like(v) for k, v in before.items()}
            for update, _, w in uploads:
                for k in state:
                    state[k] += (w / total) * update[f"head.{k}"]
            self.head.load_state_dict({k: self._server_step(before[k], v)
                                       for k, v in state.items()})
        # Downloads derived from the tables are stale now.
        self._svd.clear()
        self._projections.clear()

    def _server_step(self, before: Tensor, aggregate: Tensor) -> Tensor:
        """``before + eta (aggregate - before)`` with ``eta = server_lr``."""
        eta = self.cfg.server_lr
        return aggregate if eta == 1 else before.lerp(aggregate, eta)

    def _add_lost_part(self, name: str, acc: Tensor, views: list) -> None:
        """Delta aggregation: ``acc += sum_c p_c (W - D_c)`` over the uploads whose view is
        lossy (hashed or low rank), with ``D_c`` the table their download represents. Added to
        the model average this gives ``W + sum_c p_c (expand_c(w_c) - D_c)``."""
        weight: dict = {}
        for spec, p in views:
            if isinstance(spec, (HashSpec, LowRank)):
                weight[spec] = weight.get(spec, 0.0) + p
        table = self.tables[name]
        for spec, p in weight.items():
            if isinstance(spec, LowRank):
                left, right = self._factors(name, spec.rank)
                represented = left @ right
            else:
                represented = expand_dense(self._projection(name, spec), spec)
            acc.add_(table - represented, alpha=p)

    def _nested_mean(self, name: str, acc: Tensor, views: list) -> Tensor:
        """Nested aggregation: the delta rule's ``acc = W + Delta`` turned into ``W + sum_l
        (P_l - P_{l-1}) Delta / W_l`` over the round's nested hashed views (see ``Config``),
        computed as ``Delta / W_L + sum_{l<L} (1/W_l - 1/W_{l+1}) P_l Delta``."""
        held: dict = {}  # memory size -> (spec, weight of the devices of that size); None: all
        for spec, p in views:
            key = spec.memory_size if isinstance(spec, HashSpec) else None
            held[key] = (spec, held.get(key, (spec, 0.0))[1] + p)
        sizes = sorted((k for k in held if k is not None), reverse=True)
        levels = ([None] if None in held else []) + sizes  # largest first
        delta = acc - self.tables[name]
        above, weights = 0.0, []
        for key in levels:
            above += held[key][1]
            weights.append(above)  # W_l: the devices holding layer l, its own size and up
        change = delta / weights[0]
        for key, w_l, w_up in zip(levels[1:], weights[1:], weights):
            spec = held[key][0]
            projected = expand_dense(project_dense(delta, spec, self.counts(spec)), spec)
            change.add_(projected, alpha=1 / w_l - 1 / w_up)
        return self.tables[name] + change

    # ------------------------------------------------------------------ the round's steps
    # (RoundRunner.run_round calls them; see fastfair.fl.rounds)
    def begin_round(self) -> None:
        self._svd.clear()
        self._projections.clear()
        self._per_class: dict = {}
        self._trained_vectors: dict = {}

    def tier_label(self, view: ClientView) -> str:
        return self.tiers[view.tier].label

    def download_bytes(self, client: int, view: ClientView) -> int:
        return self.payload_bytes(view)

    def snapshot(self, model: ClientModel) -> Optional[dict]:
        """The downloaded item tables, which a compressor encodes the change from."""
        if self.compressor is None:
            return None
        return {k: v.detach().clone() for k, v in model.named_parameters()
                if k.startswith("item_")}

    def kept_user_vectors(self, before: dict, model: ClientModel,
                          step: Optional[float] = None) -> dict:
        """The private vectors a device keeps after local training from ``before``:
        ``before + step (trained - before)``, ``step`` by default ``user_step``. Under
        ``user_step="data"`` the step is known only once the round's clients have returned
        (``end_round``), so it must be given."""
        step = self.cfg.user_step if step is None else step
        if step == DATA_STEP:
            raise ValueError("user_step 'data' depends on the weights of every client the "
                             "round aggregates: it is applied after the round (end_round), "
                             "not by a device on its own")
        kept = {}
        for name, start in before.items():
            trained = getattr(model, f"user_{name}").detach()
            kept[name] = trained.clone() if step == 1 else start + step * (trained - start)
        return kept

    def keep_private(self, client: int, model: ClientModel) -> None:
        if self.cfg.user_step == DATA_STEP:
            # Kept aside until end_round knows the weights of the round's accepted clients.
            self._trained_vectors[client] = {
                name: getattr(model, f"user_{name}").detach().clone()
                for name in self.user_vectors}
            return
        kept = self.kept_user_vectors({k: v[client] for k, v in self.user_vectors.items()},
                                      model)
        for name, vector in kept.items():
            self.user_vectors[name][client] = vector

    def end_round(self, accepted: list) -> None:
        """``user_step="data"``: each accepted client ``u`` of ``accepted`` (``[(client,
        weight)]``) keeps ``p_u = weight_u / sum weight`` of its change; a client whose update
        was rejected keeps nothing (its row is not in the average)."""
        trained, self._trained_vectors = self._trained_vectors, {}
        if self.cfg.user_step != DATA_STEP or not accepted:
            return
        total = sum(w for _, w in accepted)
        for client, w in accepted:
            for name, vectors in self.user_vectors.items():
                start = vectors[client]
                vectors[client] = start + (w / total) * (trained[client][name] - start)

    def transmit(self, client: int, update, start, view: ClientView, down: int,
                 reason: Optional[str]) -> tuple:
        """The update as sent (compressed when configured and well-formed) and its accounting;
        under a profile, the client's simulated time too."""
        sent = {"bits": 8 * down, "bits_int32": 8 * down, "item_bits": None}
        if reason is None and self.compressor is not None:
            update, sent = self.compress(client, update, start, view)
        if self.profile is not None:
            sent.update(self._simulate(client, down, sent))
            _add_class_stats(self._per_class, self.profile.classes[
                int(self.device_class[client])].name, sent)
        return update, sent

    def account(self, tier: dict, sent: dict) -> None:
        for key in ("bits", "bits_int32"):
            tier[f"{key}_up"] = tier.get(f"{key}_up", 0) + sent[key]
        if sent["item_bits"] is not None:
            tier["item_bits_up"] = tier.get("item_bits_up", 0) + sent["item_bits"]
            tier["item_bits_int32_up"] = (tier.get("item_bits_int32_up", 0)
                                          + sent["item_bits_int32"])
            tier["item_reference_bits"] = (tier.get("item_reference_bits", 0)
                                           + sent["item_reference_bits"])

    def weight(self, client: int) -> float:
        """``|D_c|``, times the device's capacity with ``weighting="capacity"``."""
        size = float(self.data.user_items(client).numel())
        if self.cfg.weighting == "capacity":
            size *= self.tiers[int(self.tier_of[client])].fraction
        return size

    def finish(self, stats: dict) -> None:
        """Bits (packed and int32) and the upload ratio; under a profile, per device class."""
        per_tier = stats["by_tier"]
        for key in ("bits_up", "bits_int32_up", "item_bits_up", "item_bits_int32_up",
                    "item_reference_bits"):
            if any(key in t for t in per_tier.values()):
                stats[key] = sum(t.get(key, 0) for t in per_tier.values())
        if "item_bits_up" in stats:
            stats["upload_ratio"] = stats["item_bits_up"] / max(stats["item_reference_bits"], 1)
        if self.profile is not None:
            stats["by_class"] = _finish_class_stats(self._per_class)
            stats["sim_seconds"] = max((c["seconds_max"] for c in stats["by_class"].values()),
                                       default=0.0)
            stats["late"] = sum(c["late"] for c in stats["by_class"].values())
        for key in ("bits_up", "bits_int32_up", "item_bits_up", "item_bits_int32_up",
                    "item_reference_bits", "late"):
            if key in stats:
                self.totals[key] = self.totals.get(key, 0) + stats[key]

    # ------------------------------------------------------------------ evaluation
    def serving_vectors(self) -> dict:
        """The vectors users are evaluated with: their private vectors, or with
        ``refit_epochs`` > 0 their vectors refit to the current global model
        (``fastfair.fl.serve``), computed once per round."""
        cfg = self.cfg
        if not cfg.refit_epochs:
            return self.user_vectors
        if self._served is None or self._served[0] != self.round_index:
            vectors = serve.refit_with(cfg, self.data, torch.arange(self.data.num_users),
                                       self.tables, self.head, self.round_index)
            self._served = (self.round_index, vectors)
        return self._served[1]

    def _rows(self, users: Tensor, items: Tensor) -> Tensor:
        uv = {k: v[users] for k, v in self.serving_vectors().items()}
        if self.cfg.arch == "mf":
            return score("mf", uv["gmf"][:, None], None, self.tables["gmf"][items], None, None)
        return score("neumf", uv["gmf"][:, None], uv["mlp"][:, None], self.tables["gmf"][items],
                     self.tables["mlp"][items], self.head)

    @torch.no_grad()
    def evaluate(self, users: Optional[Tensor] = None) -> dict:
        """The global model with each user's private vectors, on the data's test protocol, over
        ``users`` (default: every user)."""
        data, ks = self.data, tuple(self.cfg.ks)
        if users is None:
            users = torch.arange(data.num_users)
        if data.protocol == "loo":
            return metrics.sampled_metrics(self._rows, users, data.test_items[users],
                                           data.test_negatives[users], ks=ks)
        return metrics.full_ranking_metrics(
            self._score_all, users, data.train_indptr, data.train_items, data.test_indptr,
            data.test_items, data.num_items, ks=ks)

    def evaluate_by_tier(self) -> dict:
        """``evaluate`` over the users of each tier, by tier label: whose recommendations a
        method serves well (a tier a method cannot train keeps its initial user vectors)."""
        return {tier.label: self.evaluate(torch.nonzero(self.tier_of == t).flatten())
                for t, tier in enumerate(self.tiers)}

    def _score_all(self, users: Tensor) -> Tensor:
        vectors = self.serving_vectors()
        mlp = vectors["mlp"][users] if self.head is not None else None
        return score_all_items(self.cfg.arch, vectors["gmf"][users], mlp,
                               self.tables["gmf"], self.tables.get("mlp"), self.head)

    # ------------------------------------------------------------------ checkpoints
    def _fingerprint(self) -> dict:
        d = self.data
        # A position-weighted sum of the train items tells apart datasets of equal sizes.
        position = torch.arange(d.num_train, dtype=torch.int64) % 65521 + 1
        return {"name": d.name, "num_users": d.num_users, "num_items": d.num_items,
                "num_train": d.num_train, "protocol": d.protocol,
                "checksum": int((d.train_items * position).sum())}

    def state_dict(self) -> dict:
        """Everything later rounds depend on, as tensors and plain containers."""
        return {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(self.cfg),
                "data": self._fingerprint(), **self.round_state(),
                "tables": dict(self.tables), "user_vectors": dict(self.user_vectors),
                "head": None if self.head is None else self.head.state_dict(),
                "optimizer_states": dict(self.optimizer_states)}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; the config and data must be the ones it was taken with."""
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a fastfair runner checkpoint of format {CHECKPOINT_FORMAT}")
        config = dataclasses.asdict(self.cfg)
        saved = _with_defaults(state["config"])
        if saved != config:
            diff = sorted(k for k in config if saved.get(k) != config[k])
            raise ValueError(f"checkpoint was taken with a different config: {diff}")
        if state["data"] != self._fingerprint():
            raise ValueError(f"checkpoint was taken on different data: {state['data']} vs "
                             f"{self._fingerprint()}")
        for name in self._table_names():
            self.tables[name] = state["tables"][name].clone()
            self.user_vectors[name] = state["user_vectors"][name].clone()
        if self.head is not None:
            self.head.load_state_dict(state["head"])
        self.load_round_state(state)
        self.optimizer_states = dict(state["optimizer_states"])
        self._served = None
        self._svd.clear()
        self._projections.clear()

    @classmethod
    def load(cls, path, data: InteractionData, workers: int = 1,
             pool: str = "auto") -> "FederatedRunner":
        """A runner that continues the checkpointed run on ``data`` exactly where it stopped."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint at {path}")
        state = torch.load(path, weights_only=True)
        if not isinstance(state, dict) or "config" not in state:
            raise ValueError(f"{path} is not a fastfair runner checkpoint")
        config = _with_defaults(state["config"])
        config["ks"] = tuple(config["ks"])
        runner = cls(data, Config(**config), workers=workers, pool=pool)
        runner.load_state_dict(state)
        return runner


# Settings whose default changed when they were added: what a config without them ran with.
LEGACY_SETTINGS = {"head_init": "torch"}


def _with_defaults(config: dict) -> dict:
    """A checkpoint's config with the settings added after it was written at what it ran with:
    their defaults, or ``LEGACY_SETTINGS``."""
    return {**{f.name: f.default for f in dataclasses.fields(Config)}, **LEGACY_SETTINGS,
            **config}


def round_seed(seed: int, round_index: int) -> int:
    """The hash seed of round ``round_index`` for a table of seed ``seed`` under
    ``subspace="round"``: ``fmix32(fmix32(seed ^ SUBSPACE_SALT) ^ round_index)``."""
    return hashing.fmix32_int(hashing.fmix32_int(seed ^ SUBSPACE_SALT) ^ round_index)


def _deferred(entries: int) -> bool:
    """Whether an item table of ``entries`` parameters steps with ``DeferredAdam``."""
    return entries >= DEFERRED_MIN_ENTRIES


def _unseen_items(pos: Tensor, num_items: int) -> Tensor:
    """The client's positives sorted and unique, for ``draw_negatives``; a ValueError when they
    cover the catalogue (no item is left to draw: redrawing would never end)."""
    seen = torch.unique(pos)
    if seen.numel() >= num_items:
        raise ValueError(f"negative_sampling 'unseen': the client's {seen.numel()} positives "
                         f"cover all {num_items} items, so no negative can be drawn")
    return seen


def _hits(items: Tensor, seen: Tensor) -> Tensor:
    """Whether each of ``items`` is in ``seen`` (sorted, non-empty)."""
    at = torch.searchsorted(seen, items).clamp_max_(seen.numel() - 1)
    return seen[at] == items


def draw_negatives(gen: torch.Generator, rows: int, negatives: int, num_items: int,
                   seen: Optional[Tensor] = None) -> Tensor:
    """``[rows, negatives]`` items drawn from ``gen``: ``torch.randint`` over the catalogue,
    then, when ``seen`` (the client's positives, sorted and unique: ``_unseen_items``) is
    given, every entry that hit one of them redrawn, all at once and in row-major order, until
    none does: each entry is then uniform over the unseen items."""
    negs = torch.randint(0, num_items, (rows, negatives), generator=gen)
    if seen is None or not seen.numel():
        return negs
    flat = negs.view(-1)
    todo = torch.nonzero(_hits(flat, seen)).flatten()
    while todo.numel():
        redrawn = torch.randint(0, num_items, (todo.numel(),), generator=gen)
        flat[todo] = redrawn
        todo = todo[_hits(redrawn, seen)]
    return negs


def _epoch_draws(cfg: Config, pos: Tensor, num_items: int, gen: torch.Generator):
    """Each epoch's ``(order, negatives)``: the positives in a fresh random order, and
    ``cfg.negatives`` items per positive (``draw_negatives``). Drawn lazily, epoch by epoch."""
    seen = _unseen_items(pos, num_items) if cfg.negative_sampling == "unseen" else None
    for _ in range(cfg.local_epochs):
        order = pos[torch.randperm(pos.numel(), generator=gen)]
        yield order, draw_negatives(gen, pos.numel(), cfg.negatives, num_items, seen)


def _settings_reason(cfg: Config, kernel: str, table_entries) -> Optional[str]:
    """Why the settings alone keep item tables of ``table_entries`` parameters each out of
    ``fused.train`` (None: they do not)."""
    if kernel == "autograd":
        return "the autograd loop was asked for"
    if cfg.optimizer != "adam" or cfg.optimizer_state != "fresh":
        return "the fused kernel trains with a fresh Adam only"
    if kernel == "auto" and any(not _deferred(n) for n in table_entries):
        return "item tables this small train in less memory in the autograd loop"
    return None


def fused_reason(cfg: Config, model: ClientModel, kernel: str, optimizer_state,
                  optimizers) -> Optional[str]:
    """Why this local round runs the autograd loop rather than ``fused.train`` (None: fused)."""
    if optimizer_state is not None or optimizers is not None:
        return "optimizers or their state were given"
    reason = _settings_reason(cfg, kernel, [p.numel() for name, p in model.named_parameters()
                                            if name.startswith("item_")])
    return reason if reason is not None else fused.unsupported(model)


def train_client(cfg: Config, pos: Tensor, num_items: int, model: ClientModel,
                 gen: torch.Generator, optimizer_state: Optional[list] = None,
                 optimizers: Optional[list] = None, kernel: Optional[str] = None) -> tuple:
    """A client's local round: ``cfg.local_epochs`` passes over its positives ``pos`` in
    shuffled batches, each positive paired with ``cfg.negatives`` items drawn every epoch
    (``draw_negatives``: uniformly over the catalogue, or with ``negative_sampling="unseen"``
    over the items not in ``pos``), minimising the BPR (``-log sigma(s_pos - s_neg)``) or BCE
    loss (plus ``cfg.reg`` times the batch's squared embedding norms over the batch size) with
    ``client_optimizers`` (or the given ``optimizers``), resumed from ``optimizer_state`` when
    given. ``kernel`` (default ``cfg.local_kernel``, see ``Config``): ``"fused"`` runs the
    round in ``fastfair.fl.fused`` where it can, ``"autograd"`` with autograd and torch
    optimizers, ``"auto"`` fused for large item tables only.
    Returns the mean loss of the last epoch and, with ``cfg.optimizer_state == "persistent"``,
    the optimizers' states (else None). Its only use of ``gen`` is what ``replay_local_train``
    replays."""
    kernel = cfg.local_kernel if kernel is None else kernel
    if kernel not in LOCAL_KERNELS:
        raise ValueError(f"kernel must be one of {LOCAL_KERNELS}, got {kernel!r}")
    epochs = _epoch_draws(cfg, pos, num_items, gen)
    if fused_reason(cfg, model, kernel, optimizer_state, optimizers) is None:
        return fused.train(model, epochs, cfg.batch_size, cfg.loss, cfg.reg, cfg.lr), None
    opts = optimizers if optimizers is not None else client_optimizers(model, cfg.optimizer,
                                                                       cfg.lr)
    if optimizer_state is not None:
        for opt, state in zip(opts, optimizer_state):
            opt.load_state_dict(state)
    # Forwards read rows with their deferred Adam steps taken: the trajectory is Adam's.
    hooks = [opt.track(m) for opt in opts if isinstance(opt, DeferredAdam)
             for m in model.modules() if isinstance(m, (nn.Embedding, HashedEmbedding))
             and any(m.weight is p for g in opt.param_groups for p in g["params"])]
    last = 0.0
    try:
        for order, negs in epochs:
            total = 0.0
            for start in range(0, pos.numel(), cfg.batch_size):
                p = order[start:start + cfg.batch_size]
                q = negs[start:start + cfg.batch_size]
                # One lookup per table for positives and negatives together: each table's
                # backward (a zero-filled gradient of the whole array) then runs once per step.
                scores = model(torch.cat([p[:, None], q], 1), with_sqnorm=bool(cfg.reg))
                if cfg.reg:
                    scores, sqnorm = scores
                s_pos, s_neg = scores[:, 0], scores[:, 1:]
                if cfg.loss == "bpr":
                    loss = -F.logsigmoid(s_pos[:, None] - s_neg).mean()
                else:
                    loss = (F.binary_cross_entropy_with_logits(s_pos, torch.ones_like(s_pos))
                            * p.numel() + F.binary_cross_entropy_with_logits(
                                s_neg, torch.zeros_like(s_neg)) * q.numel()) / (p.numel()
                                                                                 + q.numel())
                if cfg.reg:
                    loss = loss + cfg.reg * sqnorm / p.numel()
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in opts:
                    opt.step()
                total += float(loss.detach()) * p.numel()
            last = total / max(pos.numel(), 1)
    finally:
        for hook in hooks:
            hook.remove()
    for opt in opts:
        if isinstance(opt, DeferredAdam):
            opt.flush()
    persistent = cfg.optimizer_state == "persistent"
    return last, ([opt.state_dict() for opt in opts] if persistent else None)


def replay_local_train(gen: torch.Generator, positives: Tensor, cfg: Config,
                       num_items: int) -> None:
    """Advance ``gen`` by the draws ``train_client`` makes for a client whose training items
    are ``positives`` (under ``negative_sampling="unseen"`` the redraws depend on which items
    they are, not only on how many)."""
    seen = _unseen_items(positives, num_items) if cfg.negative_sampling == "unseen" else None
    for _ in range(cfg.local_epochs):
        torch.randperm(positives.numel(), generator=gen)
        draw_negatives(gen, positives.numel(), cfg.negatives, num_items, seen)


def client_optimizers(model: nn.Module, kind: str, lr: float) -> list:
    """The client's optimizers. Adam: the large item tables (sparse gradients, see
    ``DEFERRED_MIN_ENTRIES``) step with ``DeferredAdam``, which equals Adam but touches only the
    rows a batch used; a dense Adam step rewrites every entry of a device's table, which made it
    the bulk of a round. Everything else steps with ``ScatterAdam``: fused Adam, the small tables'
    sparse gradients scattered into their moments without a dense gradient (its state is
    ``torch.optim.Adam``'s, so the optimizer states of earlier checkpoints load). SGD: one fused
    SGD."""
    if kind == "sgd":
        return [torch.optim.SGD(model.parameters(), lr=lr, fused=True)]
    tables = [m.weight for m in model.modules()
              if getattr(m, "sparse", False) and _deferred(m.weight.numel())]
    ids = {id(p) for p in tables}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return ([DeferredAdam(tables, lr=lr)] if tables else []) + \
        [ScatterAdam(rest, lr=lr, fused=True)]


def _dense(table):
    """A received item table as a tensor (a compressed one rebuilt)."""
    return table.dense() if isinstance(table, Received) else table


def _item_mean(table: Tensor, uploads: list) -> Tensor:
    """``W[i] + mean`` of the nonzero changes ``U_c[i] - W[i]`` over the uploads (rows no upload
    changed stay)."""
    change = torch.zeros_like(table)
    count = torch.zeros(table.shape[0], 1)
    for upload in uploads:
        diff = upload - table
        change += diff
        count += (diff != 0).any(1, keepdim=True)
    return table + change / count.clamp_min(1)


def _add_class_stats(per_class: dict, name: str, sent: dict) -> None:
    c = per_class.setdefault(name, {"clients": 0, "late": 0, "seconds": [], "actions": []})
    c["clients"] += 1
    c["late"] += int(sent["late"])
    c["seconds"].append(sent["seconds"])
    if sent.get("actions"):
        c["actions"].append(sent["actions"])


def _finish_class_stats(per_class: dict) -> dict:
    """Per device class: clients, late clients, mean and max simulated seconds, mean K."""
    return {name: {"clients": c["clients"], "late": c["late"],
                   "seconds_mean": sum(c["seconds"]) / len(c["seconds"]),
                   "seconds_max": max(c["seconds"]),
                   "actions_mean": (sum(c["actions"]) / len(c["actions"])
                                    if c["actions"] else None)}
            for name, c in per_class.items()}


class _Excluded:
    """Marks a tier the method cannot represent (its devices sit out)."""

    def __repr__(self) -> str:
        return "excluded"


_EXCLUDED = _Excluded()


def _view_name(spec) -> str:
    if spec is _EXCLUDED:
        return "excluded"
    if spec is None:
        return "dense"
    if isinstance(spec, HashSpec):
        return f"hashed {spec.memory_size:,}"
    if isinstance(spec, LowRank):
        return f"rank {spec.rank}"
    return f"{spec.width} columns"


@torch.no_grad()
def popularity_metrics(data: InteractionData, ks=(10,)) -> dict:
    """The no-training baseline: every user gets the items ranked by their number of training
    interactions, ``s(u, i) = #{v : i in train(v)}``, scored on the data's test protocol (the
    same metrics as ``FederatedRunner.evaluate``). A federated model that ends below it has not
    learned more than item popularity."""
    counts = torch.bincount(data.train_items, minlength=data.num_items).float()
    users = torch.arange(data.num_users)
    ks = tuple(ks) if isinstance(ks, (tuple, list)) else (ks,)
    if data.protocol == "loo":
        return metrics.sampled_metrics(lambda u, items: counts[items], users, data.test_items,
                                       data.test_negatives, ks=ks)
    return metrics.full_ranking_metrics(
        lambda u: counts.expand(u.numel(), -1), users, data.train_indptr, data.train_items,
        data.test_indptr, data.test_items, data.num_items, ks=ks)


def train(data: InteractionData, config: Config, on_eval=None, workers: int = 1,
          pool: str = "auto") -> list:
    """Run every round, evaluating every ``eval_every`` rounds and after the last; returns the
    list of evaluation records (round stats + metrics) and passes each to ``on_eval``.
    ``workers`` > 1 trains each round's clients that many at a time, in threads or processes
    (``pool``, see ``FederatedRunner.pool_kind``), with the same results."""
    records = []
    with FederatedRunner(data, config, workers=workers, pool=pool) as runner:
        for r in range(1, config.rounds + 1):
            stats = runner.run_round()
            if r % config.eval_every == 0 or r == config.rounds:
                rec = {"method": config.method, "tiers": config.tiers, **stats,
                       **runner.evaluate(), "totals": dict(runner.totals)}
                records.append(rec)
                if on_eval is not None:
                    on_eval(rec)
    return records
