"""The ``fastfair`` command line: federated training from a shell.

``fastfair train`` runs one method on one tier mix; ``fastfair compare`` runs several methods x
tier mixes on the same data and seeds. Both write to ``--out``:

* ``config.json``: every setting (seeds included), the command lines, versions, the data summary
  and, per run, its full ``Config`` and ``FederatedRunner.describe()`` (tier sizes and bytes);
* ``results.jsonl``: one JSON object per evaluation;
* ``rounds.jsonl``: one JSON object per round (in-process runs): its clients, the bytes each
  client downloaded and uploaded (``by_client``), per tier and in total, drops, rejections, loss;
* ``summary.md``: method x tier mix -> final and best metrics, MB moved, rounds (also printed);
* ``plot.png``: metric vs round, and final metric vs the smallest tier's capacity;
* ``checkpoints/<method>__<tiers>.pt``: ``FederatedRunner.save`` every ``--checkpoint-every``
  rounds and at the end; ``--resume`` continues every run bit-identically from them.

``fastfair summary`` (``fastfair.summary_cli``) puts the seeds of such runs side by side, and
``fastfair xc`` (``fastfair.xc_cli``) runs extreme classification.

Every bad argument or data problem ends with one line ``fastfair: error: ...`` and status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import pickle
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .fl.data import DATASETS, load_dataset, synthetic
from .fl.model import ARCHS, HEAD_INITS
from .fl.compress import COMPRESSORS
from .fl.parallel import POOLS
from .fl.profiles import PROFILES
from .fl.summary import CONFIG_FILE, RESULTS_FILE, read_json_lines, record_key
from .fl.runner import (AGGREGATIONS, ASSIGNMENTS, COMPRESSIBLE, DATA_STEP, FULL_TABLES,
                        HASHED_FULL_METHODS, LEGACY_SETTINGS, LOCAL_KERNELS, LOSSES, METHODS,
                        FITS, NEGATIVE_SAMPLINGS, OPTIMIZER_STATES, OPTIMIZERS, SUBSPACES,
                        WEIGHTINGS, Config,
                        FederatedRunner, popularity_metrics)
from .fl.tiers import fraction_label, parse_tiers

ENGINES = ("inprocess", "flower")
ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.md"
PLOT_FILE = "plot.png"
CHECKPOINT_DIR = "checkpoints"
# Half the users keep the full table, the other half hold 1/2, 1/8 or 1/64 of it: from where every
# baseline still works to where only hashing does.
COMPARE_TIERS = ("2:0-1", "2:0-3", "2:0-6")
# Fields of a record that measure time: the only ones a resumed run may change.
TIMING_FIELDS = ("seconds", "eval_seconds")
# Settings a --resume may change: they decide how far and how visibly a run goes, not what it
# computes.
RESUMABLE_SETTINGS = ("rounds", "checkpoint_every", "quiet", "resume", "overwrite", "out",
                      "data_dir", "workers", "pool")

_CHOICES = {"method": METHODS, "arch": ARCHS, "head_init": HEAD_INITS, "full_table": FULL_TABLES,
            "assignment": ASSIGNMENTS,
            "optimizer": OPTIMIZERS,
            "optimizer_state": OPTIMIZER_STATES, "loss": LOSSES, "compressor": COMPRESSORS,
            "aggregation": AGGREGATIONS, "weighting": WEIGHTINGS, "fit": FITS,
            "subspace": SUBSPACES, "negative_sampling": NEGATIVE_SAMPLINGS,
            "local_kernel": LOCAL_KERNELS}
_SHORT = {"clients_per_round": "-K", "local_epochs": "-E"}
_HELP = {
    "arch": "model",
    "head_init": "NeuMF dense layers' initialisation: NeuMF's usual (ncf) or nn.Linear's "
                 "default (torch, fastfair's before 2026-11-21)",
    "full_table": "what full-capacity devices hold: the dense item tables, or hashed arrays "
                  "of the same size with collisions (an early FAIR reference version's "
                  "compression 1)",
    "dim": "embedding dimension d",
    "assignment": "how users get tiers: seeded shuffle, the most active get the largest, or "
                  "in user-id order, the first get the largest (the reference code)",
    "clients_per_round": "clients sampled per round (without replacement)",
    "rounds": "federated rounds",
    "local_epochs": "local epochs per round",
    "batch_size": "local batch size",
    "lr": "client learning rate",
    "optimizer": "client optimizer",
    "optimizer_state": "fresh optimizer every round, or one kept on each client",
    "loss": "training loss",
    "negatives": "negatives per positive, redrawn every epoch",
    "negative_sampling": "draw negatives uniformly over every item (uniform), or over the items "
                         "outside the client's training interactions (unseen, the reference "
                         "code)",
    "local_kernel": "how clients train locally: compiled kernels (fused, where they apply), "
                    "autograd, or auto (fused for item tables of 2^19+ entries, autograd for "
                    "smaller ones, which it trains in less memory); the same round, to rounding",
    "reg": "L2 weight on the embeddings each batch uses",
    "aggregation": "average what clients hold (model, the reference rule), what they changed "
                   "(delta), what they changed with each nested subspace averaged over the clients "
                   "holding it (nested), or each item's change over the clients that changed "
                   "it (item-mean, dense views only)",
    "weighting": "a client's weight in the average: its number of interactions (data), or "
                 "that times its capacity (capacity)",
    "fit": "how a hashed device's array is fitted to the global table at download: least "
           "squares (plain, FAIR) or weighted by each item row's energy (energy), so used rows "
           "arrive close to their value",
    "fit_floor": "energy fit: every row's weight is its energy plus this times the mean energy",
    "subspace": "the hashed arrays' random subspace: one for the whole run (fixed, FAIR) or a "
                "fresh one every round, shared by the round's devices (round)",
    "chunk_size": "hash chunk size Z (contiguous elements per hash)",
    "dropout": "probability that a sampled client never returns its update",
    "seed": "seed of the runner (initialisation, tiers, hashes, sampling)",
    "eval_every": "evaluate every N rounds (and after the last)",
    "compressor": "how clients encode their item-table updates (none: upload the tables)",
    "ratio": "payload budget per item table, as a fraction of the whole table in float32 "
             "(0: none)",
    "actions": "number of actions K, or 'adaptive' (chosen per client by --ratio, --profile "
               "and --error-bound)",
    "max_actions": "largest K the adaptive rule may choose",
    "spherical": "actions: cluster directions and send one scale per touched row",
    "kmeans_iters": "actions: cap on Lloyd iterations",
    "error_bound": "adaptive actions: smallest K whose relative reconstruction error is at "
                   "most this (0: off)",
    "profile": f"device/network profile: {', '.join(PROFILES)} or a JSON file (gives "
               "simulated round times and the deadline)",
    "deadline": "simulated round deadline in seconds (0: the profile's)",
    "server_lr": "server learning rate: move this far towards the aggregate",
    "user_step": "fraction of a round's change a device keeps in its private user vectors "
                 "(the reference code's averaging of user rows is about 1/K), or 'data': "
                 "the client's weight over the total weight of the clients the round "
                 "aggregates (that averaging's own step)",
    "refit_epochs": "serve users with vectors refit to the global model by this many Adam "
                    "steps (0: their private training vectors)",
    "refit_lr": "learning rate of the serving refit",
    "refit_sample": "positives per user the serving refit uses (0: all)",
}
_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_SYNTHETIC = {k: p.default for k, p in inspect.signature(synthetic).parameters.items()}


class _UsageError(Exception):
    """A bad command line, reported like every other error: one line, status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _user_step(text: str):
    """``--user-step``: a float (``Config.check`` tests its range) or ``"data"``."""
    if text.strip() == DATA_STEP:
        return DATA_STEP
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"user_step must be a float in (0, 1] or {DATA_STEP!r}, got {text!r}") from None


# argparse names the type in its message ("invalid _positive value"); these read better.
_positive.__name__ = "positive int"
_non_negative.__name__ = "int >= 0"
# Options whose values are not of their default's type.
_TYPES = {"user_step": (_user_step, f"FLOAT|{DATA_STEP}")}


def _add_common(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="synthetic",
                      help=f"one of {', '.join(DATASETS)} (default: %(default)s, generated)")
    data.add_argument("--data-dir", metavar="DIR",
                      help="the dataset's folder (default: its folder under $FASTFAIR_DATA_DIR "
                           "or ../shared/data)")
    data.add_argument("--users", type=_positive, metavar="N",
                      help=f"synthetic only: number of users (default: {_SYNTHETIC['num_users']})")
    data.add_argument("--items", type=_positive, metavar="N",
                      help=f"synthetic only: number of items (default: {_SYNTHETIC['num_items']})")
    data.add_argument("--data-seed", type=_non_negative, metavar="S",
                      help=f"synthetic only: seed of the generator (default: {_SYNTHETIC['seed']})")

    train = parser.add_argument_group("training (fastfair.fl.runner.Config)")
    for name, field in _CONFIG_FIELDS.items():
        if name in ("method", "tiers", "ks") or (name == "compressor" and
                                                  parser.prog.endswith("compare")):
            continue
        flags = [f"--{name.replace('_', '-')}"] + ([_SHORT[name]] if name in _SHORT else [])
        kind = type(field.default)
        if kind is bool:
            train.add_argument(*flags, dest=name, action="store_true", help=_HELP.get(name))
            continue
        kind, metavar = _TYPES.get(name, (kind, None if name in _CHOICES
                                          else kind.__name__.upper()))
        train.add_argument(*flags, dest=name, type=kind, default=field.default,
                           choices=_CHOICES.get(name), metavar=metavar,
                           help=f"{_HELP.get(name, name)} (default: %(default)s)")
    train.add_argument("--k", dest="ks", type=_positive, action="append", metavar="K",
                       help="metric cut-off, repeatable; the first is the one plotted "
                            f"(default: {', '.join(map(str, Config.ks))})")

    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR",
                     help="output folder (default: runs/<command>-<dataset>)")
    out.add_argument("--overwrite", action="store_true",
                     help="start again in an --out folder that already holds a run")
    out.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its checkpoints up to --rounds "
                          "(same command line otherwise)")
    out.add_argument("--checkpoint-every", type=_non_negative, metavar="N",
                     help="checkpoint every N rounds and at the end "
                          "(default: at every evaluation; 0: only at the end)")
    out.add_argument("--quiet", action="store_true",
                     help="no progress output; the summary table is still printed")
    out.add_argument("--workers", type=_positive, default=1, metavar="N",
                     help="train each round's clients N at a time (same results as 1; "
                          "default: %(default)s)")
    out.add_argument("--pool", choices=POOLS, default="auto",
                     help="with --workers N: train clients in threads (the fused kernel "
                          "releases the GIL; tables stay in this process) or in processes "
                          "(the autograd loop needs them); auto: threads when the "
                          "full-capacity clients train fused (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastfair", allow_abbrev=False,
                     description="Federated recommendation with item tables of any size "
                                 "(FAIR and baselines).")
    parser.add_argument("--version", action="version", version=f"fastfair {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", allow_abbrev=False, help="run one method",
                                description="Train one method on one tier mix.")
    train.add_argument("--method", default=Config.method, choices=METHODS,
                       help="(default: %(default)s)")
    train.add_argument("--tiers", default=Config.tiers, metavar="SPEC",
                       help="tier mix, e.g. 2:0-1-2-3 or 1:0.5,1/64:0.5 (default: %(default)s)")
    train.add_argument("--engine", default="inprocess", choices=ENGINES,
                       help="run the clients in this process, or on Flower's simulation "
                            "engine (pip install 'fastfair[flower]'; no checkpoints) "
                            "(default: %(default)s)")
    _add_common(train)
    compare = commands.add_parser("compare", allow_abbrev=False,
                                  help="run several methods x tier mixes",
                                  description="Run every method on every tier mix, on the same "
                                              "data and seeds.")
    compare.add_argument("--methods", default=",".join(METHODS), metavar="LIST",
                         help="comma-separated methods among %(default)s (default: all)")
    compare.add_argument("--tiers", action="append", metavar="SPEC",
                         help="a tier mix, repeatable "
                              f"(default: {' '.join(COMPARE_TIERS)})")
    compare.add_argument("--compressors", "--compressor", default="none", metavar="LIST",
                         help=f"comma-separated upload compressors among "
                              f"{','.join(COMPRESSORS)}, each run with every method and tier "
                              "mix (default: %(default)s)")
    _add_common(compare)
    # Parsed by fastfair.xc_cli; listed here so ``fastfair --help`` shows it.
    commands.add_parser("xc", add_help=False,
                        help="extreme classification with LSH output layers (PGHash); "
                             "see fastfair xc --help")
    # Parsed by fastfair.summary_cli.
    commands.add_parser("summary", add_help=False,
                        help="the seeds of each experiment side by side, from run folders; "
                             "see fastfair summary --help")
    return parser


# ---------------------------------------------------------------------------------------------
# Planning: everything is checked before anything is written
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Run:
    """One method on one tier mix."""

    config: Config
    name: str
    smallest: float
    not_run: Optional[str] = None      # why the method cannot train this mix at all
    unsupported: Optional[str] = None  # tiers it cannot represent (they sit out)
    described: list = dataclasses.field(default_factory=list)
    start: int = 0                     # round of the checkpoint a resumed run continues from

    @property
    def key(self) -> tuple:
        return self.config.method, self.config.tiers, self.config.compressor

    @property
    def label(self) -> str:
        """The method, with its upload compressor when it has one."""
        c = self.config
        return c.method if c.compressor == "none" else f"{c.method}+{c.compressor}"


def _choices(flag: str, text: str, allowed: tuple, what: str) -> list:
    """A comma-separated list of ``allowed`` names, in order, without repeats."""
    chosen = list(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        raise ValueError(f"{flag}: unknown {what}(s) {unknown or [text]}; choose from "
                         f"{', '.join(allowed)}")
    return chosen


def _methods(args) -> list:
    if args.command == "train":
        return [args.method]
    return _choices("--methods", args.methods, METHODS, "method")


def _compressors(args) -> list:
    if args.command == "train":
        return [args.compressor]
    return _choices("--compressors", args.compressors, COMPRESSORS, "compressor")


def _tier_mixes(args) -> list:
    if args.command == "train":
        mixes = [args.tiers]
    else:
        mixes = list(dict.fromkeys(args.tiers or COMPARE_TIERS))
    for spec in mixes:
        parse_tiers(spec)
    return mixes


def _load_data(args):
    key = args.dataset.strip().lower()
    if key not in DATASETS:
        return load_dataset(args.dataset)  # raises, naming the datasets it knows
    given = {"--users": args.users, "--items": args.items, "--data-seed": args.data_seed}
    if DATASETS[key][1] is not None:  # read from files, not generated
        named = [flag for flag, value in given.items() if value is not None]
        if named:
            raise ValueError(f"{', '.join(named)}: only for --dataset synthetic, not "
                             f"{args.dataset!r}")
        return load_dataset(args.dataset, args.data_dir)
    kwargs = {name: value for name, value in (("num_users", args.users),
                                              ("num_items", args.items),
                                              ("seed", args.data_seed)) if value is not None}
    if args.items is not None:
        # The generator's default activity cap leaves too few items for the 99 test negatives
        # on small catalogues; cap it instead of refusing the size.
        room = args.items - _SYNTHETIC["num_negatives"]
        if room < _SYNTHETIC["max_interactions"]:
            kwargs["max_interactions"] = max(room, _SYNTHETIC["min_interactions"])
    return load_dataset(args.dataset, args.data_dir, **kwargs)


def _file_stem(method: str, tiers: str, compressor: str = "none") -> str:
    stem = f"{method}__{re.sub(r'[^A-Za-z0-9.-]+', '_', tiers.strip())}"
    return stem if compressor == "none" else f"{stem}__{compressor}"


def _plan(args, data) -> list:
    methods, mixes, compressors = _methods(args), _tier_mixes(args), _compressors(args)
    shared = {name: getattr(args, name) for name in _CONFIG_FIELDS
              if name not in ("method", "tiers", "ks", "compressor")}
    ks = tuple(dict.fromkeys(args.ks)) if args.ks else Config.ks
    runs, stems = [], {}
    for tiers in mixes:
        smallest = min(t.fraction for t in parse_tiers(tiers))
        for method, compressor in ((m, c) for m in methods for c in compressors):
            config = Config(method=method, tiers=tiers, ks=ks, compressor=compressor, **shared)
            if args.command == "compare" and not config.has_hashed_arrays():
                # How hashed arrays are fitted and hashed does not apply: the baseline runs as
                # it is.
                config = dataclasses.replace(config, fit="plain", subspace="fixed")
            if compressor != "none" and method not in COMPRESSIBLE:
                if args.command == "train":
                    config.check(data)  # raises, naming the methods a compressor applies to
                continue
            # A method without hashed full tables is an n/a row of a comparison.
            unhashable = config.full_table == "hashed" and method not in HASHED_FULL_METHODS
            if not unhashable or args.command == "train":
                config.check(data)
            stem = _file_stem(method, tiers, compressor)
            if stem in stems:
                raise ValueError(f"tier mixes {stems[stem]!r} and {tiers!r} would share the "
                                 f"checkpoint name {stem}; write them alike or drop one")
            stems[stem] = tiers
            run = _Run(config, stem, smallest)
            try:
                runner = FederatedRunner(data, config)
            except ValueError as err:
                if args.command == "train":
                    raise
                run.not_run = str(err)
            else:
                run.unsupported = runner.unsupported_message()
                run.described = runner.describe()
            runs.append(run)
    if all(run.not_run for run in runs):
        raise ValueError(f"no run can train: {runs[0].not_run}")
    return runs


def _settings(args, methods, mixes) -> dict:
    """Every setting of the command, JSON-normalised (so a stored copy compares equal)."""
    settings = {k: v for k, v in vars(args).items()
                if k not in ("method", "methods", "tiers", "compressor", "compressors")}
    settings.setdefault("engine", "inprocess")
    settings.update(methods=methods, tier_mixes=mixes, compressors=_compressors(args),
                    ks=list(dict.fromkeys(args.ks)) if args.ks else list(Config.ks))
    return json.loads(json.dumps(settings))


def _load_checkpoint(path: Path, data, workers: int = 1, pool: str = "auto") -> FederatedRunner:
    try:
        return FederatedRunner.load(path, data, workers, pool)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from None


def _check_resume(out: Path, runs: list, data, settings: dict, rounds: int) -> None:
    """Set each run's start round from its checkpoint; refuse what cannot continue exactly."""
    config_file = out / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"--resume: {out} holds no run to resume (no {CONFIG_FILE})")
    before = json.loads(config_file.read_text()).get("settings")
    if not isinstance(before, dict):
        raise ValueError(f"--resume: {config_file} holds no fastfair settings")
    # A setting added after the run was started counts as what that run used: its default, or
    # its legacy value where the default changed when it was added.
    before = {**{k: f.default for k, f in _CONFIG_FIELDS.items() if k not in before},
              **LEGACY_SETTINGS, **before}
    changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in settings.items()
               if k not in RESUMABLE_SETTINGS and before.get(k) != v]
    if changed:
        raise ValueError(f"--resume: settings differ from the run in {out}: {'; '.join(changed)}")
    found = False
    for run in runs:
        path = out / CHECKPOINT_DIR / f"{run.name}.pt"
        if run.not_run or not path.is_file():
            continue
        runner = _load_checkpoint(path, data)
        saved, wanted = dataclasses.asdict(runner.cfg), dataclasses.asdict(run.config)
        diff = sorted(k for k in wanted if k != "rounds" and saved[k] != wanted[k])
        if diff:
            raise ValueError(f"checkpoint {path} was taken with different settings: {diff}")
        if runner.round_index > rounds:
            raise ValueError(f"--resume --rounds {rounds}: {run.config.method} on "
                             f"{run.config.tiers} already trained {runner.round_index} rounds")
        run.start = runner.round_index
        found = True
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def _plain(value):
    """JSON-safe: non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_records(path: Path) -> list:
    return read_json_lines(path) if path.is_file() else []


def _data_record(data) -> dict:
    return {"name": data.name, "num_users": data.num_users, "num_items": data.num_items,
            "num_train": data.num_train, "num_test": data.num_test, "protocol": data.protocol,
            "info": {k: v for k, v in data.info.items() if isinstance(v, (str, int, float))},
            "summary": data.summary()}


def _write_config(out: Path, settings: dict, argv: list, data, runs: list) -> None:
    path = out / CONFIG_FILE
    commands = json.loads(path.read_text()).get("commands", []) if settings["resume"] else []
    commands.append(shlex.join(["fastfair", *argv]))
    config = {
        "settings": settings,
        "commands": commands,
        "versions": {"fastfair": __version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version(),
                     "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "data": _data_record(data),
        "runs": [{"method": r.config.method, "tiers": r.config.tiers,
                  "compressor": r.config.compressor,
                  "config": dataclasses.asdict(r.config),
                  "checkpoint": f"{CHECKPOINT_DIR}/{r.name}.pt",
                  "trainable": r.not_run is None, "reason": r.not_run,
                  "unsupported": r.unsupported, "tiers_described": r.described}
                 for r in runs],
    }
    _write_atomic(path, json.dumps(_plain(config), indent=2) + "\n")


def _prepare_out(args, out: Path, runs: list) -> None:
    ckpt_dir = out / CHECKPOINT_DIR
    if args.resume:
        starts = {run.key: run.start for run in runs}
        # Lines of rounds after a run's checkpoint are redone by the resumed run.
        for name in (RESULTS_FILE, ROUNDS_FILE):
            kept = [r for r in _read_records(out / name)
                    if r["round"] <= starts.get(record_key(r), -1)]
            _write_atomic(out / name, "".join(json.dumps(r) + "\n" for r in kept))
        return
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, RESULTS_FILE, ROUNDS_FILE, SUMMARY_FILE, PLOT_FILE):
        (out / name).unlink(missing_ok=True)
    for stale in ckpt_dir.glob("*.pt"):
        stale.unlink()
    (out / RESULTS_FILE).touch()
    (out / ROUNDS_FILE).touch()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def _record(cfg: Config, totals: dict, stats: dict, metrics: dict, eval_seconds: float,
            by_tier: Optional[dict] = None) -> dict:
    """One evaluation's line of results.jsonl; ``by_tier``: the metrics over each tier's users
    (in-process runs; Flower's federated evaluation reports the mean only)."""
    return _plain({
        "method": cfg.method, "tiers": cfg.tiers,
        "compressor": cfg.compressor, "round": stats["round"],
        "metrics": metrics, **({"metrics_by_tier": by_tier} if by_tier is not None else {}),
        "loss": stats["loss"],
        "clients": stats["clients"], "returned": stats["returned"],
        "bytes_down": stats["bytes_down"], "bytes_up": stats["bytes_up"],
        "bytes_down_total": totals["bytes_down"], "bytes_up_total": totals["bytes_up"],
        "dropped": stats["dropped"], "rejected": stats["rejected"],
        "dropped_total": totals["dropped"], "rejected_total": totals["rejected"],
        "by_tier": stats["by_tier"],
        **{k: stats[k] for k in ("upload_ratio", "bits_up", "bits_int32_up", "sim_seconds",
                                 "late", "by_class") if k in stats},
        **{f"{k}_total": totals[k] for k in ("bits_up", "bits_int32_up", "item_bits_up",
                                             "item_bits_int32_up", "item_reference_bits",
                                             "late") if k in totals},
        "seconds": stats["seconds"], "eval_seconds": eval_seconds,
    })


def _round_record(cfg: Config, stats: dict) -> dict:
    """One round's line of rounds.jsonl: ``by_client`` maps a client id to its bytes
    ``[down, up]`` (a dropped client's up is 0)."""
    return _plain({"method": cfg.method, "tiers": cfg.tiers, "compressor": cfg.compressor,
                   **{k: stats[k] for k in ("round", "loss", "clients", "returned", "dropped",
                                            "rejected", "rejections", "bytes_down", "bytes_up",
                                            "by_tier", "by_client", "seconds")}})


def _train_flower(run: _Run, data, out: Path, args) -> None:
    """The run through Flower's simulation engine (``fastfair.fl.flower``): the same records,
    no checkpoints (the server never holds the clients' private vectors)."""
    try:
        from .fl import flower
    except ImportError as err:
        raise ValueError(str(err)) from None
    cfg = run.config
    started = time.perf_counter()
    with open(out / RESULTS_FILE, "a") as results:
        def write(rec):
            metrics = {k: v for k, v in rec.items() if "@" in k or k == "users"}
            results.write(json.dumps(_record(cfg, rec["totals"], rec, metrics,
                                             rec["eval_seconds"])) + "\n")
            results.flush()

        flower.simulate(data, cfg, on_eval=write)
    if not args.quiet:
        print(f"{run.label} {cfg.tiers}: {cfg.rounds} rounds through Flower "
              f"({time.perf_counter() - started:.1f} s)", flush=True)


def _train(run: _Run, data, out: Path, args, show_bar: bool) -> None:
    path = out / CHECKPOINT_DIR / f"{run.name}.pt"
    if run.start:
        runner = _load_checkpoint(path, data, args.workers, args.pool)
        # The checkpoint stores the rounds it was started with; it continues to the new target.
        runner.cfg.rounds = run.config.rounds
    else:
        runner = FederatedRunner(data, run.config, workers=args.workers, pool=args.pool)
    with runner:
        _train_rounds(runner, run, out, args, show_bar)


def _train_rounds(runner: FederatedRunner, run: _Run, out: Path, args, show_bar: bool) -> None:
    path = out / CHECKPOINT_DIR / f"{run.name}.pt"
    cfg = runner.cfg
    every = cfg.eval_every if args.checkpoint_every is None else args.checkpoint_every
    metric = f"ndcg@{cfg.ks[0]}"
    shown = {}
    started = time.perf_counter()
    bar = tqdm(total=cfg.rounds, initial=runner.round_index, unit="round", leave=True,
               desc=f"{run.label} {cfg.tiers}", disable=not show_bar, dynamic_ncols=True)
    with bar, open(out / RESULTS_FILE, "a") as results, open(out / ROUNDS_FILE, "a") as per_round:
        while runner.round_index < cfg.rounds:
            stats = runner.run_round()
            per_round.write(json.dumps(_round_record(cfg, stats)) + "\n")
            per_round.flush()
            r = stats["round"]
            shown["loss"] = f"{stats['loss']:.4f}"
            if r % cfg.eval_every == 0 or r == cfg.rounds:
                t0 = time.perf_counter()
                metrics = runner.evaluate()
                by_tier = runner.evaluate_by_tier()
                results.write(json.dumps(_record(cfg, runner.totals, stats, metrics,
                                                 time.perf_counter() - t0, by_tier)) + "\n")
                results.flush()
                shown[metric] = f"{metrics[metric]:.4f}"
            if (every and r % every == 0) or r == cfg.rounds:
                runner.save(path)
            bar.set_postfix(shown, refresh=False)
            bar.update(1)
    if not show_bar and not args.quiet:
        detail = ", ".join(f"{k} {v}" for k, v in shown.items())
        print(f"{run.label} {cfg.tiers}: round {cfg.rounds}, {detail} "
              f"({time.perf_counter() - started:.1f} s)", flush=True)


# ---------------------------------------------------------------------------------------------
# Summary and plot
# ---------------------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def summary_table(runs: list, records: list, ks: tuple, popularity: Optional[dict] = None) -> str:
    """Markdown table: one row per run, from its evaluation records, and a last row for the
    item-popularity ranking (``popularity``: its metrics) when given."""
    names = [f"{m}@{k}" for k in ks for m in ("ndcg", "hr")]
    compressed = any(run.config.compressor != "none" for run in runs)
    header = (["method", "tiers", "smallest tier", "rounds"]
              + [f"{n} {w}" for n in names for w in ("final", "best")]
              + [f"{names[0]} final by tier"] + ["MB down+up"] + (["MB up", "item upload ratio"] if compressed else [])
              + ["notes"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        mine = sorted((r for r in records if record_key(r) == run.key), key=lambda r: r["round"])
        row = [run.label, run.config.tiers, fraction_label(run.smallest)]
        if run.not_run or not mine:
            row += ["n/a"] * (1 + 2 * len(names) + 2 + 2 * compressed)
            row.append(f"n/a: {run.not_run}" if run.not_run else "no evaluation yet")
        else:
            last = mine[-1]
            row.append(str(last["round"]))
            for name in names:
                seen = [r["metrics"][name] for r in mine if r["metrics"].get(name) is not None]
                row += [_number(last["metrics"].get(name)), _number(max(seen, default=None))]
            row.append(", ".join(f"{tier}: {_number(m.get(names[0]))}"
                                 for tier, m in last.get("metrics_by_tier", {}).items()))
            row.append(f"{(last['bytes_down_total'] + last['bytes_up_total']) / 1e6:.2f}")
            if compressed:
                row.append(f"{last['bytes_up_total'] / 1e6:.2f}")
                ref = last.get("item_reference_bits_total")
                row.append(f"1/{ref / last['item_bits_up_total']:.1f}"
                           if ref and last.get("item_bits_up_total") else "1")
            row.append(run.unsupported or "")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    if popularity is not None:
        row = ["popularity (no training)", "", "", "0"]
        for name in names:
            row += [_number(popularity.get(name))] * 2
        row += ["", "0.00"] + ["", ""] * compressed
        row += ["items ranked by their number of training interactions"]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _write_summary(out: Path, title: str, table: str) -> None:
    text = (f"# {title}\n\n{table}\n\nfinal: the last evaluation; best: the best evaluation of "
            f"the run; by tier: the final metric over each tier's users; MB: bytes downloaded + uploaded by all clients over all rounds "
            f"(1 MB = 10^6 bytes; uploads counted exactly in bits, indices bit-packed); item "
            f"upload ratio: item-table bits uploaded / bits of uploading those tables whole "
            f"in float32. Per-evaluation records: `{RESULTS_FILE}`; settings: "
            f"`{CONFIG_FILE}`.\n")
    _write_atomic(out / SUMMARY_FILE, text)


def write_plot(path: Path, runs: list, records: list, metric: str, title: str,
               upload_metric: Optional[str] = None) -> None:
    """Left: ``metric`` vs round, one line per run (colour: method and compressor, style: tier
    mix). Middle: the final ``metric`` vs the smallest tier's capacity, one line per method.
    Right (when ``upload_metric`` is given): the final ``upload_metric`` vs the MB uploaded, one
    point per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    labels = list(dict.fromkeys(run.label for run in runs))
    colours = {m: f"C{i % 10}" for i, m in enumerate(labels)}
    mixes = list(dict.fromkeys(run.config.tiers for run in runs))
    styles = {t: ("-", "--", ":", "-.")[i % 4] for i, t in enumerate(mixes)}
    fig = Figure(figsize=(19 if upload_metric else 13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if upload_metric else 2)
    left, right = axes[0], axes[1]
    finals: dict = {}
    for run in runs:
        mine = sorted((r for r in records if record_key(r) == run.key
                       and r["metrics"].get(metric) is not None), key=lambda r: r["round"])
        if run.not_run or not mine:
            continue
        method = run.label
        left.plot([r["round"] for r in mine], [r["metrics"][metric] for r in mine],
                  color=colours[method], linestyle=styles[run.config.tiers], marker=".")
        finals.setdefault(method, []).append((run.smallest, mine[-1]["metrics"][metric]))
        if upload_metric and mine[-1]["metrics"].get(upload_metric) is not None:
            axes[2].scatter([mine[-1]["bytes_up_total"] / 1e6],
                            [mine[-1]["metrics"][upload_metric]], color=colours[method],
                            marker="o^sDv*"[mixes.index(run.config.tiers) % 6])
    for method, points in finals.items():
        points.sort()
        right.plot([x for x, _ in points], [y for _, y in points], color=colours[method],
                   marker="o", label=method)
    left.set(xlabel="round", ylabel=metric, title=f"{metric} during training")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Line2D([], [], color=colours[m], label=m) for m in finals]
    handles += [Line2D([], [], color="gray", linestyle=styles[t], label=f"tiers {t}")
                for t in mixes]
    left.legend(handles=handles, fontsize="small")
    smallest = sorted({run.smallest for run in runs})
    right.set_xscale("log", base=2)
    right.set_xticks(smallest, [fraction_label(x) for x in smallest])
    right.minorticks_off()
    right.set(xlabel="capacity of the smallest tier (fraction of the dense item table)",
              ylabel=f"final {metric}", title=f"final {metric} vs smallest tier")
    right.legend(fontsize="small")
    if upload_metric:
        axes[2].set_xscale("log")
        axes[2].set(xlabel="MB uploaded by all clients (log)", ylabel=f"final {upload_metric}",
                    title=f"final {upload_metric} vs upload")
        axes[2].legend(handles=[Line2D([], [], color=colours[m], marker="o", linestyle="",
                                       label=m) for m in finals], fontsize="small")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _setup(argv: list):
    """Parse, load, check and prepare the output folder; raises on anything bad before any file
    is written."""
    args = build_parser().parse_args(argv)
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if getattr(args, "engine", "inprocess") == "flower":
        if args.resume:
            raise ValueError("--engine flower cannot --resume: the server never holds the "
                             "clients' private vectors, so it has no complete checkpoint")
        if args.workers != 1 or args.pool != "auto":
            raise ValueError("--workers and --pool apply to the in-process engine; "
                             "Flower runs its clients on its own nodes")
        if args.user_step == DATA_STEP:
            raise ValueError(f"--user-step {DATA_STEP} needs the weights of every client of "
                             "the round before a device keeps its step: in-process engine only")
        try:
            from .fl import flower  # noqa: F401  (fail before any file is written)
        except ImportError as err:
            raise ValueError(str(err)) from None
    out = Path(args.out or f"runs/{args.command}-{args.dataset.strip().lower()}")
    args.out = str(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    data = _load_data(args)
    if data.info.get("generator") == "synthetic":
        # Recorded as effective values, so config.json names the seed and sizes even when left
        # to their defaults.
        args.users, args.items, args.data_seed = data.num_users, data.num_items, data.info["seed"]
    runs = _plan(args, data)
    settings = _settings(args, list(dict.fromkeys(r.config.method for r in runs)),
                         list(dict.fromkeys(r.config.tiers for r in runs)))
    if args.resume:
        _check_resume(out, runs, data, settings, args.rounds)
    elif (out / CONFIG_FILE).exists() and not args.overwrite:
        raise ValueError(f"{out} already holds a run: pass --resume to continue it or "
                         f"--overwrite to start again")
    _prepare_out(args, out, runs)
    _write_config(out, settings, argv, data, runs)
    return args, out, data, runs


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["xc"]:
        from .xc_cli import main as xc_main
        return xc_main(argv[1:])
    if argv[:1] == ["summary"]:
        from .summary_cli import main as summary_main
        return summary_main(argv[1:])
    try:
        args, out, data, runs = _setup(argv)
    except SystemExit as done:  # --help, --version
        return done.code or 0
    except (_UsageError, ValueError, TypeError, OSError) as err:
        print(f"fastfair: error: {_one_line(err)}", file=sys.stderr)
        return 2
    show_bar = not args.quiet and sys.stderr.isatty()
    trainable = [run for run in runs if not run.not_run]
    if not args.quiet:
        print(data.summary())
        print(f"{len(trainable)} run(s) of {args.rounds} rounds -> {out}", flush=True)
    try:
        for run in trainable:
            if getattr(args, "engine", "inprocess") == "flower":
                _train_flower(run, data, out, args)
            elif run.start < args.rounds:
                _train(run, data, out, args, show_bar)
    except KeyboardInterrupt:
        print(f"fastfair: interrupted; the same command with --resume continues from the "
              f"checkpoints in {out / CHECKPOINT_DIR}", file=sys.stderr)
        return 130
    records = _read_records(out / RESULTS_FILE)
    ks = runs[0].config.ks
    title = (f"fastfair {args.command} on {data.name}: {data.num_users:,} users, "
             f"{data.num_items:,} items, d={args.dim}, K={args.clients_per_round}, "
             f"E={args.local_epochs}")
    table = summary_table(runs, records, ks, popularity_metrics(data, ks))
    _write_summary(out, title, table)
    write_plot(out / PLOT_FILE, runs, records, f"ndcg@{ks[0]}", title,
               upload_metric=f"hr@{ks[0]}" if any(r.config.compressor != "none"
                                                  for r in runs) else None)
    print(table)
    print(f"wrote {out / SUMMARY_FILE}, {out / PLOT_FILE}, {out / RESULTS_FILE}, "
          f"{out / CONFIG_FILE}")
    return 0
