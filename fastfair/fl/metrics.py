"""Top-K ranking metrics for implicit-feedback recommenders, vectorised over batches of users.

A *scorer* is any callable ``score(users: LongTensor[b], items: LongTensor[b, c]) -> Tensor[b, c]``
giving the model's predicted preference of ``users[r]`` for ``items[r, j]`` (higher is better). The
full-catalogue metric takes ``score_all(users: LongTensor[b]) -> Tensor[b, num_items]`` instead, so
a model can score every item with one matrix product. Scorers should return logits, not
probabilities: a float32 sigmoid saturates to exactly 1.0 and turns good items into ties.

Two protocols, both with binary relevance and the discount ``1 / log2(p + 2)`` at 0-based
position p:

* ``sampled_metrics``: the NCF leave-one-out protocol (HR@10 / NDCG@10 ranking the held-out item
  among it and its 99 sampled negatives), as in hexiangnan/neural_collaborative_filtering.
* ``full_ranking_metrics``: NDCG@20 over the full catalogue with the user's train items masked, the
  metric of the FAIR reference code (apd10/FLCF).

Ties are resolved **pessimistically** everywhere: an item tied with a relevant item ranks above it
whenever that item is not relevant. A constant scorer therefore gets no credit, and a model cannot
gain from collapsing its scores. For tie-free scores (any real model scoring logits) both functions
give exactly the references' numbers, up to the differences listed in each docstring.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

Scorer = Callable[[Tensor, Tensor], Tensor]
FullScorer = Callable[[Tensor], Tensor]

# Bytes per catalogue entry a full-ranking batch holds at once: the scorer's output, its masked
# copy, and a comparison mask, with room to spare for float64 scores.
BYTES_PER_SCORE = 24
# With this budget a batch of the 359,014-item Goodreads catalogue holds 7 users (~58 MiB).
SCORE_BUDGET_BYTES = 64 << 20
SAMPLED_BATCH_SIZE = 4096


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def _check_ks(ks: Union[int, Sequence[int]], letter: str = "K") -> Tuple[int, ...]:
    """The distinct cut-offs of ``ks``, ascending; ``letter`` names them in errors (these
    metrics write HR@K, ``fastfair.fl.xc`` writes P@k)."""
    if isinstance(ks, int) and not isinstance(ks, bool):
        ks = (ks,)
    try:
        ks = tuple(ks)
    except TypeError:
        raise TypeError(f"ks must be an int or a sequence of ints, got {ks!r}") from None
    if not ks:
        raise ValueError(f"ks must name at least one cut-off {letter}, got an empty sequence")
    for k in ks:
        _check_int(f"every {letter} in ks", k, 1)
    return tuple(sorted(set(ks)))


def _check_index(name: str, t, dim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t.long()


def _check_scores(s, shape: Tuple[int, int], what: str) -> Tensor:
    if not isinstance(s, Tensor) or not s.is_floating_point():
        desc = s.dtype if isinstance(s, Tensor) else type(s).__name__
        raise TypeError(f"{what} must return a floating-point tensor, got {desc}")
    if tuple(s.shape) != shape:
        raise ValueError(f"{what} must return shape {shape}, got {tuple(s.shape)}")
    # A NaN compares false with everything, so it would silently rank first under ">=" counting.
    if torch.isnan(s).any():
        raise ValueError(f"{what} returned NaN scores")
    return s


def _discounts(kmax: int) -> Tensor:
    """``d[p] = 1 / log2(p + 2)`` for ``p < kmax``, in float64."""
    return 1.0 / torch.log2(torch.arange(kmax, dtype=torch.float64) + 2.0)


def sampled_metrics(score: Scorer, users: Tensor, test_items: Tensor, negatives: Tensor,
                    ks: Union[int, Sequence[int]] = (10,),
                    batch_size: int = SAMPLED_BATCH_SIZE) -> Dict[str, float]:
    """HR@K and NDCG@K of the leave-one-out protocol with sampled negatives.

    Row ``i`` describes user ``users[i]``: its held-out item ``t_i = test_items[i]`` (``-1``, or any
    negative value, for a user with nothing held out: that row is skipped) and its sampled
    negatives ``negatives[i, :]`` (``n`` items, 99 in the NCF protocol; a skipped row's negatives
    are ignored). Candidates are items, not slots: with ``N_i`` the *set* of items in
    ``negatives[i, :]`` minus ``t_i`` (a repeated negative counts once, one equal to ``t_i`` not at
    all), the held-out item's 0-based rank is, with ``s`` the scores,

        r_i = #{j in N_i : s(j) >= s(t_i)}

    (ties count as ranked above the held-out item, so a constant scorer gets r_i = |N_i|). Then

        HR@K   = mean_i [r_i < K]
        NDCG@K = mean_i [r_i < K] / log2(r_i + 2)

    over the ``U`` kept rows. Returns ``{"hr@K": ..., "ndcg@K": ... for each K, "users": U}``; the
    metrics are NaN when no row is kept. ``score`` is called once per batch of at most
    ``batch_size`` kept rows, on the ``[b, n + 1]`` item matrix ``[t_i, negatives[i, :]]``.

    Compared with hexiangnan/neural_collaborative_filtering (``evaluate.py``): the same
    candidates (it keys scores by item id in a dict, which merges repeated items), rank, HR and
    NDCG (``log 2 / log(r + 2)`` there), except that the reference breaks ties by that dict's
    iteration order (neither optimistic nor pessimistic).
    """
    ks = _check_ks(ks)
    batch_size = _check_int("batch_size", batch_size, 1)
    users = _check_index("users", users, 1)
    test_items = _check_index("test_items", test_items, 1)
    negatives = _check_index("negatives", negatives, 2)
    if test_items.shape[0] != users.shape[0] or negatives.shape[0] != users.shape[0]:
        raise ValueError(f"users, test_items and negatives must have one row per user, got "
                         f"{users.shape[0]}, {test_items.shape[0]} and {negatives.shape[0]} rows")
    if negatives.shape[1] == 0:
        raise ValueError("negatives must hold at least one item per user, got 0 columns")

    keep = test_items >= 0
    users, test_items, negatives = users[keep], test_items[keep], negatives[keep]
    if (negatives < 0).any():
        row = int((negatives < 0).any(1).nonzero()[0])
        raise ValueError(f"negatives of user {int(users[row])} hold a negative item id: "
                         f"{negatives[row].tolist()}")
    # Published negative files repeat items: in the NCF-layout Last.fm split, 86 of 1741 users
    # have their held-out item among their "negatives". Each item is one candidate, as in NCF.
    ordered = negatives.sort(1)
    first = torch.ones_like(negatives, dtype=torch.bool)
    first[:, 1:] = ordered.values[:, 1:] != ordered.values[:, :-1]
    counted = torch.empty_like(first).scatter_(1, ordered.indices, first)
    counted &= negatives != test_items[:, None]

    n_users = users.shape[0]
    hits = {k: 0.0 for k in ks}
    gains = {k: 0.0 for k in ks}
    with torch.no_grad():
        for lo in range(0, n_users, batch_size):
            b_users = users[lo:lo + batch_size]
            b_tests = test_items[lo:lo + batch_size, None]
            items = torch.cat([b_tests, negatives[lo:lo + batch_size]], 1)
            s = _check_scores(score(b_users, items), tuple(items.shape), "score")
            above = (s[:, 1:] >= s[:, :1]) & counted[lo:lo + batch_size].to(s.device)
            rank = above.sum(1).double().cpu()
            gain = 1.0 / torch.log2(rank + 2.0)
            for k in ks:
                hit = rank < k
                hits[k] += float(hit.sum())
                gains[k] += float(gain[hit].sum())

    out: Dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = hits[k] / n_users if n_users else math.nan
        out[f"ndcg@{k}"] = gains[k] / n_users if n_users else math.nan
    out["users"] = n_users
    return out


def _check_csr(name: str, indptr, items, num_items: int) -> Tuple[Tensor, Tensor]:
    indptr = _check_index(f"{name}_indptr", indptr, 1)
    items = _check_index(f"{name}_items", items, 1)
    if indptr.numel() == 0 or int(indptr[0]) != 0 or int(indptr[-1]) != items.numel():
        raise ValueError(f"{name}_indptr must start at 0 and end at len({name}_items) = "
                         f"{items.numel()}, got {indptr[:1].tolist()} ... {indptr[-1:].tolist()}")
    if (indptr[1:] < indptr[:-1]).any():
        raise ValueError(f"{name}_indptr must be non-decreasing")
    if items.numel() and (int(items.min()) < 0 or int(items.max()) >= num_items):
        raise ValueError(f"{name}_items must lie in [0, num_items = {num_items}), got values in "
                         f"[{int(items.min())}, {int(items.max())}]")
    return indptr, items


def _gather_rows(indptr: Tensor, items: Tensor, rows: Tensor) -> Tuple[Tensor, Tensor]:
    """CSR rows ``rows`` as (position in ``rows``, item) pairs."""
    starts, lens = indptr[rows], indptr[rows + 1] - indptr[rows]
    owner = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), lens)
    first = torch.cumsum(lens, 0) - lens
    pos = torch.arange(owner.numel(), device=rows.device) - first[owner] + starts[owner]
    return owner, items[pos]


def full_ranking_metrics(score_all: FullScorer, users: Tensor, train_indptr: Tensor,
                         train_items: Tensor, test_indptr: Tensor, test_items: Tensor,
                         num_items: int, ks: Union[int, Sequence[int]] = (20,),
                         batch_size: Optional[int] = None) -> Dict[str, float]:
    """NDCG@K, recall@K and HR@K ranking the full catalogue with the user's train items masked.

    The interactions are CSR matrices indexed by user id: user ``u``'s train items are
    ``train_items[train_indptr[u]:train_indptr[u + 1]]``, its test items (the relevant set ``R_u``,
    duplicates merged) likewise. For each user in ``users`` with ``R_u`` non-empty (the others are
    skipped), the candidates are all items except ``u``'s train items, and items scored ``-inf`` are
    never recommended. A relevant candidate ``j`` of score ``s_j`` sits at the 0-based position

        p_j = #{candidates i : s_i > s_j} + #{irrelevant candidates i : s_i = s_j}
              + #{relevant candidates i placed before j : s_i = s_j}

    (pessimistic ties: a relevant item ranks below every irrelevant item it ties with; the order
    within a group of tied relevant items does not change the set of positions they fill, hence
    none of the metrics). With ``hits_u = #{j in R_u : p_j < K}``,

        DCG@K    = sum_{j in R_u, p_j < K} 1 / log2(p_j + 2)
        IDCG@K   = sum_{p < min(K, |R_u|)} 1 / log2(p + 2)
        NDCG@K   = mean_u DCG@K / IDCG@K
        recall@K = mean_u hits_u / |R_u|
        HR@K     = mean_u [hits_u > 0]

    over the ``U`` evaluated users. A test item that is also a train item is relevant but masked:
    it counts in ``IDCG`` and ``|R_u|`` and can never be a hit. Returns ``{"ndcg@K", "recall@K",
    "hr@K" for each K, "users": U}``; the metrics are NaN when no user is evaluated.

    ``score_all`` is called once per batch of at most ``batch_size`` users; by default the batch
    holds ``SCORE_BUDGET_BYTES / (BYTES_PER_SCORE * num_items)`` users (at least 1). Only the top
    ``max(ks)`` values of each row are sorted (``torch.topk``), plus one pass counting the ties at
    the K-th value, so the cost per user is O(num_items + |R_u| log |R_u|).

    Compared with the FAIR reference (apd10/FLCF ``util.evaluate``, called with ``user_batch=10,
    full=True``): it sets the train items' scores to -10000, marks the test items 1 in a dense
    target, and averages ``sklearn.metrics.ndcg_score(target, scores, k=20)`` over batches of 10
    users. That is the same DCG (linear gain, ``1 / log2(p + 2)`` discount, cut at K) and IDCG
    (ideal order cut at K, i.e. ``min(K, |R_u|)`` ones) over the users of its test file, with three
    differences: sklearn averages the gain over each tie group (McSherry & Najork) where this is
    pessimistic, which differs only when a relevant item ties with an irrelevant one within the top
    K; the reference averages per-batch means, weighting the users of a short last batch more, where
    this averages over users; and masked items rank last there but are excluded here, which differs
    only when fewer than K candidates remain or the model scores below -10000.
    """
    num_items = _check_int("num_items", num_items, 1)
    ks = _check_ks(ks)
    if batch_size is None:
        batch_size = max(1, SCORE_BUDGET_BYTES // (BYTES_PER_SCORE * num_items))
    batch_size = _check_int("batch_size", batch_size, 1)
    users = _check_index("users", users, 1)
    train_indptr, train_items = _check_csr("train", train_indptr, train_items, num_items)
    test_indptr, test_items = _check_csr("test", test_indptr, test_items, num_items)
    n_rows = min(train_indptr.numel(), test_indptr.numel()) - 1
    if users.numel() and (int(users.min()) < 0 or int(users.max()) >= n_rows):
        raise ValueError(f"users must lie in [0, {n_rows}) (the rows of both CSR matrices), got "
                         f"values in [{int(users.min())}, {int(users.max())}]")

    users = users[test_indptr[users + 1] > test_indptr[users]]
    n_users = users.numel()
    kmax = ks[-1]
    disc = _discounts(kmax)
    ideal = torch.cat([disc.new_zeros(1), torch.cumsum(disc, 0)])
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("ndcg", "recall", "hr")}
    with torch.no_grad():
        for lo in range(0, n_users, batch_size):
            b_users = users[lo:lo + batch_size]
            b = b_users.numel()
            s = _check_scores(score_all(b_users), (b, num_items), "score_all")
            dev = s.device
            row, item = _gather_rows(train_indptr, train_items, b_users)
            s = s.index_put((row.to(dev), item.to(dev)), s.new_tensor(-math.inf))

            # A relevant item below the K-th largest value (the floor) is never a hit. Every item
            # scoring above the floor is among the top K values, so for a relevant item above it
            # the items scoring >= it are counted there; at the floor they need the full row.
            top = torch.topk(s, min(kmax, num_items), dim=1).values
            floor = top[:, -1:]
            at_floor = (s >= floor).sum(1, keepdim=True)

            row, item = _gather_rows(test_indptr, test_items, b_users)
            key = torch.unique(row * num_items + item)
            row, item = key // num_items, key % num_items
            n_rel = torch.bincount(row, minlength=b)
            first = torch.cumsum(n_rel, 0) - n_rel
            col = torch.arange(key.numel(), device=key.device) - first[row]
            rel = s.new_full((b, int(n_rel.max())), -math.inf)
            rel[row.to(dev), col.to(dev)] = s[row.to(dev), item.to(dev)]
            rel = rel.sort(dim=1, descending=True).values

            # The q-th relevant item of a row sorted descending is preceded by the q relevant items
            # before it and by every irrelevant candidate scoring >= it (n_ge - n_rel_ge of them).
            neg_rel = -rel
            n_rel_ge = torch.searchsorted(neg_rel, neg_rel, right=True)
            n_ge = torch.where(rel > floor, torch.searchsorted(-top, neg_rel, right=True), at_floor)
            pos = n_ge - n_rel_ge + torch.arange(rel.shape[1], device=dev)
            live = (rel >= floor) & (rel > -math.inf)
            pos = torch.where(live, pos, torch.full_like(pos, kmax)).cpu()
            gain = torch.where(pos < kmax, disc[pos.clamp(max=kmax - 1)], disc.new_zeros(()))
            n_rel = n_rel.cpu()
            for k in ks:
                hit = pos < k
                n_hit = hit.sum(1)
                dcg = (gain * hit).sum(1)
                sums[f"ndcg@{k}"] += float((dcg / ideal[n_rel.clamp(max=k)]).sum())
                sums[f"recall@{k}"] += float((n_hit.double() / n_rel).sum())
                sums[f"hr@{k}"] += float((n_hit > 0).sum())

    out: Dict[str, float] = {name: v / n_users if n_users else math.nan
                             for name, v in sums.items()}
    out["users"] = n_users
    return out
