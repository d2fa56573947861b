"""The reference approach of ``benchmarks/fair_round.py``: its hashing, projection and round."""
import importlib.util
import pathlib

import pytest
import torch

import fastfair
from fastfair.fl.data import synthetic
from fastfair.fl.runner import Config, FederatedRunner

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "fair_round.py"
_spec = importlib.util.spec_from_file_location("fair_round", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

N, D, M = 200, 8, 400


@pytest.fixture(scope="module")
def data():
    return synthetic(num_users=30, num_items=N, dim=D, max_interactions=100)


def _dense(seed=0, rows=N):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_project_is_the_least_squares_fit_and_expand_of_it_is_idempotent():
    n, m = 50, 100  # small enough for a dense least-squares solve
    table = bench.StoredHashEmbedding(n, D, m, seed=3)
    # The linear map w -> V of this table, as an explicit (n d) x m matrix.
    A = torch.zeros(n * D, m, dtype=torch.float64)
    A[torch.arange(n * D), table.idx.view(-1)] = table.sign.view(-1).double()
    dense = _dense(rows=n)
    w = table.project(dense)
    # gelsd: the minimum-norm solution, so empty slots must come out 0.
    fit = torch.linalg.lstsq(A, dense.view(-1, 1), driver="gelsd").solution.view(-1)
    torch.testing.assert_close(w, fit)
    with torch.no_grad():
        table.weight.copy_(w)
    once = table.expand()
    with torch.no_grad():
        table.weight.copy_(table.project(once))
    torch.testing.assert_close(table.expand(), once)
    assert (table.counts() == 0).any(), "the case should exercise empty slots"


def test_with_fastfairs_hash_it_computes_fastfairs_project_and_expand():
    spec = fastfair.HashSpec(N, D, M, seed=5)
    table = bench.StoredHashEmbedding(N, D, M, seed=0)
    idx, sign = fastfair.hash_index(torch.arange(N), spec)
    table.idx.copy_(idx)
    table.sign.copy_(sign.float())
    dense = _dense(1).float()
    w = table.project(dense)
    torch.testing.assert_close(w, fastfair.project_dense(dense, spec))
    torch.testing.assert_close(table.counts(), fastfair.slot_counts(spec))
    with torch.no_grad():
        table.weight.copy_(w)
    torch.testing.assert_close(table.expand(), fastfair.expand_dense(w, spec))
    items = torch.tensor([0, 7, 199, 7])
    torch.testing.assert_close(table(items), fastfair.expand_dense(w, spec)[items])


def test_stored_hashes_nest_across_sizes():
    big = bench.StoredHashEmbedding(N, D, 4 * M, seed=1)
    small = bench.StoredHashEmbedding(N, D, M, seed=1)
    assert torch.equal(small.idx, big.idx % M)
    assert torch.equal(small.sign, big.sign)


@pytest.mark.parametrize("fused_adam", [False, True])
def test_a_round_trains_the_clients_and_averages_their_expanded_uploads(data, fused_adam):
    cfg = Config(dim=D, tiers="2:0-1", local_epochs=1, lr=0.01)
    runner = FederatedRunner(data, cfg)
    sizes = bench.memory_sizes_of(runner)
    assert any(s is None for s in sizes) and any(s is not None for s in sizes)
    ref = bench.ReferenceFair(data, cfg, sizes, fused_adam)
    clients = [c for c in range(data.num_users) if sizes[c] is not None][:3] + \
              [c for c in range(data.num_users) if sizes[c] is None][:2]
    before = {k: v.clone() for k, v in ref.tables.items()}
    users_before = ref.user_vectors["gmf"].clone()
    head_before = {k: v.clone() for k, v in ref.head.state_dict().items()}
    ref.run_round(clients)
    for name, table in ref.tables.items():
        assert torch.isfinite(table).all()
        assert not torch.allclose(table, before[name])
    moved = torch.nonzero((ref.user_vectors["gmf"] != users_before).any(1)).flatten()
    assert moved.tolist() == sorted(clients)
    assert any(not torch.equal(v, head_before[k]) for k, v in ref.head.state_dict().items())


def test_the_aggregate_is_the_weighted_mean_of_expanded_uploads(data):
    # A negligible learning rate: each upload is the client's download, known in advance.
    cfg = Config(dim=D, tiers="2:0-1", local_epochs=1, lr=1e-30)
    sizes = bench.memory_sizes_of(FederatedRunner(data, cfg))
    hashed = next(c for c in range(data.num_users) if sizes[c] is not None)
    dense = next(c for c in range(data.num_users) if sizes[c] is None)
    ref = bench.ReferenceFair(data, cfg, sizes)
    weights = [float(data.user_items(c).numel()) for c in (hashed, dense)]
    p = weights[0] / sum(weights)
    model = ref.download(hashed)
    expect = {name: p * getattr(model, f"item_{name}").expand() + (1 - p) * table
              for name, table in ref.tables.items()}
    ref.run_round([hashed, dense])
    for name in ref.tables:
        torch.testing.assert_close(ref.tables[name], expect[name], rtol=1e-5, atol=1e-6)
