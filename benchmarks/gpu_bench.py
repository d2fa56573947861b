"""GPU benchmark of fastfair's kernels against every baseline, in one run (issue 3).

    python benchmarks/gpu_bench.py [--out results/gpu_bench.json] [--md results/gpu_bench.md]
                                   [--tiny] [--family fbgemm,dlrm,fair,stream] [--reps N]

Writes a JSON with every number and a markdown table. Without CUDA (or with ``--tiny``) the same
code runs on CPU with tiny shapes (Triton under ``TRITON_INTERPRET=1``, the cuda backend skipped
with its own reason): that exercises the script, it measures nothing about a GPU.

Shapes (float32, chunk size ``--chunk-size`` = 8, i.e. one 32-byte sector per chunk):

* FBGEMM-like: 512 bags of 20, d = 128, n in {1e5, 1e6, 1e7} virtual rows, compression in
  {1, 1/10, 1/100, 1/1000}.
* DLRM-Kaggle-like: the 26 Criteo-Kaggle tables (33.8M rows in all) as one table-batched
  virtual table, one lookup per (sample, table) bag, d in {16, 64}, B in {2048, 16384, 65536}
  samples, compression in {1/10, 1/1000}.
* FAIR client-like: an NCF item table, n = 359,014, d in {8, 16, 32, 64}, 512 un-pooled lookups,
  compression in {1, 1/16}.
* Streaming ops: fold (factor 4), tile (expand, factor 4), aggregate (8 nested arrays) and
  slot_counts on an array below L2 and one 20x above it.

Indices are uniform or Zipf(1.15) over each table's rows (hot rows at random positions); weights
and upstream gradients are fresh N(0, 1) per case. Arrays are classed against the L2 size that
``torch.cuda.get_device_properties().L2_cache_size`` reports.

Implementations, all on the same lookups: fastfair ``triton`` and ``cuda`` (forward, and
forward + backward with the atomic backward and, separately, the deterministic one); the dense
``torch.nn.functional.embedding_bag`` / ``embedding`` on the virtual table (where it fits in
memory); fastfair's pure-torch ``reference``; a stored-index baseline (int64 addresses and float
signs of every virtual element stored up front, then gather, multiply and pool with torch ops:
the FAIR reference code's approach, 12 bytes per virtual element); and a device-to-device copy
of the same number of bytes (the ceiling).

Ideal bytes (the floor, ``e`` = 4 bytes per float, ``N`` lookups, ``B`` bags, ``U`` distinct chunk
slots the lookups touch, counted exactly per case, ``Z`` the chunk size)::

    forward  = N * index_bytes + (B + 1) * 8 [pooled] + U * 32 * ceil(min(Z, d) * e / 32) + B d e
    backward = B d e (read grad_out) + N * index_bytes + (B + 1) * 8 [pooled] + m e (write the
               dense gradient of the m-slot array once)
    fwd+bwd  = forward + backward
    fold = m e + 8 m + (m / f) e;  tile = m e + f m e;  aggregate = sum_i m_i e + m e;
    slot_counts = 8 m

Achieved GB/s = ideal bytes / median time; "% of copy" = that over the GB/s of a copy of the same
bytes (read + write = ideal bytes) timed the same way in the same run.

Timing: correctness first (each implementation's output and weight gradient against the
float64 reference, within 4x the float32 reference's own error), then warm-up calls, then
``--reps`` timed calls, median. On CUDA each timed call sits between two events, preceded by a
GPU sleep longer than the call's host time, so the events bracket the GPU work and not Python's
launch overhead (``wall_ms``, the host-inclusive time per call, is recorded too); for arrays above
L2 the L2 is flushed (a 2x-L2 write) before every call, below L2 it stays warm by design.
Implementations that synchronise with the host (the pure-torch reference) are timed with that
stall included.

Targets (arrays above L2, fastfair triton and cuda): forward >= 80% of copy, fwd+bwd >= 50%;
fold / tile / aggregate >= 80%; fwd+bwd faster than torch.nn.EmbeddingBag and >= 10x faster than
the stored-index baseline. The results say for each whether it is met and by how much it is
missed. The exit status is 1 when a correctness check failed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

HERE = pathlib.Path(__file__).resolve().parent
SCHEMA = "fastfair-gpu-bench/1"
FAMILIES = ("fbgemm", "dlrm", "fair", "stream")
DISTS = ("uniform", "zipf")
ZIPF_S = 1.15
DTYPE = torch.float32
# Criteo Kaggle display-advertising challenge: rows of the 26 categorical tables.
CRITEO_KAGGLE = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593,
                 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105,
                 142572)
# Tiny runs have no L2 to ask: a nominal size that puts one tiny array on each side.
TINY_L2_BYTES = 8 << 10
# A fastfair gradient or output may be this many times as far from float64 as the float32
# reference is (plus float32 rounding of the largest value): reordering passes, a bug does not.
ERROR_FACTOR = 4.0
# Virtual elements above which the reference slot_counts (one bincount over the whole array per
# row block) is not run.
SLOT_COUNTS_REF_MAX = 1 << 24
TARGETS = {"forward": 0.80, "fwd_bwd": 0.50, "stream": 0.80, "vs_dense": 1.0, "vs_stored": 10.0}
FASTFAIR = ("triton", "cuda")
DENSE, REFERENCE, STORED, COPY = ("torch.nn.EmbeddingBag", "reference", "stored-index", "copy")


# ---------------------------------------------------------------------------------------- shapes
@dataclasses.dataclass(frozen=True)
class Table:
    """One table-batched virtual table: ``rows[f]`` rows per feature, stacked, ``dim`` columns."""
    family: str
    rows: tuple
    dim: int
    compression: float

    @property
    def num_embeddings(self) -> int:
        return sum(self.rows)


@dataclasses.dataclass(frozen=True)
class Batch:
    """``samples`` samples; each has one bag of ``bag_size`` lookups per feature (table), or
    ``bag_size = 0``: un-pooled, one output row per lookup."""
    samples: int
    bag_size: int
    dist: str


def plan(tiny: bool, families) -> dict:
    """``{family: [(Table, [Batch, ...]), ...]}`` and the streaming array sizes."""
    if tiny:
        shapes = {
            "fbgemm": [(Table("fbgemm", (3000,), 16, 1 / 8), [Batch(4, 5, d) for d in DISTS])],
            # One distribution each: the Triton interpreter is slow, and the code path is the same.
            "dlrm": [(Table("dlrm", (50, 7, 300), 8, 1 / 4), [Batch(6, 1, "zipf")])],
            "fair": [(Table("fair", (359,), 8, 1 / 2), [Batch(16, 0, "uniform")])],
            "stream": [256, 8192],
        }
    else:
        shapes = {
            "fbgemm": [(Table("fbgemm", (n,), 128, c), [Batch(512, 20, d) for d in DISTS])
                       for n in (10**5, 10**6, 10**7) for c in (1, 1 / 10, 1 / 100, 1 / 1000)],
            "dlrm": [(Table("dlrm", CRITEO_KAGGLE, d, c),
                      [Batch(b, 1, dist) for b in (2048, 16384, 65536) for dist in DISTS])
                     for d in (16, 64) for c in (1 / 10, 1 / 1000)],
            "fair": [(Table("fair", (359_014,), d, c), [Batch(512, 0, dist) for dist in DISTS])
                     for d in (8, 16, 32, 64) for c in (1, 1 / 16)],
            "stream": None,  # sized from the L2 at run time
        }
    return {f: shapes[f] for f in families}


def _fraction(c: float) -> str:
    return "1" if c == 1 else f"1/{round(1 / c)}"


def _count(n: int) -> str:
    if n >= 10**6:
        return f"{n / 1e6:.3g}M"
    return f"{n / 1e3:.3g}k" if n >= 10**4 else str(n)


def case_name(table: Table, batch: Batch) -> str:
    rows = _count(table.num_embeddings)
    if batch.bag_size == 0:
        look = f"{batch.samples} lookups"
    elif len(table.rows) > 1:
        look = f"B={batch.samples} x {len(table.rows)} tables, L={batch.bag_size}"
    else:
        look = f"B={batch.samples}, L={batch.bag_size}"
    return (f"{table.family} n={rows} d={table.dim} c={_fraction(table.compression)} {look} "
            f"{batch.dist}")


# ---------------------------------------------------------------------------------------- inputs
def sample_rows(n: int, count: int, dist: str, gen: torch.Generator, device) -> torch.Tensor:
    """``count`` rows of ``[0, n)``: uniform, or Zipf(1.15) by rank with ranks placed at random."""
    if dist == "uniform":
        return torch.randint(0, n, (count,), generator=gen, device=device)
    weights = torch.arange(1, n + 1, dtype=torch.float64, device=device).pow_(-ZIPF_S)
    cdf = torch.cumsum(weights, 0)
    cdf /= cdf[-1].clone()
    u = torch.rand(count, generator=gen, dtype=torch.float64, device=device)
    rank = torch.searchsorted(cdf, u).clamp_(max=n - 1)
    return torch.randperm(n, generator=gen, device=device)[rank]


@dataclasses.dataclass
class Lookups:
    batch: Batch
    indices: torch.Tensor
    bounds: Optional[torch.Tensor]   # B + 1 bag boundaries; None: un-pooled
    bag_ids: Optional[torch.Tensor]  # the bag of each lookup (for the stored-index baseline)
    grad: torch.Tensor               # fresh upstream gradient, one row per output row

    @property
    def out_rows(self) -> int:
        return self.grad.shape[0]


def make_lookups(table: Table, batch: Batch, gen: torch.Generator, device) -> Lookups:
    """Sample-major lookups: sample s, feature f, bag element l at ``(s F + f) L + l``, each row
    offset by its feature's first row in the stacked table."""
    feats = len(table.rows)
    per = max(batch.bag_size, 1)
    cols = []
    start = 0
    for rows in table.rows:
        cols.append(sample_rows(rows, batch.samples * per, batch.dist, gen, device)
                    .view(batch.samples, per) + start)
        start += rows
    indices = torch.stack(cols, 1).reshape(-1)
    if batch.bag_size == 0:
        bounds = bag_ids = None
        out_rows = indices.numel()
    else:
        out_rows = batch.samples * feats
        bounds = torch.arange(out_rows + 1, device=device) * batch.bag_size
        bag_ids = torch.arange(out_rows, device=device).repeat_interleave(batch.bag_size)
    grad = torch.randn(out_rows, table.dim, generator=gen, device=device, dtype=DTYPE)
    return Lookups(batch, indices, bounds, bag_ids, grad)


# ---------------------------------------------------------------------------------------- timing
class Clock:
    """Median time of a call: CUDA events around each call, GPU sleep before it (module doc)."""

    def __init__(self, device: torch.device, reps: int, warmup: int, l2_bytes: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.flush_buf = torch.empty(max(2 * l2_bytes, 1 << 26), dtype=torch.uint8,
                                         device=device)
            self.cycles_per_ms = self._sleep_rate()

    def _sleep_rate(self) -> float:
        torch.cuda._sleep(1000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 10**7
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / start.elapsed_time(end)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], flush: bool) -> dict:
        for _ in range(self.warmup):
            fn()
        self.sync()
        if not self.cuda:
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return _stats(times, times)
        t0 = time.perf_counter()
        fn()
        host_ms = (time.perf_counter() - t0) * 1e3
        self.sync()
        sleep = int(self.cycles_per_ms * min(max(2 * host_ms, 0.05), 50.0))
        pairs = []
        for _ in range(self.reps):
            if flush:
                self.flush_buf.zero_()
            torch.cuda._sleep(sleep)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        self.sync()
        times = [s.elapsed_time(e) for s, e in pairs]
        walls = []
        for _ in range(max(3, self.reps // 4)):
            if flush:
                self.flush_buf.zero_()
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            walls.append((time.perf_counter() - t0) * 1e3)
        return _stats(times, walls)


def _stats(times, walls) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times),
            "wall_ms": statistics.median(walls), "reps": len(times)}


@contextlib.contextmanager
def deterministic_mode():
    """torch's deterministic mode, without its NaN fill of fresh tensors (a debugging aid that
    would add a write of every output to the path being measured)."""
    from torch.utils import deterministic as det
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        det.fill_uninitialized_memory = before[2]


# ---------------------------------------------------------------------------------------- runners
class Runner:
    """One implementation on one table: ``forward(lk)``, ``step(lk)`` (forward + backward) and
    ``weight_grad()``, the gradient with respect to the hashed array after a step."""

    def __init__(self, weight: torch.Tensor, copy: bool = True):
        self.param = (weight.detach().clone() if copy else weight.detach()).requires_grad_()

    def step(self, lk: Lookups) -> None:
        self.param.grad = None
        self.forward(lk).backward(lk.grad)

    def weight_grad(self) -> torch.Tensor:
        return self.param.grad


class FastfairRunner(Runner):
    def __init__(self, weight, spec, backend: str, deterministic: bool = False,
                 copy: bool = True):
        super().__init__(weight, copy)
        self.spec, self.backend, self.deterministic = spec, backend, deterministic

    def forward(self, lk: Lookups) -> torch.Tensor:
        import fastfair
        if lk.bounds is None:
            return fastfair.embedding(lk.indices, self.param, self.spec, backend=self.backend,
                                      validate=False)
        return fastfair.embedding_bag(lk.indices, self.param, self.spec, lk.bounds, "sum",
                                      include_last_offset=True, backend=self.backend,
                                      validate=False)

    def step(self, lk: Lookups) -> None:
        if self.deterministic:
            with deterministic_mode():
                super().step(lk)
        else:
            super().step(lk)


class DenseRunner(Runner):
    """torch.nn.EmbeddingBag's functional form on the dense ``n x d`` virtual table."""

    def __init__(self, weight, spec, build_backend: str):
        import fastfair
        self.spec, self.build_backend = spec, build_backend
        table = fastfair.expand_dense(weight.detach(), spec, backend=build_backend)
        self.param = table.requires_grad_()

    def forward(self, lk: Lookups) -> torch.Tensor:
        if lk.bounds is None:
            return torch.nn.functional.embedding(lk.indices, self.param)
        return torch.nn.functional.embedding_bag(lk.indices, self.param, lk.bounds, mode="sum",
                                                 include_last_offset=True)

    def weight_grad(self) -> torch.Tensor:
        """The dense gradient carried to the hashed array (``A^T g``), to compare with the rest."""
        from fastfair.kernels import ops
        s = self.spec
        rows = torch.arange(s.num_embeddings, device=self.param.device)
        return ops.embedding_bag_backward_op(self.param.grad, rows, None, None, s.memory_size,
                                             s.embedding_dim, s.chunk_size, s.seed, s.signed, 0,
                                             -1, self.build_backend)


class StoredIndexRunner(Runner):
    """The FAIR reference code's approach: an int64 address and a float sign stored for every
    virtual element (12 bytes each), then gather, multiply and pool with torch ops."""

    def __init__(self, weight, spec, build_backend: str):
        import fastfair
        super().__init__(weight)
        n, d = spec.num_embeddings, spec.embedding_dim
        self.index = torch.empty(n, d, dtype=torch.int64, device=weight.device)
        self.sign = torch.empty(n, d, dtype=weight.dtype, device=weight.device)
        block = max(1, (1 << 24) // d)
        for start in range(0, n, block):
            rows = torch.arange(start, min(start + block, n), device=weight.device)
            idx, sign = fastfair.hash_index(rows, spec, backend=build_backend)
            self.index[start:start + rows.numel()] = idx
            self.sign[start:start + rows.numel()] = sign

    def forward(self, lk: Lookups) -> torch.Tensor:
        vals = self.param[self.index[lk.indices]] * self.sign[lk.indices]
        if lk.bounds is None:
            return vals
        out = vals.new_zeros(lk.out_rows, vals.shape[1])
        return out.index_add_(0, lk.bag_ids, vals)


def reference_row_block() -> int:
    from fastfair.kernels import reference
    return reference.ROW_BLOCK


def _free_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 62
    return torch.cuda.mem_get_info(device)[0]


def fits(need_bytes: int, device: torch.device) -> str:
    """'' if ``need_bytes`` fits in free device memory with a quarter to spare, else why not."""
    free = _free_bytes(device)
    if need_bytes * 1.25 <= free:
        return ""
    return f"needs {need_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


# ---------------------------------------------------------------------------------------- checks
def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def error_bound(ref32: torch.Tensor, ref64: torch.Tensor) -> float:
    eps = torch.finfo(DTYPE).eps
    return ERROR_FACTOR * _max_abs(ref32.double() - ref64) + eps * (_max_abs(ref64) + 1)


def check(runner: Runner, lk: Lookups, ref: dict) -> dict:
    """Output and weight gradient of ``runner`` against the float64 reference."""
    with torch.no_grad():
        out = runner.forward(lk)
    res = {"forward_err": _max_abs(out.double() - ref["out64"]), "forward_bound": ref["out_bound"]}
    runner.step(lk)
    g = runner.weight_grad()
    hit = ref["grad_slots"]
    res["grad_err"] = max(_max_abs(g[hit].double() - ref["grad_values"]),
                          _max_abs(g.index_fill(0, hit, 0)))
    res["grad_bound"] = ref["grad_bound"]
    res["ok"] = res["forward_err"] <= res["forward_bound"] and res["grad_err"] <= res["grad_bound"]
    return res


def reference_results(weight, spec, lk: Lookups) -> dict:
    """Float32 and float64 reference outputs and gradients, reduced to what the checks need: the
    float64 gradient is kept only where it is not zero (the slots the lookups hit)."""
    lk64 = dataclasses.replace(lk, grad=lk.grad.double())
    outs, grads = [], []
    for w, look in ((weight, lk), (weight.double(), lk64)):
        runner = FastfairRunner(w, spec, "reference", copy=w is weight)
        with torch.no_grad():
            outs.append(runner.forward(look))
        runner.step(look)
        grads.append(runner.weight_grad())
        del runner
    hit = torch.nonzero(grads[1]).reshape(-1)
    return {"out64": outs[1], "out_bound": error_bound(*outs), "grad_slots": hit,
            "grad_values": grads[1][hit], "grad_bound": error_bound(*grads)}


# ---------------------------------------------------------------------------------------- bytes
def distinct_chunks(spec, indices: torch.Tensor, build_backend: str) -> int:
    """Distinct chunk slots ``idx(i, c Z) / Z`` over the rows looked up, exactly."""
    import fastfair
    rows = torch.unique(indices)
    z = spec.chunk_size
    block = max(1, (1 << 24) // spec.embedding_dim)
    parts = []
    for start in range(0, rows.numel(), block):
        idx, _ = fastfair.hash_index(rows[start:start + block], spec, backend=build_backend)
        parts.append(torch.unique(idx[:, ::z] // z))
    return int(torch.unique(torch.cat(parts)).numel()) if parts else 0


def bag_bytes(spec, lk: Lookups, chunks: int) -> dict:
    e = torch.finfo(DTYPE).bits // 8
    n = lk.indices.numel()
    meta = n * lk.indices.element_size() + (0 if lk.bounds is None else lk.bounds.numel() * 8)
    sectors = math.ceil(min(spec.chunk_size, spec.embedding_dim) * e / 32)
    out = lk.out_rows * spec.embedding_dim * e
    fwd = meta + chunks * sectors * 32 + out
    bwd = out + meta + spec.memory_size * e
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}


def copy_fn(nbytes: int, device: torch.device) -> Callable[[], object]:
    """A device-to-device copy moving ``nbytes`` in all (half read, half written)."""
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def with_rate(t: dict, nbytes: int, copy: Optional[dict]) -> dict:
    t = dict(t, ideal_bytes=nbytes, GBps=nbytes / t["median_ms"] / 1e6)
    if copy is not None:
        t["pct_copy"] = 100.0 * copy["median_ms"] / t["median_ms"]
    return t


# ---------------------------------------------------------------------------------------- runs
class Bench:
    def __init__(self, args, device: torch.device):
        from fastfair.kernels import backends
        self.args, self.device = args, device
        self.backends = backends
        self.tiny = args.tiny
        self.l2 = (TINY_L2_BYTES if device.type != "cuda"
                   else torch.cuda.get_device_properties(device).L2_cache_size)
        self.clock = Clock(device, args.reps, args.warmup, self.l2)
        self.build_backend = backends.resolve("auto", device).NAME
        self.gen = torch.Generator(device=device).manual_seed(args.seed)
        self.failures = []

    def why_not(self, name: str) -> str:
        return self.backends.why_not(name, self.device)

    def log(self, msg: str) -> None:
        print(f"gpu_bench: {msg}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ embedding-bag families
    def run_table(self, table: Table, batches) -> list:
        import fastfair
        spec = fastfair.HashSpec.from_compression(table.num_embeddings, table.dim,
                                                  table.compression, self.args.chunk_size,
                                                  seed=self.args.seed)
        e = torch.finfo(DTYPE).bits // 8
        weight = torch.randn(spec.memory_size, generator=self.gen, device=self.device,
                             dtype=DTYPE)
        array_bytes = spec.memory_size * e
        flush = array_bytes > self.l2
        cases = []
        for batch in batches:
            lk = make_lookups(table, batch, self.gen, self.device)
            chunks = distinct_chunks(spec, lk.indices, self.build_backend)
            ideal = bag_bytes(spec, lk, chunks)
            cases.append({
                "family": table.family, "case": case_name(table, batch),
                "table": {"rows": list(table.rows), "num_embeddings": table.num_embeddings,
                          "dim": table.dim, "compression": table.compression},
                "batch": dataclasses.asdict(batch),
                "spec": {"memory_size": spec.memory_size, "chunk_size": spec.chunk_size,
                         "seed": spec.seed, "signed": spec.signed},
                "lookups": lk.indices.numel(), "array_bytes": array_bytes, "above_l2": flush,
                "distinct_chunks": chunks, "ideal_bytes": ideal,
                "checks": {}, "timings": {}, "_lk": lk,
                "_ref": reference_results(weight, spec, lk)})
            self.log(cases[-1]["case"])
        for case in cases:
            copies = {k: self.clock.time(copy_fn(case["ideal_bytes"][k], self.device), flush)
                      for k in ("fwd", "fwd_bwd")}
            case["timings"][COPY] = {k: with_rate(v, case["ideal_bytes"][k], None)
                                     for k, v in copies.items()}
            case["_copy"] = copies
        for label, name, make, forward in self._bag_impls(spec):
            why = self._why_not_bag(name, spec)
            if why:
                for case in cases:
                    case["checks"][label] = case["timings"][label] = {"skipped": why}
                continue
            runner = make(weight)
            for case in cases:
                self._time_bag(case, label, runner, flush, forward)
            del runner
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        for case in cases:
            del case["_lk"], case["_ref"], case["_copy"]
        return cases

    def _bag_impls(self, spec):
        """``(label, name, make(weight) -> Runner, time the forward too)`` per implementation;
        the deterministic backward's forward is the same kernel, so only its step is timed."""
        impls = []
        for be in FASTFAIR:
            impls.append((be, be, lambda w, be=be: FastfairRunner(w, spec, be), True))
            impls.append((f"{be} (deterministic)", be,
                          lambda w, be=be: FastfairRunner(w, spec, be, deterministic=True), False))
        impls.append((DENSE, DENSE, lambda w: DenseRunner(w, spec, self.build_backend), True))
        impls.append((REFERENCE, REFERENCE, lambda w: FastfairRunner(w, spec, "reference"), True))
        impls.append((STORED, STORED, lambda w: StoredIndexRunner(w, spec, self.build_backend),
                      True))
        return impls

    def _why_not_bag(self, name: str, spec) -> str:
        e = torch.finfo(DTYPE).bits // 8
        virtual = spec.num_embeddings * spec.embedding_dim
        if name in FASTFAIR:
            return self.why_not(name)
        if name == DENSE:
            # table + its gradient + the gradient carried back to the array for the check
            return fits(2 * virtual * e + spec.memory_size * e, self.device)
        if name == STORED:
            return fits(virtual * (8 + e) + 2 * spec.memory_size * e, self.device)
        return ""

    def _time_bag(self, case: dict, label: str, runner: Runner, flush: bool, forward: bool):
        lk, ref, copies, ideal = case["_lk"], case["_ref"], case["_copy"], case["ideal_bytes"]
        chk = check(runner, lk, ref)
        case["checks"][label] = chk
        if not chk["ok"]:
            self.failures.append(f"{case['case']}: {label}: {chk}")
            case["timings"][label] = {"skipped": "failed its correctness check"}
            return
        res = {}
        if forward:
            def fwd():
                with torch.no_grad():
                    runner.forward(lk)
            res["fwd"] = with_rate(self.clock.time(fwd, flush), ideal["fwd"], copies["fwd"])
        res["fwd_bwd"] = with_rate(self.clock.time(lambda: runner.step(lk), flush),
                                   ideal["fwd_bwd"], copies["fwd_bwd"])
        case["timings"][label] = res

    # ------------------------------------------------------------------ streaming ops
    def stream_sizes(self) -> list:
        if self.tiny:
            return plan(True, ["stream"])["stream"]
        e = torch.finfo(DTYPE).bits // 8
        below = 1 << max(10, (self.l2 // (4 * e)).bit_length() - 1)
        above = 1 << (20 * self.l2 // e).bit_length()
        return [below, above]

    def run_stream(self, m: int) -> list:
        import fastfair
        e = torch.finfo(DTYPE).bits // 8
        dim, z = (8, 8) if self.tiny else (64, self.args.chunk_size)
        # Compression 1/8: eight virtual elements per slot, as a collapsible table has.
        spec = fastfair.HashSpec(max(1, 8 * m // dim), dim, memory_size=m, chunk_size=z,
                                 seed=self.args.seed)
        flush = m * e > self.l2
        w = torch.randn(m, generator=self.gen, device=self.device, dtype=DTYPE)
        counts = fastfair.slot_counts(spec, self.device, backend=self.build_backend)
        sizes = [m >> (i % 4) for i in range(8)]
        arrays = [torch.randn(s, generator=self.gen, device=self.device, dtype=DTYPE)
                  for s in sizes]
        coefs = [1.0 / (i + 1) for i in range(8)]
        ops = {
            "fold": (lambda be: fastfair.fold(w, 4, counts, backend=be),
                     m * e + 8 * m + m // 4 * e),
            "tile": (lambda be: fastfair.tile(w, 4, backend=be), m * e + 4 * m * e),
            "aggregate": (lambda be: fastfair.aggregate(arrays, coefs, m, backend=be),
                          sum(sizes) * e + m * e),
            "slot_counts": (lambda be: fastfair.slot_counts(spec, self.device, backend=be),
                            8 * m),
        }
        cases = []
        for op, (fn, nbytes) in ops.items():
            case = {"family": "stream", "case": f"{op} m={_count(m)} ({m * e / 2**20:.3g} MiB)",
                    "op": op, "memory_size": m, "array_bytes": m * e, "above_l2": flush,
                    "ideal_bytes": nbytes, "checks": {}, "timings": {}}
            self.log(case["case"])
            copy = self.clock.time(copy_fn(nbytes, self.device), flush)
            case["timings"][COPY] = with_rate(copy, nbytes, None)
            expect = self._stream_expect(op, fn, spec)
            for be in FASTFAIR + (REFERENCE,):
                why = self._why_not_stream(be, op, spec)
                if why:
                    case["checks"][be] = case["timings"][be] = {"skipped": why}
                    continue
                got = fn(be)
                if op == "slot_counts":
                    # Integer counts: exact, and every virtual element counted once.
                    err = float((got != expect).sum()) if expect is not None else 0.0
                    err += abs(int(got.sum()) - spec.num_embeddings * spec.embedding_dim)
                    bound = 0.0
                else:
                    err = _max_abs(got.double() - expect.double())
                    bound = torch.finfo(DTYPE).eps * 8 * (_max_abs(expect) + 1)
                chk = {"err": err, "bound": bound, "ok": err <= bound}
                case["checks"][be] = chk
                if not chk["ok"]:
                    self.failures.append(f"{case['case']}: {be}: {chk}")
                    case["timings"][be] = {"skipped": "failed its correctness check"}
                    continue
                case["timings"][be] = with_rate(self.clock.time(lambda: fn(be), flush), nbytes,
                                                copy)
            cases.append(case)
        return cases

    def _stream_expect(self, op, fn, spec):
        """The reference result, or None for slot counts too big for the reference to finish in
        reasonable time (then the check is the total count and agreement between backends)."""
        if op == "slot_counts" and self._why_not_stream(REFERENCE, op, spec):
            for be in FASTFAIR:
                if not self.why_not(be):
                    return fn(be)
            return None
        return fn("reference")

    def _why_not_stream(self, be: str, op: str, spec) -> str:
        if be != REFERENCE:
            return self.why_not(be)
        if op == "slot_counts" and spec.num_embeddings * spec.embedding_dim > SLOT_COUNTS_REF_MAX:
            return (f"the reference slot_counts makes one bincount pass over the array per "
                    f"{reference_row_block()} rows; not run above {SLOT_COUNTS_REF_MAX} elements")
        return ""


# ---------------------------------------------------------------------------------------- targets
def _target(case: dict, impl: str, what: str, value, threshold: float, kind: str) -> dict:
    row = {"case": case["case"], "impl": impl, "target": what, "threshold": threshold,
           "kind": kind}
    if value is None:
        t = case["timings"].get(impl, {})
        row.update(met=None, value=None, missed_by=f"not measured: {t.get('skipped', 'n/a')}")
        return row
    scale = 100.0 if kind == "pct" else 1.0
    row.update(value=value, met=value >= threshold * scale)
    if row["met"]:
        row["missed_by"] = ""
    elif kind == "pct":
        row["missed_by"] = (f"{threshold * 100 - value:.1f} points "
                            f"({value / (threshold * 100):.0%} of target)")
    else:
        row["missed_by"] = f"needs {threshold / value:.2f}x faster"
    return row


def _time(case, impl, key):
    t = case["timings"].get(impl, {})
    return t[key]["median_ms"] if key in t else None


def _pct_of_copy(case, impl, key):
    t = case["timings"].get(impl, {})
    return t[key]["pct_copy"] if key in t else None


def targets(bag_cases, stream_cases) -> list:
    rows = []
    for case in bag_cases:
        if not case["above_l2"]:
            continue
        for impl in FASTFAIR:
            rows.append(_target(case, impl, "forward >= 80% of copy",
                                _pct_of_copy(case, impl, "fwd"), TARGETS["forward"], "pct"))
            rows.append(_target(case, impl, "fwd+bwd >= 50% of copy",
                                _pct_of_copy(case, impl, "fwd_bwd"), TARGETS["fwd_bwd"], "pct"))
            mine = _time(case, impl, "fwd_bwd")
            for base, what, key in ((DENSE, "fwd+bwd faster than torch.nn.EmbeddingBag",
                                     "vs_dense"),
                                    (STORED, "fwd+bwd >= 10x faster than stored-index",
                                     "vs_stored")):
                theirs = _time(case, base, "fwd_bwd")
                if theirs is None:
                    skipped = case["timings"].get(base, {}).get("skipped", "not run")
                    rows.append({"case": case["case"], "impl": impl, "target": what,
                                 "threshold": TARGETS[key], "kind": "ratio", "value": None,
                                 "met": None, "missed_by": f"baseline not measured: {skipped}"})
                    continue
                rows.append(_target(case, impl, what, None if mine is None else theirs / mine,
                                    TARGETS[key], "ratio"))
    for case in stream_cases:
        if not case["above_l2"] or case["op"] == "slot_counts":
            continue
        for impl in FASTFAIR:
            t = case["timings"].get(impl, {})
            rows.append(_target(case, impl, f"{case['op']} >= 80% of copy",
                                t.get("pct_copy"), TARGETS["stream"], "pct"))
    return rows


def ratios(case: dict) -> dict:
    """Baseline time / implementation time, fwd and fwd+bwd, for every measured pair."""
    out = {}
    for impl in case["timings"]:
        if impl in (COPY, DENSE, STORED, REFERENCE) or "skipped" in case["timings"][impl]:
            continue
        r = {}
        for base in (DENSE, STORED, REFERENCE):
            for key in ("fwd", "fwd_bwd"):
                mine, theirs = _time(case, impl, key), _time(case, base, key)
                if mine and theirs:
                    r[f"{key}_vs_{base}"] = theirs / mine
        out[impl] = r
    return out


# ---------------------------------------------------------------------------------------- report
def environment(device: torch.device, bench: Bench) -> dict:
    from fastfair import __version__, info

    def run(*cmd) -> Optional[str]:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True,
                                  cwd=HERE).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = run("git", "status", "--porcelain", "--untracked-files=no")
    nvcc = run("nvcc", "--version")
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "commit": run("git", "rev-parse", "HEAD") or "unknown",
        "dirty": None if status is None else bool(status),
        "nvcc": next((ln for ln in nvcc.splitlines() if "release" in ln), nvcc) if nvcc else None,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()})"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": info._version("triton"),
        "fastfair": __version__, "extension": info.extension_status(),
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "l2_bytes": bench.l2,
        "l2_source": ("torch.cuda.get_device_properties().L2_cache_size" if device.type == "cuda"
                      else "nominal (tiny CPU run)"),
        "backends": bench.backends.status(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sm_count"] = props.multi_processor_count
        env["total_memory"] = props.total_memory
        big = 4 * max(bench.l2, 1 << 28)
        t = bench.clock.time(copy_fn(big, device), flush=True)
        env["copy_GBps_large"] = big / t["median_ms"] / 1e6
    return env


def _ms(t: dict, key: str) -> str:
    return f"{t[key]['median_ms'] * 1e3:.1f}" if key in t else "-"


def _pct(t: dict, key: str) -> str:
    return f"{t[key]['pct_copy']:.0f}%" if key in t and "pct_copy" in t[key] else "-"


def _gbps(t: dict, key: str) -> str:
    return f"{t[key]['GBps']:.0f}" if key in t else "-"


def _where(case: dict) -> str:
    side = "above" if case["above_l2"] else "below"
    return f"{case['array_bytes'] / 2**20:.3g} MiB ({side})"


def markdown(doc: dict) -> str:
    env = doc["env"]
    lines = [
        "# fastfair GPU benchmark" + (" (tiny CPU run: exercises the script, measures no GPU)"
                                      if doc["tiny"] else ""),
        "",
        f"Device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), nvcc "
        f"{env['nvcc']}, triton {env['triton']}, fastfair {env['fastfair']} "
        f"({env['extension']}); commit "
        f"{env['commit'][:12]}{' (dirty)' if env['dirty'] else ''}; {env['date']}.",
        f"Command: `{env['command']}`. L2: {env['l2_bytes'] / 2**20:.3g} MiB "
        f"({env['l2_source']})" + (f"; large-copy bandwidth {env['copy_GBps_large']:.0f} GB/s."
                                   if "copy_GBps_large" in env else "."),
        f"Median of {doc['protocol']['reps']} timed calls after {doc['protocol']['warmup']} "
        "warm-up calls; times in microseconds; % of copy = achieved GB/s over a copy of the same "
        "ideal bytes in this run. Correctness checks: "
        + ("all passed." if doc["summary"]["checks_ok"] else "SOME FAILED (see the JSON)."),
        "",
        "## Targets (arrays above L2)",
        "",
        "| target | case | impl | value | met | missed by |",
        "|---|---|---|---|---|---|",
    ]
    for t in doc["targets"]:
        if t["value"] is None:
            value = "-"
        elif t["kind"] == "pct":
            value = f"{t['value']:.1f}%"
        else:
            value = f"{t['value']:.2f}x"
        met = {True: "yes", False: "NO", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {t['case']} | {t['impl']} | {value} | {met} | "
                     f"{t['missed_by']} |")
    lines += [
        "",
        "## Embedding bag",
        "",
        "| case | array (vs L2) | impl | fwd us | fwd GB/s | fwd % copy | fwd+bwd us | "
        "fwd+bwd GB/s | fwd+bwd % copy | x EmbeddingBag | x stored-index | x reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in doc["bag_cases"]:
        where = _where(case)
        for impl, t in case["timings"].items():
            if "skipped" in t:
                lines.append(f"| {case['case']} | {where} | {impl} | skipped: {t['skipped']} "
                             "| | | | | | | | |")
                continue
            r = case["ratios"].get(impl, {})
            x = [f"{r[f'fwd_bwd_vs_{b}']:.2f}" if f"fwd_bwd_vs_{b}" in r else "-"
                 for b in (DENSE, STORED, REFERENCE)]
            lines.append(f"| {case['case']} | {where} | {impl} | {_ms(t, 'fwd')} | "
                         f"{_gbps(t, 'fwd')} | {_pct(t, 'fwd')} | {_ms(t, 'fwd_bwd')} | "
                         f"{_gbps(t, 'fwd_bwd')} | {_pct(t, 'fwd_bwd')} | {' | '.join(x)} |")
    lines += ["", "## Streaming ops", "", "| op | array (vs L2) | impl | us | GB/s | % copy |",
              "|---|---|---|---|---|---|"]
    for case in doc["stream_cases"]:
        where = _where(case)
        for impl, t in case["timings"].items():
            if "skipped" in t:
                lines.append(f"| {case['case']} | {where} | {impl} | skipped: {t['skipped']} | | |")
                continue
            pct = f"{t['pct_copy']:.0f}%" if "pct_copy" in t else "-"
            lines.append(f"| {case['case']} | {where} | {impl} | {t['median_ms'] * 1e3:.1f} | "
                         f"{t['GBps']:.0f} | {pct} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- main
def _positive(name: str, lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{name} must be >= {lo}, got {value}")
        return value
    return parse


def _families(text: str) -> list:
    names = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in names if f not in FAMILIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--family takes a comma-separated subset of {FAMILIES}, "
                                         f"got {text!r}")
    return names


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=pathlib.Path,
                    help="results JSON (default results/gpu_bench.json, or gpu_bench_tiny.json)")
    ap.add_argument("--md", type=pathlib.Path, help="markdown table (default: --out with .md)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes on CPU (the default when CUDA is not available)")
    ap.add_argument("--family", type=_families, default=list(FAMILIES),
                    help=f"comma-separated subset of {','.join(FAMILIES)}")
    ap.add_argument("--reps", type=_positive("--reps", 1), help="timed calls (default 30, tiny 1)")
    ap.add_argument("--warmup", type=_positive("--warmup", 0),
                    help="warm-up calls (default 5, tiny 0)")
    ap.add_argument("--chunk-size", type=_positive("--chunk-size", 1), default=8)
    ap.add_argument("--seed", type=_positive("--seed", 0), default=0)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.tiny = args.tiny or not torch.cuda.is_available()
    if args.tiny:
        # Triton reads this when its kernels are decorated, i.e. when fastfair's Triton backend
        # is first imported, which has not happened yet.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cpu" if args.tiny else "cuda")
    args.reps = args.reps or (1 if args.tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 5)
    name = "gpu_bench_tiny" if args.tiny else "gpu_bench"
    out = args.out or HERE / "results" / f"{name}.json"
    md = args.md or out.with_suffix(".md")

    bench = Bench(args, device)
    bag_cases, stream_cases = [], []
    shapes = plan(args.tiny, args.family)
    for family in args.family:
        if family == "stream":
            for m in bench.stream_sizes():
                stream_cases += bench.run_stream(m)
            continue
        for table, batches in shapes[family]:
            bag_cases += bench.run_table(table, batches)
    for case in bag_cases:
        case["ratios"] = ratios(case)
    doc = {
        "schema": SCHEMA, "tiny": args.tiny,
        "env": environment(device, bench),
        "protocol": {"reps": args.reps, "warmup": args.warmup, "dtype": str(DTYPE),
                     "chunk_size": args.chunk_size, "zipf_s": ZIPF_S, "targets": TARGETS,
                     "error_factor": ERROR_FACTOR},
        "bag_cases": bag_cases, "stream_cases": stream_cases,
        "targets": targets(bag_cases, stream_cases),
        "summary": {"checks_ok": not bench.failures, "failures": bench.failures},
    }
    met = [t["met"] for t in doc["targets"] if t["met"] is not None]
    doc["summary"].update(targets_met=sum(met), targets_measured=len(met),
                          targets_total=len(doc["targets"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    md.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    md.write_text(markdown(doc))
    bench.log(f"wrote {out} and {md}; targets met {sum(met)}/{len(met)} measured "
              f"({len(doc['targets'])} in all)")
    for f in bench.failures:
        bench.log(f"correctness check FAILED: {f}")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
