"""One FAIR federated round on Goodreads-100: fastfair against the reference code's approach.

``python benchmarks/fair_round.py [--rounds R] [--threads T] [--out results.json]`` measures,
in one run on one machine:

1. The seconds of one round of ``fastfair.fl.runner.FederatedRunner.run_round()``: K = 10
   clients, E = 5 local epochs, d = 8, NeuMF, Adam lr 1e-3, batch 512, BPR with one negative,
   tiers ``2:0-1`` (half the users hold the dense tables, half a hashed array of half the size).
2. The same round done the way the FAIR reference code does it (``ReferenceFair`` below): every
   hashed client materialises ``n x d`` index and sign tables, looks rows up through them,
   and the server expands every upload to a dense ``n x d`` table before averaging. It trains
   the clients that fastfair's round sampled, with the capacities fastfair gave them, in two
   variants (``REFERENCES``): with the reference code's own optimizer,
   ``torch.optim.Adam(model.parameters(), lr=...)`` with torch's defaults (on CPU the
   per-tensor implementation), and with torch's fused Adam for every parameter (the fastest
   dense Adam torch has; fastfair's runner trains each client in its fused kernel,
   ``fastfair.fl.fused``: forward, backward and Adam of an epoch in one Numba call, Adam's zero-
   gradient steps deferred for the table entries a batch did not use).
3. The peak resident memory of one 1/16-capacity client's local training (the user with the
   most interactions, one epoch) under each, each in a fresh interpreter, and the bytes that
   client holds.

Rounds alternate between the implementations (one warm-up round each, then ``R`` timed rounds;
the median is reported) so that load from other processes hits all alike. The results file
records the machine, versions, commit and command; a markdown table is printed.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import numba
import torch
from torch import Tensor, nn

from fastfair.fl.data import InteractionData, load_dataset
from fastfair.fl.model import ClientModel, Head
from fastfair.fl.parallel import POOLS
from fastfair.fl.fused import state_bytes as fused_state_bytes
from fastfair.fl.runner import (INIT_STD, Config, FederatedRunner, client_optimizers,
                                fused_reason)
from fastfair.fl.runner import train_client as run_client
from fastfair.kernels import backends, numba_backend
from fastfair.nn import HashedEmbedding
from fastfair.optim import DeferredAdam, ScatterAdam

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import commit, cpu_model, package_changes, versions  # noqa: E402
from memory import status_kb  # noqa: E402  (a sibling script, not a package)
ROUND = dict(method="fair", arch="neumf", dim=8, tiers="2:0-1", clients_per_round=10,
             local_epochs=5, batch_size=512, lr=1e-3, optimizer="adam", loss="bpr", negatives=1,
             chunk_size=1, seed=0)
MEMORY_FRACTION = 1 / 16
MEMORY_EPOCHS = 1
# The reference code draws h from [0, 2**29) with a torch generator seeded with this value.
HASH_RANGE = 2**29
REFERENCE_SEED = 2023
TARGET_SPEEDUP = 10
TARGET_MEMORY_RATIO = 16
# The reference variants, by key: whether the variant trains with fused Adam, and its label.
REFERENCES = {
    "reference": (False, "reference (its own optimizer: torch.optim.Adam defaults)"),
    "reference_fused": (True, "reference + fused Adam (isolates hashing and aggregation)"),
}
IMPLEMENTATIONS = ("fastfair", *REFERENCES)
LABELS = {"fastfair": "fastfair", **{k: label for k, (_, label) in REFERENCES.items()}}
WORKERS_KEY = "fastfair_workers"


# ----------------------------------------------------------------------------------------------
# The reference approach


class StoredHashEmbedding(nn.Module):
    """An item table held as a hashed array ``weight`` of size ``m`` with the hash materialised.

    A seeded ``torch.Generator`` draws ``h[i, k]`` uniformly from ``[0, 2**29)``, then
    ``sign[i, k]`` uniformly from ``{-1, +1}``, element by element (chunk size 1), and the module
    stores ``idx = h mod m`` (int64) and ``sign`` (float32), both ``n x d``. Rows are
    ``V[i, k] = sign[i, k] * weight[idx[i, k]]``. Every size draws the same ``h`` from the same
    seed, so for ``m'`` dividing ``m``, ``idx_{m'} = idx_m mod m'``: the subspaces nest.
    """

    def __init__(self, num_items: int, dim: int, memory_size: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        h = torch.randint(0, HASH_RANGE, (num_items, dim), generator=gen)
        self.register_buffer("idx", h.remainder_(memory_size))
        self.register_buffer("sign", torch.randint(0, 2, (num_items, dim), generator=gen,
                                                   dtype=torch.float32).mul_(2).sub_(1))
        self.weight = nn.Parameter(torch.zeros(memory_size))

    def forward(self, items: Tensor) -> Tensor:
        return self.weight[self.idx[items]] * self.sign[items]

    def counts(self) -> Tensor:
        """``cnt[s] = #{(i, k) : idx[i, k] = s}``."""
        return torch.bincount(self.idx.view(-1), minlength=self.weight.numel())

    @torch.no_grad()
    def project(self, dense: Tensor) -> Tensor:
        """The least-squares array of a dense table:
        ``w[s] = sum_{idx[i,k]=s} sign[i,k] D[i,k] / cnt[s]``, 0 where ``cnt[s] = 0``."""
        sums = torch.zeros(self.weight.numel(), dtype=dense.dtype)
        sums.index_add_(0, self.idx.view(-1), (dense * self.sign).view(-1))
        return sums / self.counts().clamp_(min=1)

    @torch.no_grad()
    def expand(self) -> Tensor:
        """The dense virtual table ``V = sign * weight[idx]``, ``n x d``."""
        return self.weight[self.idx] * self.sign


def train_client(model: ClientModel, items: Tensor, num_items: int, cfg: Config,
                 gen: torch.Generator, optimizer: str) -> int:
    """The runner's local round (``fastfair.fl.runner.train_client``) on ``items`` with
    ``optimizer``: ``"default"``, torch's default Adam, as the reference code uses; ``"fused"``,
    torch's fused Adam (both in the autograd loop); ``"fastfair"``, what the runner does (its
    fused kernel, ``fastfair.fl.fused``, for tables of ``DEFERRED_MIN_ENTRIES`` or more entries;
    the autograd loop with ``client_optimizers`` for smaller ones). Returns the bytes of
    optimizer state the client held."""
    if optimizer == "fastfair":
        if fused_reason(cfg, model, cfg.local_kernel, None, None) is None:
            run_client(cfg, items, num_items, model, gen)
            return fused_state_bytes(model)
        opts = client_optimizers(model, "adam", cfg.lr)
    else:
        opts = [torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=optimizer == "fused")]
    run_client(cfg, items, num_items, model, gen, optimizers=opts)
    return sum(t.numel() * t.element_size() for opt in opts for s in opt.state.values()
               for t in s.values() if isinstance(t, torch.Tensor))


def reference_client(num_items: int, dim: int, memory_size, arrays: dict, head_state: dict,
                     user: dict) -> ClientModel:
    """A reference-approach device with the head and the user's vectors. Dense ``nn.Embedding``
    tables (copies of ``arrays[name]``, ``n x d``) when ``memory_size`` is None; else one
    ``StoredHashEmbedding`` per table (seed ``REFERENCE_SEED + k``) holding ``arrays[name]``: its
    array, or the projection of it when it is a dense ``n x d`` table (a download)."""
    def make_table(name):
        if memory_size is None:
            return nn.Embedding.from_pretrained(arrays[name].clone(), freeze=False)
        table = StoredHashEmbedding(num_items, dim, memory_size,
                                    REFERENCE_SEED + ("gmf", "mlp").index(name))
        value = arrays[name]
        with torch.no_grad():
            table.weight.copy_(table.project(value) if value.dim() == 2 else value)
        return table

    model = ClientModel("neumf", num_items, dim, make_table)
    _load_private_state(model, head_state, user)
    return model


def _load_private_state(model: ClientModel, head_state: dict, user: dict) -> None:
    with torch.no_grad():
        model.user_gmf.copy_(user["gmf"])
        model.user_mlp.copy_(user["mlp"])
    model.head.load_state_dict(head_state)


class ReferenceFair:
    """FAIR rounds run the way the reference code runs them (NeuMF only).

    The server keeps dense ``n x d`` item tables ``T`` and the head; user vectors stay private
    to their clients, as in fastfair. Each sampled client ``c``, one after the other, builds its
    model (a hashed client materialises its index and sign tables), downloads
    ``w_c = project_c(T)`` (a dense client copies ``T``), trains with a fresh Adam (fused when
    ``fused_adam``, else torch's default as in the reference code) and uploads.
    The server then sets, per table,

        ``T <- sum_c p_c expand_c(w_c)``,   ``expand_c(w) = sign_c * w[idx_c]``

    building one dense ``n x d`` temporary per hashed upload; ``p_c`` is proportional to the
    client's number of training interactions and the head is averaged with the same weights.
    ``memory_sizes[u]`` is user ``u``'s array size (None: dense tables).
    """

    def __init__(self, data: InteractionData, cfg: Config, memory_sizes: list,
                 fused_adam: bool = False):
        n, d = data.num_items, cfg.dim
        self.data, self.cfg, self.memory_sizes = data, cfg, list(memory_sizes)
        self.fused_adam = fused_adam
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.tables = {name: torch.randn(n, d, generator=self.gen) * INIT_STD
                       for name in ("gmf", "mlp")}
        self.user_vectors = {name: torch.randn(data.num_users, d, generator=self.gen) * INIT_STD
                             for name in ("gmf", "mlp")}
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            self.head = Head(d)

    def download(self, client: int) -> ClientModel:
        n, d = self.data.num_items, self.cfg.dim
        user = {name: v[client] for name, v in self.user_vectors.items()}
        return reference_client(n, d, self.memory_sizes[client], self.tables,
                                self.head.state_dict(), user)

    def run_round(self, clients: list) -> None:
        """Train ``clients`` one after the other, then aggregate their uploads."""
        uploads = []
        for client in clients:
            model = self.download(client)
            items = self.data.user_items(client)
            train_client(model, items, self.data.num_items, self.cfg, self.gen,
                         "fused" if self.fused_adam else "default")
            with torch.no_grad():
                self.user_vectors["gmf"][client] = model.user_gmf
                self.user_vectors["mlp"][client] = model.user_mlp
            uploads.append((model, float(items.numel())))
        total = sum(w for _, w in uploads)
        for name in ("gmf", "mlp"):
            acc = torch.zeros_like(self.tables[name])
            for model, w in uploads:
                table = getattr(model, f"item_{name}")
                if isinstance(table, StoredHashEmbedding):
                    acc += (w / total) * table.expand()
                else:
                    acc += (w / total) * table.weight.detach()
            self.tables[name] = acc
        state = {k: torch.zeros_like(v) for k, v in self.head.state_dict().items()}
        for model, w in uploads:
            for k, v in model.head.state_dict().items():
                state[k] += (w / total) * v
        self.head.load_state_dict(state)


def memory_sizes_of(runner: FederatedRunner) -> list:
    """Every user's array size in ``runner`` (None for dense tables); both tables of a device
    have the same size."""
    return [None if (s := runner.view(u).specs["gmf"]) is None else s.memory_size
            for u in range(runner.data.num_users)]


# ----------------------------------------------------------------------------------------------
# Memory of one client, in a fresh interpreter


def _set_threads(threads: int) -> None:
    # Numba fixes its threading layer when its threads start, which set_num_threads does; the
    # backend module states fastfair's preference on import. Importing it first gives the layer
    # a normal run gets (there the first kernel call imports the backend).
    backends.load("numba")
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def _fastfair_client(num_items: int, dim: int, memory_size: int, seeds: dict, arrays: dict,
                     head_state: dict, user: dict) -> ClientModel:
    """The model ``FederatedRunner.download`` builds for a hashed device, from its arrays."""
    def make_table(name):
        table = HashedEmbedding(num_items, dim, memory_size=memory_size, seed=seeds[name],
                                sparse=True)
        with torch.no_grad():
            table.weight.copy_(arrays[name])
        return table

    model = ClientModel("neumf", num_items, dim, make_table)
    _load_private_state(model, head_state, user)
    return model


def _build_client(impl: str, p: dict, num_items: int, memory_size: int) -> ClientModel:
    """``impl``'s hashed client: fastfair's, or the reference approach's (either variant)."""
    if impl == "fastfair":
        return _fastfair_client(num_items, p["dim"], memory_size, p["seeds"], p["arrays"],
                                p["head"], p["user"])
    return reference_client(num_items, p["dim"], memory_size, p["arrays"], p["head"], p["user"])


def _warm_parallel_optimizer() -> None:
    """Load the optimizers' parallel Numba builds (DeferredAdam's, ScatterAdam's), which the tiny
    warm-up client is too small to launch (``numba_backend.PARALLEL_MIN_WORK``): loading compiled
    code is a once-per-process cost, not the client's."""
    size = 2 * numba_backend.PARALLEL_MIN_WORK

    def one_hot():
        return torch.sparse_coo_tensor(torch.zeros(1, 1, dtype=torch.int64), torch.ones(1),
                                       (size,), check_invariants=True)

    weight = nn.Parameter(torch.zeros(size))
    opt = DeferredAdam([weight])
    weight.grad = torch.ones(size)
    opt.step()  # every row: the parallel step
    weight.grad = one_hot()
    opt.step()
    opt.flush()  # every other row missed a step: the parallel replay
    scatter = ScatterAdam([weight], fused=True)
    weight.grad = one_hot()
    scatter.step()  # the pass over every entry is parallel at this size


def _memory_child(payload_path: str, impl: str) -> None:
    """Build one hashed client from the downloaded arrays in ``payload_path`` and train it;
    print the rise of the peak resident memory over the resident size before it, in MB, and
    the bytes the client holds."""
    p = torch.load(payload_path)
    _set_threads(p["threads"])
    cfg = Config(**{**ROUND, "local_epochs": MEMORY_EPOCHS})
    gen = torch.Generator().manual_seed(0)
    optimizer = ("fused" if REFERENCES[impl][0] else "default") if impl in REFERENCES \
        else "fastfair"
    # Kernels compile and allocators initialise on a tiny table, outside the measured region.
    tiny = _build_client(impl, {**p, "arrays": {k: v[:500] for k, v in p["arrays"].items()}},
                         1000, 500)
    train_client(tiny, torch.arange(0, 1000, 2), 1000, cfg, gen, optimizer)
    if optimizer == "fastfair":
        _warm_parallel_optimizer()
    del tiny
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kb("VmRSS")
    model = _build_client(impl, p, p["num_items"], p["memory_size"])
    state = train_client(model, p["items"], p["num_items"], cfg, gen, optimizer)
    peak_mb = (status_kb("VmHWM") - base) / 1024
    params = sum(t.numel() * t.element_size() for t in model.parameters())
    tables = sum(t.numel() * t.element_size() for t in model.buffers())
    print(json.dumps({"peak_rise_mb": peak_mb, "held_bytes": {
        "parameters": params, "optimizer_state": state, "index_sign_tables": tables,
        "total": params + state + tables}}))


def measure_client_memory(data: InteractionData, threads: int) -> dict:
    """Peak memory of one 1/16-capacity client's local training under every implementation."""
    cfg = Config(**{**ROUND, "tiers": f"{MEMORY_FRACTION}:1"})
    client = int(torch.argmax(data.train_counts()))
    runner = FederatedRunner(data, cfg)
    view = runner.view(client)
    downloaded = runner.download(client, view)
    memory_size = view.specs["gmf"].memory_size
    common = {"threads": threads, "num_items": data.num_items, "dim": cfg.dim,
              "memory_size": memory_size, "items": data.user_items(client).clone()}
    fastfair_payload = {
        **common, "seeds": {name: s.seed for name, s in view.specs.items()},
        "arrays": {name: getattr(downloaded, f"item_{name}").weight.detach().clone()
                   for name in ("gmf", "mlp")},
        "head": downloaded.head.state_dict(),
        "user": {"gmf": downloaded.user_gmf.detach().clone(),
                 "mlp": downloaded.user_mlp.detach().clone()}}
    reference = ReferenceFair(data, cfg, [memory_size] * data.num_users).download(client)
    reference_payload = {
        **common,
        "arrays": {name: getattr(reference, f"item_{name}").weight.detach().clone()
                   for name in ("gmf", "mlp")},
        "head": reference.head.state_dict(),
        "user": {"gmf": reference.user_gmf.detach().clone(),
                 "mlp": reference.user_mlp.detach().clone()}}
    del runner, downloaded, reference
    out = {"client": client, "interactions": int(data.train_counts()[client]),
           "fraction": MEMORY_FRACTION, "memory_size": memory_size, "epochs": MEMORY_EPOCHS}
    payloads = {"fastfair": fastfair_payload, **{k: reference_payload for k in REFERENCES}}
    with tempfile.TemporaryDirectory() as tmp:
        for impl, payload in payloads.items():
            path = os.path.join(tmp, f"{impl}.pt")
            torch.save(payload, path)
            res = subprocess.run([sys.executable, __file__, "--memory-child", impl, path],
                                 capture_output=True, text=True, check=True)
            out[impl] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------------------------
# The round benchmark


def time_rounds(data: InteractionData, rounds: int, workers: int = 1,
                pool: str = "auto") -> dict:
    """Alternating rounds of fastfair and each reference variant on the same clients; with
    ``workers`` > 1 also fastfair training the round's clients that many at a time in
    ``pool`` (the same round: its tables are checked equal to the sequential runner's)."""
    runner = FederatedRunner(data, Config(**ROUND))
    pooled = (FederatedRunner(data, Config(**ROUND), workers=workers, pool=pool)
              if workers > 1 else None)
    references = {k: ReferenceFair(data, runner.cfg, memory_sizes_of(runner), fused)
                  for k, (fused, _) in REFERENCES.items()}
    seconds = {k: [] for k in IMPLEMENTATIONS}
    if pooled is not None:
        seconds[WORKERS_KEY] = []
    sampled = []
    for r in range(rounds + 1):
        before = runner.user_vectors["gmf"].clone()
        t0 = time.perf_counter()
        runner.run_round()
        t_fastfair = time.perf_counter() - t0
        # A trained client's private vectors always move, and only trained clients' do.
        clients = torch.nonzero((runner.user_vectors["gmf"] != before).any(1)).flatten().tolist()
        if len(clients) != runner.cfg.clients_per_round:
            raise RuntimeError(f"found {len(clients)} trained clients in fastfair's round, "
                               f"expected {runner.cfg.clients_per_round}")
        took = {"fastfair": t_fastfair}
        if pooled is not None:
            t0 = time.perf_counter()
            pooled.run_round()
            took[WORKERS_KEY] = time.perf_counter() - t0
            if any(not torch.equal(pooled.tables[k], runner.tables[k]) for k in runner.tables):
                raise RuntimeError("fastfair with workers trained another round than without")
        for key, reference in references.items():
            t0 = time.perf_counter()
            reference.run_round(clients)
            took[key] = time.perf_counter() - t0
        if r:  # round 0 warms up (Numba cache loads, first-touch allocations)
            for key, t in took.items():
                seconds[key].append(t)
            sampled.append(clients)
    kind = None
    if pooled is not None:
        kind = pooled.pool_kind()
        pooled.close()
    sizes = references["reference"].memory_sizes
    return {"seconds": seconds, "clients": sampled, "pool_kind": kind,
            "hashed_clients_per_round": [sum(sizes[c] is not None for c in cs) for cs in sampled],
            "interactions_per_round": [int(sum(data.user_items(c).numel() for c in cs))
                                       for cs in sampled],
            "hashed_memory_size": next(m for m in sizes if m is not None)}


def table(doc: dict) -> str:
    """The markdown summary of a results document."""
    t, m, ratios = doc["round"], doc["memory"], doc["ratios"]
    med = t["median_seconds"]
    rows = [
        f"FAIR round on {doc['dataset']['name']} (K={doc['config']['clients_per_round']}, "
        f"E={doc['config']['local_epochs']}, d={doc['config']['dim']}, NeuMF, tiers "
        f"{doc['config']['tiers']}), median of {len(t['seconds']['fastfair'])} rounds; "
        f"{doc['machine']['cpu']}, torch/Numba threads {doc['machine']['torch_threads']}, "
        f"commit {doc['commit']}.",
        "",
        "| implementation | round s | fastfair faster by | 1/16 client peak MB | "
        "fastfair peak below by | held MB |",
        "|---|---|---|---|---|---|",
    ]
    for k in IMPLEMENTATIONS:
        faster = "-" if k == "fastfair" else f"{ratios['speedup'][k]:.2f}x"
        below = "-" if k == "fastfair" else f"{ratios['peak_memory'][k]:.1f}x"
        rows.append(f"| {LABELS[k]} | {med[k]:.2f} | {faster} | {m[k]['peak_rise_mb']:.1f} | "
                    f"{below} | {m[k]['held_bytes']['total'] / 2**20:.1f} |")
    if WORKERS_KEY in med:
        workers, kind = doc["workers"], doc.get("pool_kind", "processes")
        for k in REFERENCES:
            rows.append(f"| fastfair, clients in {workers} {kind}, vs {k} | "
                        f"{med[WORKERS_KEY]:.2f} | {ratios['speedup_workers'][k]:.2f}x | | | |")
    rows.append("")
    for k in REFERENCES:
        rows.append(f"Against {LABELS[k]}: speed-up {ratios['speedup'][k]:.2f}x (target "
                    f"{TARGET_SPEEDUP}x), peak memory {ratios['peak_memory'][k]:.1f}x below, held "
                    f"bytes {ratios['held_bytes'][k]:.1f}x below (target {TARGET_MEMORY_RATIO}x).")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and Numba threads for both implementations (default 1: on a "
                         "small shared machine more threads contend with other work)")
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "fair_round.json",
                    help="results JSON (default benchmarks/results/fair_round.json)")
    ap.add_argument("--workers", type=int, default=1,
                    help="also time fastfair training each round's clients this many at a "
                         "time (default 1: not timed)")
    ap.add_argument("--pool", choices=POOLS, default="auto",
                    help="threads or processes for --workers (default: %(default)s, which is "
                         "threads here: the fused kernel releases the GIL)")
    ap.add_argument("--memory-child", nargs=2, metavar=("IMPL", "PAYLOAD"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child[1], args.memory_child[0])
        return
    if args.rounds < 1 or args.threads < 1 or args.workers < 1:
        ap.error("--rounds, --threads and --workers must be at least 1")
    try:
        data = load_dataset("goodreads")
    except FileNotFoundError as err:
        raise SystemExit(f"fair_round.py needs Goodreads-100: {err}") from None
    _set_threads(args.threads)
    memory = measure_client_memory(data, args.threads)
    timing = time_rounds(data, args.rounds, args.workers, args.pool)
    med = {k: statistics.median(v) for k, v in timing["seconds"].items()}
    peak = {k: memory[k]["peak_rise_mb"] for k in IMPLEMENTATIONS}
    held = {k: memory[k]["held_bytes"]["total"] for k in IMPLEMENTATIONS}
    # Each ratio is the reference variant's value over fastfair's, per variant.
    ratios = {"speedup": {k: med[k] / med["fastfair"] for k in REFERENCES},
              "peak_memory": {k: peak[k] / peak["fastfair"] for k in REFERENCES},
              "held_bytes": {k: held[k] / held["fastfair"] for k in REFERENCES}}
    if WORKERS_KEY in med:
        ratios["speedup_workers"] = {k: med[k] / med[WORKERS_KEY] for k in REFERENCES}
    doc = {
        "benchmark": "fair_round",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", os.path.relpath(__file__), *sys.argv[1:]]),
        "commit": commit(),
        "uncommitted_package_changes": package_changes(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "numba_threads": numba.get_num_threads()},
        "versions": versions(),
        "dataset": {"name": data.name, "users": data.num_users, "items": data.num_items,
                    "train_interactions": data.num_train},
        "config": ROUND,
        "workers": args.workers,
        "pool_kind": timing.pop("pool_kind"),
        "implementations": LABELS,
        "notes": [
            "All implementations train the same sampled clients (read off fastfair's round) "
            "with the same capacities and array sizes. fastfair trains each client in its fused "
            "kernel (fastfair.fl.fused: the epoch's forward, backward and Adam in one Numba "
            "call, zero-gradient steps of unused table entries deferred); reference_fused uses "
            "torch's fused Adam for everything; reference uses "
            "torch.optim.Adam with its defaults, as the reference code does (the per-tensor "
            "implementation on CPU).",
            "Round seconds include download, local training and aggregation; each round runs "
            "fastfair, then reference, then reference_fused, after one warm-up round each.",
            "Peak MB: rise of VmHWM over VmRSS, fresh process, from building the client's model "
            "(index/sign tables included for the reference) through one epoch of training.",
        ],
        "round": {**timing, "median_seconds": med},
        "memory": memory,
        "ratios": ratios,
        "targets": {"speedup": TARGET_SPEEDUP, "memory_ratio": TARGET_MEMORY_RATIO,
                    "speedup_met": {k: r >= TARGET_SPEEDUP
                                    for k, r in ratios["speedup"].items()},
                    "speedup_workers_met": {k: r >= TARGET_SPEEDUP for k, r in
                                            ratios.get("speedup_workers", {}).items()},
                    "peak_memory_met": {k: r >= TARGET_MEMORY_RATIO
                                        for k, r in ratios["peak_memory"].items()}},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))


if __name__ == "__main__":
    main()
