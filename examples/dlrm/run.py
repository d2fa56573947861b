"""Train the DLRM of ``dlrm.py`` on the synthetic Criteo-like stream with dense tables, then with
fastfair hashed tables at several compressions, and compare AUC, log-loss, memory and step time.

    python examples/dlrm/run.py --out runs/dlrm

The hashed models are the dense model after one call::

    fastfair.nn.replace_embeddings(model, compression=c, chunk_size=8, min_rows=1000)

as is (the tables keep DLRM's ``sparse=True``: sparse gradients, ``SparseAdam``), and with
``sparse=False`` (dense gradients of the small hashed arrays, ``Adam``). Every run starts from
the same initial model (the hashed tables are least-squares fits of the dense ones) and sees the
same batches. Writes ``summary.md``, ``results.json`` and ``plot.png`` to ``--out`` and prints
the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fastfair
from fastfair.nn import replace_embeddings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dlrm import DLRM, CriteoLikeStream, auc, bags, log_loss, table_rows  # noqa: E402


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _fractions(text: str) -> list[float]:
    return [_fraction(part) for part in text.split(",") if part.strip()]


def _grad_kinds(text: str) -> list[str]:
    kinds = [part.strip() for part in text.split(",") if part.strip()]
    bad = [k for k in kinds if k not in ("sparse", "dense")]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"expected 'sparse' and/or 'dense', got {text!r}")
    return kinds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for summary, results, plot")
    p.add_argument("--compressions", type=_fractions, default=[0.1, 0.01, 0.001],
                   help="comma-separated hashed-table compressions (fraction of the dense size)")
    p.add_argument("--scale", type=_fraction, default=0.01,
                   help="table sizes as a fraction of Criteo Kaggle's (33.8M rows in all)")
    p.add_argument("--dim", type=_positive_int, default=16, help="embedding dimension")
    p.add_argument("--chunk-size", type=_positive_int, default=8, help="fastfair chunk size")
    p.add_argument("--min-rows", type=int, default=1000,
                   help="tables with fewer rows stay dense")
    p.add_argument("--steps", type=_positive_int, default=600, help="training steps per run")
    p.add_argument("--batch-size", type=_positive_int, default=1024)
    p.add_argument("--eval-samples", type=_positive_int, default=65536)
    p.add_argument("--hashed-grads", type=_grad_kinds, default=["sparse", "dense"],
                   help="comma-separated; sparse: the hashed tables keep DLRM's sparse=True "
                        "(the drop-in as is); dense: replace_embeddings(..., sparse=False), "
                        "dense gradients and a dense optimiser on the (small) hashed arrays")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                   help="adam: SparseAdam on tables with sparse gradients, Adam on the rest; "
                        "sgd: SGD on all")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0, help="model and hash seed")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch and numba threads (timings in the docs use 1)")
    p.add_argument("--backend", default="auto", help="fastfair backend of the hashed tables")
    p.add_argument("--warmup", type=int, default=20,
                   help="steps left out of the step-time median")
    args = p.parse_args(argv)
    if args.min_rows < 0:
        p.error(f"--min-rows must be >= 0, got {args.min_rows}")
    if args.warmup < 0 or args.warmup >= args.steps:
        p.error(f"--warmup must be in [0, --steps), got {args.warmup}")
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.backend != "auto" and args.backend not in fastfair.kernels.backends.NAMES:
        p.error(f"--backend must be 'auto' or one of {fastfair.kernels.backends.NAMES}")
    return args


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    # Numba's thread pool is sized when first used; fastfair picks its threading layer on
    # import, so import the backend before asking numba for a thread count.
    numba = fastfair.kernels.backends.load("numba")
    if not isinstance(numba, str):
        import numba as nb
        nb.set_num_threads(min(threads, nb.config.NUMBA_NUM_THREADS))


def _optimizers(model: DLRM, args) -> list:
    if args.optimizer == "sgd":
        return [torch.optim.SGD(model.parameters(), lr=args.lr)]
    sparse = [t.weight for t in model.tables if t.sparse]
    ids = {id(p) for p in sparse}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [torch.optim.SparseAdam(sparse, lr=args.lr), torch.optim.Adam(rest, lr=args.lr)]


def _state_bytes(optimizers) -> int:
    return sum(v.numel() * v.element_size() for opt in optimizers for st in opt.state.values()
               for v in st.values() if isinstance(v, torch.Tensor))


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def train_and_evaluate(model: DLRM, stream: CriteoLikeStream, evalset, args) -> dict:
    """Train ``args.steps`` steps on the stream (batches drawn from ``args.data_seed + 1``) and
    return the held-out AUC and log-loss, memory and the median step time."""
    optimizers = _optimizers(model, args)
    gen = torch.Generator().manual_seed(args.data_seed + 1)
    loss_fn = nn.BCEWithLogitsLoss()
    times, losses = [], []
    model.train()
    for _ in range(args.steps):
        dense, ids, labels = stream.batch(args.batch_size, gen)
        t0 = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(dense, bags(ids)), labels)
        loss.backward()
        for opt in optimizers:
            opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    model.eval()
    dense, ids, labels = evalset
    with torch.no_grad():
        logits = torch.cat([model(dense[i:i + 8192], bags(ids[i:i + 8192]))
                            for i in range(0, labels.numel(), 8192)])
    return {
        "auc": auc(logits, labels),
        "log_loss": log_loss(logits, labels),
        "train_loss_last_50": statistics.fmean(losses[-50:]),
        "embedding_bytes": _bytes(model.embedding_parameters()),
        "parameter_bytes": _bytes(model.parameters()),
        "optimizer_state_bytes": _state_bytes(optimizers),
        "step_ms_median": 1e3 * statistics.median(times[args.warmup:]),
    }


def _table(results, oracle) -> str:
    lines = ["| tables | compression | embedding MB | parameter MB | optimizer state MB | AUC | "
             "log-loss | step ms (median) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        comp = "1" if r["compression"] is None else f"{r['compression']:g}"
        lines.append(f"| {r['tables']} | {comp} | {r['embedding_bytes'] / 1e6:.3f} | "
                     f"{r['parameter_bytes'] / 1e6:.3f} | "
                     f"{r['optimizer_state_bytes'] / 1e6:.3f} | {r['auc']:.4f} | "
                     f"{r['log_loss']:.4f} | {r['step_ms_median']:.2f} |")
    lines.append(f"| planted model (the data's own logit) | | | | | {oracle['auc']:.4f} | "
                 f"{oracle['log_loss']:.4f} | |")
    return "\n".join(lines)


def _kind(result) -> str:
    if result["compression"] is None:
        return "dense"
    return "sparse" if result["grads"] == "sparse" else "fastfair-dense"


def _plot(results, oracle, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("auc", "log_loss", "step_ms_median"),
                              ("held-out AUC", "held-out log-loss", "step time, median (ms)")):
        styles = {"dense": ("s", "k", "dense tables"),
                  "sparse": ("o", "C0", "fastfair, sparse grads"),
                  "fastfair-dense": ("^", "C1", "fastfair, dense grads")}
        for kind, (marker, color, name) in styles.items():
            mine = [r for r in results if _kind(r) == kind]
            if not mine:
                continue
            xs = [r["embedding_bytes"] / 1e6 for r in mine]
            ax.scatter(xs, [r[key] for r in mine], marker=marker, color=color, label=name)
            for x, r in zip(xs, mine):
                text = "dense" if kind == "dense" else f"1/{round(1 / r['compression'])}"
                ax.annotate(text, (x, r[key]), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        if key in oracle:
            ax.axhline(oracle[key], color="C2", linestyle="--", label="planted model")
        ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.margins(x=0.15, y=0.12)
        ax.set_xlabel("embedding parameters (MB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("DLRM on a synthetic Criteo-like stream: dense vs fastfair hashed tables")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list:
    args = parse_args(argv)
    _set_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(args.scale)
    stream = CriteoLikeStream(rows, seed=args.data_seed)
    evalset = stream.batch(args.eval_samples, torch.Generator().manual_seed(args.data_seed + 2))
    planted = stream.logit(evalset[0], evalset[1])
    oracle = {"auc": auc(planted, evalset[2]), "log_loss": log_loss(planted, evalset[2])}
    print(f"{len(rows)} tables, {sum(rows)} rows x {args.dim}; {args.steps} steps of "
          f"{args.batch_size}; click rate {float(evalset[2].mean()):.3f}", flush=True)

    results = []
    runs = [(None, "sparse")] + [(c, g) for g in args.hashed_grads for c in args.compressions]
    for compression, grads in runs:
        torch.manual_seed(args.seed)
        model = DLRM(rows, dim=args.dim)
        report = None
        t0 = time.perf_counter()
        if compression is not None:
            report = replace_embeddings(model, compression=compression,
                                        chunk_size=args.chunk_size, seed=args.seed,
                                        min_rows=args.min_rows, backend=args.backend,
                                        sparse=None if grads == "sparse" else False)
        replace_s = time.perf_counter() - t0
        r = train_and_evaluate(model, stream, evalset, args)
        r.update(compression=compression, grads=grads, replace_s=replace_s,
                 tables="dense" if report is None
                 else f"fastfair, {grads} grads ({len(report.replaced)} of {len(rows)} hashed)")
        results.append(r)
        print(f"{r['tables']}, compression {compression or 1:g}: AUC {r['auc']:.4f}, log-loss "
              f"{r['log_loss']:.4f}, {r['step_ms_median']:.2f} ms/step", flush=True)

    table = _table(results, oracle)
    print(table)
    (args.out / "summary.md").write_text(table + "\n")
    meta = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "rows": rows, "oracle": oracle, "torch": torch.__version__,
            "fastfair": fastfair.__version__, "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results},
                                                      indent=1))
    _plot(results, oracle, args.out / "plot.png")
    return results


if __name__ == "__main__":
    main()
