"""FAIR over Flower (fastfair.fl.flower) against the in-process runner on the same seeds.

Most tests drive the strategy and the client app through a loopback Grid (every message handed
to the ClientApp in this process, one Context per node), which is fast; one test runs Flower's
simulation engine (Ray) end to end. Skipped when the optional extra is not installed.
"""
import math

import pytest
import torch

flower = pytest.importorskip(
    "fastfair.fl.flower", reason="Flower is not installed (pip install 'fastfair[flower]')",
    exc_type=ImportError)

from flwr.app import ArrayRecord, Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fastfair.fl.data import synthetic  # noqa: E402
from fastfair.fl.runner import Config, FederatedRunner  # noqa: E402

FIRST_NODE = 1000


class LoopbackGrid(Grid):
    """Delivers each message to ``app`` at once, node ``FIRST_NODE + u`` holding user ``u``.
    ``tamper(message, reply)`` may replace a reply before the server sees it."""

    def __init__(self, app, users, tamper=None):
        # Messages take their run id from the process's task identity, which Flower's runtime
        # sets; nothing sets it in a bare test process.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.app, self.tamper = app, tamper
        self.contexts = {FIRST_NODE + u: Context(run_id=1, node_id=FIRST_NODE + u,
                                                 node_config={"partition-id": u},
                                                 state=RecordDict(), run_config={})
                         for u in range(users)}
        self.sent = []

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message)
            context = self.contexts[message.metadata.dst_node_id]
            reply = self.app(message, context)
            if self.tamper is not None:
                reply = self.tamper(message, reply)
            replies.append(reply)
        return replies


@pytest.fixture(scope="module")
def data():
    return synthetic(num_users=16, num_items=200, max_interactions=60, seed=0)


def _config(**kwargs):
    base = dict(method="fair", tiers="2:0-3", clients_per_round=4, rounds=2, eval_every=1,
                lr=0.05, local_epochs=2)
    base.update(kwargs)
    return Config(**base)


def _loopback(data, cfg, tamper=None):
    strategy = flower.FairStrategy(data, cfg)
    device = flower.Device(data, cfg)
    grid = LoopbackGrid(flower.make_client_app(lambda _: device), data.num_users, tamper)
    strategy.start_run(grid)
    return strategy, grid


def _in_process(data, cfg):
    runner = FederatedRunner(data, cfg)
    records = []
    for r in range(1, cfg.rounds + 1):
        stats = runner.run_round()
        if r % cfg.eval_every == 0 or r == cfg.rounds:
            records.append({"method": cfg.method, "tiers": cfg.tiers, **stats,
                            **runner.evaluate(), "totals": dict(runner.totals)})
    return runner, records


def _assert_same_records(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        for key, value in a.items():
            if key == "seconds":  # wall time
                continue
            if isinstance(value, float) and key.endswith(tuple(f"@{k}" for k in range(1, 100))):
                # Federated evaluation sums the users' float64 metrics in another order.
                assert b[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
            elif isinstance(value, float) and math.isnan(value):
                assert math.isnan(b[key]), key
            else:
                assert b[key] == value, key


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(method="fedhm", tiers="2:0-1"),
    dict(method="heterofl", tiers="2:0-1"),
    dict(method="fair-inconsistent"),
    dict(arch="mf", tiers="2:0-1-3", dropout=0.3, optimizer_state="persistent",
         aggregation="delta", rounds=3, eval_every=2),
    dict(compressor="actions", ratio=0.25, rounds=3),
    dict(compressor="topk", ratio=0.1),
    dict(refit_epochs=10, refit_sample=5, refit_lr=0.05, user_step=0.5, rounds=3),
    dict(full_table="hashed", aggregation="delta"),
    # every round's seed must reach the nodes: a node hashing with another gives other tables
    dict(subspace="round", aggregation="delta", rounds=3),
    dict(tiers="2:0-1-3", subspace="round", aggregation="nested", rounds=3),
], ids=["fair", "fedhm", "heterofl", "fair-inconsistent", "mf-dropout-persistent-delta",
        "actions", "topk", "refit-user-step", "hashed-full", "round-subspace", "nested"])
def test_loopback_equals_in_process(data, kwargs):
    cfg = _config(**kwargs)
    runner, expected = _in_process(data, cfg)
    strategy, grid = _loopback(data, cfg)
    _assert_same_records(expected, strategy.records)
    for name, table in runner.tables.items():
        assert torch.equal(strategy.runner.tables[name], table), name
    if runner.head is not None:
        for key, value in runner.head.state_dict().items():
            assert torch.equal(strategy.runner.head.state_dict()[key], value), key
    # The metrics must be able to tell models apart: some user's item ranks in the top 10.
    assert max(r["hr@10"] for r in strategy.records) > 0
    if cfg.method == "fair" and cfg.tiers == "2:0-3":
        # Downloads differ in shape between tiers: what the stock FedAvg cannot average.
        shapes = {tuple(m.content["download"]["item_gmf.weight"].shape) for m in grid.sent
                  if m.metadata.message_type == "train"}
        assert len(shapes) == 2


def test_compressed_uploads_carry_no_item_table(data):
    cfg = _config(compressor="actions", ratio=0.25, rounds=1)
    replies = []

    def keep(message, reply):
        if message.metadata.message_type == "train":
            replies.append(reply)
        return reply

    strategy, _ = _loopback(data, cfg, keep)
    assert replies
    for reply in replies:
        assert not any(k.startswith("item_") for k in reply.content["update"])
        sent = sum(a.numpy().nbytes for a in reply.content["encoded"].values())
        assert sent * 8 <= reply.content["sent"]["bits_int32"]
    assert strategy.rounds[0]["upload_ratio"] < 0.5


def test_client_state_stays_on_the_node(data):
    cfg = _config(arch="neumf", rounds=2)
    strategy, grid = _loopback(data, cfg)
    trained = {m.content["task"]["user"] for m in grid.sent
               if m.metadata.message_type == "train"}
    for node, context in grid.contexts.items():
        user = node - FIRST_NODE
        assert ("fastfair.user-vectors" in context.state) == (user in trained)
    for message in grid.sent:
        assert not any(k.startswith("user_") for r in message.content.values()
                       if isinstance(r, ArrayRecord) for k in r)
    # The server's copy of the user vectors is never written: it is not the clients'.
    untouched = FederatedRunner(data, cfg).user_vectors
    for name, vectors in strategy.runner.user_vectors.items():
        assert torch.equal(vectors, untouched[name])


def test_a_failed_node_is_a_rejected_update(data):
    cfg = _config(rounds=1)
    failing = {}

    def fail_first(message, reply):
        if message.metadata.message_type == "train" and not failing:
            failing["user"] = message.content["task"]["user"]
            return Message(_error("device out of battery"), reply_to=message)
        return reply

    strategy, _ = _loopback(data, cfg, fail_first)
    stats = strategy.rounds[0]
    assert stats["rejected"] == 1
    assert f"client {failing['user']}: no usable reply: node error: device out of battery" \
        in stats["rejections"]
    assert math.isnan(stats["loss"])


def _error(reason):
    from flwr.app import Error
    return Error(code=0, reason=reason)


@pytest.mark.parametrize("corrupt", ["shape", "nan", "missing"])
def test_a_bad_update_is_rejected_with_its_reason(data, corrupt):
    cfg = _config(rounds=1)
    hit = {}

    def damage(message, reply):
        if message.metadata.message_type != "train" or hit:
            return reply
        hit["user"] = message.content["task"]["user"]
        update = reply.content["update"].to_torch_state_dict()
        key = "item_gmf.weight"
        if corrupt == "shape":
            update[key] = update[key][:-1].clone()
        elif corrupt == "nan":
            update[key] = update[key].clone()
            update[key][0] = float("nan")
        else:
            del update[key]
        reply.content["update"] = ArrayRecord(update)
        return reply

    strategy, _ = _loopback(data, cfg, damage)
    stats = strategy.rounds[0]
    assert stats["rejected"] == 1
    (reason,) = stats["rejections"]
    assert reason.startswith(f"client {hit['user']}: ")
    assert {"shape": "has shape", "nan": "NaN", "missing": "missing"}[corrupt] in reason


def test_an_undecodable_upload_is_rejected(data):
    cfg = _config(compressor="actions", ratio=0.25, rounds=1)
    hit = {}

    def damage(message, reply):
        if message.metadata.message_type != "train" or hit:
            return reply
        hit["user"] = message.content["task"]["user"]
        parts = reply.content["encoded"].to_torch_state_dict()
        key = next(k for k in parts if k.endswith("|bitmap"))
        parts[key] = parts[key][:-1].clone()
        reply.content["encoded"] = ArrayRecord(parts)
        return reply

    strategy, _ = _loopback(data, cfg, damage)
    (reason,) = strategy.rounds[0]["rejections"]
    # the server's update check decodes the payload and names what is wrong with it
    assert reason.startswith(f"client {hit['user']}: item_gmf.weight: payload cannot be decoded: "
                             "packed has")


def test_a_node_that_trains_from_another_random_state_is_rejected(data):
    cfg = _config(rounds=1)

    def reseed(message, reply):
        if message.metadata.message_type == "train":
            reply.content["rng"] = ArrayRecord({"state": torch.Generator().manual_seed(5)
                                                .get_state()})
        return reply

    strategy, _ = _loopback(data, cfg, reseed)
    stats = strategy.rounds[0]
    assert stats["rejected"] == 4
    assert all("trained from another random state" in r for r in stats["rejections"])


def test_a_message_for_another_user_is_refused(data):
    cfg = _config()
    device = flower.Device(data, cfg)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    message = Message(RecordDict({"task": flower.ConfigRecord({"user": 3})}), dst_node_id=7,
                      message_type="evaluate")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 4}, state=RecordDict(),
                      run_config={})
    with pytest.raises(ValueError, match="user 3 reached the node of user 4"):
        device.evaluate(message, context)
    for bad in ({}, {"partition-id": 16}, {"partition-id": "4"}):
        context = Context(run_id=1, node_id=7, node_config=bad, state=RecordDict(),
                          run_config={})
        with pytest.raises(ValueError, match="partition-id"):
            device.user(context)


def test_server_runner_is_driven_by_plan_and_finish(data):
    runner = flower.ServerRunner(data, _config())
    with pytest.raises(RuntimeError, match="plan_round"):
        runner.run_round()
    with pytest.raises(RuntimeError, match="plan_round first"):
        runner.finish_round({})
    with pytest.raises(RuntimeError, match="federated"):
        runner.evaluate()
    plan = runner.plan_round()
    assert len(plan) == 4
    with pytest.raises(RuntimeError, match="twice"):
        runner.plan_round()
    stranger = next(u for u in range(data.num_users) if u not in plan)
    with pytest.raises(ValueError, match=f"clients \\[{stranger}\\]"):
        runner.finish_round({stranger: flower.Reply(error="x")})
    # No reply at all: every planned client is rejected, the model is unchanged.
    before = {k: v.clone() for k, v in runner.tables.items()}
    stats = runner.finish_round({})
    assert stats["rejected"] == 4 and all("no reply" in r for r in stats["rejections"])
    for name, table in before.items():
        assert torch.equal(runner.tables[name], table)


def test_strategy_arguments_are_checked(data):
    with pytest.raises(ValueError, match="connect_timeout"):
        flower.FairStrategy(data, _config(), connect_timeout=0)
    with pytest.raises(TypeError, match="on_eval"):
        flower.FairStrategy(data, _config(), on_eval=3)
    with pytest.raises(ValueError, match="threads"):
        flower.Device(data, _config(), threads=0)
    with pytest.raises(ValueError, match="client_cpus=4 is more than num_cpus=2"):
        flower.simulate(data, _config(), num_cpus=2, client_cpus=4)


def test_run_config():
    data, cfg = flower.config_from_run_config({
        "users": 12, "items": 200, "data-seed": 1, "max-interactions": 50, "method": "fedhm",
        "clients-per-round": 3, "ks": "5,10", "lr": 0.1})
    assert data.num_users == 12 and data.num_items == 200
    assert (cfg.method, cfg.clients_per_round, cfg.ks, cfg.lr) == ("fedhm", 3, (5, 10), 0.1)
    with pytest.raises(ValueError, match="unknown run-config key 'round'"):
        flower.config_from_run_config({"round": 3})
    with pytest.raises(ValueError, match="method must be one of"):
        flower.config_from_run_config({"users": 12, "items": 200, "max-interactions": 50,
                                       "method": "fedsgd"})


def test_simulation_engine_equals_in_process(data):
    pytest.importorskip("ray", reason="Flower's simulation engine needs ray "
                        "(pip install 'flwr[simulation]')")
    cfg = _config(clients_per_round=4, rounds=2)
    runner, expected = _in_process(data, cfg)
    seen = []
    strategy = flower.simulate(data, cfg, num_cpus=2, client_cpus=1, on_eval=seen.append)
    for name, table in runner.tables.items():
        assert torch.equal(strategy.runner.tables[name], table), name
    _assert_same_records(expected, strategy.records)
    assert seen == strategy.records and len(strategy.rounds) == 2
    assert len({tier for r in strategy.rounds for tier in r["by_tier"]}) == 2
    assert max(r["hr@10"] for r in strategy.records) > 0
