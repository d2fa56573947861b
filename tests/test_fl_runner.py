"""The federated runner: aggregation, privacy of user state, memory of small devices, bytes."""

import tracemalloc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastfair
from fastfair.fl.data import synthetic
from fastfair.fl.runner import (BYTES_PER_PARAM, Config, FederatedRunner, LowRank, Slice,
                                round_seed, train)
from testing import state_equal


@pytest.fixture(scope="module")
def data():
    return synthetic(num_users=60, num_items=500, dim=8, seed=1)


def _cfg(**kw):
    base = dict(dim=8, rounds=2, clients_per_round=6, local_epochs=1, lr=0.01, eval_every=1)
    base.update(kw)
    return Config(**base)


def test_fair_with_only_full_devices_is_fedavg(data):
    a = FederatedRunner(data, _cfg(method="fair", tiers="1:1"))
    b = FederatedRunner(data, _cfg(method="fedavg-full", tiers="2:0-1-2"))
    for _ in range(2):
        a.run_round()
        b.run_round()
    for name in a.tables:
        assert torch.equal(a.tables[name], b.tables[name])


def _naive_dense(runner, name, update, view):
    """A client's upload as a dense table, the slow obvious way (None: columns not held)."""
    key, spec = f"item_{name}", view.specs[name]
    if spec is None:
        return update[f"{key}.weight"]
    if isinstance(spec, LowRank):
        return update[f"{key}.left"] @ update[f"{key}.right"]
    if isinstance(spec, Slice):
        return update[f"{key}.weight"]
    return fastfair.expand_dense(update[f"{key}.weight"], spec, backend="reference")


def _trained_uploads(runner, data, clients):
    """``(update, view, weight)`` per client after a local round, and what each downloaded."""
    uploads, starts = [], []
    for client in clients:
        view = runner.view(client)
        model = runner.download(client, view)
        # what the client was sent (upload() hands out the live parameters: copy them)
        starts.append({k: v.clone() for k, v in runner.upload(client, model, view).items()})
        runner.local_train(client, model, torch.Generator().manual_seed(client))
        uploads.append((runner.upload(client, model, view), view,
                        float(data.user_items(client).numel())))
    return uploads, starts


@pytest.mark.parametrize("method,tiers,full,subspace", [
    ("fair", "2:0-1-2-3", "dense", "fixed"), ("fair-inconsistent", "2:0-1-2-3", "dense", "fixed"),
    ("fedhm", "2:0-1-2-3", "dense", "fixed"), ("heterofl", "2:0-1-2", "dense", "fixed"),
    ("fair", "2:0-1-2-3", "hashed", "fixed"), ("fair-inconsistent", "2:0-1-2", "hashed", "fixed"),
    ("fedavg-full", "2:0-1-2", "hashed", "fixed"),
    ("fair", "2:0-1-2-3", "dense", "round"), ("fair", "2:0-1-2", "hashed", "round"),
    ("fair-inconsistent", "2:0-1-2", "dense", "round"),
    ("fedavg-full", "2:0-1-2", "hashed", "round")])
def test_aggregation_equals_the_naive_weighted_sum_of_uploads(data, method, tiers, full,
                                                              subspace):
    runner = FederatedRunner(data, _cfg(method=method, tiers=tiers, full_table=full,
                                        subspace=subspace))
    runner.round_index = 3  # a round whose seeds are not the run's own
    uploads, _ = _trained_uploads(runner, data, runner.eligible[:16].tolist())
    trainable = set(range(len(runner.tiers))) - set(runner.unsupported)
    assert len(trainable) >= 3 and {v.tier for _, v, _ in uploads} == trainable, \
        "every tier must take part"
    expect = {}
    for name in runner.tables:
        acc = torch.zeros_like(runner.tables[name], dtype=torch.float64)
        mass = torch.zeros(8, dtype=torch.float64)  # per column, for heterofl
        for update, view, w in uploads:
            dense = _naive_dense(runner, name, update, view).double()
            acc[:, :dense.shape[1]] += w * dense
            mass[:dense.shape[1]] += w
        held = mass > 0
        acc[:, held] /= mass[held]
        acc[:, ~held] = runner.tables[name][:, ~held].double()
        expect[name] = acc.float()
    runner.aggregate_uploads(uploads)
    for name in runner.tables:
        torch.testing.assert_close(runner.tables[name], expect[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,tiers,full,fit,subspace", [
    ("fair", "2:0-1-2-3", "dense", "plain", "fixed"),
    ("fair-inconsistent", "2:0-1-2", "dense", "plain", "fixed"),
    ("fedhm", "2:0-1-2", "dense", "plain", "fixed"),
    ("heterofl", "2:0-1-2", "dense", "plain", "fixed"),
    ("fair", "2:0-1-2", "hashed", "plain", "fixed"),
    ("fair", "2:0-1-2-3", "dense", "energy", "fixed"),
    ("fair-inconsistent", "2:0-1-2", "hashed", "energy", "fixed"),
    ("fair", "2:0-1-2-3", "dense", "plain", "round"),
    ("fair", "2:0-1-2", "hashed", "energy", "round")])
def test_delta_aggregation_adds_the_naive_weighted_sum_of_changes(data, method, tiers, full,
                                                                  fit, subspace):
    runner = FederatedRunner(data, _cfg(method=method, tiers=tiers, aggregation="delta",
                                        full_table=full, fit=fit, subspace=subspace))
    runner.round_index = 3
    before = {name: t.clone() for name, t in runner.tables.items()}
    uploads, starts = _trained_uploads(runner, data, runner.eligible[:12].tolist())
    assert len({v.tier for _, v, _ in uploads}) >= 2
    expect = {}
    for name in runner.tables:
        change = torch.zeros_like(before[name], dtype=torch.float64)
        mass = torch.zeros(8, dtype=torch.float64)  # per column, for heterofl
        for (update, view, w), start in zip(uploads, starts):
            delta = (_naive_dense(runner, name, update, view).double()
                     - _naive_dense(runner, name, start, view).double())
            change[:, :delta.shape[1]] += w * delta
            mass[:delta.shape[1]] += w
        held = mass > 0
        change[:, held] /= mass[held]
        change[:, ~held] = 0
        expect[name] = (before[name].double() + change).float()
    model_rule = FederatedRunner(data, _cfg(method=method, tiers=tiers, full_table=full,
                                            fit=fit, subspace=subspace))
    model_rule.round_index = 3
    model_rule.aggregate_uploads(uploads)
    runner.aggregate_uploads(uploads)
    for name in runner.tables:
        torch.testing.assert_close(runner.tables[name], expect[name], rtol=1e-5, atol=1e-6)
        # Lossy views lose the part of the table they cannot represent under the reference rule.
        same = torch.allclose(model_rule.tables[name], expect[name], rtol=1e-5, atol=1e-6)
        assert same == (method == "heterofl")


def _projector(spec, n, d):
    """The orthogonal projection onto a hashed view's subspace as an explicit ``nd x nd``
    matrix, from its lift ``A`` (column ``j``: slot ``j`` expanded) as ``A (A^T A)^+ A^T``."""
    if spec is None:
        return torch.eye(n * d, dtype=torch.float64)
    lift = torch.stack([fastfair.expand_dense(torch.eye(spec.memory_size)[j], spec,
                                              backend="reference").flatten()
                        for j in range(spec.memory_size)], 1).double()
    return lift @ torch.linalg.pinv(lift.T @ lift) @ lift.T


@pytest.mark.parametrize("tiers,full,subspace", [
    ("2:0-1-3", "dense", "fixed"), ("2:0-1-2-3", "dense", "round"), ("2:0-1-3", "hashed", "fixed"),
    ("1:0.4,1/2:0.2,1/8:0.4", "dense", "round")])
def test_nested_aggregation_is_the_least_squares_change(tiers, full, subspace):
    small = synthetic(num_users=40, num_items=40, dim=8, seed=3, max_interactions=20,
                      num_negatives=10)
    n, d = small.num_items, 8
    runner = FederatedRunner(small, _cfg(method="fair", tiers=tiers, aggregation="nested",
                                         full_table=full, subspace=subspace))
    runner.round_index = 2
    # unequal numbers of devices per tier, so the layers' weights differ
    clients = [c for t, k in enumerate((3, 1, 2, 2)) if t < len(runner.tiers)
               for c in torch.nonzero(runner.tier_of == t).flatten()[:k].tolist()]
    uploads, starts = _trained_uploads(runner, small, clients)
    total = sum(w for _, _, w in uploads)
    expect = {}
    for name, table in runner.tables.items():
        normal = torch.zeros(n * d, n * d, dtype=torch.float64)
        rhs = torch.zeros(n * d, dtype=torch.float64)
        for (update, view, w), start in zip(uploads, starts):
            delta = (_naive_dense(runner, name, update, view).double()
                     - _naive_dense(runner, name, start, view).double()).flatten()
            projector = _projector(view.specs[name], n, d)
            normal += (w / total) * projector
            rhs += (w / total) * projector @ delta
        # minimum norm: a direction no device's subspace holds does not move
        change = torch.linalg.pinv(normal, hermitian=True) @ rhs
        expect[name] = (table.double() + change.view(n, d)).float()
        plain = sum((w / total) * (_naive_dense(runner, name, u, v).double()
                                   - _naive_dense(runner, name, s0, v).double())
                    for (u, v, w), s0 in zip(uploads, starts))
        assert not torch.allclose(change.view(n, d), plain, atol=1e-6), \
            "the test needs layers whose weights are not all 1"
    runner.aggregate_uploads(uploads)
    for name in runner.tables:
        torch.testing.assert_close(runner.tables[name], expect[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,tiers", [
    ("fedhm", "2:0-1-2"), ("heterofl", "2:0-1-2"), ("fedavg-full", "2:0-1-2"),
    ("exclusion", "2:0-1"), ("fair", "1:1")])
def test_nested_aggregation_is_delta_where_views_do_not_nest(data, method, tiers):
    runs = [FederatedRunner(data, _cfg(method=method, tiers=tiers, aggregation=rule))
            for rule in ("delta", "nested")]
    for runner in runs:
        runner.round_index = 1
    uploads, _ = _trained_uploads(runs[0], data, runs[0].eligible[:9].tolist())
    for runner in runs:
        runner.aggregate_uploads(uploads)
    for name in runs[0].tables:
        torch.testing.assert_close(runs[1].tables[name], runs[0].tables[name],
                                   rtol=1e-5, atol=1e-6)


def test_nested_aggregation_refuses_subspaces_that_do_not_nest(data):
    with pytest.raises(ValueError, match="'nested' needs consistent hashing.*fair-inconsistent"):
        FederatedRunner(data, _cfg(method="fair-inconsistent", aggregation="nested"))


def test_hashed_full_tier_holds_an_array_the_size_of_the_table(data):
    n, d = data.num_items, 8
    runner = FederatedRunner(data, _cfg(tiers="2:0-1", full_table="hashed"))
    dense = FederatedRunner(data, _cfg(tiers="2:0-1"))
    full_client = int(torch.nonzero(runner.tier_of == 0)[0])
    view = runner.view(full_client)
    assert dense.view(full_client).specs["gmf"] is None
    for name in ("gmf", "mlp"):
        spec = view.specs[name]
        assert spec.memory_size == fastfair.nested_size(n * d)
        assert spec.collapse(2) == runner.layout[name][1]
    model = runner.download(full_client, view)
    assert isinstance(model.item_gmf, fastfair.nn.HashedEmbedding)
    # With collisions the array cannot hold the global table exactly: the download is its
    # projection, and the server's expansion of it differs from the table.
    expanded = fastfair.expand_dense(model.item_gmf.weight.detach(), view.specs["gmf"])
    assert not torch.allclose(expanded, runner.tables["gmf"], atol=1e-4)
    assert runner.payload_bytes(view) == dense.payload_bytes(dense.view(full_client)) + \
        4 * 2 * (spec.memory_size - n * d)


def test_fair_with_only_hashed_full_devices_is_hashed_fedavg(data):
    a = FederatedRunner(data, _cfg(method="fair", tiers="1:1", full_table="hashed"))
    b = FederatedRunner(data, _cfg(method="fedavg-full", tiers="2:0-1-2", full_table="hashed"))
    assert {str(b.view(c).specs["gmf"]) for c in b.eligible.tolist()} == \
        {str(a.view(0).specs["gmf"])}
    for _ in range(2):
        a.run_round()
        b.run_round()
    for name in a.tables:
        torch.testing.assert_close(a.tables[name], b.tables[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw,match", [
    (dict(full_table="sparse"), "full_table must be one of .*got 'sparse'"),
    (dict(full_table="hashed", method="fedhm"), "full_table 'hashed' applies to .*'fedhm'"),
    (dict(full_table="hashed", method="fedavg-full", aggregation="item-mean"),
     "item-mean' needs dense views")])
def test_full_table_settings_are_checked(data, kw, match):
    with pytest.raises(ValueError, match=match):
        FederatedRunner(data, _cfg(**kw))


def test_heterofl_keeps_columns_nobody_held(data):
    runner = FederatedRunner(data, _cfg(method="heterofl", tiers="2:1"))
    client = int(runner.eligible[0])
    view = runner.view(client)
    assert view.specs["gmf"] == Slice(4)
    before = runner.tables["gmf"].clone()
    model = runner.download(client, view)
    runner.local_train(client, model, torch.Generator().manual_seed(0))
    runner.aggregate_uploads([(runner.upload(client, model, view), view, 3.0)])
    assert torch.equal(runner.tables["gmf"][:, 4:], before[:, 4:])
    assert torch.equal(runner.tables["gmf"][:, :4], model.item_gmf.weight.detach())


def test_fedhm_download_is_the_best_rank_r_approximation(data):
    runner = FederatedRunner(data, _cfg(method="fedhm", tiers="2:0-2"))
    client = int(torch.nonzero(runner.tier_of == 1)[0])
    view = runner.view(client)
    rank = view.specs["gmf"].rank
    assert rank == (500 * 8 // 4) // (500 + 8)
    model = runner.download(client, view)
    table = runner.tables["gmf"].double()
    approx = (model.item_gmf.left @ model.item_gmf.right).detach().double()
    s = torch.linalg.svdvals(table)
    # Eckart-Young: the truncated SVD's error is the norm of the dropped singular values.
    torch.testing.assert_close(torch.linalg.norm(table - approx), s[rank:].norm(),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method,fraction", [("fedhm", "1/1024"), ("heterofl", "1/16")])
def test_baselines_report_the_tiers_they_cannot_represent(method, fraction):
    data = synthetic(num_users=40, num_items=300, dim=8, max_interactions=100, seed=3)
    runner = FederatedRunner(data, _cfg(method=method, tiers="2:0-10" if method == "fedhm"
                                        else "2:0-4"))
    assert runner.unsupported == [1]
    assert fraction in runner.unsupported_message()
    assert bool((runner.tier_of[runner.eligible] == 0).all())
    rows = runner.describe()
    assert not rows[1]["supported"] and rows[1]["holds"]["gmf"] == "excluded"
    runner.run_round()
    with pytest.raises(ValueError, match="cannot represent any tier"):
        FederatedRunner(data, _cfg(method=method, tiers="2:10" if method == "fedhm" else "2:4"))


def test_download_is_the_projection_and_nests(data):
    runner = FederatedRunner(data, _cfg(method="fair", tiers="2:1-2-3"))
    specs = runner.tier_specs["gmf"]
    assert all(s is not None for s in specs)
    big = max(specs, key=lambda s: s.memory_size)
    for s in specs:
        assert big.memory_size % s.memory_size == 0 and s.seed == big.seed
    client = 3
    view = runner.view(client)
    model = runner.download(client, view)
    spec = view.specs["gmf"]
    proj = fastfair.expand_dense(fastfair.project_dense(runner.tables["gmf"], spec), spec)
    torch.testing.assert_close(fastfair.expand_dense(model.item_gmf.weight.detach(), spec), proj)


def test_round_subspace_draws_a_fresh_seed_every_round_shared_by_the_rounds_devices(data):
    runner = FederatedRunner(data, _cfg(method="fair", tiers="2:0-1-2-3", subspace="round",
                                        aggregation="delta"))
    fixed = FederatedRunner(data, _cfg(method="fair", tiers="2:0-1-2-3"))
    by_tier = {}
    for client in range(data.num_users):
        by_tier.setdefault(int(runner.tier_of[client]), client)
    assert len(by_tier) == 4
    seen = set()
    for r in range(3):
        runner.run_round()
        specs = {t: runner.view(c).specs for t, c in by_tier.items()}
        for name in ("gmf", "mlp"):
            hashed = [specs[t][name] for t in sorted(specs) if specs[t][name] is not None]
            base = fixed.view(by_tier[1]).specs[name].seed
            # one seed for the round's devices, so their arrays nest and fold ...
            assert {s.seed for s in hashed} == {round_seed(base, runner.round_index)}
            big, small = hashed[0], hashed[-1]
            w = torch.randn(big.memory_size, dtype=torch.float64)
            counts = fastfair.slot_counts(big)
            fold = fastfair.fold(w, big.memory_size // small.memory_size, counts)
            direct = fastfair.project_dense(fastfair.expand_dense(w, big), small)
            torch.testing.assert_close(fold, direct)
            seen.add(hashed[0].seed)
    # ... and a new one each round, none the fixed run's
    assert len(seen) == 6 and not seen & {fixed.view(by_tier[1]).specs[n].seed
                                          for n in ("gmf", "mlp")}


def test_round_subspace_downloads_the_projection_onto_the_rounds_subspace(data):
    runner = FederatedRunner(data, _cfg(method="fair", tiers="2:0-2", subspace="round"))
    client = next(c for c in range(data.num_users) if int(runner.tier_of[c]) == 1)
    for _ in range(2):
        runner.run_round()
        runner.begin_round()
        view = runner.view(client)
        model = runner.download(client, view)
        spec = view.specs["gmf"]
        assert spec.seed == round_seed(runner.tier_specs["gmf"][1].seed, runner.round_index)
        proj = fastfair.expand_dense(fastfair.project_dense(runner.tables["gmf"], spec), spec)
        torch.testing.assert_close(fastfair.expand_dense(model.item_gmf.weight.detach(), spec),
                                   proj)


@pytest.mark.parametrize("fit", ["plain", "energy"])
def test_round_subspace_caches_only_the_current_rounds_arrays(data, fit):
    # A Flower node only sets the round and downloads: no begin_round clears its caches.
    runner = FederatedRunner(data, _cfg(method="fair", tiers="2:0-1-2", subspace="round",
                                        aggregation="delta", fit=fit))
    clients = [next(c for c in range(data.num_users) if int(runner.tier_of[c]) == t)
               for t in (1, 2)]
    for r in range(4):
        runner.round_index = r
        for client in clients:
            runner.download(client, runner.view(client))
        seeds = {round_seed(s.seed, r) for s in
                 (runner.tier_specs[n][1] for n in ("gmf", "mlp"))}
        cached = [key[1] for key in runner._projections if isinstance(key[1], fastfair.HashSpec)]
        assert {s.seed for s in runner._counts} <= seeds and {s.seed for s in cached} == seeds
        assert len(cached) == 4  # two tiers, two tables


def test_energy_fit_downloads_the_energy_weighted_fit(data):
    cfg = _cfg(method="fair", tiers="2:0-1-3", aggregation="delta", fit="energy", fit_floor=0.3)
    runner = FederatedRunner(data, cfg)
    runner.run_round()  # tables no longer at their start
    heavy = torch.randperm(data.num_items, generator=torch.Generator().manual_seed(0))[:20]
    for table in runner.tables.values():
        table[heavy] *= 10  # rows training moved far, as popular items' rows
    runner.begin_round()
    client = int(torch.nonzero(runner.tier_of == 2)[0])
    view = runner.view(client)
    model = runner.download(client, view)
    for name, table in runner.tables.items():
        spec = view.specs[name]
        energy = (table.double() ** 2).sum(1)
        weights = energy + 0.3 * energy.mean()
        expect = fastfair.project_dense(table.double(), spec, row_weights=weights).float()
        got = getattr(model, f"item_{name}").weight.detach()
        torch.testing.assert_close(got, expect)
        plain = fastfair.project_dense(table, spec)
        assert (got - plain).abs().max() > 1e-4
        # The heavy rows arrive close to their value; the plain fit shrinks them.
        err = {k: (fastfair.expand_dense(w, spec)[heavy] - table[heavy]).norm()
               / table[heavy].norm() for k, w in (("energy", got), ("plain", plain))}
        assert err["energy"] < 0.6 * err["plain"]


@pytest.mark.parametrize("kernel", ["autograd", "fused"])
def test_small_device_never_holds_anything_table_sized(kernel):
    """A 1/1024 client's local round, every torch op intercepted (and, for the fused kernel,
    every numpy allocation traced): nothing of num_items x d."""
    data = synthetic(num_users=20, num_items=40_000, dim=8, seed=2)
    runner = FederatedRunner(data, _cfg(method="fair", tiers="2:0-10", dim=16,
                                        local_kernel=kernel))
    small = int(torch.nonzero(runner.tier_of == 1)[0])
    view = runner.view(small)
    assert view.specs["gmf"].memory_size <= 40_000 * 16 // 1000
    model = runner.download(small, view)
    largest = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    largest.append(t.numel())
            return out

    with Watch():
        runner.local_train(small, model, torch.Generator().manual_seed(0))
    assert largest, "the watch saw no op"
    assert max(largest) < 40_000 * 16 // 64, max(largest)
    if kernel == "fused":
        # Its allocations are numpy's and Numba's, which tracemalloc traces (torch's it does
        # not): the Adam state, 16 bytes per array entry (2 x 624 here), and per-batch buffers
        # (~0.4 MB for 282 rows of d = 16), against 2.56 MB for one float32 table.
        model = runner.download(small, view)
        tracemalloc.start()
        runner.local_train(small, model, torch.Generator().manual_seed(0))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 40_000 * 16 * 4 // 4, peak


def test_small_tables_never_get_a_dense_gradient():
    """Under Adam a hashed client's tables train with sparse gradients: in its local round the
    only new tensors of an array's size are the two Adam moments of each table (no dense
    gradient per step, no temporaries of the optimizer)."""
    data = synthetic(num_users=20, num_items=3000, dim=8, seed=2)
    runner = FederatedRunner(data, _cfg(method="fair", tiers="2:0-4", dim=8, local_epochs=2,
                                        batch_size=16, local_kernel="autograd"))
    small = int(torch.nonzero(runner.tier_of == 1)[0])
    view = runner.view(small)
    size = view.specs["gmf"].memory_size
    assert view.specs["mlp"].memory_size == size and size < 3000 * 8
    model = runner.download(small, view)
    known = {p.untyped_storage().data_ptr() for p in model.parameters()}
    new = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if (isinstance(t, torch.Tensor) and not t.is_sparse and t.numel() == size
                        and not t._is_view() and t.untyped_storage().data_ptr() not in known):
                    known.add(t.untyped_storage().data_ptr())
                    new.append(func)
            return out

    with Watch():
        runner.local_train(small, model, torch.Generator().manual_seed(0))
    assert int(data.user_items(small).numel()) > 16  # several steps
    assert len(new) == 4, new


def test_user_vectors_stay_private(data):
    runner = FederatedRunner(data, _cfg(method="fair", tiers="2:0-1", clients_per_round=5))
    before = {k: v.clone() for k, v in runner.user_vectors.items()}
    runner.gen.manual_seed(123)
    pick = torch.randperm(runner.eligible.numel(), generator=runner.gen)[:5]
    runner.gen.manual_seed(123)
    runner.run_round()
    chosen = set(runner.eligible[pick].tolist())
    for name, v in runner.user_vectors.items():
        changed = set(torch.nonzero((v != before[name]).any(1)).flatten().tolist())
        # Early in training BPR can leave the MLP user vector exactly still (its term cancels
        # between the positive and the negative), so only the GMF vectors must all move.
        assert changed == chosen if name == "gmf" else changed <= chosen


@pytest.mark.parametrize("method", ["fair", "fedhm", "heterofl"])
def test_bytes_are_exact(data, method):
    runner = FederatedRunner(data, _cfg(method=method, tiers="2:0-1"))
    n, d = data.num_items, 8
    head = sum(p.numel() for p in runner.head.parameters())
    for client in range(10):
        view = runner.view(client)
        tables = 0
        for spec in view.specs.values():
            if spec is None:
                tables += n * d
            elif method == "fair":
                tables += spec.memory_size
            elif method == "fedhm":
                tables += (n + d) * spec.rank
            else:
                tables += n * spec.width
        assert runner.payload_bytes(view) == (tables + head) * BYTES_PER_PARAM
        model = runner.download(client, view)
        sent = sum(t.numel() for t in runner.upload(client, model, view).values())
        assert runner.payload_bytes(view) == sent * BYTES_PER_PARAM
    stats = runner.run_round()
    assert stats["bytes_down"] == sum(t["bytes_down"] for t in stats["by_tier"].values())
    assert stats["bytes_up"] == stats["bytes_down"]


def test_exclusion_samples_only_full_devices(data):
    runner = FederatedRunner(data, _cfg(method="exclusion", tiers="2:0-1-2"))
    assert bool((runner.tier_of[runner.eligible] == 0).all())
    assert runner.eligible.numel() == 20


def test_training_learns_on_the_synthetic_default(data):
    records = train(data, _cfg(method="fair", tiers="2:0-1", rounds=8, clients_per_round=20,
                               local_epochs=2, eval_every=8))
    assert records[-1]["hr@10"] > 0.2  # 99 negatives: chance is 0.1
    assert records[-1]["round"] == 8 and "ndcg@10" in records[-1]


@pytest.mark.parametrize("kw,match", [
    (dict(method="fedprox"), "method must be one of"),
    (dict(clients_per_round=61), "clients_per_round=61 is larger than the number of clients"),
    (dict(method="exclusion", tiers="2:1-2"), "cannot represent any tier of .2:1-2.: tiers with capacity 1/2, 1/4 sit out"),
    (dict(dropout=1.0), "dropout must be a probability"),
    (dict(optimizer_state="shared"), "optimizer_state must be one of"),
    (dict(seed=-1), "seed must be a non-negative int"),
    (dict(lr=0), "lr must be a positive number"),
    (dict(refit_lr=float("nan")), "refit_lr must be a positive number, got nan"),
    (dict(head_init="xavier"), "head_init must be one of"),
    (dict(user_step=0), "user_step must be a float in \\(0, 1\\] or 'data', got 0"),
    (dict(user_step=1.5), "user_step must be a float in \\(0, 1\\] or 'data', got 1.5"),
    (dict(user_step="foo"), "user_step must be a float in \\(0, 1\\] or 'data', got 'foo'"),
    (dict(user_step=True), "user_step must be a float in .* got True"),
    (dict(negative_sampling="popular"), "negative_sampling must be one of .*got 'popular'"),
    (dict(refit_epochs=-1), "refit_epochs must be a non-negative int, got -1"),
    (dict(refit_sample=True), "refit_sample must be a non-negative int, got True"),
    (dict(rounds=0), "rounds must be a positive int"),
    (dict(fit="sharp"), "fit must be one of \\('plain', 'energy'\\), got 'sharp'"),
    (dict(fit_floor=0), "fit_floor must be a positive number, got 0"),
    (dict(fit_floor=float("inf")), "fit_floor must be a positive number, got inf"),
    (dict(fit="energy", method="fedhm"), "fit 'energy' applies to hashed arrays: .*"
                                         "method 'fedhm' has none"),
    (dict(fit="energy", method="fedavg-full"), "fit 'energy' applies to hashed arrays"),
    (dict(tiers="2:"), "tier spec '2:'"),
    (dict(subspace="daily"), "subspace must be one of \\('fixed', 'round'\\), got 'daily'"),
    (dict(subspace="round", method="heterofl"), "subspace 'round' applies to hashed arrays: .*"
                                                "method 'heterofl' has none"),
    (dict(subspace="round", method="exclusion"), "subspace 'round' applies to hashed arrays"),
])
def test_bad_configs(data, kw, match):
    with pytest.raises(ValueError, match=match):
        FederatedRunner(data, _cfg(**kw))


class _Poisoning(FederatedRunner):
    """A runner whose clients upload ``bad(update)`` except the ones listed in ``good``."""

    def __init__(self, data, config, bad, good=()):
        super().__init__(data, config)
        self.bad, self.good, self.sent = bad, set(good), {}

    def upload(self, client, model, view):
        update = super().upload(client, model, view)
        if client in self.good:
            self.sent[client] = (update, view)
            return update
        return self.bad(dict(update))


def _nan(update):
    key = next(iter(update))
    update[key] = update[key].clone()
    update[key].view(-1)[0] = float("nan")
    return update


def _inf_pair(update):  # +Inf and -Inf: their sum is NaN, not Inf
    key = next(iter(update))
    update[key] = update[key].clone()
    update[key].view(-1)[:2] = torch.tensor([float("inf"), -float("inf")])
    return update


def test_finite_values_whose_sum_overflows_are_accepted():
    from fastfair.fl.rounds import check_tensors
    huge = torch.full((4, 3), 3e38)  # finite, sum overflows float32
    assert check_tensors({"w": huge}, {"w": (4, 3)}) is None
    huge[2, 1] = float("inf")
    assert "NaN or Inf" in check_tensors({"w": huge}, {"w": (4, 3)})


@pytest.mark.parametrize("bad,reason", [
    (_nan, "NaN or Inf"),
    (_inf_pair, "NaN or Inf"),
    (lambda u: {k: v[:-1] for k, v in u.items()}, "has shape"),
    (lambda u: {k: v.double() for k, v in u.items()}, "not a float32 tensor"),
    (lambda u: {**u, "user_gmf": torch.zeros(8)}, "unexpected ['user_gmf']"),
    (lambda u: {k: v for k, v in u.items() if not k.startswith("head.")}, "tensors missing"),
    (lambda u: [u], "not a dict"),
])
def test_bad_updates_are_rejected_and_never_averaged(data, bad, reason):
    runner = _Poisoning(data, _cfg(method="fair", tiers="2:0-2"), bad)
    tables = {k: v.clone() for k, v in runner.tables.items()}
    head = {k: v.clone() for k, v in runner.head.state_dict().items()}
    stats = runner.run_round()
    assert stats["rejected"] == stats["clients"] == 6 and runner.totals["rejected"] == 6
    assert all(reason in r for r in stats["rejections"]), stats["rejections"]
    for k in tables:
        assert torch.equal(runner.tables[k], tables[k])
    for k, v in runner.head.state_dict().items():
        assert torch.equal(v, head[k])


def test_aggregation_renormalises_over_the_accepted_updates(data):
    probe = FederatedRunner(data, _cfg(method="fair", tiers="2:0-2"))
    first = int(probe.eligible[torch.randperm(probe.eligible.numel(), generator=probe.gen)[0]])
    runner = _Poisoning(data, _cfg(method="fair", tiers="2:0-2"), _nan, good=[first])
    stats = runner.run_round()
    assert stats["rejected"] == 5
    update, view = runner.sent[first]
    for name in runner.tables:
        # One accepted update carries all the weight, whatever its data size.
        expect = _naive_dense(runner, name, update, view)
        torch.testing.assert_close(runner.tables[name], expect, rtol=1e-5, atol=1e-6)
    for k, v in runner.head.state_dict().items():
        torch.testing.assert_close(v, update[f"head.{k}"])


def test_dropout_counts_and_renormalises(data):
    runner = FederatedRunner(data, _cfg(method="fair", tiers="2:0-1", dropout=0.5,
                                        clients_per_round=20))
    seen = []
    original = runner.aggregate_uploads
    runner.aggregate_uploads = lambda uploads: (seen.append(len(uploads)), original(uploads))
    stats = [runner.run_round() for _ in range(3)]
    dropped = sum(s["dropped"] for s in stats)
    assert 0 < dropped < 60 and runner.totals["dropped"] == dropped
    assert seen == [s["returned"] for s in stats] == [20 - s["dropped"] for s in stats]
    for s in stats:
        assert s["bytes_up"] < s["bytes_down"]
        assert sum(t["dropped"] for t in s["by_tier"].values()) == s["dropped"]
    assert all(torch.isfinite(t).all() for t in runner.tables.values())


@pytest.mark.parametrize("method,extra", [
    ("fair", {}), ("fedhm", {}), ("heterofl", {}), ("fair-inconsistent", {}),
    # compressed uploads: k-means seeds, adaptive K and device classes must resume too
    ("fair", dict(compressor="actions", ratio=1 / 8, spherical=True, profile="mobile",
                  aggregation="delta")),
    # redrawn negatives and the step applied after the round
    ("fair", dict(negative_sampling="unseen", user_step="data")),
    ("fedhm", dict(negative_sampling="unseen", user_step="data", weighting="capacity")),
    ("fair", dict(fit="energy", aggregation="delta")),
    ("fair", dict(subspace="round", aggregation="delta")),
    ("fair-inconsistent", dict(subspace="round"))])
def test_resume_continues_bit_identically(data, method, extra, tmp_path):
    cfg = _cfg(method=method, tiers="2:0-1-2", dropout=0.3, optimizer_state="persistent",
               clients_per_round=10, **extra)
    straight = FederatedRunner(data, cfg)
    for _ in range(4):
        straight.run_round()
    first = FederatedRunner(data, cfg)
    for _ in range(2):
        first.run_round()
    path = tmp_path / "ckpt.pt"
    first.save(path)
    del first
    torch.load(path, weights_only=True)  # the format a user can load safely
    resumed = FederatedRunner.load(path, data)
    assert resumed.round_index == 2 and resumed.optimizer_states
    for _ in range(2):
        resumed.run_round()
    assert state_equal(resumed.state_dict(), straight.state_dict())
    assert resumed.evaluate() == straight.evaluate()


def test_checkpoints_refuse_other_data_and_other_files(data, tmp_path):
    runner = FederatedRunner(data, _cfg())
    runner.run_round()
    runner.save(tmp_path / "ckpt.pt")
    other = synthetic(num_users=60, num_items=500, dim=8, seed=2)
    with pytest.raises(ValueError, match="different data"):
        FederatedRunner.load(tmp_path / "ckpt.pt", other)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fastfair runner checkpoint"):
        FederatedRunner.load(tmp_path / "other.pt", data)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        FederatedRunner.load(tmp_path / "missing.pt", data)
    with pytest.raises(ValueError, match=r"different config: \['lr'\]"):
        FederatedRunner(data, _cfg(lr=0.5)).load_state_dict(runner.state_dict())


def test_checkpoint_without_a_later_setting_loads_with_its_default(data, tmp_path):
    runner = FederatedRunner(data, _cfg())
    runner.run_round()
    state = runner.state_dict()
    del state["config"]["weighting"]  # as written before that setting existed
    del state["config"]["negative_sampling"]
    torch.save(state, tmp_path / "old.pt")
    resumed = FederatedRunner.load(tmp_path / "old.pt", data)
    assert resumed.cfg.weighting == "data" and state_equal(resumed.state_dict(),
                                                           runner.state_dict())
    assert resumed.cfg.negative_sampling == "uniform"
    # ... and goes on as the run it was taken from
    resumed.run_round()
    runner.run_round()
    assert state_equal(resumed.state_dict(), runner.state_dict())


@pytest.mark.parametrize("method", ["fair", "exclusion"])
def test_metrics_by_tier_split_the_overall_metrics(data, method):
    runner = FederatedRunner(data, _cfg(method=method, tiers="2:0-2", ks=(5, 10)))
    runner.run_round()
    overall, parts = runner.evaluate(), runner.evaluate_by_tier()
    assert set(parts) == {t.label for t in runner.tiers}
    assert sum(p["users"] for p in parts.values()) == overall["users"]
    for key in ("hr@5", "ndcg@10"):
        mean = sum(p[key] * p["users"] for p in parts.values()) / overall["users"]
        assert mean == pytest.approx(overall[key], rel=1e-12)
    # Only the full-capacity users' vectors moved under exclusion; the split shows it.
    trained = {t.label: bool((runner.user_vectors["gmf"][runner.tier_of == i]
                              != FederatedRunner(data, runner.cfg).user_vectors["gmf"][
                                  runner.tier_of == i]).any())
               for i, t in enumerate(runner.tiers)}
    assert trained == {"1": True, "1/4": method == "fair"}


def test_capacity_weighting_scales_each_client_by_its_tier(data):
    runner = FederatedRunner(data, _cfg(method="fair", tiers="2:0-1-2", weighting="capacity"))
    plain = FederatedRunner(data, _cfg(method="fair", tiers="2:0-1-2"))
    for client in range(data.num_users):
        fraction = runner.tiers[int(runner.tier_of[client])].fraction
        assert runner.weight(client) == plain.weight(client) * fraction
    assert {runner.tiers[int(t)].fraction for t in runner.tier_of} == {1, 0.5, 0.25}
    with pytest.raises(ValueError, match="weighting must be one of"):
        FederatedRunner(data, _cfg(weighting="size"))


@pytest.mark.parametrize("arch", ["neumf", "mf"])
def test_scoring_every_item_matches_the_pairwise_score(arch):
    from fastfair.fl.model import Head, score, score_all_items
    torch.manual_seed(0)
    n, d, b = 37, 5, 6
    head = Head(d) if arch == "neumf" else None
    ug, um, ig, im = (torch.randn(k, d, dtype=torch.float64) for k in (b, b, n, n))
    if head is not None:
        head.double()
    expect = score(arch, ug[:, None], um[:, None] if head else None, ig, im if head else None,
                   head)
    got = score_all_items(arch, ug, um if head else None, ig, im if head else None, head,
                          budget=3 * n * d)  # several user chunks
    torch.testing.assert_close(got, expect)


def test_popularity_baseline_ranks_by_train_counts(data):
    from fastfair.fl.runner import popularity_metrics
    got = popularity_metrics(data, ks=(10,))
    counts = torch.bincount(data.train_items, minlength=data.num_items)
    hits = 0
    for u in range(data.num_users):
        t = int(data.test_items[u])
        negs = set(data.test_negatives[u].tolist()) - {t}
        # Pessimistic ties, as in every metric here: a tie ranks above the held-out item.
        rank = sum(int(counts[j] >= counts[t]) for j in negs)
        hits += rank < 10
    assert got["hr@10"] == pytest.approx(hits / data.num_users)


def test_reg_adds_the_l2_of_the_batch_embeddings(monkeypatch):
    data = synthetic(num_users=20, num_items=150, seed=1, min_interactions=6, max_interactions=12)
    losses = {}
    for reg in (0.0, 0.5):
        cfg = Config(method="fedavg-full", tiers="2:0-1", clients_per_round=3, rounds=1, dim=4,
                     seed=3, reg=reg, optimizer="sgd", lr=1e-9, batch_size=1000)
        runner = FederatedRunner(data, cfg)
        client = 0
        model = runner.download(client, runner.view(client))
        seen = []
        real = model.forward

        def spy(items, with_sqnorm=False):
            out = real(items, with_sqnorm)
            seen.append((items.clone(), out))
            return out

        monkeypatch.setattr(model, "forward", spy)
        losses[reg] = runner.local_train(client, model, torch.Generator().manual_seed(0))
        items = seen[0][0]
    # with a vanishing lr the weights do not move: the loss difference is exactly the L2 term
    with torch.no_grad():
        rows = (model.item_gmf(items).pow(2).sum() + model.item_mlp(items).pow(2).sum()
                + model.user_gmf.pow(2).sum() + model.user_mlp.pow(2).sum())
    expected = 0.5 * float(rows) / items.shape[0]
    assert losses[0.5] - losses[0.0] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="reg must be"):
        Config(reg=-1.0).check(data)


@pytest.mark.parametrize("method,tiers", [("fair", "2:0-1-2"), ("fedavg-full", "2:0-1")])
def test_deferred_adam_trains_like_dense_adam_and_resumes(data, method, tiers, monkeypatch,
                                                          tmp_path):
    import fastfair.fl.runner as runner_module
    # Under NeuMF's usual head init this 3-round persistent-Adam run amplifies the two
    # optimizers' float rounding (3e-9 after round 1) to ~5e-3 by round 3, while a direct
    # comparison over reloaded states stays within 1e-6; nn.Linear's init keeps the trajectories
    # within rounding, so this end-to-end check uses it.
    cfg = _cfg(method=method, tiers=tiers, optimizer_state="persistent", clients_per_round=10,
               local_epochs=2, rounds=3, head_init="torch")
    dense = FederatedRunner(data, cfg)
    for _ in range(3):
        dense.run_round()
    # every table large enough: the tables step with DeferredAdam
    monkeypatch.setattr(runner_module, "DEFERRED_MIN_ENTRIES", 0)
    deferred = FederatedRunner(data, cfg)
    deferred.run_round()
    kinds = {type(o).__name__ for o in runner_module.client_optimizers(
        deferred.download(0, deferred.view(0)), "adam", 0.1)}
    assert kinds == {"DeferredAdam", "ScatterAdam"}
    deferred.save(tmp_path / "c.pt")
    resumed = FederatedRunner.load(tmp_path / "c.pt", data)
    for _ in range(2):
        deferred.run_round()
        resumed.run_round()
    assert state_equal(resumed.state_dict(), deferred.state_dict())
    for name in dense.tables:  # the same Adam, up to float rounding
        torch.testing.assert_close(deferred.tables[name], dense.tables[name], rtol=1e-4,
                                   atol=1e-5)


def test_user_step_keeps_that_fraction_of_the_rounds_change(data):
    full = FederatedRunner(data, _cfg())
    damped = FederatedRunner(data, _cfg(user_step=0.25))
    start = {k: v.clone() for k, v in full.user_vectors.items()}
    full.run_round()
    damped.run_round()
    for name in full.tables:  # the first round's uploads do not depend on it
        assert torch.equal(full.tables[name], damped.tables[name])
    moved = (full.user_vectors["gmf"] != start["gmf"]).any(1)
    assert moved.sum() == _cfg().clients_per_round
    for name, before in start.items():
        want = before + 0.25 * (full.user_vectors[name] - before)
        torch.testing.assert_close(damped.user_vectors[name], want, rtol=0, atol=1e-7)
        assert torch.equal(damped.user_vectors[name][~moved], before[~moved])


def test_checkpoint_from_before_head_init_loads_as_torch_init(data, tmp_path):
    runner = FederatedRunner(data, _cfg(head_init="torch"))
    runner.run_round()
    state = runner.state_dict()
    del state["config"]["head_init"]  # its default changed when it was added
    torch.save(state, tmp_path / "old.pt")
    resumed = FederatedRunner.load(tmp_path / "old.pt", data)
    assert resumed.cfg.head_init == "torch"
    assert state_equal(resumed.state_dict(), runner.state_dict())


def test_head_init_ncf_is_neumfs_usual_start():
    from fastfair.fl.model import Head
    torch.manual_seed(0)
    ncf = Head(8)
    torch.manual_seed(0)
    default = Head(8, init="torch")
    assert torch.count_nonzero(ncf.mlp.bias) == 0 and torch.count_nonzero(ncf.predict.bias) == 0
    assert torch.count_nonzero(default.mlp.bias) > 0
    # Xavier-uniform bound sqrt(6 / (16 + 8)) = 0.5; Kaiming(a=1, sigmoid) sqrt(3 / 16) = 0.433;
    # nn.Linear's 1 / sqrt(16) = 0.25: the weights must use more than the default's range.
    assert 0.25 < ncf.mlp.weight.abs().max() <= 0.5
    assert ncf.predict.weight.abs().max() <= 0.433
    assert default.mlp.weight.abs().max() <= 0.25
    with pytest.raises(ValueError, match="head init must be one of .*got 'he'"):
        Head(8, init="he")


# --------------------------------------------------------------------------- negative sampling

def _dense_data(seed):
    """Users holding 70-90% of a 50-item catalogue: uniform negatives mostly hit positives."""
    return synthetic(num_users=12, num_items=50, dim=4, min_interactions=36,
                     median_interactions=42, max_interactions=45, num_negatives=4, seed=seed)


def _spy_negatives(monkeypatch, model, seen):
    real = model.forward

    def spy(items, with_sqnorm=False):
        seen.append(items.clone())
        return real(items, with_sqnorm)

    monkeypatch.setattr(model, "forward", spy)


@pytest.mark.parametrize("seed", [5, 6])
def test_unseen_negatives_never_hit_the_clients_positives(monkeypatch, seed):
    data = _dense_data(seed)
    share = {}
    for sampling in ("uniform", "unseen"):
        # the autograd loop: the spy reads the model's inputs (both loops draw alike)
        runner = FederatedRunner(data, _cfg(clients_per_round=4, negatives=4, local_epochs=2,
                                            batch_size=16, negative_sampling=sampling,
                                            local_kernel="autograd"))
        hits = drawn = 0
        for client in range(data.num_users):
            model = runner.download(client, runner.view(client))
            seen = []
            _spy_negatives(monkeypatch, model, seen)
            runner.local_train(client, model, torch.Generator().manual_seed(100 * seed + client))
            pos = data.user_items(client)
            negs = torch.cat(seen)[:, 1:].flatten()
            assert negs.numel() == 2 * 4 * pos.numel()
            assert bool(((negs >= 0) & (negs < data.num_items)).all())
            hits += int(torch.isin(negs, pos).sum())
            drawn += negs.numel()
        share[sampling] = hits / drawn
    assert share["unseen"] == 0
    assert share["uniform"] > 0.6  # the users' positives cover 70-90% of the items


@pytest.mark.parametrize("seed", [11, 12])
def test_unseen_negatives_are_uniform_over_the_unseen_items(seed):
    from fastfair.fl.runner import draw_negatives
    n = 50
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randperm(n, generator=gen)[:40]
    negs = draw_negatives(gen, pos.numel(), 500, n, torch.unique(pos))
    assert negs.shape == (40, 500)
    counts = torch.bincount(negs.flatten(), minlength=n).double()
    assert counts[pos].sum() == 0
    unseen = counts[~torch.isin(torch.arange(n), pos)]
    assert unseen.numel() == 10
    expected = negs.numel() / unseen.numel()
    chi2 = float(((unseen - expected) ** 2 / expected).sum())
    assert chi2 < 33.7, chi2  # the 0.9999 quantile of chi-square with 9 degrees of freedom
    # Without the positives every item is drawn, the positives included.
    plain = torch.bincount(draw_negatives(gen, 40, 500, n).flatten(), minlength=n)
    assert bool((plain[pos] > 0).all())


def test_uniform_negatives_are_the_plain_randint_draws(data, monkeypatch):
    """negative_sampling="uniform" makes exactly the draws train_client made before the
    setting existed: per epoch a randperm of the positives, then one randint."""
    from fastfair.fl.runner import draw_negatives
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(draw_negatives(g1, 33, 3, 500), torch.randint(0, 500, (33, 3),
                                                                      generator=g2))
    assert torch.equal(g1.get_state(), g2.get_state())
    runner = FederatedRunner(data, _cfg(local_epochs=2, negatives=3, batch_size=100_000,
                                        local_kernel="autograd"))
    client = int(torch.argmax(data.train_counts()))
    pos = data.user_items(client)
    model = runner.download(client, runner.view(client))
    seen = []
    _spy_negatives(monkeypatch, model, seen)
    seed = int(torch.randint(0, 2**31, (1,)))
    gen, ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    runner.local_train(client, model, gen)
    assert len(seen) == 2  # one batch per epoch
    for items in seen:
        order = pos[torch.randperm(pos.numel(), generator=ref)]
        negs = torch.randint(0, data.num_items, (pos.numel(), 3), generator=ref)
        assert torch.equal(items[:, 0], order) and torch.equal(items[:, 1:], negs)
    assert torch.equal(gen.get_state(), ref.get_state())


@pytest.mark.parametrize("sampling", ["uniform", "unseen"])
def test_replay_leaves_the_generator_where_training_does(sampling):
    import dataclasses
    from fastfair.fl.runner import replay_local_train
    data = _dense_data(7)
    cfg = _cfg(clients_per_round=4, local_epochs=3, negatives=2, batch_size=16,
               negative_sampling=sampling)
    runner = FederatedRunner(data, cfg)
    for client in range(6):
        trained, replayed = (torch.Generator().manual_seed(client) for _ in range(2))
        runner.local_train(client, runner.download(client, runner.view(client)), trained)
        replay_local_train(replayed, data.user_items(client), cfg, data.num_items)
        assert torch.equal(trained.get_state(), replayed.get_state())
        if sampling == "unseen":
            # the redraws are part of the replay: the uniform draws alone stop elsewhere
            plain = torch.Generator().manual_seed(client)
            replay_local_train(plain, data.user_items(client),
                               dataclasses.replace(cfg, negative_sampling="uniform"),
                               data.num_items)
            assert not torch.equal(plain.get_state(), trained.get_state())


def test_unseen_negatives_need_an_item_outside_the_positives():
    from fastfair.fl.data import InteractionData
    from fastfair.fl.runner import replay_local_train, train_client
    n = 10
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    rest = torch.randperm(n, generator=gen)
    covered = int(torch.randint(0, 3, (1,), generator=gen))  # the user who holds every item
    train_lists = [rest[:3].sort().values, rest[3:5].sort().values, rest[5:8].sort().values]
    train_lists[covered] = torch.arange(n)
    test_lists = [rest[8:9], rest[9:10], torch.tensor([], dtype=torch.int64)]
    test_lists[covered] = torch.tensor([], dtype=torch.int64)
    lengths = torch.tensor([0] + [t.numel() for t in train_lists])
    test_lengths = torch.tensor([0] + [t.numel() for t in test_lists])
    data = InteractionData("covered", 3, n, "full", lengths.cumsum(0), torch.cat(train_lists),
                           torch.cat(test_lists), test_lengths.cumsum(0))
    data.validate()
    cfg = dict(dim=4, clients_per_round=2, tiers="1:1")
    with pytest.raises(ValueError, match=f"user {covered}'s training items cover all {n} items"):
        FederatedRunner(data, Config(**cfg, negative_sampling="unseen"))
    uniform = FederatedRunner(data, Config(**cfg))  # any item may be a uniform negative
    uniform.run_round()
    model = uniform.download(covered, uniform.view(covered))
    unseen = Config(**cfg, negative_sampling="unseen")
    for call in (lambda: train_client(unseen, data.user_items(covered), n, model, gen),
                 lambda: replay_local_train(gen, data.user_items(covered), unseen, n)):
        with pytest.raises(ValueError, match=f"{n} positives cover all {n} items"):
            call()


# --------------------------------------------------------------------------- user_step="data"

def _returned(stats):
    """The clients of a round that returned their update (a dropped one uploads nothing)."""
    return [int(c) for c, (_, up) in stats["by_client"].items() if up > 0]


@pytest.mark.parametrize("weighting,dropout", [("data", 0.0), ("data", 0.5), ("capacity", 0.5)])
def test_user_step_data_keeps_each_clients_share_of_the_round(data, weighting, dropout):
    kw = dict(method="fair", tiers="2:0-1-2", clients_per_round=20, dropout=dropout,
              weighting=weighting)
    shared = FederatedRunner(data, _cfg(user_step="data", **kw))
    full = FederatedRunner(data, _cfg(**kw))  # keeps all of its change: the trained vectors
    before = {k: v.clone() for k, v in full.user_vectors.items()}
    stats, full_stats = shared.run_round(), full.run_round()
    for name in full.tables:  # the round's training and uploads do not depend on the step
        assert torch.equal(shared.tables[name], full.tables[name])
    assert stats["by_client"] == full_stats["by_client"]
    returned = _returned(stats)
    assert len(returned) == 20 - stats["dropped"]
    if dropout:
        assert 0 < stats["dropped"] < 20
    fractions = [1.0, 0.5, 0.25]  # the capacities of tiers "2:0-1-2"
    weight = {c: float(data.user_items(c).numel())
              * (fractions[int(shared.tier_of[c])] if weighting == "capacity" else 1.0)
              for c in returned}
    total = sum(weight.values())
    for name, start in before.items():
        got, trained = shared.user_vectors[name], full.user_vectors[name]
        for c in returned:
            want = start[c] + (weight[c] / total) * (trained[c] - start[c])
            torch.testing.assert_close(got[c], want, rtol=0, atol=1e-7)
        assert bool((got[returned] != trained[returned]).any())  # a share, not the full step
        others = torch.ones(data.num_users, dtype=torch.bool)
        others[returned] = False  # never sampled, or dropped: unchanged
        assert torch.equal(got[others], start[others])


def test_user_step_data_gives_a_rejected_client_nothing(data):
    kw = dict(method="fair", tiers="2:0-2", clients_per_round=6)
    probe = FederatedRunner(data, _cfg(**kw))
    first = int(probe.eligible[torch.randperm(probe.eligible.numel(), generator=probe.gen)[0]])
    full = FederatedRunner(data, _cfg(**kw))
    before = {k: v.clone() for k, v in full.user_vectors.items()}
    stats = full.run_round()
    clients = [int(c) for c in stats["by_client"]]
    assert first in clients and len(clients) == 6
    shared = _Poisoning(data, _cfg(user_step="data", **kw), _nan, good=[first])
    assert shared.run_round()["rejected"] == 5
    # float steps: a rejected device still keeps its own step of its private vectors
    kept = _Poisoning(data, _cfg(user_step=0.5, **kw), _nan, good=[first])
    kept.run_round()
    for name, start in before.items():
        # the one accepted client carries all the weight: it keeps its whole change
        torch.testing.assert_close(shared.user_vectors[name][first],
                                   full.user_vectors[name][first], rtol=0, atol=1e-7)
        assert torch.equal(shared.user_vectors[name][[c for c in range(data.num_users)
                                                      if c != first]],
                           start[[c for c in range(data.num_users) if c != first]])
        rejected = [c for c in clients if c != first]
        want = start[rejected] + 0.5 * (full.user_vectors[name][rejected] - start[rejected])
        torch.testing.assert_close(kept.user_vectors[name][rejected], want, rtol=0, atol=1e-7)


def test_user_step_data_is_not_a_device_side_step(data):
    runner = FederatedRunner(data, _cfg(user_step="data"))
    model = runner.download(0, runner.view(0))
    vectors = {k: v[0] for k, v in runner.user_vectors.items()}
    with pytest.raises(ValueError, match="user_step 'data' depends on the weights"):
        runner.kept_user_vectors(vectors, model)
    kept = runner.kept_user_vectors(vectors, model, step=0.5)
    assert all(torch.equal(kept[k], vectors[k]) for k in vectors)  # untrained: nothing moved
