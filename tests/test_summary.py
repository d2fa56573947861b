"""``fastfair summary``: runs grouped by settings, per-seed best and window means, mean and SE."""
import dataclasses
import json
import math

import numpy as np
import pytest

from fastfair import cli
from fastfair.fl import summary
from fastfair.fl.runner import Config

TINY = ["--users", "40", "--items", "200", "-K", "5", "--quiet"]


def _write_run(folder, configs, curves, data="goodreads_100", torn=False):
    """A run folder as ``fastfair compare`` writes it: ``configs`` (Config or dict) and, per
    config, ``curves``: {round: (metric, {tier: metric})}."""
    folder.mkdir(parents=True)
    entries = []
    for config in configs:
        as_dict = dataclasses.asdict(config) if isinstance(config, Config) else config
        entries.append({"method": as_dict["method"], "tiers": as_dict["tiers"],
                        "compressor": as_dict.get("compressor", "none"), "config": as_dict,
                        "trainable": True})
    (folder / "config.json").write_text(json.dumps({"data": {"name": data}, "runs": entries}))
    lines = []
    for entry, curve in zip(entries, curves):
        for rnd, (value, by_tier) in curve.items():
            lines.append(json.dumps({
                "method": entry["method"], "tiers": entry["tiers"],
                "compressor": entry["compressor"], "round": rnd,
                "metrics": {"ndcg@20": value, "hr@20": 1 - value, "users": 9},
                "metrics_by_tier": {t: {"ndcg@20": v, "users": 3} for t, v in by_tier.items()}}))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"method": "fa'
    (folder / "results.jsonl").write_text(text)


def _curve(rng, rounds, tiers=("1", "1/2")):
    return {r: (float(rng.random()), {t: float(rng.random()) for t in tiers}) for r in rounds}


def _row(text, label):
    rows = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
    assert len(rows) == 1, text
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_seeds_grouped_with_best_window_mean_and_standard_error(tmp_path):
    rng = np.random.default_rng(1)
    rounds = list(range(10, 210, 10))
    curves = {seed: _curve(rng, rounds) for seed in (0, 1, 2)}
    for seed, curve in curves.items():
        # Written out of round order: the summary sorts each run's records.
        shuffled = dict(sorted(curve.items(), key=lambda kv: -kv[0]))
        _write_run(tmp_path / f"s{seed}", [Config(method="fair", seed=seed, subspace="round")],
                   [shuffled])
    runs = summary.load_runs([tmp_path / f"s{s}" for s in (2, 0, 1)])
    (experiment,) = summary.group(runs)
    assert [r.config["seed"] for r in experiment.runs] == [0, 1, 2]
    text = summary.table([experiment], "ndcg@20", (100, 200))
    row = _row(text, "fair")

    bests = [max(c.values(), key=lambda v: v[0]) for c in curves.values()]
    best_rounds = [max(c, key=lambda r: c[r][0]) for c in curves.values()]
    window = [[c[r][0] for r in rounds if 100 <= r <= 200] for c in curves.values()]
    means = [float(np.mean(w)) for w in window]
    assert row[0:4] == ["fair", "2:0-1", "0, 1, 2", "200"]
    assert row[4] == ", ".join(f"{b[0]:.4f} ({r})" for b, r in zip(bests, best_rounds))
    values = [b[0] for b in bests]
    se = np.std(values, ddof=1) / math.sqrt(3)
    assert row[5] == f"{np.mean(values):.4f} ± {se:.4f}"
    assert row[6] == ", ".join(f"{m:.4f}" for m in means)
    assert row[7] == f"{np.mean(means):.4f} ± {np.std(means, ddof=1) / math.sqrt(3):.4f}"
    tier_half = np.mean([np.mean([c[r][1]["1/2"] for r in rounds if 100 <= r <= 200])
                         for c in curves.values()])
    assert f"1/2: {tier_half:.4f}" in row[8]


def test_rows_told_apart_by_the_settings_that_differ(tmp_path):
    rng = np.random.default_rng(2)
    _write_run(tmp_path / "a", [Config(method="fair", seed=0),
                                Config(method="exclusion", seed=0)],
               [_curve(rng, [5, 10]), _curve(rng, [5, 10])])
    _write_run(tmp_path / "b", [Config(method="fair", seed=1, subspace="round")],
               [_curve(rng, [5, 10])])
    # Written before ``subspace`` existed: it ran with the default, so it joins the fixed row.
    legacy = dataclasses.asdict(Config(method="fair", seed=3))
    del legacy["subspace"]
    _write_run(tmp_path / "c", [legacy], [_curve(rng, [5, 10])])
    experiments = summary.group(summary.load_runs([tmp_path / n for n in "abc"]))
    assert summary.differing(experiments) == ["subspace"]
    assert [(e.label, e.settings["subspace"], [r.config["seed"] for r in e.runs])
            for e in experiments] == [("fair", "fixed", [0, 3]), ("exclusion", "fixed", [0]),
                                      ("fair", "round", [1])]
    text = summary.table(experiments, "ndcg@20", (0, None))
    assert text.splitlines()[0].startswith("| method | tiers | subspace | seeds |")
    # One seed: a mean without a standard error.
    assert "±" not in _row(text, "exclusion")[6]


def test_partial_runs_and_untrainable_entries(tmp_path):
    rng = np.random.default_rng(3)
    _write_run(tmp_path / "done", [Config(seed=0)], [_curve(rng, [10, 20, 30])])
    # Still running: its last line is half written, and no evaluation reached the window yet.
    _write_run(tmp_path / "running", [Config(seed=1)], [_curve(rng, [10])], torn=True)
    config = json.loads((tmp_path / "done" / "config.json").read_text())
    config["runs"].append({**config["runs"][0], "method": "fedhm", "trainable": False,
                           "config": {**config["runs"][0]["config"], "method": "fedhm"}})
    (tmp_path / "done" / "config.json").write_text(json.dumps(config))
    runs = summary.load_runs([tmp_path / "done", tmp_path / "running"])
    assert [r.label for r in runs] == ["fair", "fair"]
    row = _row(summary.table(summary.group(runs), "ndcg@20", (20, 30)), "fair")
    assert row[3] == "10-30"
    # A third seed that has not evaluated yet keeps its place in the per-seed lists.
    _write_run(tmp_path / "starting", [Config(seed=2)], [{}])
    runs3 = summary.load_runs([tmp_path / "done", tmp_path / "running", tmp_path / "starting"])
    row3 = _row(summary.table(summary.group(runs3), "ndcg@20", (20, 30)), "fair")
    assert row3[2] == "0, 1, 2" and row3[4].endswith(", n/a") and row3[4].count(",") == 2
    assert row3[6].endswith("n/a, n/a") and row3[5] == row[5]
    # An experiment with no evaluation at all still fills every column.
    _write_run(tmp_path / "fresh", [Config(seed=0, method="exclusion")], [{}])
    text = summary.table(summary.group(summary.load_runs([tmp_path / "fresh"])), "ndcg@20",
                         (0, None))
    header, _, fresh = text.splitlines()
    assert header.count("|") == fresh.count("|")
    assert _row(text, "exclusion")[2:] == ["0"] + ["n/a"] * 6
    mine = json.loads((tmp_path / "done" / "results.jsonl").read_text().splitlines()[1])
    last = json.loads((tmp_path / "done" / "results.jsonl").read_text().splitlines()[2])
    expected = (mine["metrics"]["ndcg@20"] + last["metrics"]["ndcg@20"]) / 2
    assert row[6] == f"{expected:.4f}, n/a"
    assert row[7] == f"{expected:.4f}"


def test_the_same_run_twice_counts_once_and_two_curves_are_refused(tmp_path):
    rng = np.random.default_rng(4)
    curve = _curve(rng, [10, 20])
    _write_run(tmp_path / "a", [Config(seed=5)], [curve])
    _write_run(tmp_path / "b", [Config(seed=5), Config(seed=5, method="exclusion")],
               [curve, _curve(rng, [10])])
    experiments = summary.group(summary.load_runs([tmp_path / "a", tmp_path / "b"]))
    assert [(e.label, len(e.runs)) for e in experiments] == [("fair", 1), ("exclusion", 1)]
    # Same settings and seed, another curve (other code, or still running): the user picks.
    _write_run(tmp_path / "c", [Config(seed=5)], [{10: curve[10]}])
    with pytest.raises(ValueError, match="both hold fair on 2:0-1 with seed 5 .* different "
                                         "curves"):
        summary.group(summary.load_runs([tmp_path / "a", tmp_path / "c"]))


def test_bad_input_named(tmp_path):
    rng = np.random.default_rng(5)
    _write_run(tmp_path / "a", [Config(seed=5)], [_curve(rng, [10])])
    # The same folder named twice is read once.
    assert len(summary.load_runs([tmp_path / "a", tmp_path / "a"])) == 1
    with pytest.raises(FileNotFoundError, match="no config.json"):
        summary.load_runs([tmp_path])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text('{"settings": {}}')
    with pytest.raises(ValueError, match="not a fastfair train/compare config"):
        summary.load_runs([tmp_path / "c"])
    broken = (tmp_path / "a" / "results.jsonl")
    broken.write_text("{oops\n" + broken.read_text())
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        summary.load_runs([tmp_path / "a"])
    for bad in ("100", "a:b", "200:100", "-1:5"):
        with pytest.raises(ValueError, match="--window must be A:B"):
            summary.parse_window(bad)
    assert summary.parse_window("100:200") == (100, 200)
    assert summary.parse_window("50:") == (50, None)


def test_command_line_on_real_runs(tmp_path, capsys):
    outs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        assert cli.main(["train", *TINY, "--rounds", "4", "--eval-every", "2", "--k", "5",
                         "--seed", str(seed), "--out", out]) == 0
        outs.append(out)
    capsys.readouterr()
    table_file = tmp_path / "table.md"
    assert cli.main(["summary", *outs, "--window", "3:4", "--out", table_file]) == 0
    printed = capsys.readouterr().out
    assert table_file.read_text() == printed
    row = _row(printed, "fair")
    finals = []
    for out in outs:
        records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        finals.append(records[-1]["metrics"]["ndcg@5"])
    # The first NDCG recorded is the default; the window holds round 4 only.
    assert row[2:4] == ["0, 1", "4"]
    assert row[6] == ", ".join(f"{v:.4f}" for v in finals)
    assert cli.main(["summary", *outs, "--metric", "hr@5"]) == 0
    capsys.readouterr()
    for argv, message in ((["summary", *outs, "--metric", "ndcg@20"], "'ndcg@20' is not among"),
                          (["summary", *outs, "--window", "9"], "--window must be A:B"),
                          (["summary", tmp_path / "nowhere"], "is not a folder"),
                          (["summary", *outs, "--out", tmp_path], "is a folder")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastfair: error: ") and message in err and err.count("\n") == 1
