"""The recommender a client trains: private user vectors, shared item tables and head.

NeuMF (GMF + one-layer MLP + prediction layer), for user vectors ``p, p'`` and item rows
``q = Q[i], q' = Q'[i]``::

    h = [ p * q ,  relu(W [p'; q'] + b) ]          (2d)
    s(u, i) = a . h + c                            (a logit)

MF is ``s(u, i) = p . q``. Item tables are any module mapping item ids to rows: a dense
``torch.nn.Embedding`` on a full-capacity device, a ``fastfair.nn.HashedEmbedding`` under FAIR,
and the baselines' ``LowRankEmbedding`` (FedHM) and ``SlicedEmbedding`` (HeteroFL).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHS = ("neumf", "mf")


class LowRankEmbedding(nn.Module):
    """FedHM's item table: ``V = L R`` with ``L`` [n, r] and ``R`` [r, d]; row ``i`` is
    ``L[i] R``. Holds ``(n + d) r`` numbers and never forms ``V``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int):
        super().__init__()
        self.left = nn.Parameter(torch.zeros(num_embeddings, rank))
        self.right = nn.Parameter(torch.zeros(rank, embedding_dim))

    def forward(self, items: Tensor) -> Tensor:
        return self.left[items] @ self.right


class SlicedEmbedding(nn.Module):
    """HeteroFL's item table: the first ``w`` of ``d`` columns, ``weight`` [n, w]; row ``i`` is
    ``[weight[i], 0, ..., 0]`` (the columns the device does not hold read as zero)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, width: int):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.zeros(num_embeddings, width))

    def forward(self, items: Tensor) -> Tensor:
        return F.pad(self.weight[items], (0, self.embedding_dim - self.weight.shape[1]))


HEAD_INITS = ("ncf", "torch")


class Head(nn.Module):
    """NeuMF's shared dense layers: the MLP layer ``W, b`` and the prediction layer ``a, c``.

    ``init="ncf"`` initialises them as NeuMF implementations do (the FAIR reference code among
    them): ``W`` Xavier-uniform, ``a`` Kaiming-uniform for a sigmoid output (bound
    ``sqrt(3 / fan_in)``), ``b = c = 0``. ``"torch"`` keeps ``nn.Linear``'s defaults (bound
    ``1 / sqrt(fan_in)`` for weights and biases), which fastfair used before the setting
    existed: on Goodreads-100 its biased ReLU layer turns item-only scores constant within
    20 rounds, and FAIR's NDCG@20 falls after round 5 instead of rising (docs/results.md)."""

    def __init__(self, dim: int, init: str = "ncf"):
        super().__init__()
        if init not in HEAD_INITS:
            raise ValueError(f"head init must be one of {HEAD_INITS}, got {init!r}")
        self.mlp = nn.Linear(2 * dim, dim)
        self.predict = nn.Linear(2 * dim, 1)
        if init == "ncf":
            nn.init.xavier_uniform_(self.mlp.weight)
            nn.init.kaiming_uniform_(self.predict.weight, a=1, nonlinearity="sigmoid")
            nn.init.zeros_(self.mlp.bias)
            nn.init.zeros_(self.predict.bias)


def score(arch: str, user_gmf: Tensor, user_mlp: Optional[Tensor], item_gmf: Tensor,
          item_mlp: Optional[Tensor], head: Optional[Head]) -> Tensor:
    """``s(u, i)`` for broadcastable ``[..., d]`` user and item rows."""
    if arch == "mf":
        return (user_gmf * item_gmf).sum(-1)
    gmf = user_gmf * item_gmf
    user_mlp, item_mlp = torch.broadcast_tensors(user_mlp, item_mlp)
    mlp = torch.relu(head.mlp(torch.cat([user_mlp, item_mlp], -1)))
    gmf, mlp = torch.broadcast_tensors(gmf, mlp)
    return head.predict(torch.cat([gmf, mlp], -1)).squeeze(-1)


def score_all_items(arch: str, user_gmf: Tensor, user_mlp: Optional[Tensor], item_gmf: Tensor,
                    item_mlp: Optional[Tensor], head: Optional[Head],
                    budget: int = 1 << 24) -> Tensor:
    """``score`` of ``B`` users [B, d] against every item [n, d], as [B, n].

    NeuMF's MLP layer splits over the concatenation, ``W [p'; q'] + b = (W_u p' + b) + W_i q'``,
    so the item half ``W_i q'`` is computed once for all users and

        s(u, i) = (a_g * p_u) . q_i + a_m . relu(U_u + I_i) + c

    with ``U = user_mlp W_u^T + b`` and ``I = item_mlp W_i^T``. The ``relu`` term is formed for
    as many users at a time as keep ``users x n x d`` within ``budget`` elements."""
    if arch == "mf":
        return user_gmf @ item_gmf.T
    d = user_gmf.shape[-1]
    w, bias = head.mlp.weight, head.mlp.bias
    a = head.predict.weight[0]
    user_part = user_mlp @ w[:, :d].T + bias
    item_part = item_mlp @ w[:, d:].T
    out = (user_gmf * a[:d]) @ item_gmf.T + head.predict.bias
    step = max(1, budget // max(1, item_part.numel()))
    for lo in range(0, user_gmf.shape[0], step):
        hidden = torch.relu(user_part[lo:lo + step, None, :] + item_part)
        out[lo:lo + step] += hidden @ a[d:]
    return out


class ClientModel(nn.Module):
    """One device's model: its own user's vectors plus item tables built by ``make_table``."""

    def __init__(self, arch: str, num_items: int, dim: int,
                 make_table: Callable[[str], nn.Module]):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        self.arch = arch
        self.user_gmf = nn.Parameter(torch.zeros(dim))
        self.item_gmf = make_table("gmf")
        if arch == "neumf":
            self.user_mlp = nn.Parameter(torch.zeros(dim))
            self.item_mlp = make_table("mlp")
            self.head = Head(dim)

    def table_names(self) -> tuple[str, ...]:
        return ("gmf",) if self.arch == "mf" else ("gmf", "mlp")

    def forward(self, items: Tensor, with_sqnorm: bool = False):
        """Scores of this client's user for ``items`` (any shape). ``with_sqnorm``: also return
        ``sum ||row||^2`` over the item rows looked up and the user vectors (for an L2 term on
        the embeddings a batch uses)."""
        q = self.item_gmf(items)
        if self.arch == "mf":
            out = score("mf", self.user_gmf, None, q, None, None)
            rows = (q, self.user_gmf)
        else:
            q2 = self.item_mlp(items)
            out = score("neumf", self.user_gmf, self.user_mlp, q, q2, self.head)
            rows = (q, q2, self.user_gmf, self.user_mlp)
        if not with_sqnorm:
            return out
        return out, sum(r.pow(2).sum() for r in rows)
