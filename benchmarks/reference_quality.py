"""The FAIR reference code's training loop, re-implemented on its own, for result 1's quality.

``python benchmarks/reference_quality.py --seed S [--rounds R] [--out FILE.json]`` trains
NeuMF on Goodreads-100 (``../shared/data/goodreads_100``) the way the reference code's README
example does (apd10/FLCF, ``main.py --algo fair --dataset Goodreads_100_m1 --learn_rate 1e-3
--reg_lambda 1e-6 --batch_size 512 --num_neg 1 --emb_dim 8 --eval_every 10 --model NCF
--ncf_dropout 0 --fair_compressions 2:0-1 --K 10 --E 5``), with none of fastfair's training,
hashing or aggregation code, and prints NDCG@20 every ``--eval-every`` rounds. The point is
to know what the reference's approach reaches on this machine and data, beside the 0.2768
its README shows for one run.

What it reproduces (each the reference code's behaviour):

- NeuMF with one MLP layer, ``d = 8``: user and item tables ``N(0, 0.01^2)``, the MLP layer
  Xavier-uniform, the prediction layer Kaiming-uniform (``a = 1``, sigmoid gain), biases 0.
- Users sorted by id; the first half hold dense item tables, the second half hashed arrays of
  ``m = int(n d / 2)`` entries (``--tiers``: the powers of two, ``0-1`` by default). A hashed
  table stores ``idx = h mod m`` and signs ``g`` drawn element by element from a seeded torch
  generator (``h`` uniform in ``[0, 2^29)``), one seed per table, and reads
  ``V[i, k] = g[i, k] w[idx[i, k]]``.
- Download: ``w[s] = sum_{idx(i,k)=s} g D[i, k] / (cnt[s] + 0.002)`` (the reference adds 1e-3
  to the counts twice); dense devices copy the server's tables.
- Each round draws K = 10 clients *with replacement*; each trains from the same server state with
  a fresh ``torch.optim.Adam(lr=1e-3)`` over all its parameters, batches of 512 positives in
  file order, E = 5 epochs, one negative per positive drawn uniformly from the items
  (up to the largest train id) outside the user's train items, redrawn every epoch; loss
  ``-mean log sigmoid(s_pos - s_neg) + 1e-6 * 6 ||u_mlp||^2 / (2 B)`` (the reference's
  regulariser adds the user's MLP vector six times).
- Server: every parameter, the user tables too, becomes ``sum_c p_c expand_c(theta_c)`` with
  ``p_c`` proportional to the client's train interactions, ``expand_c(w) = g * w[idx]`` for a
  hashed table (``--aggregation delta``: ``theta + sum_c p_c expand_c(theta_c - download_c)``
  instead, fastfair's delta rule, for comparison).
- Evaluation after round ``t`` (``t + 1`` rounds trained) for ``t`` a positive multiple of
  ``--eval-every``, on the server model.

Adam moves an entry only once it has had a gradient (its moments are 0 before), so each client
trains only the item rows (dense) or array entries (hashed) its positives and the negatives of
all its epochs touch, drawn before training: the same steps as Adam over the whole table, at a
fraction of the cost.

NDCG@20 is fastfair's ``full_ranking_metrics`` (the same DCG and IDCG as the reference's
``sklearn.metrics.ndcg_score``; the docstring there lists the differences: tie handling, the
mean over users rather than over batches of 10 users). The results file records the curve, the
settings, the machine, versions and commit.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shlex
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastfair.fl.data import default_data_dir, load_fair
from fastfair.fl.metrics import full_ranking_metrics

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import commit, cpu_model, package_changes, versions  # noqa: E402

DIM = 8
CLIENTS = 10
EPOCHS = 5
BATCH = 512
LR = 1e-3
REG = 1e-6
HASH_RANGE = 2**29
HASH_SEEDS = {"ig": 2023, "im": 2023 * 3 + 1}
COUNT_EPS = 2e-3
TABLES = ("ig", "im")
DENSE_PARAMS = ("ug", "um", "w1", "b1", "w2", "b2")


def read_users(path: pathlib.Path) -> dict:
    """``{user: items in file order}`` of a FAIR-layout file (``user item item ...``).

    Not ``fastfair.fl.data.load_fair``: that sorts and merges a user's items, and the reference
    walks them in file order, repeats included."""
    out = {}
    with open(path) as f:
        for line in f:
            ids = np.array(line.split(), dtype=np.int64)
            if ids.size:
                out[int(ids[0])] = ids[1:]
    return out


def init_server(num_users: int, num_items: int) -> dict:
    """NeuMF with one MLP layer: ``s = w2 . [u_g * i_g, relu(W1 [u_m; i_m] + b1)] + b2``."""
    ug, um, ig, im = (torch.randn(n, DIM) * 0.01
                      for n in (num_users, num_users, num_items, num_items))
    mlp, predict = nn.Linear(2 * DIM, DIM), nn.Linear(2 * DIM, 1)
    nn.init.xavier_uniform_(mlp.weight)
    nn.init.kaiming_uniform_(predict.weight, a=1, nonlinearity="sigmoid")
    return {"ug": ug, "um": um, "ig": ig, "im": im, "w1": mlp.weight.data.clone(),
            "b1": torch.zeros(DIM), "w2": predict.weight.data.clone(), "b2": torch.zeros(1)}


def score(p: dict, ug: Tensor, um: Tensor, ig: Tensor, im: Tensor) -> Tensor:
    h = torch.relu(F.linear(torch.cat([um, im], -1), p["w1"], p["b1"]))
    return F.linear(torch.cat([ug * ig, h], -1), p["w2"], p["b2"]).view(-1)


class StoredHash:
    """One item table's element-level hash, materialised as the reference does."""

    def __init__(self, num_items: int, size: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.size = size
        self.idx = torch.randint(0, HASH_RANGE, (num_items, DIM), generator=gen) % size
        self.sign = torch.randint(0, 2, (num_items, DIM), generator=gen).float() * 2 - 1

    def project(self, dense: Tensor) -> Tensor:
        idx = self.idx.view(-1)
        sums = torch.zeros(self.size).scatter_add_(0, idx, (dense * self.sign).view(-1))
        counts = torch.zeros(self.size).scatter_add_(0, idx, torch.ones(idx.numel()))
        return sums / (counts + COUNT_EPS)

    def expand(self, w: Tensor) -> Tensor:
        return w[self.idx] * self.sign


def parse_tiers(text: str) -> list:
    try:
        powers = [int(p) for p in text.split("-")]
    except ValueError:
        raise SystemExit(f"--tiers: expected powers of two like 0-1, got {text!r}") from None
    if not powers or min(powers) < 0 or max(powers) > 20:
        raise SystemExit(f"--tiers: powers must lie in [0, 20], got {text!r}")
    return powers


def train_client(server: dict, download: dict | None, hashes: dict | None, user: int,
                 pos_np: np.ndarray, pool: np.ndarray) -> dict:
    """One client's local training; returns its parameters in the server's shapes."""
    pos = torch.from_numpy(pos_np)
    negs = [torch.from_numpy(np.random.choice(pool, (len(pos),))) for _ in range(EPOCHS)]
    rows = torch.unique(torch.cat([pos] + negs))
    local = {k: server[k].clone() for k in DENSE_PARAMS}
    lookup, slots = {}, {}
    for k in TABLES:
        if hashes is None:
            local[k] = server[k][rows].clone()
            lookup[k] = None
        else:
            slots[k], inverse = torch.unique(hashes[k].idx[rows], return_inverse=True)
            lookup[k] = (inverse, hashes[k].sign[rows])
            local[k] = download[k][slots[k]].clone()
    params = {k: nn.Parameter(v) for k, v in local.items()}
    opt = torch.optim.Adam(params.values(), lr=LR)

    def item(k: str, i: Tensor) -> Tensor:
        if lookup[k] is None:
            return params[k][i]
        inverse, sign = lookup[k]
        return params[k][inverse[i]] * sign[i]

    lpos = torch.searchsorted(rows, pos)
    for epoch in range(EPOCHS):
        lneg = torch.searchsorted(rows, negs[epoch])
        for b in range(0, len(pos), BATCH):
            users = torch.full((min(BATCH, len(pos) - b),), user, dtype=torch.long)
            p, n = lpos[b:b + BATCH], lneg[b:b + BATCH]
            opt.zero_grad()
            ug, um = params["ug"][users], params["um"][users]
            diff = (score(params, ug, um, item("ig", p), item("im", p))
                    - score(params, ug, um, item("ig", n), item("im", n)))
            reg = 6 * um.norm(2).pow(2) / 2 / len(users)
            (-F.logsigmoid(diff).mean() + REG * reg).backward()
            opt.step()
    out = {k: params[k].detach() for k in DENSE_PARAMS}
    with torch.no_grad():
        for k in TABLES:
            if hashes is None:
                full = server[k].clone()
                full[rows] = params[k]
            else:
                w = download[k].clone()
                w[slots[k]] = params[k]
                full = hashes[k].expand(w)
            out[k] = full
    return out


def ndcg(server: dict, users: Tensor, train_csr: tuple, test_csr: tuple, num_items: int) -> float:
    """NDCG@20 of the server model over ``users``."""
    def score_all(batch: Tensor) -> Tensor:
        return torch.stack([score(server, server["ug"][u], server["um"][u].expand(num_items, DIM),
                                  server["ig"], server["im"]) for u in batch.tolist()])

    with torch.no_grad():
        return full_ranking_metrics(score_all, users, *train_csr, *test_csr, num_items,
                                    ks=(20,))["ndcg@20"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--tiers", default="0-1", help="powers of two of the tiers (2:0-1 -> 0-1)")
    ap.add_argument("--aggregation", choices=("model", "delta"), default="model")
    ap.add_argument("--data-dir", type=pathlib.Path, default=None)
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args()
    for name, low in (("rounds", 1), ("eval_every", 1), ("seed", 0)):
        if getattr(args, name) < low:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {low}, "
                             f"got {getattr(args, name)}")
    if args.seed >= 2**32:
        raise SystemExit(f"--seed must be below 2**32 (numpy's seeds), got {args.seed}")
    powers = parse_tiers(args.tiers)
    folder = (args.data_dir or default_data_dir()) / "goodreads_100"
    if not (folder / "train.txt").is_file() or not (folder / "test.txt").is_file():
        raise SystemExit(f"no Goodreads-100 at {folder} (train.txt and test.txt)")

    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    # The evaluation's sorted, unique CSR matrices and the table sizes (1 + the largest id over
    # both files, as the reference counts them): fastfair's loader of the same files.
    data = load_fair(folder)
    num_users, num_items = data.num_users, data.num_items
    eval_users = data.test_users()
    train_csr = (data.train_indptr, data.train_items)
    test_csr = (data.test_indptr, data.test_items)
    train = read_users(folder / "train.txt")
    item_max = max(int(v.max()) for v in train.values())
    users = sorted(train)
    fraction = [1.0 / 2 ** powers[i * len(powers) // len(users)] for i in range(len(users))]
    pools = {}
    for u in users:
        allowed = np.ones(item_max + 1, dtype=bool)
        allowed[train[u]] = False
        pools[u] = np.nonzero(allowed)[0]
    server = init_server(num_users, num_items)
    hashes = {c: {k: StoredHash(num_items, int(num_items * DIM * c), HASH_SEEDS[k])
                  for k in TABLES} for c in set(fraction) if c < 1.0}

    curve, start = [], time.time()
    for t in range(args.rounds):
        sample = np.random.choice(np.arange(len(users)), CLIENTS)
        sizes = np.array([len(train[users[s]]) for s in sample], dtype=np.float64)
        weights = sizes / sizes.sum()
        downloads = {c: {k: h.project(server[k]) for k, h in hs.items()}
                     for c, hs in hashes.items()}
        if args.aggregation == "model":
            acc = {k: torch.zeros_like(v) for k, v in server.items()}
        else:
            acc = {k: v.clone() for k, v in server.items()}
            # What each hashed tier started from, in the server's shapes: once per round.
            starts = {c: {k: hashes[c][k].expand(w) for k, w in ws.items()}
                      for c, ws in downloads.items()}
        for s, p in zip(sample, weights):
            u, c = users[s], fraction[s]
            out = train_client(server, downloads.get(c), hashes.get(c), u, train[u], pools[u])
            for k, v in out.items():
                if args.aggregation == "model":
                    acc[k] += p * v
                else:
                    begin = starts[c][k] if c < 1.0 and k in TABLES else server[k]
                    acc[k] += p * (v - begin)
        server = acc
        if t % args.eval_every == 0 and t > 0:
            value = ndcg(server, eval_users, train_csr, test_csr, num_items)
            curve.append({"round": t, "rounds_trained": t + 1, "ndcg@20": value,
                          "seconds": round(time.time() - start, 1)})
            print(f"round {t}: NDCG@20 {value:.4f}", flush=True)

    best = max(curve, key=lambda r: r["ndcg@20"]) if curve else None
    doc = {"what": "the FAIR reference code's loop, re-implemented (reference_quality.py)",
           "command": " ".join(shlex.quote(a) for a in sys.argv),
           "date": datetime.date.today().isoformat(), "cpu": cpu_model(), "commit": commit(),
           "package_changes": package_changes(), "versions": versions(),
           "settings": {**vars(args), "data_dir": str(folder), "out": str(args.out)},
           "curve": curve, "best": best}
    if best is not None:
        print(f"best NDCG@20 {best['ndcg@20']:.4f} (round {best['round']})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
