"""PGHash speed and memory: rehashing, serial tables, and a training step against dense softmax.

``python benchmarks/lsh_bench.py [--threads 1] [--repeats R] [--device cpu|cuda] [--out F]``
measures, in one run on one machine, medians of ``R`` repeats:

1. **Rehash**: 50 tables of 8-bit periodic Gaussian codes (``c = 8``) for 205,443 neurons of
   ``d = 128`` (Delicious-200K's output layer), codes and CSR buckets, from the weights (fold
   fused) and from the sketch alone (what a device holds): ``fastfair`` on its CPU backend, the
   pure-torch reference backend, and a numpy re-implementation of the reference code's approach
   (fold once, then per table a ``[k, c] x [c, n]`` product, sign bits packed to ints and an
   argsort into buckets). The reference code's own figure, ~9.7 s, is quoted, not measured.
2. **Serial memory**: the peak resident memory (fresh process each, ``VmHWM``) of building the
   50 tables from the weights and keeping them, against building them one at a time from the
   sketch, each used for a batch's union and dropped.
3. **Training step** at 670,091 labels (Amazon-670K), ``d = 128``, batch 256, 5 labels per
   sample: dense softmax (full logits, label-normalised softmax, backward, ``torch.optim.Adam``)
   against ``LSHOutputLayer(hash="pg", budget=0.1)`` (selection, sparse logits, backward,
   ``fastfair.optim.LazyAdam``; also with ``torch.optim.SparseAdam``, the same rule), with the
   rehash every 50 steps (Amazon-670K's setting) amortised in.

The floor of the rehash is written next to its time: ``n d`` adds for the fold plus ``L k c n``
multiply-adds, and the bytes of ``W`` read plus the codes and buckets written.

``--device cuda`` times the same on the GPU (backend ``auto`` is Triton there; the torch
reference backend runs on the GPU too; the numpy approach is CPU-only and left out): each timed
call is synchronised, and the serial-tables memory is the rise of
``torch.cuda.max_memory_allocated`` in this process. ``--scale S`` divides the neuron and label
counts by ``S``: a smoke run of the script, not a measurement.
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
import time

import numba
import numpy as np
import torch

from fastfair.kernels import backends, lsh
from fastfair.nn import LSHFamily, LSHOutputLayer
from fastfair.optim import LazyAdam

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import commit, cpu_model, package_changes, versions  # noqa: E402
from memory import status_kb  # noqa: E402

NEURONS, DIM, SKETCH, BITS, TABLES = 205_443, 128, 8, 8, 50
LABELS, BATCH, LABELS_PER_SAMPLE, BUDGET, STEP_REHASH = 670_091, 256, 5, 0.1, 50
REFERENCE_CODE_SECONDS = 9.7


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: compilation, allocator
    times = []
    for _ in range(repeats):
        gc.collect()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def numpy_rehash(weight: np.ndarray, projs: np.ndarray) -> list:
    """The reference code's approach in numpy: fold, then per table project, pack, sort."""
    n, d = weight.shape
    L, k, c = projs.shape
    sketch = weight.reshape(n, d // c, c).sum(1).T  # [c, n]
    powers = (1 << np.arange(k)).astype(np.int64)
    out = []
    for t in range(L):
        codes = (powers @ (projs[t] @ sketch > 0)).astype(np.int64)
        members = np.argsort(codes, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=1 << k))])
        out.append((offsets, members))
    return out


def rehash(repeats: int, backend: str, device: torch.device, neurons: int) -> dict:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(neurons, DIM, generator=g).to(device)
    fam = LSHFamily("pg", DIM, sketch_dim=SKETCH, bits=BITS, tables=TABLES, seed=1,
                    backend=backend)
    sketch = fam.source(weight)
    projs = fam._proj(0, TABLES, torch.float32, device)
    few = max(1, repeats // 3)
    res = {
        "fastfair_from_weights": _median(lambda: lsh.buckets(
            lsh.pg_codes(weight, projs, backend=backend), BITS, backend=backend), repeats,
            device),
        "fastfair_from_sketch": _median(lambda: fam.build(sketch), repeats, device),
        "fastfair_codes_from_weights": _median(
            lambda: lsh.pg_codes(weight, projs, backend=backend), repeats, device),
        "reference_backend_from_weights": _median(lambda: lsh.buckets(
            lsh.pg_codes(weight, projs, backend="reference"), BITS, backend="reference"),
            few, device),
    }
    if device.type == "cpu":
        res["numpy_reference_approach"] = _median(
            lambda: numpy_rehash(weight.numpy(), projs.numpy()), few, device)
    fast = res["fastfair_from_weights"]
    out = {"seconds": res, "backend": backend,
           "floor": {"multiply_adds": neurons * DIM + TABLES * BITS * SKETCH * neurons,
                     "bytes": neurons * DIM * 4 + TABLES * neurons * 8},
           "speedup_vs_reference_backend": res["reference_backend_from_weights"] / fast,
           "speedup_vs_reference_code_quoted": REFERENCE_CODE_SECONDS / fast}
    if "numpy_reference_approach" in res:
        out["speedup_vs_numpy"] = res["numpy_reference_approach"] / fast
    return out


def _serial_peak(mode: str, backend: str, device: torch.device, neurons: int, measure) -> float:
    """The peak rise (MB) of building the tables: all kept (``kept``) or one at a time from the
    sketch (``serial``); ``measure(start)`` resets the peak, ``measure(None)`` reads its rise."""
    g = torch.Generator().manual_seed(0)
    fam = LSHFamily("pg", DIM, sketch_dim=SKETCH, bits=BITS, tables=TABLES, seed=1,
                    backend=backend)
    x = torch.relu(torch.randn(128, DIM, generator=g)).to(device)
    small = torch.randn(1000, DIM, generator=g).to(device)  # warm the kernels on a tiny layer
    fam.build(fam.source(small))
    if mode == "kept":
        weight = torch.randn(neurons, DIM, generator=g).to(device)
    else:
        sketch = fam.source(torch.randn(neurons, DIM, generator=g).to(device))
    gc.collect()
    measure(True)
    aset = lsh.ActiveSet(neurons, neurons, 0, backend=backend)
    if mode == "kept":
        tables = fam.build(fam.source(weight))
        aset.add(fam.query(x, 0, TABLES), *tables)
    else:
        for t in range(TABLES):
            aset.add(fam.query(x, t, t + 1), *fam.build(sketch, t, t + 1))
    _sync(device)
    return measure(None)


def _memory_child(mode: str, backend: str, neurons: int) -> None:
    base = {}

    def measure(start):
        if start:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base["kb"] = status_kb("VmRSS")
            return None
        return (status_kb("VmHWM") - base["kb"]) / 1024

    peak = _serial_peak(mode, backend, torch.device("cpu"), neurons, measure)
    print(json.dumps({"peak_rise_mb": peak}))


def serial_memory(backend: str, device: torch.device, neurons: int) -> dict:
    out = {}
    for mode in ("kept", "serial"):
        if device.type == "cuda":
            base = {}

            def measure(start):
                if start:
                    torch.cuda.reset_peak_memory_stats(device)
                    base["bytes"] = torch.cuda.memory_allocated(device)
                    return None
                return (torch.cuda.max_memory_allocated(device) - base["bytes"]) / 2**20

            out[mode] = {"peak_rise_mb": _serial_peak(mode, backend, device, neurons, measure)}
            continue
        res = subprocess.run([sys.executable, __file__, "--memory-child", mode, "--backend",
                              backend, "--neurons", str(neurons)],
                             capture_output=True, text=True, check=True)
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    weight_mb = neurons * DIM * 4 / 2**20
    sketch_mb = neurons * SKETCH * 4 / 2**20
    table_mb = (neurons * 4 * 2 + ((1 << BITS) + 1) * 8) / 2**20  # codes + members + offsets
    return {"measured_peak_rise_mb": out, "measured_by": "torch.cuda.max_memory_allocated"
            if device.type == "cuda" else "VmHWM of a fresh process",
            "held_mb": {"kept": weight_mb + TABLES * table_mb, "serial": sketch_mb + table_mb},
            "peak_ratio": out["kept"]["peak_rise_mb"] / max(out["serial"]["peak_rise_mb"], 1e-9)}


def step_times(repeats: int, backend: str, device: torch.device, labels: int) -> dict:
    g = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(BATCH, DIM, generator=g)).to(device)
    offsets = torch.arange(0, BATCH * LABELS_PER_SAMPLE + 1, LABELS_PER_SAMPLE, device=device)
    ids = torch.randint(0, labels, (BATCH * LABELS_PER_SAMPLE,), generator=g).to(device)
    layer = LSHOutputLayer(DIM, labels, hash="pg", budget=BUDGET, rehash_every=STEP_REHASH,
                           seed=3, backend=backend).to(device)
    lazy_opt = LazyAdam(layer.parameters(), lr=1e-4, backend=backend)
    sparse_opt = torch.optim.SparseAdam(layer.parameters(), lr=1e-4)
    dense_w = torch.nn.Parameter(layer.weight.detach().clone())
    dense_b = torch.nn.Parameter(layer.bias.detach().clone())
    dense_opt = torch.optim.Adam([dense_w, dense_b], lr=1e-4)
    everything = torch.arange(labels, device=device)

    def dense_step():
        z = x @ dense_w.T + dense_b
        loss = lsh.softmax_loss(z, everything, offsets, ids, backend=backend)
        dense_opt.zero_grad()
        loss.backward()
        dense_opt.step()

    def lsh_step(opt=lazy_opt):
        out = layer(x, offsets, ids)
        loss = layer.loss(out, offsets, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()

    few = max(1, repeats // 2)
    layer.rehash()
    layer.steps = 1  # time steps between rehashes; the rehash is timed on its own below
    lsh_s = _median(lsh_step, repeats, device)
    sparse_adam_s = _median(lambda: lsh_step(sparse_opt), few, device)
    rehash_s = _median(layer.rehash, few, device)
    dense_s = _median(dense_step, few, device)
    amortised = lsh_s + rehash_s / STEP_REHASH
    return {"seconds": {"dense_softmax_step": dense_s, "lsh_step": lsh_s,
                        "lsh_step_torch_sparse_adam": sparse_adam_s, "rehash": rehash_s,
                        "lsh_step_with_amortised_rehash": amortised},
            "labels": labels, "active_neurons": layer.m, "speedup": dense_s / amortised}


def table(doc: dict) -> str:
    r, m, s = doc["rehash"], doc["serial_memory"], doc["step"]
    t = r["seconds"]
    floor = r["floor"]
    where = (f"{doc['machine']['gpu']}" if doc["machine"].get("gpu") else
             f"{doc['machine']['cpu']}, {doc['machine']['threads']} thread(s)")
    numpy_row = (f"| numpy, the reference code's approach | {t['numpy_reference_approach']:.3f} | "
                 f"{r['speedup_vs_numpy']:.1f}x |" if "speedup_vs_numpy" in r else
                 "| numpy, the reference code's approach | not run (CPU only) | - |")
    smoke = (f"SMOKE RUN (--scale {doc['scale']}): reduced sizes, not a measurement. "
             if doc["scale"] != 1 else "")
    lines = [
        f"{smoke}PGHash on {where}, backend {r['backend']}, commit {doc['commit']}.", "",
        f"Rehash: {TABLES} tables x {doc['neurons']:,} neurons, d={DIM}, c={SKETCH}, k={BITS} "
        f"(floor {floor['multiply_adds'] / 1e6:.0f} M multiply-adds, {floor['bytes'] / 1e6:.0f} MB)",
        "", "| implementation | seconds | fastfair faster by |", "|---|---|---|",
        f"| fastfair, from the weights | {t['fastfair_from_weights']:.4f} | - |",
        f"| fastfair, from the sketch | {t['fastfair_from_sketch']:.4f} | - |",
        f"| torch reference backend | {t['reference_backend_from_weights']:.3f} | "
        f"{r['speedup_vs_reference_backend']:.1f}x |",
        numpy_row,
        f"| reference code (quoted, not run) | {REFERENCE_CODE_SECONDS} | "
        f"{r['speedup_vs_reference_code_quoted']:.0f}x |", "",
        f"Serial tables: peak rise {m['measured_peak_rise_mb']['serial']['peak_rise_mb']:.1f} MB "
        f"vs {m['measured_peak_rise_mb']['kept']['peak_rise_mb']:.1f} MB keeping all tables "
        f"({m['peak_ratio']:.1f}x lower); held {m['held_mb']['serial']:.1f} vs "
        f"{m['held_mb']['kept']:.1f} MB.", "",
        f"Training step, {s['labels']:,} labels, batch {BATCH}, budget {BUDGET} "
        f"({s['active_neurons']:,} active): dense {s['seconds']['dense_softmax_step']:.3f} s, "
        f"LSH {s['seconds']['lsh_step']:.3f} s + rehash {s['seconds']['rehash']:.3f} s / "
        f"{STEP_REHASH} steps = {s['seconds']['lsh_step_with_amortised_rehash']:.3f} s "
        f"({s['speedup']:.1f}x faster); with torch's SparseAdam instead of LazyAdam the LSH "
        f"step takes {s['seconds']['lsh_step_torch_sparse_adam']:.3f} s.",
    ]
    return "\n".join(lines)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=_at_least_one, default=1)
    ap.add_argument("--repeats", type=_at_least_one, default=5)
    ap.add_argument("--backend", default="auto", choices=("auto",) + backends.NAMES)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--scale", type=_at_least_one, default=1,
                    help="divide the neuron and label counts by this (smoke runs)")
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "lsh.json")
    ap.add_argument("--memory-child", choices=("kept", "serial"), help=argparse.SUPPRESS)
    ap.add_argument("--neurons", type=_at_least_one, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    backends.load("numba")  # before numba starts its threads: it picks its threading layer
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args.memory_child, args.backend, args.neurons)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    backend = args.backend
    if backend == "auto":
        backend = backends.resolve("auto", device).NAME
    neurons, labels = max(NEURONS // args.scale, 1 << BITS), max(LABELS // args.scale, 100)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    doc = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "commit": commit(), "uncommitted_package_changes": package_changes(),
           "machine": machine, "device": str(device), "versions": versions(),
           "scale": args.scale, "neurons": neurons,
           "rehash": rehash(args.repeats, backend, device, neurons),
           "serial_memory": serial_memory(backend, device, neurons),
           "step": step_times(args.repeats, backend, device, labels)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))


if __name__ == "__main__":
    main()
