"""Serving vectors: each user's vectors refit to the current global model before it is served.

A user's private vectors are fitted, round after round, to the item tables its device held:
for a device below full capacity a fold of the global table (a 1/32 device on MovieLens-100K
holds 420 numbers per table), and for every device the tables of the last round it took part
in. Scoring the global model with those vectors is a mismatch. On ML-100K at the `2:0-5` mix
the 1/32 users served that way reach HR@10 0.24, below users whose vectors were never trained
(0.29, `docs/results.md`). A device that is served by the global model can refit its vectors
to it: the vectors are ``2d`` numbers, and a few hundred of the user's interactions determine
them. The private training vectors are not changed; training is the same with or without
this.

**The fit.** User ``u`` takes a sample ``P_u`` of its training positives (at most ``sample``
of them, all when ``sample == 0``). The global item tables and head are frozen. The serving
vectors ``(p_u, p'_u)`` start at zero and take ``epochs`` full-batch Adam steps (rate ``lr``) on

    L_u = mean_{i in P_u} l(s(u, i), s(u, j_{u,e,i,1}), ..., s(u, j_{u,e,i,r}))

Here ``l`` is the run's loss (BPR: ``mean_t -log sigma(s_i - s_j_t)``; BCE: the positive and its
``r = negatives`` negatives as labelled logits), and the ``j`` are uniform negatives, redrawn
every epoch ``e``. Adam is elementwise, so one optimizer over ``sum_u L_u`` gives every user
exactly the steps of its own fit, whoever is refit with it.

**Randomness is counter-based.** The sample, and the negatives of user ``u`` at epoch ``e``,
are hashes of ``(seed, round, u, e, slot)`` (MurmurHash3's fmix32; a negative is the hash mod
``num_items``, whose bias is below ``num_items / 2^32``). So a user's serving vectors depend
only on its own data and the global model. A Flower device that refits alone gets the vectors
the in-process runner computes for it in a batch.

**On the device** this holds the sample's rows and their negatives' rows: ``sample * (1 +
negatives)`` rows of ``d`` per item table, downloaded from the server, never the whole table.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import hashing
from .data import InteractionData
from .model import Head, score

# Salts of the serving stream, apart from every other hash the package keys with the seed.
SERVE_SALT = 0x5E7F1A7B


def stream_key(seed: int, round_index: int) -> int:
    """The 32-bit key of the serving refit after ``round_index`` rounds of a run seeded
    ``seed``."""
    return hashing.fmix32_int(hashing.fmix32_int(seed ^ SERVE_SALT) ^ round_index)


def user_keys(users: Tensor, key: int) -> Tensor:
    """Each user's own 32-bit key (int64)."""
    return hashing.fmix32(users.long() ^ key)


def sample_positives(data: InteractionData, users: Tensor, sample: int, key: int) -> tuple:
    """``(owner, items, rank)`` of each user's sample of training positives.

    The user keeps the ``sample`` items with the smallest ``fmix32(item ^ user key)`` (every item
    when ``sample == 0``), in that order. ``owner`` is the position of the user in ``users``
    and ``rank`` the item's position in its user's sample."""
    indptr = data.train_indptr
    starts, ends = indptr[users], indptr[users + 1]
    sizes = ends - starts
    owner = torch.repeat_interleave(torch.arange(users.numel()), sizes)
    first = torch.cumsum(sizes, 0) - sizes
    within = torch.arange(owner.numel()) - first[owner]
    items = data.train_items[starts[owner] + within]
    order_key = hashing.fmix32(items.long() ^ user_keys(users, key)[owner])
    order = torch.sort((owner << 32) | order_key, stable=True).indices
    owner, items = owner[order], items[order]
    rank = torch.arange(owner.numel()) - first[owner]
    if sample:
        keep = rank < sample
        owner, items, rank = owner[keep], items[keep], rank[keep]
    return owner, items.long(), rank


def negatives(user_key: Tensor, rank: Tensor, epoch: int, count: int, num_items: int) -> Tensor:
    """The ``count`` negatives of each sampled positive at ``epoch``: ``[len(rank), count]``.

    ``user_key`` is each positive's user key. fmix32 is a bijection of 32-bit words, so within
    a user and an epoch no two slots share a hash."""
    epoch_key = hashing.fmix32((user_key + (epoch + 1) * hashing.GOLDEN) & hashing.MASK32)
    slots = rank[:, None] * count + torch.arange(count)
    return hashing.fmix32((epoch_key[:, None] + slots) & hashing.MASK32) % num_items


def _losses(s_pos: Tensor, s_neg: Tensor, loss: str) -> Tensor:
    """Each positive's loss, as ``local_train`` defines it (the mean over its terms)."""
    if loss == "bpr":
        return -F.logsigmoid(s_pos[:, None] - s_neg).mean(1)
    return (F.softplus(-s_pos) + F.softplus(s_neg).sum(1)) / (1 + s_neg.shape[1])


@torch.enable_grad()  # evaluation runs under no_grad; this fit needs autograd
def refit(data: InteractionData, users: Tensor, tables: dict, head: Optional[Head], *,
          arch: str, loss: str, negatives_per_positive: int, epochs: int, lr: float,
          sample: int, key: int) -> dict:
    """The serving vectors of ``users`` (module doc) against ``tables`` (``gmf`` and, for
    NeuMF, ``mlp``: ``[num_items, d]``) and ``head``, as ``{"gmf": [len(users), d], ...}``."""
    users = users.long()
    d = tables["gmf"].shape[1]
    names = ("gmf",) if arch == "mf" else ("gmf", "mlp")
    vectors = {name: torch.zeros(users.numel(), d, requires_grad=True) for name in names}
    if head is not None:
        head = copy.deepcopy(head).requires_grad_(False)
    owner, items, rank = sample_positives(data, users, sample, key)
    if owner.numel() == 0 or epochs == 0:
        return {k: v.detach() for k, v in vectors.items()}
    keys = user_keys(users, key)[owner]
    weight = 1.0 / torch.bincount(owner, minlength=users.numel()).to(torch.float32)[owner]
    pos_rows = {name: tables[name][items] for name in names}
    opt = torch.optim.Adam(list(vectors.values()), lr=lr)
    for epoch in range(epochs):
        neg = negatives(keys, rank, epoch, negatives_per_positive, data.num_items)
        rows = {name: torch.cat([pos_rows[name][:, None], tables[name][neg]], 1)
                for name in names}
        s = score(arch, vectors["gmf"][owner][:, None], vectors["mlp"][owner][:, None]
                  if head is not None else None, rows["gmf"], rows.get("mlp"), head)
        objective = (_losses(s[:, 0], s[:, 1:], loss) * weight).sum()
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()
    return {k: v.detach() for k, v in vectors.items()}


def refit_with(cfg, data: InteractionData, users: Tensor, tables: dict, head: Optional[Head],
               round_index: int) -> dict:
    """``refit`` with a run's settings (``fastfair.fl.runner.Config``: ``arch``, ``loss``,
    ``negatives``, ``refit_epochs``, ``refit_lr``, ``refit_sample``, ``seed``) after
    ``round_index`` rounds."""
    return refit(data, users, tables, head, arch=cfg.arch, loss=cfg.loss,
                 negatives_per_positive=cfg.negatives, epochs=cfg.refit_epochs,
                 lr=cfg.refit_lr, sample=cfg.refit_sample,
                 key=stream_key(cfg.seed, round_index))
