"""fastfair.fl.fused (a client's local round in compiled kernels) against the autograd loop of
fastfair.fl.runner.train_client, which it replaces where it can run the model."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from fastfair.fl import fused
from fastfair.fl.model import ClientModel, LowRankEmbedding
from fastfair.fl.fused import train
from fastfair.fl.runner import DEFERRED_MIN_ENTRIES, Config, train_client
from fastfair.nn import HashedEmbedding


def _model(arch, n, d, table, dtype, seed):
    """A client model with random tables, user vectors and head (never zeros)."""
    gen = torch.Generator().manual_seed(seed)

    def make_table(name):
        if table == "dense":
            return nn.Embedding.from_pretrained(torch.randn(n, d, generator=gen, dtype=dtype),
                                                freeze=False, sparse=True)
        memory, chunk, signed = table
        module = HashedEmbedding(n, d, memory_size=memory, chunk_size=chunk, signed=signed,
                                 seed=seed + len(name), sparse=True, dtype=dtype)
        with torch.no_grad():
            module.weight.copy_(torch.randn(memory, generator=gen, dtype=dtype))
        return module

    model = ClientModel(arch, n, d, make_table).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.numel() == d:  # the user vectors start at zero
                p.copy_(torch.randn(d, generator=gen, dtype=dtype))
    return model


def _both(cfg, model, pos, n, seed):
    """``(autograd model, loss), (fused model, loss)`` after one local round from ``model``."""
    slow, fast = copy.deepcopy(model), copy.deepcopy(model)
    a = train_client(cfg, pos, n, slow, torch.Generator().manual_seed(seed),
                     kernel="autograd")[0]
    b = train_client(cfg, pos, n, fast, torch.Generator().manual_seed(seed), kernel="fused")[0]
    return (slow, a), (fast, b)


CASES = [  # arch, n, d, table, loss, negatives, reg, batch, positives, epochs
    ("neumf", 40, 5, "dense", "bpr", 1, 0.0, 7, 23, 3),
    ("neumf", 40, 3, "dense", "bce", 3, 0.01, 16, 16, 2),
    ("neumf", 300, 8, (64, 1, True), "bpr", 2, 0.0, 9, 50, 3),
    ("neumf", 300, 13, (99, 3, True), "bce", 1, 0.02, 11, 37, 2),
    ("neumf", 300, 6, (70, 2, False), "bpr", 1, 0.01, 32, 29, 2),
    ("mf", 50, 4, "dense", "bpr", 2, 0.01, 5, 19, 3),
    ("mf", 300, 7, (41, 1, True), "bce", 2, 0.0, 8, 33, 2),
    ("mf", 300, 33, (132, 4, True), "bpr", 1, 0.0, 10, 25, 2),
]


@pytest.mark.parametrize("arch,n,d,table,loss,neg,reg,batch,npos,epochs", CASES)
def test_fused_round_equals_the_autograd_loop_in_float64(arch, n, d, table, loss, neg, reg,
                                                          batch, npos, epochs):
    cfg = Config(arch=arch, dim=d, local_epochs=epochs, batch_size=batch, lr=0.02, loss=loss,
                 negatives=neg, reg=reg)
    model = _model(arch, n, d, table, torch.float64, seed=n + d)
    pos = torch.randperm(n, generator=torch.Generator().manual_seed(d))[:npos]
    (slow, a), (fast, b) = _both(cfg, model, pos, n, seed=3)
    assert b == pytest.approx(a, rel=1e-10)
    for (name, p), q, p0 in zip(slow.named_parameters(), fast.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-9, msg=name)
        # Every parameter trained. BPR's differences cancel the prediction bias: its gradient is
        # zero (autograd's is rounding noise, which Adam scales up to ~1e-11).
        if not (loss == "bpr" and name == "head.predict.bias"):
            assert not torch.equal(p, p0), name


@pytest.mark.parametrize("table", ["dense", (1 << 19, 1, True)])
def test_fused_round_equals_adam_on_tables_large_enough_for_deferred_adam(table):
    # Tables of DEFERRED_MIN_ENTRIES or more train with DeferredAdam in the autograd loop (whose
    # forwards must read rows with their pending steps taken) and deferred steps in the kernel.
    n = DEFERRED_MIN_ENTRIES // 4 + 1 if table == "dense" else 500
    cfg = Config(arch="neumf", dim=4, local_epochs=3, batch_size=6, lr=0.05, negatives=1)
    model = _model("neumf", n, 4, table, torch.float64, seed=5)
    # few distinct items, so rows are read again after steps they missed
    pos = torch.arange(12) * 7
    (slow, a), (fast, b) = _both(cfg, model, pos, n, seed=4)
    assert b == pytest.approx(a, rel=1e-10)
    for (name, p), q in zip(slow.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-9, msg=name)


def test_fused_round_in_float32_stays_within_rounding_of_the_autograd_loop():
    cfg = Config(arch="neumf", dim=8, local_epochs=2, batch_size=16, lr=0.01, loss="bce",
                 negatives=2)
    model = _model("neumf", 200, 8, (120, 1, True), torch.float32, seed=9)
    pos = torch.randperm(200, generator=torch.Generator().manual_seed(1))[:40]
    (slow, a), (fast, b) = _both(cfg, model, pos, 200, seed=2)
    assert b == pytest.approx(a, rel=1e-5)
    for (name, p), q in zip(slow.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


def test_models_the_kernel_cannot_run_are_refused_with_the_reason():
    model = ClientModel("neumf", 30, 4, lambda name: LowRankEmbedding(30, 4, 2))
    assert "LowRankEmbedding" in fused.unsupported(model)
    with pytest.raises(ValueError, match="LowRankEmbedding"):
        fused.train(model, [], 8, "bpr", 0.0, 1e-3)
    padded = ClientModel("mf", 30, 4, lambda name: nn.Embedding(30, 4, padding_idx=0))
    assert "padding_idx" in fused.unsupported(padded)
    mixed = _model("mf", 30, 4, "dense", torch.float32, seed=1)
    mixed.user_gmf.data = mixed.user_gmf.data.double()
    assert "float32 or all float64" in fused.unsupported(mixed)


def test_bad_loss_is_refused():
    model = _model("mf", 30, 4, "dense", torch.float32, seed=1)
    with pytest.raises(ValueError, match="'hinge'"):
        fused.train(model, [], 8, "hinge", 0.0, 1e-3)


@pytest.mark.parametrize("method,tiers,sampling", [("fair", "2:0-2", "unseen"),
                                                   ("fedavg-full", "2:0", "uniform")])
def test_a_federated_round_is_the_same_with_either_kernel(monkeypatch, method, tiers, sampling):
    from fastfair.fl.data import synthetic
    from fastfair.fl.runner import FederatedRunner
    data = synthetic(num_users=12, num_items=400, dim=4, seed=3, max_interactions=100)
    runners = {k: FederatedRunner(data, Config(method=method, tiers=tiers, dim=8,
                                               clients_per_round=4, local_epochs=2, batch_size=32,
                                               lr=0.01, negative_sampling=sampling, seed=1,
                                               local_kernel=k))
               for k in ("autograd", "fused")}
    calls = []
    monkeypatch.setattr(fused, "train", lambda *a, **k: calls.append(1) or train(*a, **k))
    start = {k: v.clone() for k, v in runners["fused"].tables.items()}
    for runner in runners.values():
        runner.run_round()
    assert len(calls) == 4  # every client of the fused runner, none of the autograd one
    for name, table in runners["autograd"].tables.items():
        other = runners["fused"].tables[name]
        moved = (table - start[name]).norm()
        assert moved > 0
        # float32: the loops agree to rounding (float64 tests above: 1e-8), but a head weight
        # whose gradient is near zero (a ReLU unit that rarely fires) takes Adam steps of
        # lr x sign(rounding noise), which reach the tables: 0.4% of their change here.
        assert (other - table).norm() < 1e-2 * moved, name


def test_rounds_beyond_the_step_counter_are_refused(monkeypatch):
    model = _model("mf", 30, 4, "dense", torch.float32, seed=1)
    monkeypatch.setitem(fused.MAX_STEPS, np.dtype(np.float32), 3)
    order = torch.arange(20)
    with pytest.raises(ValueError, match="more than 3 steps in float32"):
        fused.train(model, [(order, order[:, None])], 5, "bpr", 0.0, 1e-3)


@pytest.mark.parametrize("memory,fused_runs", [(4096, False), (DEFERRED_MIN_ENTRIES, True)])
def test_auto_kernel_keeps_small_tables_in_the_leaner_autograd_loop(monkeypatch, memory,
                                                                     fused_runs):
    calls = []
    monkeypatch.setattr(fused, "train", lambda *a, **k: calls.append(1) or train(*a, **k))
    cfg = Config(arch="neumf", dim=4, local_epochs=1, batch_size=8, lr=0.01)
    assert cfg.local_kernel == "auto"
    model = _model("neumf", 100, 4, (memory, 1, True), torch.float32, seed=2)
    train_client(cfg, torch.arange(0, 100, 7), 100, model, torch.Generator().manual_seed(0))
    assert bool(calls) == fused_runs
