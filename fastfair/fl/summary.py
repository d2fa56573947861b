"""Seeds side by side: one row per experiment over the run folders of ``fastfair train``/``compare``.

A *run* is one method on one tier mix in one output folder: its settings are its ``Config`` in
``config.json`` and its curve the records of ``results.jsonl`` with its method, tiers and
compressor. Runs whose settings are equal but for ``seed`` (and the data set) are one
*experiment*; settings a folder's ``config.json`` predates take their defaults
(``runner._with_defaults``), the behaviour the code had before they existed.

For a metric ``m`` and a window of rounds ``[a, b]``, each run gives

* its best evaluation ``max_t m_t`` (and the round where it was reached),
* its window mean ``mean_{a <= t <= b} m_t`` over the evaluations in the window, for all users
  and for each tier's users (``metrics_by_tier``),

and each experiment the mean of these over its runs with the standard error of that mean,
``sd / sqrt(n)`` (sample standard deviation, ``n`` runs; none for one run). A best is the
maximum of a noisy curve, so it is biased upward by how many evaluations a run has and how noisy
they are; the window mean is not, which is why both are given.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

from .runner import _with_defaults

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
# Shown in their own columns (or folded into the seed list), never as a differing setting.
OWN_COLUMNS = ("method", "tiers", "compressor", "seed")


@dataclasses.dataclass
class Run:
    """One method on one tier mix in one folder, with its evaluation records sorted by round."""

    folder: Path
    config: dict
    data: str
    records: list

    @property
    def key(self) -> tuple:
        return self.config["method"], self.config["tiers"], self.config["compressor"]

    @property
    def label(self) -> str:
        method, _, compressor = self.key
        return method if compressor == "none" else f"{method}+{compressor}"


@dataclasses.dataclass
class Experiment:
    """Runs that differ only in their seed."""

    runs: list
    settings: dict  # the runs' shared settings, seed left out

    @property
    def label(self) -> str:
        return self.runs[0].label


def record_key(record: dict) -> tuple:
    """The run an evaluation record of ``results.jsonl`` belongs to: (method, tiers, compressor)."""
    return record["method"], record["tiers"], record.get("compressor", "none")


def read_json_lines(path: Path) -> list:
    """The JSON objects of a JSON-lines file, one per line; a torn last line (a run still writing,
    or killed mid-write) is left out, a bad line elsewhere is an error."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}, line {number} is not JSON") from None
    return records


def load_runs(folders: list) -> list:
    """Every trainable run in ``folders`` (each written by ``fastfair train`` or ``compare``),
    with the evaluations recorded so far; a run still in progress gives the ones it has."""
    runs = []
    for folder in dict.fromkeys(Path(f) for f in folders):
        config_path = folder / CONFIG_FILE
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder")
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} holds no fastfair run (no {CONFIG_FILE})")
        try:
            config = json.loads(config_path.read_text())
            planned = config["runs"]
            data = config["data"]["name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{config_path} is not a fastfair train/compare config "
                             f"(no 'runs' and 'data')") from None
        results = folder / RESULTS_FILE
        records = read_json_lines(results) if results.is_file() else []
        for entry in planned:
            if not entry.get("trainable", True):
                continue
            run = Run(folder, _with_defaults(entry["config"]), data, [])
            run.records = sorted((r for r in records if record_key(r) == run.key),
                                 key=lambda r: r["round"])
            runs.append(run)
    return runs


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def _curve(run: Run) -> list:
    return [(r["round"], r["metrics"]) for r in run.records]


def group(runs: list) -> list:
    """Runs with equal settings but for the seed, in the order they first appear. Two runs with
    the same settings and seed count once when they evaluated the same metrics at the same
    rounds (the same run written twice, e.g. by two ``compare`` commands), and are refused
    otherwise: one of them ran other code or is still running, and which to keep is the
    user's call."""
    experiments: dict = {}
    for run in runs:
        settings = {k: v for k, v in run.config.items() if k != "seed"}
        key = (run.data, tuple(sorted((k, _frozen(v)) for k, v in settings.items())))
        experiment = experiments.setdefault(key, Experiment([], {"data": run.data,
                                                                 **settings}))
        twin = next((r for r in experiment.runs if r.config["seed"] == run.config["seed"]),
                    None)
        if twin is None:
            experiment.runs.append(run)
        elif _curve(twin) != _curve(run):
            raise ValueError(f"{twin.folder} and {run.folder} both hold {run.label} on "
                             f"{run.config['tiers']} with seed {run.config['seed']} and the "
                             f"same settings, with different curves: pass one of them")
    for experiment in experiments.values():
        experiment.runs.sort(key=lambda r: r.config["seed"])
    return list(experiments.values())


def differing(experiments: list) -> list:
    """The settings (besides method, tiers, compressor and seed) whose values are not the same
    in every experiment: what tells the rows apart."""
    names = dict.fromkeys(k for e in experiments for k in e.settings if k not in OWN_COLUMNS)
    return [k for k in names
            if len({json.dumps(e.settings.get(k)) for e in experiments}) > 1]


def parse_window(text: str) -> tuple:
    """``"A:B"`` -> ``(A, B)``, the rounds ``A <= t <= B``; ``"A:"`` leaves it open above."""
    first, sep, last = text.partition(":")
    try:
        start = int(first)
        stop = int(last) if last.strip() else None
    except ValueError:
        start = -1
    if not sep or start < 0 or (stop is not None and stop < start):
        raise ValueError(f"--window must be A:B (or A:) with rounds 0 <= A <= B, got {text!r}")
    return start, stop


def mean_se(values: list) -> tuple:
    """The mean of ``values`` and its standard error ``sd / sqrt(n)`` (None for fewer than two
    values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclasses.dataclass
class RunSummary:
    last_round: int
    best: float
    best_round: int
    window: Optional[float]        # None: no evaluation in the window
    window_by_tier: dict


def summarize_run(run: Run, metric: str, window: tuple) -> Optional[RunSummary]:
    """``metric`` over one run's curve (None if it has no evaluation of ``metric`` yet)."""
    curve = [r for r in run.records if r["metrics"].get(metric) is not None]
    if not curve:
        return None
    start, stop = window
    inside = [r for r in curve if r["round"] >= start and (stop is None or r["round"] <= stop)]
    best = max(curve, key=lambda r: r["metrics"][metric])
    by_tier: dict = {}
    for r in inside:
        for tier, values in r.get("metrics_by_tier", {}).items():
            if values.get(metric) is not None:
                by_tier.setdefault(tier, []).append(values[metric])
    return RunSummary(
        last_round=curve[-1]["round"], best=best["metrics"][metric], best_round=best["round"],
        window=(sum(r["metrics"][metric] for r in inside) / len(inside)) if inside else None,
        window_by_tier={t: sum(v) / len(v) for t, v in by_tier.items()})


def metrics_in(runs: list) -> list:
    """Every metric some run has evaluated, in first-seen order."""
    return list(dict.fromkeys(m for run in runs for r in run.records for m in r["metrics"]
                              if m != "users"))


def _number(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _with_se(values: list) -> str:
    if not values:
        return "n/a"
    mean, se = mean_se(values)
    return _number(mean) if se is None else f"{mean:.4f} ± {se:.4f}"


def _setting(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def table(experiments: list, metric: str, window: tuple) -> str:
    """A markdown table, one row per experiment; see the module docstring for the columns."""
    start, stop = window
    span = f"{start}-{stop}" if stop is not None else f"{start}-"
    shown = differing(experiments)
    header = (["method", "tiers"] + shown
              + ["seeds", "rounds", "best (round) per seed", "best: mean ± SE",
                 f"mean {span} per seed", f"mean {span}: mean ± SE", f"mean {span} by tier"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for experiment in experiments:
        each = [summarize_run(r, metric, window) for r in experiment.runs]
        done = [s for s in each if s is not None]
        row = [experiment.label, experiment.settings["tiers"]]
        row += [_setting(experiment.settings.get(k)) for k in shown]
        row.append(", ".join(str(r.config["seed"]) for r in experiment.runs))
        if not done:
            row += ["n/a"] * 6
        else:
            rounds = sorted({s.last_round for s in done})
            row.append(str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}")
            # Per-seed lists keep every seed's place: "n/a" for one without an evaluation yet.
            row.append(", ".join("n/a" if s is None else f"{s.best:.4f} ({s.best_round})"
                                 for s in each))
            row.append(_with_se([s.best for s in done]))
            row.append(", ".join("n/a" if s is None else _number(s.window) for s in each))
            row.append(_with_se([s.window for s in done if s.window is not None]))
            tiers = list(dict.fromkeys(t for s in done for t in s.window_by_tier))
            row.append(", ".join(
                f"{t}: {_number(mean_se([s.window_by_tier[t] for s in done if t in s.window_by_tier])[0])}"
                for t in tiers))
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)
