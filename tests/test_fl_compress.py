"""Upload compressors (action sharing and baselines), profiles, and their use in the runner."""
import json
import math

import pytest
import torch

from fastfair.fl import compress as C
from fastfair.kernels import kmeans as km
from fastfair.fl.data import synthetic
from fastfair.fl.profiles import PROFILES, load_profile
from fastfair.fl.runner import Config, FederatedRunner


def sparse_update(rows=40, dim=6, touched=15, seed=0, distinct=None):
    """A table update whose untouched rows are exactly zero; ``distinct``: how many different
    rows the touched ones are drawn from (repeats make the K >= distinct case testable)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.zeros(rows, dim)
    idx = torch.randperm(rows, generator=gen)[:touched]
    values = torch.randn(touched, dim, generator=gen)
    if distinct is not None:
        values = values[torch.randint(0, distinct, (touched,), generator=gen)]
    g[idx] = values
    return g


@pytest.fixture(scope="module")
def data():
    return synthetic(num_users=40, num_items=300, seed=3, min_interactions=8,
                     max_interactions=30)


def test_full_is_lossless_and_counted_exactly():
    g = sparse_update()
    enc = C.Compressor("full").encode(g)
    assert torch.equal(C.decode(enc), g)
    m = int((g != 0).any(1).sum())
    assert enc.bits == 40 + 32 * m * 6
    assert enc.bits_int32 == 32 * m + 32 * m * 6


def test_actions_exact_when_k_covers_distinct_rows():
    g = sparse_update(rows=50, dim=5, touched=30, distinct=7, seed=1)
    enc = C.Compressor("actions", actions=16).encode(g, seed=4)
    assert enc.size == 7  # K' = number of distinct touched rows
    assert torch.equal(C.decode(enc), g)
    # bitmap + 3-bit index per touched row + 7 float32 centroids of 5
    assert enc.bits == 50 + 30 * 3 + 32 * 7 * 5
    assert enc.bits_int32 == 32 * 30 * 2 + 32 * 7 * 5


def test_actions_lossy_below_distinct_and_error_falls_with_k():
    g = sparse_update(rows=200, dim=8, touched=120, seed=2)
    errors = [C.Compressor("actions", actions=k).encode(g, seed=0).error for k in (2, 8, 32)]
    assert errors[0] > errors[1] > errors[2] > 0
    rebuilt = C.decode(C.Compressor("actions", actions=8).encode(g, seed=0))
    assert torch.equal(rebuilt[(g == 0).all(1)], torch.zeros(int((g == 0).all(1).sum()), 8))
    assert len(torch.unique(rebuilt[(g != 0).any(1)], dim=0)) <= 8


def test_spherical_actions_scale_each_row():
    g = sparse_update(rows=60, dim=4, touched=40, seed=5)
    enc = C.Compressor("actions", actions=4, spherical=True).encode(g, seed=1)
    rebuilt = C.decode(enc)
    touched = (g != 0).any(1)
    centroids = enc.parts["centroids"]
    # every rebuilt row is a multiple of a unit centroid, with the least-squares scale
    cos = torch.nn.functional.normalize(rebuilt[touched], dim=1) @ centroids.T
    assert torch.allclose(cos.abs().max(1).values, torch.ones(int(touched.sum())), atol=1e-5)
    assert enc.bits == 60 + 40 * 2 + 32 * 4 * 4 + 32 * 40


def test_budgeted_actions_take_the_largest_k_that_fits():
    g = sparse_update(rows=300, dim=8, touched=200, seed=6)
    budget = 300 * 8 * 32 // 32
    enc = C.Compressor("actions").encode(g, budget=budget, seed=0)
    assert enc.bits <= budget
    bigger = 2 * enc.size
    assert C.action_bits(bigger, 200, 300, 8, False)[0] > budget


def test_topk_keeps_the_largest_entries():
    g = sparse_update(rows=30, dim=4, touched=20, seed=7)
    budget = 10 * (32 + math.ceil(math.log2(30 * 4)))
    enc = C.Compressor("topk").encode(g, budget=budget)
    rebuilt = C.decode(enc)
    assert enc.size == 10 and enc.bits == budget
    kept = rebuilt != 0
    assert torch.equal(rebuilt[kept], g[kept])
    assert g.abs()[kept].min() >= g.abs()[~kept].max()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_at_most_half_a_step(bits):
    g = sparse_update(rows=25, dim=3, touched=18, seed=bits)
    enc = C.Compressor(f"quant{bits}").encode(g)
    touched = (g != 0).any(1)
    vals = g[touched]
    step = float(vals.max() - vals.min()) / (2 ** bits - 1)
    err = (C.decode(enc)[touched] - vals).abs().max()
    assert err <= step / 2 + 1e-6
    assert torch.equal(C.decode(enc)[~touched], torch.zeros(int((~touched).sum()), 3))
    assert enc.bits == 25 + 64 + 18 * 3 * bits


def test_svd_is_the_best_rank_r_of_the_touched_rows():
    g = sparse_update(rows=40, dim=6, touched=25, seed=8)
    budget = 40 + 32 * 2 * (25 + 6)
    enc = C.Compressor("svd").encode(g, budget=budget)
    assert enc.size == 2 and enc.bits == budget
    s = torch.linalg.svdvals(g[(g != 0).any(1)].double())
    best = float(s[2:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
    assert enc.error == pytest.approx(best, rel=1e-4)


@pytest.mark.parametrize("kind,spherical", [("actions", False), ("actions", True),
                                            ("full", False), ("topk", False)])
def test_received_table_adds_into_an_accumulator_without_forming_it(kind, spherical):
    gen = torch.Generator().manual_seed(11)
    start = torch.randn(40, 6, generator=gen)
    g = sparse_update(rows=40, dim=6, touched=25, seed=12)
    enc = C.Compressor(kind, actions=5, spherical=spherical).encode(g, budget=2000, seed=3)
    received = C.Received(start, enc)
    torch.testing.assert_close(received.dense(), start + C.decode(enc))
    acc = torch.randn(40, 6, generator=gen)
    expect = acc + 0.3 * received.dense()
    received.add_to(acc, 0.3)
    torch.testing.assert_close(acc, expect, rtol=1e-6, atol=1e-6)


def test_empty_update_costs_the_bitmap_only():
    g = torch.zeros(12, 4)
    for kind in ("full", "actions", "quant8", "svd"):
        enc = C.Compressor(kind, actions=4).encode(g)
        assert enc.bits == 12 and torch.equal(C.decode(enc), g)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="zip"), "compressor"), (dict(kind="actions", actions=0), "actions"),
    (dict(kind="actions", iters=0), "iters"), (dict(kind="actions", tol=1.5), "tol")])
def test_compressor_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        C.Compressor(**kwargs)


def test_encode_rejects_bad_input():
    comp = C.Compressor("topk")
    with pytest.raises(ValueError, match="2-D float32"):
        comp.encode(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="budget"):
        comp.encode(torch.ones(4, 3), budget=0)
    with pytest.raises(ValueError, match="fixed K or a payload budget"):
        C.Compressor("actions").encode(torch.ones(4, 3))


# ---------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------

def test_profile_assignment_follows_shares():
    prof = PROFILES["mobile"]
    labels = prof.assign(1000, seed=1)
    counts = torch.bincount(labels, minlength=3).tolist()
    assert counts == [round(1000 * c.share) for c in prof.classes]
    assert not torch.equal(labels, prof.assign(1000, seed=2))


@pytest.mark.parametrize("doc, match", [
    ("not json", "JSON"), ({"deadline": 1}, "exactly"),
    ({"deadline": -1, "classes": []}, "deadline"),
    ({"deadline": 1, "classes": []}, "non-empty"),
    ({"deadline": 1, "classes": [{"name": "a", "share": 1, "flops": 1e9, "down_bps": 1e6}]},
     "fields"),
    ({"deadline": 1, "classes": [{"name": "a", "share": 0.5, "flops": 1e9, "down_bps": 1e6,
                                  "up_bps": 1e6}]}, "sum to 1"),
    ({"deadline": 1, "classes": [{"name": "a", "share": 1, "flops": 0, "down_bps": 1e6,
                                  "up_bps": 1e6}]}, "flops"),
])
def test_malformed_profiles_are_refused(tmp_path, doc, match):
    path = tmp_path / "p.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(ValueError, match=match):
        load_profile(str(path))
    with pytest.raises(ValueError, match="neither"):
        load_profile(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------------------------------------
# In the runner
# ---------------------------------------------------------------------------------------------

def _run(data, rounds=2, **kwargs):
    cfg = dict(method="fair", tiers="2:0-3", clients_per_round=6, local_epochs=2, dim=4,
               rounds=rounds, seed=5, chunk_size=2)
    cfg.update(kwargs)
    runner = FederatedRunner(data, Config(**cfg))
    stats = [runner.run_round() for _ in range(rounds)]
    return runner, stats


@pytest.mark.parametrize("method", ["fair", "fedavg-full"])
def test_actions_with_k_above_touched_rows_equals_uncompressed_delta(data, method):
    full, _ = _run(data, method=method, compressor="full")
    acts, stats = _run(data, method=method, compressor="actions", actions="100000",
                       max_actions=100000)
    for name in full.tables:
        assert torch.equal(full.tables[name], acts.tables[name])
    assert stats[-1]["upload_ratio"] < 1
    # and the delta form of a lossless upload is the plain upload up to float rounding
    plain, _ = _run(data, method=method)
    for name in full.tables:
        torch.testing.assert_close(plain.tables[name], full.tables[name], rtol=1e-5, atol=1e-6)


def test_compressed_round_counts_exact_bits(data):
    runner, stats = _run(data, rounds=1, compressor="actions", ratio=1 / 16)
    s = stats[0]
    # every client's payload is rounded up to whole bytes once
    assert s["bits_up"] / 8 <= s["bytes_up"] < s["bits_up"] / 8 + s["returned"]
    assert s["bits_up"] < 8 * runner.payload_bytes(runner.view(0)) * s["returned"]
    assert s["item_bits_up"] <= s["item_reference_bits"] / 16
    # int32 indices cost more than bit-packed ones, by the same head bits on both sides
    assert s["item_bits_int32_up"] > s["item_bits_up"]
    assert s["bits_int32_up"] - s["item_bits_int32_up"] == s["bits_up"] - s["item_bits_up"]
    assert runner.totals["bits_up"] == s["bits_up"]


def test_server_lr_moves_part_of_the_way(data):
    base, _ = _run(data, rounds=1, method="fedavg-full")
    half, _ = _run(data, rounds=1, method="fedavg-full", server_lr=0.5)
    start = FederatedRunner(data, Config(method="fedavg-full", tiers="2:0-3",
                                         clients_per_round=6, local_epochs=2, dim=4,
                                         rounds=1, seed=5, chunk_size=2))
    for name in base.tables:
        expected = start.tables[name] + 0.5 * (base.tables[name] - start.tables[name])
        torch.testing.assert_close(half.tables[name], expected)


def _profile(tmp_path, name, up_bps, deadline=0.05):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"deadline": deadline, "classes": [
        {"name": name, "share": 1, "flops": 1e10, "down_bps": 1e9, "up_bps": up_bps}]}))
    return str(path)


def test_adaptive_k_follows_upload_bandwidth(data, tmp_path):
    fast, f = _run(data, rounds=1, compressor="actions", profile=_profile(tmp_path, "fast", 1e8))
    slow, s = _run(data, rounds=1, compressor="actions", profile=_profile(tmp_path, "slow", 3e5))
    assert s[0]["item_bits_up"] < f[0]["item_bits_up"]
    assert s[0]["by_class"]["slow"]["actions_mean"] < f[0]["by_class"]["fast"]["actions_mean"]
    assert s[0]["late"] == 0 and s[0]["sim_seconds"] <= slow.deadline
    # a deadline nobody can meet: everyone falls back to K = 1 and is counted late
    _, late = _run(data, rounds=1, compressor="actions", profile="mobile", deadline=1e-9)
    assert late[0]["late"] == late[0]["returned"]
    assert all(c["actions_mean"] == 1 for c in late[0]["by_class"].values())


def test_error_bound_picks_the_smallest_k_meeting_it(data):
    _, loose = _run(data, rounds=1, compressor="actions", ratio=0.5, error_bound=0.9)
    _, tight = _run(data, rounds=1, compressor="actions", ratio=0.5, error_bound=0.05)
    assert loose[0]["item_bits_up"] < tight[0]["item_bits_up"]


def test_nan_update_is_rejected_before_compression(data, monkeypatch):
    runner = FederatedRunner(data, Config(method="fedavg-full", tiers="2:0-3",
                                          clients_per_round=4, dim=4, rounds=1, seed=5,
                                          compressor="actions", actions="4"))
    real = runner.upload

    def poisoned(client, model, view):
        update = real(client, model, view)
        update["item_gmf.weight"] = update["item_gmf.weight"].clone()
        update["item_gmf.weight"][0, 0] = float("nan")
        return update

    monkeypatch.setattr(runner, "upload", poisoned)
    stats = runner.run_round()
    assert stats["rejected"] == 4 and all("NaN" in r for r in stats["rejections"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="fedhm", compressor="actions", actions="4"), "applies to methods"),
    (dict(compressor="actions"), "needs a payload budget"),
    (dict(compressor="actions", actions="0"), "actions must be"),
    (dict(compressor="actions", actions="many"), "actions must be"),
    (dict(compressor="topk", ratio=1.5), "ratio"),
    (dict(compressor="gzip"), "compressor must be"),
    (dict(deadline=1.0), "needs a profile"),
    (dict(profile="nowhere"), "neither"),
    (dict(server_lr=0.0), "server_lr"),
    (dict(compressor="actions", actions="4", error_bound=0.1), "adaptive"),
    (dict(spherical=1), "spherical"),
])
def test_config_rejects_bad_compression_settings(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Config(tiers="2:0-3", **kwargs).check(data)


def test_item_mean_moves_each_row_by_its_mean_change_over_the_clients_that_changed_it(data):
    runner = FederatedRunner(data, Config(method="fedavg-full", tiers="1:1", clients_per_round=6,
                                          dim=4, rounds=1, seed=5, aggregation="item-mean",
                                          compressor="actions", actions="8"))
    before = {name: t.clone() for name, t in runner.tables.items()}
    seen = []
    real = runner.aggregate_uploads
    runner.aggregate_uploads = lambda uploads: (seen.append(uploads), real(uploads))
    runner.run_round()
    for name, table in before.items():
        changes = torch.stack([u[f"item_{name}.weight"].dense() - table
                               for u, _, _ in seen[0]]).double()
        touched = (changes != 0).any(2)
        assert touched.sum(0).max() >= 2, "some row must be changed by several clients"
        mean = changes.sum(0) / touched.sum(0).clamp_min(1)[:, None]
        torch.testing.assert_close(runner.tables[name].double(), table.double() + mean,
                                   rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="item-mean"):
        Config(method="fair", tiers="2:0-3", aggregation="item-mean").check(data)


def test_received_payloads_are_checked_before_they_are_rebuilt():
    g = sparse_update(rows=30, dim=4, touched=12, seed=13)
    start = torch.zeros(30, 4)
    good = C.Compressor("actions", actions=3).encode(g, seed=0)
    assert C.Received(start, good).check() is None
    nan = C.Encoded(**{**good.__dict__, "parts": {**good.parts,
                                                  "centroids": good.parts["centroids"] * float("nan")}})
    assert "NaN" in C.Received(start, nan).check()
    torn = C.Encoded(**{**good.__dict__, "parts": {**good.parts,
                                                   "bitmap": good.parts["bitmap"][:-1]}})
    assert "cannot be decoded" in C.Received(start, torn).check()
    assert good.size == 3  # indices take 2 bits, so index 3 can be sent and names nothing
    bad = km.pack_indices(torch.full((12,), 3), 2)
    beyond = C.Encoded(**{**good.__dict__, "parts": {**good.parts, "labels": bad}})
    assert "names no centroid" in C.Received(start, beyond).check()
    assert "cannot cover" in C.Received(torch.zeros(31, 4), good).check()
