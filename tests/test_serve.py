"""Serving vectors (fastfair.fl.serve): sample, negatives, the fit, and the runner's use of it."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fastfair.fl import serve
from fastfair.fl.data import synthetic
from fastfair.fl.model import Head, score
from fastfair.fl.runner import Config, FederatedRunner
from testing import gen


@pytest.fixture(scope="module")
def data():
    return synthetic(num_users=40, num_items=500, dim=8, seed=3)


def _model(data, d=8, arch="neumf", seed=0):
    g = gen(seed)
    tables = {"gmf": torch.randn(data.num_items, d, generator=g),
              "mlp": torch.randn(data.num_items, d, generator=g)}
    if arch == "mf":
        return {"gmf": tables["gmf"]}, None
    torch.manual_seed(seed)
    return tables, Head(d)


@pytest.mark.parametrize("sample", [0, 1, 7])
def test_sample_is_each_users_own_distinct_items(data, sample):
    users = torch.tensor([5, 0, 17, 3])
    owner, items, rank = serve.sample_positives(data, users, sample, key=1234)
    for pos, u in enumerate(users.tolist()):
        mine = items[owner == pos]
        train = data.user_items(u)
        want = train.numel() if sample == 0 else min(sample, train.numel())
        assert mine.numel() == want
        assert torch.unique(mine).numel() == want
        assert torch.isin(mine, train).all()
        assert torch.equal(rank[owner == pos], torch.arange(want))


def test_sample_depends_on_the_key_and_not_on_the_other_users(data):
    alone = serve.sample_positives(data, torch.tensor([9]), 3, key=77)[1]
    among = serve.sample_positives(data, torch.tensor([2, 9, 30]), 3, key=77)
    assert torch.equal(alone, among[1][among[0] == 1])
    other = serve.sample_positives(data, torch.tensor([9]), 3, key=78)[1]
    assert not torch.equal(alone, other)


def test_negatives_are_in_range_redrawn_each_epoch_and_deterministic():
    keys = serve.user_keys(torch.tensor([0, 0, 1, 1]), key=5)
    rank = torch.tensor([0, 1, 0, 1])
    first = serve.negatives(keys, rank, 0, 4, 1000)
    assert first.shape == (4, 4)
    assert ((first >= 0) & (first < 1000)).all()
    assert torch.equal(first, serve.negatives(keys, rank, 0, 4, 1000))
    assert not torch.equal(first, serve.negatives(keys, rank, 1, 4, 1000))
    # Two users with the same rank draw different negatives.
    assert not torch.equal(first[0], first[2])


def _refit(data, users, tables, head, arch="neumf", loss="bpr", negs=2, epochs=30, sample=5,
           key=99, lr=0.05):
    return serve.refit(data, users, tables, head, arch=arch, loss=loss,
                       negatives_per_positive=negs, epochs=epochs, lr=lr, sample=sample, key=key)


def test_a_users_vectors_do_not_depend_on_who_else_is_refit(data):
    tables, head = _model(data)
    everyone = _refit(data, torch.arange(data.num_users), tables, head)
    some = torch.tensor([31, 4, 12])
    few = _refit(data, some, tables, head)
    for name in everyone:
        torch.testing.assert_close(few[name], everyone[name][some], rtol=1e-6, atol=1e-7)
    moved = _refit(data, some, tables, head, key=100)
    assert not torch.allclose(moved["gmf"], few["gmf"])


def _one_user_fit(data, user, tables, head, arch, loss, negs, epochs, sample, key, lr):
    """The fit of the module doc for one user, written out with its own Adam."""
    owner, items, rank = serve.sample_positives(data, torch.tensor([user]), sample, key)
    ukey = serve.user_keys(torch.tensor([user]), key).expand(items.numel())
    d = tables["gmf"].shape[1]
    p = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    q = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    params = [p] if arch == "mf" else [p, q]
    opt = torch.optim.Adam(params, lr=lr)
    t64 = {k: v.double() for k, v in tables.items()}
    h64 = None if head is None else _double_head(head)
    for epoch in range(epochs):
        neg = serve.negatives(ukey, rank, epoch, negs, data.num_items)
        terms = []
        for i, js in zip(items.tolist(), neg.tolist()):
            row = [i] + js
            s = score(arch, p, None if arch == "mf" else q, t64["gmf"][row],
                      None if arch == "mf" else t64["mlp"][row], h64)
            if loss == "bpr":
                terms.append(-F.logsigmoid(s[0] - s[1:]).mean())
            else:
                labels = torch.zeros(len(row), dtype=torch.float64)
                labels[0] = 1
                terms.append(F.binary_cross_entropy_with_logits(s, labels))
        objective = torch.stack(terms).mean()
        opt.zero_grad()
        objective.backward()
        opt.step()
    return [x.detach() for x in params]


def _double_head(head):
    twin = Head(head.mlp.in_features // 2)
    twin.load_state_dict(head.state_dict())
    return twin.double().requires_grad_(False)


@pytest.mark.parametrize("arch,loss", [("neumf", "bpr"), ("neumf", "bce"), ("mf", "bpr")])
def test_refit_is_each_users_own_adam_fit(data, arch, loss):
    tables, head = _model(data, arch=arch, seed=4)
    users = torch.tensor([1, 22, 7])
    got = _refit(data, users, tables, head, arch=arch, loss=loss, negs=3, epochs=6, sample=4)
    for pos, u in enumerate(users.tolist()):
        want = _one_user_fit(data, u, tables, head, arch, loss, 3, 6, 4, 99, 0.05)
        torch.testing.assert_close(got["gmf"][pos].double(), want[0], rtol=1e-4, atol=1e-5)
        if arch == "neumf":
            torch.testing.assert_close(got["mlp"][pos].double(), want[1], rtol=1e-4, atol=1e-5)


def test_refit_lowers_each_users_loss(data):
    tables, head = _model(data, seed=6)
    users = torch.arange(10)
    fitted = _refit(data, users, tables, head, epochs=60, sample=0)
    owner, items, rank = serve.sample_positives(data, users, 0, 99)
    neg = serve.negatives(serve.user_keys(users, 99)[owner], rank, 0, 2, data.num_items)
    rows = torch.cat([items[:, None], neg], 1)

    def per_user(vec):
        s = score("neumf", vec["gmf"][owner][:, None], vec["mlp"][owner][:, None],
                  tables["gmf"][rows], tables["mlp"][rows], head)
        terms = -F.logsigmoid(s[:, :1] - s[:, 1:]).mean(1)
        return torch.zeros(10).index_add_(0, owner, terms.detach())

    zero = {k: torch.zeros_like(v) for k, v in fitted.items()}
    assert (per_user(fitted) < per_user(zero)).all()


def test_zero_epochs_or_no_positives_give_zero_vectors(data):
    tables, head = _model(data)
    out = _refit(data, torch.tensor([0, 1]), tables, head, epochs=0)
    assert all(torch.count_nonzero(v) == 0 for v in out.values())


def _cfg(**kw):
    base = dict(dim=8, rounds=2, clients_per_round=8, local_epochs=1, lr=0.01, eval_every=1,
                tiers="2:0-3")
    base.update(kw)
    return Config(**base)


def test_serving_refit_leaves_training_alone_and_is_what_is_evaluated(data):
    plain = FederatedRunner(data, _cfg())
    served = FederatedRunner(data, _cfg(refit_epochs=20, refit_sample=6, refit_lr=0.05))
    for _ in range(2):
        plain.run_round()
        served.run_round()
        before = plain.evaluate()
        got = served.evaluate()
        assert got != before
        for name in plain.tables:
            assert torch.equal(plain.tables[name], served.tables[name])
            assert torch.equal(plain.user_vectors[name], served.user_vectors[name])
        vectors = _refit(data, torch.arange(data.num_users), served.tables, served.head,
                         negs=1, epochs=20, sample=6, lr=0.05,
                         key=serve.stream_key(0, served.round_index))
        plain.user_vectors = vectors
        assert plain.evaluate() == pytest.approx(got, abs=1e-12)
        plain.user_vectors = {k: v.clone() for k, v in served.user_vectors.items()}


def test_serving_vectors_are_redone_after_a_round_and_a_load(data):
    runner = FederatedRunner(data, _cfg(refit_epochs=5))
    runner.run_round()
    first = runner.serving_vectors()
    assert runner.serving_vectors() is first
    state = copy.deepcopy(runner.state_dict())  # like torch's, it shares the live tensors
    runner.run_round()
    assert not torch.equal(runner.serving_vectors()["gmf"], first["gmf"])
    runner.load_state_dict(state)
    assert torch.equal(runner.serving_vectors()["gmf"], first["gmf"])


def test_old_checkpoints_load_without_refit(data, tmp_path):
    runner = FederatedRunner(data, _cfg())
    state = runner.state_dict()
    for key in ("refit_epochs", "refit_lr", "refit_sample"):
        del state["config"][key]
    torch.save(state, tmp_path / "old.pt")
    loaded = FederatedRunner.load(tmp_path / "old.pt", data)
    assert dataclasses.asdict(loaded.cfg) == dataclasses.asdict(runner.cfg)
