"""``fastfair xc``: extreme classification with LSH output layers (PGHash), centralised or federated.

Runs every method x budget x device count on one dataset with the same seed and writes to
``--out``: ``config.json`` (settings, command, versions, data summary), ``results.jsonl`` (one
record per evaluation), ``models/<method>__budget<b>__devices<n>.pt`` (each trained model's
``state_dict``), ``checkpoints/`` (each run's trainer after every epoch, for ``--resume``) and
``summary.md`` (best and final P@1/3/5, mean active neurons, MB moved,
seconds per epoch), printed at the end. Every bad argument ends with one line
``fastfair: error: ...`` and status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path
from typing import Optional

import torch

from . import __version__
from .cli import _one_line, _Parser, _UsageError
from .fl.data import default_data_dir
from .fl.pghash import METHODS, XCConfig, train
from .fl.xc import load_xc_split, synthetic_xc


def _list(kind, flag: str, allowed: Optional[tuple] = None):
    def parse(text: str):
        out = []
        for part in text.split(","):
            part = part.strip()
            try:
                value = kind(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag}: {part!r} is not a {kind.__name__}")
            if allowed is not None and value not in allowed:
                raise argparse.ArgumentTypeError(f"{flag}: {part!r} is not one of {allowed}")
            out.append(value)
        return list(dict.fromkeys(out))
    return parse


def build_parser() -> argparse.ArgumentParser:
    d = XCConfig()
    p = _Parser(prog="fastfair xc", allow_abbrev=False,
                description="Extreme classification with an LSH output layer (PGHash): every "
                            "method x budget x device count.")
    p.add_argument("--data", default="delicious",
                   help="'delicious' (from --data-dir), 'synthetic', or a folder with train.txt "
                        "and test.txt (default: %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help="where named datasets live (default: $FASTFAIR_DATA_DIR or ../shared/data)")
    p.add_argument("--methods", type=_list(str, "--methods", METHODS), default=list(METHODS),
                   help=f"comma-separated, among {','.join(METHODS)} (default: all)")
    p.add_argument("--budgets", type=_list(float, "--budgets"), default=[1.0, 0.25, 0.1],
                   help="comma-separated fractions of the labels in (0, 1] (default: 1,0.25,0.1)")
    p.add_argument("--devices", type=_list(int, "--devices"), default=[1],
                   help="comma-separated device counts; 1 = centralised (default: 1)")
    for name, help_ in (("epochs", "passes over the training data"), ("batch_size", "batch size"),
                        ("hidden", "hidden width d"), ("sketch_dim", "sketch size c"),
                        ("bits", "bits per code k"), ("tables", "hash tables L"),
                        ("rehash_every", "steps (rounds when federated) between rehashes"),
                        ("local_steps", "device steps per round"), ("seed", "seed")):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name),
                       help=f"{help_} (default: %(default)s)")
    p.add_argument("--clients-per-round", type=int, default=0,
                   help="devices sampled per round, federated; 0 = every device (default: 0)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="probability that a device drops out after its download (default: 0)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--no-force-labels", action="store_true",
                   help="do not force the batch's labels into the active set (the reference code)")
    p.add_argument("--device-tiers", default="", metavar="SPEC",
                   help="federated devices' private hash settings, round robin, e.g. "
                        "'bits=8,tables=50,sketch=8,rehash=1;bits=6,tables=10,sketch=4,rehash=5' "
                        "(default: every device uses --bits/--tables/--sketch-dim/--rehash-every)")
    p.add_argument("--signed-fold", action="store_true", help="random signs before folding (pg)")
    p.add_argument("--serial", action="store_true", help="build tables one at a time (centralised)")
    p.add_argument("--labels", type=int, default=100_000, help="synthetic: labels")
    p.add_argument("--points", type=int, default=50_000, help="synthetic: training points")
    p.add_argument("--features", type=int, default=20_000, help="synthetic: features")
    p.add_argument("--out", default=None, help="output folder (default: runs/xc-<data>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs in --out from their checkpoints (bit-identically); "
                        "--epochs may be raised")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def _load(args):
    if args.data == "synthetic":
        return synthetic_xc(args.points, args.features, args.labels, seed=args.seed,
                            test_points=max(1, args.points // 5))
    folder = Path(args.data)
    if not folder.is_dir():
        base = Path(args.data_dir) if args.data_dir else default_data_dir()
        folder = base / "xc" / args.data
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {args.data!r}: no folder {folder} (give 'synthetic', a "
                                f"folder with train.txt and test.txt, or a name under --data-dir)")
    return load_xc_split(folder)


def _plan(args) -> list:
    runs = []
    for devices in args.devices:
        for method in args.methods:
            for budget in ([1.0] if method == "dense" else args.budgets):
                cfg = XCConfig(method=method, budget=budget, hidden=args.hidden,
                               sketch_dim=args.sketch_dim, bits=args.bits, tables=args.tables,
                               rehash_every=args.rehash_every, signed_fold=args.signed_fold,
                               force_labels=not args.no_force_labels, serial=args.serial,
                               lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                               devices=devices, local_steps=args.local_steps, seed=args.seed,
                               device_tiers=args.device_tiers,
                               clients_per_round=min(args.clients_per_round, devices),
                               dropout=args.dropout)
                cfg.check()
                if not 0 < budget <= 1:
                    raise ValueError(f"--budgets: {budget} is outside (0, 1]")
                if args.serial and devices > 1:
                    raise ValueError("--serial applies to centralised runs (--devices 1) only")
                runs.append(cfg)
    return runs


def summary_table(records: list) -> str:
    rows = {}
    for r in records:
        rows.setdefault((r["method"], r["budget"], r["devices"]), []).append(r)
    head = ("| method | budget | devices | P@1 best | P@1 final | P@3 final | P@5 final "
            "| active/step | MB down | MB up | s/epoch |")
    lines = [head, "|" + "---|" * 11]
    for (method, budget, devices), recs in rows.items():
        last = recs[-1]
        lines.append(
            f"| {method} | {budget:g} | {devices} | {max(r['P@1'] for r in recs):.4f} "
            f"| {last['P@1']:.4f} | {last['P@3']:.4f} | {last['P@5']:.4f} "
            f"| {last['active_mean']:.0f} | {last['bytes_down'] / 1e6:.1f} "
            f"| {last['bytes_up'] / 1e6:.1f} "
            f"| {sum(r['seconds'] for r in recs) / len(recs):.2f} |")
    return "\n".join(lines)


def _check_resume(out: Path, config: dict) -> list:
    """The records already in ``out``, after checking that its runs are these (up to epochs)."""
    saved = out / "config.json"
    if not saved.exists():
        raise ValueError(f"--resume: {out} holds no run to continue (no config.json)")
    old = json.loads(saved.read_text())["runs"]

    def key(runs):
        return [{k: v for k, v in r.items() if k != "epochs"} for r in runs]

    if key(old) != key(config["runs"]):
        raise ValueError(f"--resume: the runs in {out} differ from this command's (only --epochs "
                         f"may change)")
    results = out / "results.jsonl"
    return ([json.loads(line) for line in results.read_text().splitlines() if line.strip()]
            if results.exists() else [])


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[2:] if argv is None else [str(a) for a in argv]
    try:
        args = build_parser().parse_args(argv)
        runs = _plan(args)
        train_data, test_data = _load(args)
        out = Path(args.out or f"runs/xc-{Path(args.data).name}")
        out.mkdir(parents=True, exist_ok=True)
    except SystemExit as done:
        return done.code or 0
    except (_UsageError, ValueError, TypeError, OSError) as err:
        print(f"fastfair: error: {_one_line(err)}", file=sys.stderr)
        return 2
    config = {"command": ["fastfair", "xc", *argv], "settings": vars(args),
              "runs": [dataclasses.asdict(c) for c in runs], "data": train_data.summary(),
              "versions": {"fastfair": __version__, "torch": torch.__version__,
                           "python": platform.python_version()}}
    results = out / "results.jsonl"
    try:
        records = _check_resume(out, config) if args.resume else []
        if not args.resume and results.exists() and results.stat().st_size:
            raise ValueError(f"{out} already holds a run: pass --resume to continue it, or "
                             f"choose another --out")
    except ValueError as err:
        print(f"fastfair: error: {_one_line(err)}", file=sys.stderr)
        return 2
    (out / "config.json").write_text(json.dumps(config, indent=1))
    if not args.resume:
        results.write_text("")

    def log(rec):
        records.append(rec)
        with open(results, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if not args.quiet:
            print(f"{rec['method']} budget {rec['budget']:g} devices {rec['devices']} epoch "
                  f"{rec['epoch']}: loss {rec['loss']:.4f} P@1 {rec['P@1']:.4f} "
                  f"({rec['seconds']:.1f} s)", flush=True)

    if not args.quiet:
        print(train_data.summary())
    for folder in ("models", "checkpoints"):
        (out / folder).mkdir(exist_ok=True)
    for cfg in runs:
        name = f"{cfg.method}__budget{cfg.effective_budget:g}__devices{cfg.devices}.pt"
        train(train_data, test_data, cfg, on_eval=log, save=out / "models" / name,
              checkpoint=out / "checkpoints" / name)
    table = summary_table(records)
    (out / "summary.md").write_text(f"# fastfair xc on {train_data.name}\n\n{table}\n")
    print(table)
    return 0
