"""``benchmarks/reference_quality.py``: the reference code's loop re-implemented for result 1."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "reference_quality.py"
_spec = importlib.util.spec_from_file_location("reference_quality", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

N_USERS, N_ITEMS = 6, 60
D = bench.DIM


def _server(seed=0):
    torch.manual_seed(seed)
    server = bench.init_server(N_USERS, N_ITEMS)
    # Away from the init scale so that every table entry matters to the scores.
    g = torch.Generator().manual_seed(seed + 1)
    for k in ("ug", "um", "ig", "im"):
        server[k] = torch.randn(server[k].shape, generator=g) * 0.3
    return server


def _train_whole_tables(server, hashes, download, user, pos_np, pool):
    """The reference's local round as it is written: Adam over every entry of every table."""
    pos = torch.from_numpy(pos_np)
    negs = [torch.from_numpy(np.random.choice(pool, (len(pos),))) for _ in range(bench.EPOCHS)]
    params = {k: nn.Parameter(server[k].clone()) for k in bench.DENSE_PARAMS}
    for k in bench.TABLES:
        params[k] = nn.Parameter((download[k] if hashes else server[k]).clone())
    opt = torch.optim.Adam(params.values(), lr=bench.LR)

    def item(k, i):
        if hashes is None:
            return params[k][i]
        return params[k][hashes[k].idx[i]] * hashes[k].sign[i]

    for epoch in range(bench.EPOCHS):
        for b in range(0, len(pos), bench.BATCH):
            users = torch.full((min(bench.BATCH, len(pos) - b),), user, dtype=torch.long)
            p, n = pos[b:b + bench.BATCH], negs[epoch][b:b + bench.BATCH]
            opt.zero_grad()
            ug, um = params["ug"][users], params["um"][users]
            diff = (bench.score(params, ug, um, item("ig", p), item("im", p))
                    - bench.score(params, ug, um, item("ig", n), item("im", n)))
            reg = 6 * um.norm(2).pow(2) / 2 / len(users)
            (-F.logsigmoid(diff).mean() + bench.REG * reg).backward()
            opt.step()
    out = {k: params[k].detach() for k in bench.DENSE_PARAMS}
    for k in bench.TABLES:
        out[k] = hashes[k].expand(params[k].detach()) if hashes else params[k].detach()
    return out


@pytest.mark.parametrize("hashed", [False, True], ids=["dense", "hashed"])
def test_training_the_touched_entries_equals_adam_over_whole_tables(hashed, monkeypatch):
    # Two batches an epoch, so rows a batch skips take Adam's zero-gradient steps.
    monkeypatch.setattr(bench, "BATCH", 7)
    server = _server()
    hashes = download = None
    if hashed:
        hashes = {k: bench.StoredHash(N_ITEMS, N_ITEMS * D // 2, seed)
                  for k, seed in bench.HASH_SEEDS.items()}
        download = {k: h.project(server[k]) for k, h in hashes.items()}
    pos = np.array([5, 17, 3, 44, 9, 30, 12, 51, 8, 26, 2], dtype=np.int64)
    allowed = np.ones(N_ITEMS, dtype=bool)
    allowed[pos] = False
    pool = np.nonzero(allowed)[0]
    np.random.seed(4)
    got = bench.train_client(server, download, hashes, 2, pos, pool)
    np.random.seed(4)
    want = _train_whole_tables(server, hashes, download, 2, pos, pool)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    # The round moved the tables (a no-op training would pass the comparison too).
    start = {k: (hashes[k].expand(download[k]) if hashed else server[k]) for k in bench.TABLES}
    for k in bench.TABLES:
        assert (got[k] - start[k]).abs().max() > 1e-4


def test_project_is_the_signed_mean_per_slot_with_the_reference_epsilon():
    h = bench.StoredHash(N_ITEMS, 97, seed=5)
    dense = torch.randn(N_ITEMS, D, generator=torch.Generator().manual_seed(6))
    w = h.project(dense)
    for s in (0, 13, 50, 96):
        hit = h.idx == s
        want = (dense[hit] * h.sign[hit]).sum() / (hit.sum() + bench.COUNT_EPS)
        torch.testing.assert_close(w[s], want)
    # Expanding and projecting back returns the array, shrunk by cnt / (cnt + eps).
    counts = torch.bincount(h.idx.view(-1), minlength=97).float()
    torch.testing.assert_close(h.project(h.expand(w)), w * counts / (counts + bench.COUNT_EPS))


def _write_fair_folder(root: pathlib.Path, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "goodreads_100"
    folder.mkdir(parents=True)
    with open(folder / "train.txt", "w") as tr, open(folder / "test.txt", "w") as te:
        for u in range(N_USERS):
            items = rng.choice(N_ITEMS, 15, replace=False)
            tr.write(" ".join(map(str, [u, *items[:10]])) + "\n")
            te.write(" ".join(map(str, [u, *items[10:]])) + "\n")
    return root


def _run(*args):
    return subprocess.run([sys.executable, str(_PATH), *args], capture_output=True, text=True)


@pytest.mark.parametrize("aggregation", ["model", "delta"])
def test_the_script_trains_and_records_its_curve(tmp_path, aggregation):
    root = _write_fair_folder(tmp_path / "data")
    out = tmp_path / "r.json"
    res = _run("--rounds", "5", "--eval-every", "2", "--aggregation", aggregation,
               "--data-dir", str(root), "--out", str(out))
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    assert [r["round"] for r in doc["curve"]] == [2, 4]
    assert all(0.0 <= r["ndcg@20"] <= 1.0 for r in doc["curve"])
    assert doc["best"]["ndcg@20"] == max(r["ndcg@20"] for r in doc["curve"])
    assert doc["settings"]["aggregation"] == aggregation and doc["versions"]["torch"]


@pytest.mark.parametrize("args, message", [
    (["--tiers", "0-x"], "--tiers: expected powers of two"),
    (["--tiers", "0--1"], "--tiers"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--eval-every", "-2"], "--eval-every must be >= 1, got -2"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--seed", str(2**32)], "--seed must be below 2**32"),
])
def test_bad_arguments_exit_with_a_clear_line(tmp_path, args, message):
    res = _run(*args, "--data-dir", str(_write_fair_folder(tmp_path)))
    assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr


def test_a_missing_dataset_is_named(tmp_path):
    res = _run("--data-dir", str(tmp_path))
    assert res.returncode != 0 and "no Goodreads-100 at" in res.stderr
