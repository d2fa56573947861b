"""A DLRM (bottom MLP, one embedding bag per categorical feature, dot interaction, top MLP) and a
synthetic Criteo-like click stream to train it on.

The model is written with plain ``torch.nn.EmbeddingBag`` tables, as DLRM code is; the example
(``run.py``) turns it into a hashed model with one call to ``fastfair.nn.replace_embeddings``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

# Rows of the 26 categorical features of the Criteo Kaggle (Display Advertising Challenge) data,
# the table sizes DLRM's Kaggle configuration builds.
CRITEO_KAGGLE_ROWS = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683,
                      8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15,
                      286181, 105, 142572)
DENSE_FEATURES = 13


def table_rows(scale: float, min_rows: int = 100) -> list[int]:
    """Criteo Kaggle's table sizes times ``scale``; a table never shrinks below
    ``min(its size, min_rows)``, so the small features keep their (small) vocabularies."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    return [max(min(n, min_rows), round(n * scale)) for n in CRITEO_KAGGLE_ROWS]


def _mlp(sizes: Sequence[int], last_relu: bool) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_relu or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """``logit = top([b, <z_i, z_j> for i > j])`` with ``b = bottom(dense)`` and
    ``z = (b, e_1, ..., e_26)``, ``e_f`` the sum-pooled embedding of feature ``f``'s ids.

    ``forward(dense [B, 13], ids: list of 26 (indices, offsets) pairs) -> logits [B]``.
    """

    def __init__(self, rows: Sequence[int], dim: int = 16, bottom: Sequence[int] = (64,),
                 top: Sequence[int] = (64,), sparse: bool = True):
        super().__init__()
        self.bottom = _mlp([DENSE_FEATURES, *bottom, dim], last_relu=True)
        self.tables = nn.ModuleList(nn.EmbeddingBag(n, dim, mode="sum", sparse=sparse)
                                    for n in rows)
        # DLRM's initialisation: U(-1/sqrt(n), 1/sqrt(n)) for an n-row table.
        with torch.no_grad():
            for t in self.tables:
                bound = 1 / math.sqrt(t.num_embeddings)
                t.weight.uniform_(-bound, bound)
        vectors = len(rows) + 1
        pairs = vectors * (vectors - 1) // 2
        self.register_buffer("_lower", torch.tril_indices(vectors, vectors, offset=-1),
                             persistent=False)
        self.top = _mlp([dim + pairs, *top, 1], last_relu=False)

    def forward(self, dense: Tensor, ids: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        b = self.bottom(dense)
        z = torch.stack([b] + [t(i, o) for t, (i, o) in zip(self.tables, ids)], dim=1)
        dots = torch.bmm(z, z.transpose(1, 2))[:, self._lower[0], self._lower[1]]
        return self.top(torch.cat([b, dots], dim=1)).squeeze(1)

    def embedding_parameters(self) -> list:
        return [p for t in self.tables for p in t.parameters()]


class CriteoLikeStream:
    """Synthetic clicks shaped like Criteo's: 13 dense features, 26 categorical ids with Zipf
    popularity, about 25% positives, and a planted model with per-id effects and pairwise
    interactions, so AUC and log-loss measure how much of the id information a model keeps.

    Feature ``f``'s id of popularity rank ``r`` has probability ``~ (r + 1)^-alpha``; ranks map
    to ids through a fixed random permutation. The click logit is
    ``bias + <w, x> + sum_f a_f[id_f] + sum_{(f, g)} <u_f[id_f], u_g[id_g]>`` over a fixed set
    of feature pairs; ``a`` and ``u`` are drawn once from the data seed.
    """

    def __init__(self, rows: Sequence[int], seed: int = 0, alpha: float = 1.1, rank: int = 4,
                 pairs: int = 12, id_std: float = 1.2, pair_std: float = 0.8,
                 dense_std: float = 0.5):
        gen = torch.Generator().manual_seed(seed)
        self.rows = list(rows)
        k = len(self.rows)
        # Standard deviations of the logit's three parts: ids, id pairs, dense features. An inner
        # product of two rank-r vectors of N(0, s^2) entries has standard deviation sqrt(r) s^2.
        effect_std = id_std / k ** 0.5
        factor_std = (pair_std / pairs ** 0.5 / rank ** 0.5) ** 0.5
        self.cdf, self.perm, self.effect, self.factor = [], [], [], []
        for n in self.rows:
            p = torch.arange(1, n + 1, dtype=torch.float64).pow(-alpha)
            self.cdf.append((p.cumsum(0) / p.sum()).float())
            self.perm.append(torch.randperm(n, generator=gen))
            self.effect.append(effect_std * torch.randn(n, generator=gen))
            self.factor.append(factor_std * torch.randn(n, rank, generator=gen))
        all_pairs = torch.combinations(torch.arange(k), 2)
        self.pairs = all_pairs[torch.randperm(all_pairs.shape[0], generator=gen)[:pairs]]
        self.w = torch.randn(DENSE_FEATURES, generator=gen) * (dense_std / DENSE_FEATURES ** 0.5)
        # The bias that makes the mean click probability of a probe sample 1/4 (by bisection:
        # the mean is increasing in the bias).
        self.bias = 0.0
        probe = self.logit(*self._features(8192, gen)).double()
        lo, hi = -20.0, 20.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float(torch.sigmoid(probe + mid).mean()) < 0.25 else (lo, mid)
        self.bias = (lo + hi) / 2

    def _features(self, batch: int, gen: torch.Generator):
        dense = torch.randn(batch, DENSE_FEATURES, generator=gen)
        ids = []
        for cdf, perm in zip(self.cdf, self.perm):
            rank = torch.searchsorted(cdf, torch.rand(batch, generator=gen))
            ids.append(perm[rank.clamp_(max=len(cdf) - 1)])
        return dense, torch.stack(ids, dim=1)

    def logit(self, dense: Tensor, ids: Tensor) -> Tensor:
        """The planted click logit (the best any model can predict)."""
        logit = self.bias + dense @ self.w
        for f, a in enumerate(self.effect):
            logit = logit + a[ids[:, f]]
        for f, g in self.pairs.tolist():
            logit = logit + (self.factor[f][ids[:, f]] * self.factor[g][ids[:, g]]).sum(1)
        return logit

    def batch(self, batch: int, gen: torch.Generator):
        """``(dense [B, 13], ids [B, 26], labels [B])`` drawn with ``gen``."""
        dense, ids = self._features(batch, gen)
        labels = torch.bernoulli(torch.sigmoid(self.logit(dense, ids)), generator=gen)
        return dense, ids, labels


def bags(ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """One-id bags per feature in EmbeddingBag's (indices, offsets) form."""
    offsets = torch.arange(ids.shape[0])
    return [(ids[:, f].contiguous(), offsets) for f in range(ids.shape[1])]


def auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half (Mann-Whitney U with average ranks)."""
    scores, labels = scores.double().flatten(), labels.double().flatten()
    pos = float(labels.sum())
    neg = labels.numel() - pos
    if pos == 0 or neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    # Average rank of each tie group: its first and last 1-based positions, averaged.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True,
                                                  return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = avg[inverse]
    return float(((ranks * labels).sum() - pos * (pos + 1) / 2) / (pos * neg))


def log_loss(logits: Tensor, labels: Tensor) -> float:
    """Mean binary cross-entropy of the click probabilities ``sigmoid(logits)``."""
    return float(nn.functional.binary_cross_entropy_with_logits(logits.double(), labels.double()))
