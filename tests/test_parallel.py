"""Clients trained in a pool (fastfair.fl.parallel: threads or processes) give the sequential
round."""

import pytest
import torch

import fastfair.fl.runner as runner_module
from fastfair.fl.data import synthetic
from fastfair.fl.runner import Config, FederatedRunner
from testing import state_equal


@pytest.fixture(scope="module")
def data():
    return synthetic(num_users=40, num_items=300, dim=8, max_interactions=60, seed=2)


@pytest.fixture
def one_thread():
    # Workers train with one thread; with one here too the sums run in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(**kw):
    base = dict(dim=8, rounds=3, clients_per_round=6, local_epochs=2, lr=0.02, tiers="2:0-3",
                eval_every=1)
    base.update(kw)
    return Config(**base)


@pytest.mark.parametrize("pool", ["threads", "processes"])
@pytest.mark.parametrize("kw", [
    dict(optimizer_state="persistent", dropout=0.3, aggregation="delta", fit="energy"),
    dict(method="fedavg-full", compressor="actions", ratio=0.25, negatives=3),
    dict(method="fedhm", tiers="2:0-1", arch="mf", loss="bce"),
    dict(negative_sampling="unseen", negatives=4, user_step="data", dropout=0.3),
    dict(local_kernel="fused", negative_sampling="unseen", loss="bce", negatives=2),
], ids=["fair-persistent-dropout", "fedavg-actions", "fedhm-mf-bce", "fair-unseen-data-step",
        "fair-fused"])
def test_workers_give_the_sequential_round_bit_for_bit(data, one_thread, kw, pool):
    cfg = _cfg(**kw)
    sequential = FederatedRunner(data, cfg)
    with FederatedRunner(data, cfg, workers=2, pool=pool) as parallel:
        assert parallel.pool_kind() == pool
        for _ in range(cfg.rounds):
            a, b = sequential.run_round(), parallel.run_round()
            a.pop("seconds"), b.pop("seconds")
            assert a == b
        assert state_equal(sequential.state_dict(), parallel.state_dict())
        assert parallel.evaluate() == sequential.evaluate()


def test_a_replay_that_differs_from_the_training_is_caught(data, one_thread, monkeypatch):
    def replay_one_epoch_short(gen, positives, cfg, num_items):
        torch.randperm(positives.numel(), generator=gen)
        torch.randint(0, num_items, (positives.numel(), cfg.negatives), generator=gen)

    monkeypatch.setattr(runner_module, "replay_local_train", replay_one_epoch_short)
    for pool in ("threads", "processes"):
        with FederatedRunner(data, _cfg(), workers=2, pool=pool) as runner:
            with pytest.raises(RuntimeError, match="drew other numbers than replay_local_train"):
                runner.run_round()


def test_auto_pool_takes_threads_exactly_when_full_clients_train_fused(data):
    def kind(**kw):
        return FederatedRunner(data, _cfg(**kw), workers=2).pool_kind()

    # 300 items x 8 is below DeferredAdam's size, where "auto" runs the autograd loop.
    assert kind() == "processes"
    assert kind(local_kernel="fused") == "threads"
    assert kind(local_kernel="fused", optimizer="sgd") == "processes"
    assert kind(local_kernel="fused", optimizer_state="persistent") == "processes"
    assert kind(local_kernel="autograd") == "processes"
    big = synthetic(num_users=12, num_items=runner_module.DEFERRED_MIN_ENTRIES // 8, dim=8,
                    max_interactions=10, seed=3)
    assert FederatedRunner(big, _cfg(), workers=2).pool_kind() == "threads"
    assert FederatedRunner(data, _cfg(), workers=2, pool="threads").pool_kind() == "threads"


def test_closed_pool_restarts_and_bad_worker_counts_are_refused(data, one_thread):
    runner = FederatedRunner(data, _cfg(rounds=2), workers=2)
    runner.run_round()
    runner.close()
    assert runner._pool is None
    runner.run_round()
    runner.close()
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="workers must be a positive int"):
            FederatedRunner(data, _cfg(), workers=bad)
    with pytest.raises(ValueError, match="pool must be one of .* got 'fibers'"):
        FederatedRunner(data, _cfg(), workers=2, pool="fibers")
    threaded = FederatedRunner(data, _cfg(rounds=2, local_kernel="fused"), workers=2)
    threaded.run_round()
    threaded.close()
    assert threaded._pool is None
    threaded.run_round()
    threaded.close()
