"""The ``fastfair`` command line: outputs, n/a combinations, resume, and one-line errors."""
import dataclasses
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastfair import cli
from fastfair.fl.runner import Config, FederatedRunner
from testing import state_equal

TINY = ["--users", "40", "--items", "200", "-K", "5", "--quiet"]
ROOT = Path(__file__).resolve().parents[1]


def _records(out, name="results.jsonl"):
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def _without_timing(records):
    return sorted(({k: v for k, v in r.items() if k not in cli.TIMING_FIELDS} for r in records),
                  key=lambda r: (r["method"], r["tiers"], r["round"]))


def _is_png(path):
    blob = path.read_bytes()
    if blob[:8] != b"\x89PNG\r\n\x1a\n" or blob[12:16] != b"IHDR" or blob[-8:-4] != b"IEND":
        return False
    width, height = struct.unpack(">II", blob[16:24])
    return width > 500 and height > 200


def test_options_default_to_config_and_the_script_is_declared():
    args = cli.build_parser().parse_args(["train"])
    for field in dataclasses.fields(Config):
        if field.name != "ks":
            assert getattr(args, field.name) == field.default, field.name
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["fastfair"] == "fastfair.cli:main"
    assert {"tqdm", "matplotlib"} <= set(project["dependencies"])


def test_train_writes_config_results_summary_plot_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--rounds", "3", "--eval-every", "2", "--tiers", "2:0-3",
            "--seed", "7", "--k", "5", "--k", "10", "--out", out]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| fair | 2:0-3 | 1/8 | 3 |" in printed and "ndcg@5 final" in printed

    config = json.loads((out / "config.json").read_text())
    settings = config["settings"]
    assert settings["seed"] == 7 and settings["data_seed"] == 0 and settings["ks"] == [5, 10]
    assert settings["users"] == 40 and settings["rounds"] == 3
    assert config["commands"] == [" ".join(["fastfair", *map(str, argv)])]
    assert config["versions"]["torch"] == torch.__version__
    assert config["data"]["summary"].startswith("synthetic: 40 users, 200 items")
    (run,) = config["runs"]
    assert run["config"]["seed"] == 7 and run["config"]["tiers"] == "2:0-3"
    assert [t["label"] for t in run["tiers_described"]] == ["1", "1/8"]
    assert run["tiers_described"][1]["payload_bytes"] < run["tiers_described"][0]["payload_bytes"]

    records = _records(out)
    assert [r["round"] for r in records] == [2, 3]
    for r in records:
        assert {"hr@5", "ndcg@5", "hr@10", "ndcg@10"} <= set(r["metrics"])
        by_tier = r["metrics_by_tier"]
        assert set(by_tier) == {"1", "1/8"}
        assert sum(m["users"] for m in by_tier.values()) == r["metrics"]["users"]
        assert r["method"] == "fair" and r["tiers"] == "2:0-3" and r["loss"] > 0
        assert r["bytes_down"] > 0 and r["bytes_up"] == r["bytes_down"]
        assert r["seconds"] > 0 and r["dropped"] == r["rejected"] == 0
    first, last = records
    assert last["bytes_down_total"] > first["bytes_down_total"] >= first["bytes_down"]
    rounds = _records(out, "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        per_client = r["by_client"]
        assert len(per_client) == r["clients"] == 5  # TINY's -K
        assert sum(b[0] for b in per_client.values()) == r["bytes_down"]
        assert sum(b[1] for b in per_client.values()) == r["bytes_up"]
        assert sum(t["bytes_up"] for t in r["by_tier"].values()) == r["bytes_up"]
    assert sum(r["bytes_down"] for r in rounds) == last["bytes_down_total"]

    summary = (out / "summary.md").read_text()
    assert summary.startswith("# fastfair train on synthetic")
    assert f"{records[-1]['metrics']['ndcg@10']:.4f}" in summary
    by_tier = records[-1]["metrics_by_tier"]
    assert (f"1: {by_tier['1']['ndcg@5']:.4f}, 1/8: {by_tier['1/8']['ndcg@5']:.4f}"
            in summary)
    assert _is_png(out / "plot.png")
    state = torch.load(out / "checkpoints" / "fair__2_0-3.pt", weights_only=True)
    assert state["round"] == 3


def test_compare_reports_runs_that_cannot_train_as_na(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", *TINY, "--rounds", "2", "--methods", "fair,exclusion,fedhm",
                     "--tiers", "2:0-3", "--tiers", "2:1-2", "--out", out]) == 0
    table = capsys.readouterr().out
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert len(rows) == 1 + 6 + 1  # header + every method x tier mix + popularity
    assert "items ranked by their number of training interactions" in rows[
        ("popularity (no training)", "")]
    assert ("n/a: method 'exclusion' cannot represent any tier of '2:1-2'"
            in rows[("exclusion", "2:1-2")])
    assert "tiers with capacity 1/8 sit out" in rows[("exclusion", "2:0-3")]
    assert "rank floor(n d c / (n + d)) is 0" in rows[("fedhm", "2:0-3")]
    assert "| 2 |" in rows[("fair", "2:1-2")]
    summary = (out / "summary.md").read_text()
    assert all(line in summary for line in rows.values())

    config = json.loads((out / "config.json").read_text())
    runs = {(r["method"], r["tiers"]): r for r in config["runs"]}
    assert not runs[("exclusion", "2:1-2")]["trainable"]
    assert "cannot represent" in runs[("exclusion", "2:1-2")]["reason"]
    assert runs[("fedhm", "2:0-3")]["unsupported"]
    trained = {(r["method"], r["tiers"]) for r in _records(out)}
    assert trained == set(runs) - {("exclusion", "2:1-2")}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        cli._file_stem(*key) + ".pt" for key in trained)
    assert _is_png(out / "plot.png")


def test_resume_continues_bit_identically(tmp_path, monkeypatch, capsys):
    common = ["compare", *TINY, "--eval-every", "1", "--tiers", "2:0-3",
              "--methods", "fair,fedhm", "--dropout", "0.3", "--optimizer-state", "persistent",
              "--checkpoint-every", "2"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert cli.main([*common, "--rounds", "4", "--out", straight]) == 0

    # A crash in round 4 of the first run: its records of round 3 outlive its checkpoint (2).
    run_round = FederatedRunner.run_round

    def crash(self):
        if self.round_index == 3:
            raise KeyboardInterrupt
        return run_round(self)

    monkeypatch.setattr(FederatedRunner, "run_round", crash)
    assert cli.main([*common, "--rounds", "4", "--out", broken]) == 130
    assert "--resume continues" in capsys.readouterr().err
    monkeypatch.setattr(FederatedRunner, "run_round", run_round)
    assert [r["round"] for r in _records(broken)] == [1, 2, 3]
    assert cli.main([*common, "--rounds", "4", "--out", broken, "--resume"]) == 0

    assert _without_timing(_records(broken)) == _without_timing(_records(straight))
    assert _without_timing(_records(broken, "rounds.jsonl")) == \
        _without_timing(_records(straight, "rounds.jsonl"))
    for name in ("fair__2_0-3.pt", "fedhm__2_0-3.pt"):
        a = torch.load(straight / "checkpoints" / name, weights_only=True)
        b = torch.load(broken / "checkpoints" / name, weights_only=True)
        assert a["round"] == b["round"] == 4 and b["optimizer_states"]
        assert state_equal(a, b)
    commands = json.loads((broken / "config.json").read_text())["commands"]
    assert len(commands) == 2 and commands[1].endswith("--resume")

    # A run written before a setting existed resumes with that setting at its default.
    config = json.loads((broken / "config.json").read_text())
    del config["settings"]["weighting"]
    del config["settings"]["negative_sampling"]
    (broken / "config.json").write_text(json.dumps(config))
    # A setting whose default changed when it was added: the run used the old value.
    config = json.loads((broken / "config.json").read_text())
    del config["settings"]["head_init"]
    (broken / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert "head_init 'torch' -> 'ncf'" in _error(capsys, [*common, "--rounds", "5", "--out",
                                                           broken, "--resume"])
    config["settings"]["head_init"] = "ncf"
    (broken / "config.json").write_text(json.dumps(config))
    # Resuming a finished run to more rounds adds only the new rounds.
    assert cli.main([*common, "--rounds", "5", "--out", broken, "--resume"]) == 0
    rounds = sorted((r["method"], r["round"]) for r in _records(broken))
    assert rounds == [(m, r) for m in ("fair", "fedhm") for r in range(1, 6)]


def _error(capsys, argv):
    assert cli.main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastfair: error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


@pytest.mark.parametrize("argv,match", [
    ([], "the following arguments are required"),
    (["train", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["train", *TINY, "--tiers", "2:x"], "tier spec '2:x'"),
    (["compare", *TINY, "--tiers", "2:0-1", "--tiers", "1/2"], "tier spec '1/2'"),
    (["train", *TINY, "-K", "41"], "clients_per_round=41 is larger than the number of clients"),
    (["train", *TINY, "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["train", *TINY, "--rounds", "0"], "rounds must be a positive int"),
    (["train", *TINY, "--dropout", "1.5"], "dropout must be a probability"),
    (["train", *TINY, "--k", "0"], "argument --k: must be a positive integer"),
    (["train", *TINY, "--checkpoint-every", "-1"], "must be an integer >= 0"),
    (["train", *TINY, "--method", "fedprox"], "argument --method: invalid choice: 'fedprox'"),
    (["compare", *TINY, "--methods", "fair,fedprox"], "unknown method(s) ['fedprox']"),
    (["train", "--dataset", "goodreads", "--users", "5"], "--users: only for --dataset synth"),
    (["train", "--dataset", "synthetic", "--data-dir", "x"], "takes no data_dir"),
    (["train", *TINY, "--items", "100"], "exceeds num_items = 100"),
    (["train", *TINY, "--method", "exclusion", "--tiers", "2:1-2"], "cannot represent any tier"),
    (["compare", *TINY, "--methods", "exclusion", "--tiers", "2:1-2"], "no run can train"),
    (["train", *TINY, "--resume", "--overwrite"], "exclude each other"),
    (["train", *TINY, "--compressor", "zip"], "argument --compressor: invalid choice: 'zip'"),
    (["compare", *TINY, "--compressors", "none,zip"], "unknown compressor(s) ['zip']"),
    (["train", *TINY, "--compressor", "actions"], "needs a payload budget"),
    (["train", *TINY, "--compressor", "actions", "--actions", "0"], "actions must be"),
    (["train", *TINY, "--method", "fedhm", "--compressor", "topk"], "applies to methods"),
    (["train", *TINY, "--profile", "nowhere.json"], "neither a built-in profile"),
    (["train", *TINY, "--method", "heterofl", "--full-table", "hashed"],
     "full_table 'hashed' applies to methods"),
    (["compare", *TINY, "--methods", "fedhm", "--full-table", "hashed"], "no run can train"),
    (["train", *TINY, "--user-step", "foo"],
     "argument --user-step: user_step must be a float in (0, 1] or 'data', got 'foo'"),
    (["train", *TINY, "--user-step", "1.5"],
     "user_step must be a float in (0, 1] or 'data', got 1.5"),
    (["train", *TINY, "--negative-sampling", "popular"],
     "argument --negative-sampling: invalid choice: 'popular'"),
    (["train", *TINY, "--engine", "flower", "--user-step", "data"],
     "--user-step data needs the weights of every client"),
    (["train", *TINY, "--pool", "fibers"], "argument --pool: invalid choice: 'fibers'"),
    (["train", *TINY, "--fit", "sharp"], "argument --fit: invalid choice: 'sharp'"),
    (["train", *TINY, "--method", "fedhm", "--fit", "energy"],
     "fit 'energy' applies to hashed arrays"),
    (["train", *TINY, "--fit", "energy", "--fit-floor", "0"],
     "fit_floor must be a positive number, got 0.0"),
    (["train", *TINY, "--engine", "flower", "--workers", "2"],
     "--workers and --pool apply to the in-process engine"),
    (["train", *TINY, "--engine", "flower", "--pool", "threads"],
     "--workers and --pool apply to the in-process engine"),
])
def test_bad_arguments_give_one_error_line(capsys, argv, match, tmp_path):
    assert match in _error(capsys, [*argv, "--out", tmp_path / "out"] if argv else argv)
    assert not (tmp_path / "out").exists()


def test_missing_data_files(capsys, tmp_path):
    line = _error(capsys, ["train", "--dataset", "goodreads", "--data-dir", tmp_path / "missing"])
    assert "no such directory" in line and "missing" in line
    line = _error(capsys, ["train", "--dataset", "goodreads", "--data-dir", tmp_path])
    assert "no such file" in line and "train.txt" in line


def test_out_folder_errors(capsys, tmp_path):
    out = tmp_path / "run"
    assert "holds no run to resume" in _error(capsys, ["train", *TINY, "--resume", "--out", out])
    (tmp_path / "file").write_text("")
    assert "is a file" in _error(capsys, ["train", *TINY, "--out", tmp_path / "file"])
    argv = ["train", *TINY, "--rounds", "2", "--out", out]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert "already holds a run" in _error(capsys, argv)
    assert "settings differ" in _error(capsys, [*argv, "--resume", "--lr", "0.5"])
    (out / "checkpoints" / "fair__2_0-1.pt").unlink()
    assert "no checkpoint in" in _error(capsys, [*argv, "--resume"])
    (out / "checkpoints" / "fair__2_0-1.pt").write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in _error(capsys, [*argv, "--resume"])
    assert cli.main([*argv, "--overwrite"]) == 0
    records = _records(out)
    assert cli.main([*argv, "--resume"]) == 0  # finished: nothing to do
    assert _records(out) == records
    capsys.readouterr()
    assert "already trained 2 rounds" in _error(capsys, [*argv, "--resume", "--rounds", "1"])


def test_entry_points(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fastfair", "--version"])
    assert cli.main() == 0
    assert "fastfair 0.1.0" in capsys.readouterr().out
    done = subprocess.run([sys.executable, "-m", "fastfair", "train", "--tiers", "2:"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.startswith("fastfair: error: tier spec '2:'")


def test_compare_with_hashed_full_tables_reports_methods_without_them_as_na(tmp_path, capsys):
    out = tmp_path / "h"
    assert cli.main(["compare", *TINY, "--rounds", "1", "--tiers", "2:0-1", "--full-table",
                     "hashed", "--methods", "fair,fedhm,fedavg-full", "--out", out]) == 0
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert "n/a: full_table 'hashed' applies to methods" in rows["fedhm"]
    assert {r["method"] for r in _records(out)} == {"fair", "fedavg-full"}
    runs = json.loads((out / "config.json").read_text())["runs"]
    assert {r["method"]: r["trainable"] for r in runs} == {"fair": True, "fedhm": False,
                                                          "fedavg-full": True}


def test_compare_fits_and_rehashes_only_the_hashed_arrays(tmp_path):
    out = tmp_path / "f"
    assert cli.main([str(a) for a in ["compare", *TINY, "--rounds", "1", "--tiers", "2:0-2",
                                      "--methods", "fair,fedhm", "--fit", "energy",
                                      "--subspace", "round", "--checkpoint-every", "1",
                                      "--out", out]]) == 0
    configs = {path.stem: torch.load(path, weights_only=True)["config"]
               for path in (out / "checkpoints").glob("*.pt")}
    assert {k: (c["fit"], c["subspace"]) for k, c in configs.items()} == {
        "fair__2_0-2": ("energy", "round"), "fedhm__2_0-2": ("plain", "fixed")}


def test_train_refuses_a_round_subspace_without_hashed_arrays(capsys, tmp_path):
    line = _error(capsys, ["train", *TINY, "--method", "fedhm", "--subspace", "round",
                           "--out", str(tmp_path / "x")])
    assert "subspace 'round' applies to hashed arrays" in line and "'fedhm' has none" in line


def test_compare_with_compressors_reports_upload_ratio_and_plots_it(tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["compare", *TINY, "--rounds", "2", "--eval-every", "2", "--tiers", "2:0-3",
            "--methods", "fair,fedhm", "--compressors", "none,actions,topk", "--ratio", "0.25",
            "--profile", "mobile", "--spherical", "--out", out]
    assert cli.main([str(a) for a in argv]) == 0
    records = _records(out)
    keys = {(r["method"], r["compressor"]) for r in records}
    # fedhm's tables are factors, not arrays: it runs uncompressed only
    assert keys == {("fair", "none"), ("fair", "actions"), ("fair", "topk"), ("fedhm", "none")}
    for r in records:
        if r["compressor"] != "none":
            assert r["item_bits_up_total"] <= r["item_reference_bits_total"] * 0.25
            assert r["bits_up_total"] / 8 <= r["bytes_up_total"]
        assert set(r["by_class"]) <= {"flagship-wifi", "midrange-4g", "budget-3g"}
    summary = (out / "summary.md").read_text()
    assert "| fair+actions | 2:0-3 |" in summary and "item upload ratio" in summary
    assert _is_png(out / "plot.png")
    settings = json.loads((out / "config.json").read_text())["settings"]
    assert settings["compressors"] == ["none", "actions", "topk"] and settings["spherical"]
    assert (out / "checkpoints" / "fair__2_0-3__actions.pt").is_file()


def test_engine_flower_gives_the_in_process_records(tmp_path):
    pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fastfair[flower]'")
    pytest.importorskip("ray", reason="Flower's simulation engine needs ray ('flwr[simulation]')")
    argv = ["train", "--users", "12", "--items", "150", "-K", "4", "--quiet", "--rounds", "2",
            "--eval-every", "2", "--tiers", "2:0-3"]
    assert cli.main([*argv, "--out", str(tmp_path / "local")]) == 0
    assert cli.main([*argv, "--engine", "flower", "--out", str(tmp_path / "flower")]) == 0
    local, remote = _records(tmp_path / "local"), _records(tmp_path / "flower")
    assert len(local) == len(remote) == 1
    for key in ("loss", "bytes_up_total", "bytes_down_total", "by_tier"):
        assert local[0][key] == remote[0][key], key
    for name, value in local[0]["metrics"].items():
        # federated evaluation sums the users' metrics in another order
        assert remote[0]["metrics"][name] == pytest.approx(value, rel=1e-9), name


def test_engine_flower_refuses_resume(capsys, tmp_path):
    line = _error(capsys, ["train", *TINY, "--engine", "flower", "--resume", "--out",
                           tmp_path / "o"])
    assert "cannot --resume" in line


def test_compare_adaptive_actions_under_a_profile(tmp_path):
    out = tmp_path / "a"
    argv = ["compare", *TINY, "--rounds", "1", "--tiers", "1:1", "--methods", "fedavg-full",
            "--compressor", "actions", "--actions", "adaptive", "--profile", "mobile",
            "--aggregation", "item-mean", "--out", out]
    assert cli.main([str(a) for a in argv]) == 0
    (record,) = _records(out)
    assert record["compressor"] == "actions" and record["sim_seconds"] > 0
    assert all(c["actions_mean"] >= 1 for c in record["by_class"].values())


def test_negative_sampling_and_data_user_step_reach_the_config(tmp_path):
    args = cli.build_parser().parse_args(["train", "--negative-sampling", "unseen",
                                          "--user-step", "data"])
    assert args.negative_sampling == "unseen" and args.user_step == "data"
    args = cli.build_parser().parse_args(["train", "--user-step", "0.25"])
    assert args.user_step == 0.25 and args.negative_sampling == "uniform"
    out = tmp_path / "run"
    argv = ["train", *TINY, "--rounds", "2", "--negative-sampling", "unseen", "--user-step",
            "data", "--dropout", "0.2", "--out", out]
    assert cli.main([str(a) for a in argv]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["negative_sampling"] == "unseen"
    assert config["settings"]["user_step"] == "data"
    (run,) = config["runs"]
    assert run["config"]["negative_sampling"] == "unseen" and run["config"]["user_step"] == "data"
    state = torch.load(out / "checkpoints" / "fair__2_0-1.pt", weights_only=True)
    assert state["config"]["negative_sampling"] == "unseen"
    assert state["config"]["user_step"] == "data"
    # the same run from Python
    data = cli._load_data(cli.build_parser().parse_args(["train", *TINY]))
    runner = FederatedRunner(data, Config(**{**state["config"],
                                             "ks": tuple(state["config"]["ks"])}))
    for _ in range(2):
        runner.run_round()
    assert state_equal(runner.state_dict(), state)
    # and --resume to a further round accepts the settings it was written with
    assert cli.main([str(a) for a in argv[:-2]] + ["--rounds", "3", "--resume", "--out",
                                                   str(out)]) == 0
    assert [r["round"] for r in _records(out, "rounds.jsonl")] == [1, 2, 3]


def test_clients_in_threads_give_the_sequential_run(tmp_path):
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pool's clients train with one thread: same summation order
    try:
        common = ["train", *TINY, "--rounds", "2", "--local-kernel", "fused",
                  "--negative-sampling", "unseen"]
        assert cli.main([*common, "--out", str(tmp_path / "one")]) == 0
        assert cli.main([*common, "--workers", "2", "--pool", "threads", "--out",
                         str(tmp_path / "two")]) == 0
    finally:
        torch.set_num_threads(torch_threads)
    assert _without_timing(_records(tmp_path / "one")) == \
        _without_timing(_records(tmp_path / "two"))
    settings = json.loads((tmp_path / "two" / "config.json").read_text())["settings"]
    assert settings["workers"] == 2 and settings["pool"] == "threads"
