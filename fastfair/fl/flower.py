"""FAIR over Flower (``flwr`` 1.41, Message API): a strategy, a client app, a simulation entry.

The in-process ``FederatedRunner`` stays the one implementation of a round. On the server,
``ServerRunner`` (a ``FederatedRunner``) holds the global model and does the sampling, the views,
the downloads, the update checks, the statistics and the aggregation; the clients' work is done on
Flower nodes instead of in the loop:

* ``plan_round`` draws the round's clients exactly as ``run_round`` will, builds each download
  (a dense table, a hashed array of the device's size, low-rank factors or a column slice: arrays
  of a different shape per device, which the stock FedAvg cannot average) and the state of the
  random generator each client starts its local training from;
* ``finish_round(replies)`` then runs ``FederatedRunner.run_round`` itself, with ``download`` /
  ``local_train`` / ``upload`` / ``compress`` answered from the plan and the nodes' replies, so
  the checks, the aggregation (``aggregate_uploads``: one ``fastfair.aggregate`` pass over the nested
  hashed uploads) and the byte counts are the in-process code, not a copy.

One Flower node is one device is one user (``node_config["partition-id"]``; the simulation
numbers its nodes ``0 .. num_users - 1``). A node keeps its user's private vectors, and with
``optimizer_state="persistent"`` its optimizer state, in ``Context.state``; they never leave it.
On a node, ``FederatedRunner.download`` builds the model of the device's view, the downloaded
arrays are loaded into it, and ``FederatedRunner.local_train`` / ``upload`` / ``compress`` run
unchanged. With a compressor (``actions``, ``topk``, ...) the node sends only the encoded
item-table updates (``fastfair.fl.compress.Encoded`` parts) and the head; the server decodes them.

Randomness: the in-process runner trains its clients one after another from one generator. The
server replays each planned client's draws (``runner.replay_local_train``: per epoch one
``randperm`` of its positives and one ``randint`` of negatives, as ``local_train`` makes them) to
know the generator state every client starts from, sends it, and checks that the state the node
reports after training is the replayed one, so clients train in parallel and a run equals the
in-process run on the same seeds (a node whose state differs is rejected, saying so: that is what
a change of ``local_train``'s draws would look like).

Evaluation is federated: every user with a held-out item gets the dense global tables and head,
scores its own candidates with its private vectors (the same ``fastfair.fl.metrics`` functions)
and returns its metrics; the server averages them over users. The means are the in-process
``evaluate()``'s up to the order of a float64 sum.

A node that fails or never replies, or whose reply is unusable (a missing record, an
undecodable payload), is counted as a rejected update with the reason (its loss is NaN, which
makes that round's mean loss NaN); an update that fails ``check_update`` is rejected as
in-process.

``import fastfair.fl.flower`` turns Flower's telemetry and update check and Ray's usage statistics
off unless ``FLWR_TELEMETRY_ENABLED``, ``FLWR_DISABLE_UPDATE_CHECK`` or
``RAY_USAGE_STATS_ENABLED`` are already set (Flower reads them when it is imported).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import time
from typing import Callable, Optional

for _name, _value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                      ("RAY_USAGE_STATS_ENABLED", "0")):
    os.environ.setdefault(_name, _value)

try:
    from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord,
                          RecordDict)
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import Strategy
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "fastfair.fl.flower needs Flower: pip install 'fastfair[flower]' (flwr 1.41; its "
        "simulation engine also needs ray: 'flwr[simulation]')") from err

import torch
from torch import Tensor

from . import metrics, serve
from .compress import Encoded, Received
from .data import DATASETS, InteractionData, load_dataset
from .model import Head, score, score_all_items
from .runner import ClientView, Config, FederatedRunner

log = logging.getLogger("fastfair.flower")

# Record names inside messages and a node's Context.state.
DOWNLOAD, RNG, TASK, UPDATE, ENCODED, ENCODED_META, SENT, RESULT = (
    "download", "rng", "task", "update", "encoded", "encoded-meta", "sent", "result")
GLOBAL, METRICS = "global", "metrics"
STATE_VECTORS, STATE_OPTIMIZER = "fastfair.user-vectors", "fastfair.optimizer"
PARTITION_KEY = "partition-id"
# Run-config keys that choose the data (the rest are ``Config`` fields, "-" for "_").
DATA_KEYS = ("dataset", "data-dir", "users", "items", "data-seed", "max-interactions")


def _as_sent(update: dict) -> dict:
    """Tensors as they go into a message: detached, contiguous."""
    return {k: v.detach().contiguous() for k, v in update.items()}


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Task:
    """One planned client of a round: its view, the model it downloads (built on the server,
    which also gives the downloaded arrays) and its generator states before and after training."""

    client: int
    view: ClientView
    model: torch.nn.Module
    download: dict
    rng_start: Tensor
    rng_end: Tensor


@dataclasses.dataclass
class Reply:
    """What came back from one client: the update as the server aggregates it (decoded when
    compressed), its loss and payload accounting; or ``error`` when nothing usable came."""

    update: Optional[dict] = None
    loss: float = math.nan
    sent: Optional[dict] = None
    error: Optional[str] = None


class _NoUpdate:
    """Stands for the update of a client whose reply never came or was unusable."""

    def __init__(self, reason: str):
        self.reason = reason


class ServerRunner(FederatedRunner):
    """``FederatedRunner`` whose clients train elsewhere: ``plan_round()`` then
    ``finish_round(replies)`` is one ``run_round()`` (see the module doc)."""

    def __init__(self, data: InteractionData, config: Config):
        super().__init__(data, config)
        self._plan: Optional[dict] = None
        self._replies: Optional[dict] = None

    def plan_round(self) -> dict:
        """``{client: Task}`` for the clients of the next round that do not drop out."""
        if self._plan is not None:
            raise RuntimeError("plan_round called twice without finish_round")
        plan = {client: Task(client, view, model,
                             _as_sent(FederatedRunner.upload(self, client, model, view)),
                             start, end)
                for client, view, model, start, end in self.plan_clients()}
        self._plan = plan
        return plan

    def finish_round(self, replies: dict) -> dict:
        """Run the planned round with ``replies`` (``{client: Reply}``; a planned client missing
        from it never replied); returns ``run_round``'s statistics."""
        if self._plan is None:
            raise RuntimeError("finish_round needs plan_round first")
        unknown = sorted(set(replies) - set(self._plan))
        if unknown:
            raise ValueError(f"replies from clients {unknown}, which were not planned this round")
        self._replies = replies
        try:
            return FederatedRunner.run_round(self)
        finally:
            self._plan = self._replies = None

    def run_round(self) -> dict:
        raise RuntimeError("a ServerRunner's clients train on Flower nodes: use plan_round() "
                           "and finish_round(replies), or FairStrategy")

    def evaluate(self) -> dict:
        raise RuntimeError("the server holds no user vectors: evaluation is federated "
                           "(FairStrategy.configure_evaluate)")

    # run_round's per-client steps, answered from the plan and the replies.
    def _task(self, client: int) -> Task:
        if self._plan is None or client not in self._plan:
            raise RuntimeError(f"client {client} is not in the round's plan: plan_round's "
                               "sampling no longer matches FederatedRunner.run_round")
        return self._plan[client]

    def download(self, client: int, view: ClientView):
        return self._task(client).model

    def local_train(self, client: int, model, gen: torch.Generator) -> float:
        task = self._task(client)
        if not torch.equal(gen.get_state(), task.rng_start):
            raise RuntimeError(f"client {client} would start from another generator state than "
                               "the one planned: plan_round no longer matches run_round")
        gen.set_state(task.rng_end)
        reply = self._replies.get(client)
        return reply.loss if reply is not None else math.nan

    def upload(self, client: int, model, view: ClientView):
        reply = self._replies.get(client)
        if reply is None:
            return _NoUpdate("no reply")
        if reply.error is not None:
            return _NoUpdate(reply.error)
        return reply.update

    def check_update(self, update, view: ClientView) -> Optional[str]:
        if isinstance(update, _NoUpdate):
            return f"no usable reply: {update.reason}"
        return super().check_update(update, view)

    def compress(self, client: int, update: dict, start: dict, view: ClientView) -> tuple:
        return update, dict(self._replies[client].sent)


def _global_arrays(runner: FederatedRunner) -> ArrayRecord:
    """The dense global tables (``gmf``, ``mlp``) and the head (``head.*``)."""
    state = {name: t for name, t in runner.tables.items()}
    if runner.head is not None:
        state.update({f"head.{k}": v for k, v in runner.head.state_dict().items()})
    return ArrayRecord(_as_sent(state))


def _scalars(stats: dict) -> dict:
    return {k: float(v) for k, v in stats.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _encoded_from(content: RecordDict) -> dict:
    """``{table key: Encoded}`` from a reply's ``encoded`` arrays and ``encoded-meta`` config."""
    meta, parts = content[ENCODED_META], content[ENCODED].to_torch_state_dict()
    out = {}
    for name in meta:
        key, field = name.rsplit("|", 1)
        if field != "kind":
            continue
        enc_parts = {p.rsplit("|", 1)[1]: t for p, t in parts.items()
                     if p.rsplit("|", 1)[0] == key}
        out[key] = Encoded(str(meta[name]), int(meta[f"{key}|rows"]), int(meta[f"{key}|dim"]),
                           enc_parts, int(meta[f"{key}|bits"]), int(meta[f"{key}|bits_int32"]),
                           int(meta[f"{key}|size"]), float(meta[f"{key}|error"]))
    return out


class FairStrategy(Strategy):
    """Runs ``config`` on ``data`` with Flower: FAIR and the baselines with devices of different
    table sizes, uncompressed or with an upload compressor.

    ``records``: one record per evaluation, as ``fastfair.fl.runner.train`` returns them (round
    statistics, metrics, running totals) plus ``eval_seconds``; ``rounds``: every round's
    statistics, whose ``seconds`` is the round's wall time with the nodes' training and the
    messages. ``on_eval`` is
    called with each record. ``connect_timeout``: seconds to wait for every user's node.
    """

    def __init__(self, data: InteractionData, config: Config, *,
                 on_eval: Optional[Callable[[dict], None]] = None,
                 connect_timeout: float = 600.0):
        if not (isinstance(connect_timeout, (int, float)) and connect_timeout > 0):
            raise ValueError(f"connect_timeout must be a positive number of seconds, got "
                             f"{connect_timeout!r}")
        if on_eval is not None and not callable(on_eval):
            raise TypeError(f"on_eval must be callable, got {type(on_eval).__name__}")
        self.runner = ServerRunner(data, config)
        self.data, self.cfg = data, config
        self.on_eval, self.connect_timeout = on_eval, float(connect_timeout)
        self.node_of: Optional[dict] = None
        self.records: list = []
        self.rounds: list = []
        self._user_of_node: dict = {}
        self._started = self._eval_started = 0.0

    def summary(self) -> None:
        cfg = self.cfg
        log.info("FairStrategy: method %s, tiers %s, %d clients per round, %d rounds, "
                 "compressor %s", cfg.method, cfg.tiers, cfg.clients_per_round, cfg.rounds,
                 cfg.compressor)

    # --------------------------------------------------------------- nodes
    def connect(self, grid: Grid) -> None:
        """Wait for one node per user and learn which node holds which user."""
        need = self.data.num_users
        deadline = time.monotonic() + self.connect_timeout
        while len(nodes := list(grid.get_node_ids())) < need:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} Flower nodes connected in "
                                   f"{self.connect_timeout:g} s; {need} needed (one per user)")
            time.sleep(0.1)
        replies = grid.send_and_receive(
            [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
             for node in nodes], timeout=self.connect_timeout)
        node_of = {}
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed to say its user: "
                                   f"{reply.error.reason}")
            user = int(reply.content[TASK]["user"])
            if user in node_of:
                raise ValueError(f"nodes {node_of[user]} and {reply.metadata.src_node_id} both "
                                 f"hold user {user}")
            node_of[user] = reply.metadata.src_node_id
        missing = sorted(set(range(need)) - set(node_of))
        if missing:
            more = " ..." if len(missing) > 10 else ""
            raise ValueError(f"no node holds users {missing[:10]}{more} (each node's "
                             f"node_config {PARTITION_KEY!r} names its user)")
        self.node_of = node_of
        self._user_of_node = {node: user for user, node in node_of.items()}

    # --------------------------------------------------------------- training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list:
        if self.node_of is None:
            self.connect(grid)
        self._started = time.perf_counter()
        plan = self.runner.plan_round()
        return [Message(RecordDict({
                    DOWNLOAD: ArrayRecord(task.download),
                    RNG: ArrayRecord({"state": task.rng_start}),
                    TASK: ConfigRecord({"user": client, "round": self.runner.round_index})}),
                dst_node_id=self.node_of[client], message_type=MessageType.TRAIN,
                group_id=str(server_round))
                for client, task in plan.items()]

    def _parse(self, reply: Message, plan: dict) -> tuple:
        user = self._user_of_node.get(reply.metadata.src_node_id)
        if user not in plan:
            raise ValueError(f"a reply from node {reply.metadata.src_node_id}, whose user "
                             f"{user} was not asked to train")
        if reply.has_error():
            return user, Reply(error=f"node error: {reply.error.reason}")
        task = plan[user]
        try:
            return user, self._reply(reply.content, task)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
            return user, Reply(error=f"unusable reply: {err}")

    @staticmethod
    def _reply(content: RecordDict, task: Task) -> Reply:
        end = content[RNG].to_torch_state_dict()["state"]
        if not torch.equal(end, task.rng_end):
            raise ValueError("the node trained from another random state than the server "
                             "replayed (replay_local_train no longer matches "
                             "FederatedRunner.local_train, or the node runs another fastfair)")
        loss = float(content[RESULT]["loss"])
        update = content[UPDATE].to_torch_state_dict()
        sent = None
        if ENCODED in content:
            sent = {k: (v if isinstance(v, bool) else float(v) if k == "error" else int(v))
                    for k, v in content[SENT].items()}
            for key, enc in _encoded_from(content).items():
                update[key] = Received(task.download[key], enc)
        return Reply(update=update, loss=loss, sent=sent)

    def aggregate_train(self, server_round: int, replies) -> tuple:
        plan = self.runner._plan
        parsed = dict(self._parse(reply, plan) for reply in replies)
        stats = self.runner.finish_round(parsed)
        # The round's wall time, the nodes' training and the messages included.
        stats["seconds"] = time.perf_counter() - self._started
        self.rounds.append(stats)
        return _global_arrays(self.runner), MetricRecord(_scalars(stats))

    # --------------------------------------------------------------- evaluation
    def _evaluates(self, server_round: int) -> bool:
        return server_round % self.cfg.eval_every == 0 or server_round == self.cfg.rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> list:
        if not self._evaluates(server_round):
            return []
        self._eval_started = time.perf_counter()
        model = _global_arrays(self.runner)
        return [Message(RecordDict({GLOBAL: model,
                                    TASK: ConfigRecord({"user": user, "round": server_round})}),
                        dst_node_id=self.node_of[user], message_type=MessageType.EVALUATE,
                        group_id=str(server_round))
                for user in self.data.test_users().tolist()]

    def aggregate_evaluate(self, server_round: int, replies) -> Optional[MetricRecord]:
        if not self._evaluates(server_round):
            return None
        sums: dict = {}
        users, failed = 0, []
        for reply in replies:
            if reply.has_error():
                failed.append(self._user_of_node.get(reply.metadata.src_node_id))
                continue
            m = reply.content[METRICS]
            n = int(m["users"])
            if n == 0:
                continue
            users += n
            for k, v in m.items():
                if k != "users":
                    sums[k] = sums.get(k, 0.0) + float(v) * n
        result = {k: (v / users if users else math.nan) for k, v in sums.items()}
        result["users"] = users
        record = {"method": self.cfg.method, "tiers": self.cfg.tiers, **self.rounds[-1],
                  **result, "totals": dict(self.runner.totals),
                  "eval_seconds": time.perf_counter() - self._eval_started}
        if failed:
            record["eval_failed"] = sorted(u for u in failed if u is not None)
        self.records.append(record)
        if self.on_eval is not None:
            self.on_eval(record)
        return MetricRecord({k: float(v) for k, v in result.items()})

    def start_run(self, grid: Grid, timeout: float = 3600.0):
        """``Strategy.start`` for ``cfg.rounds`` rounds from the runner's initial model."""
        return self.start(grid, _global_arrays(self.runner), num_rounds=self.cfg.rounds,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------

def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


class Device:
    """The client side: one ``FederatedRunner`` per process, built from the same data and config
    as the server's (it gives the views, the model structure, the initial user vectors, local
    training, uploads and compression); a node's own state lives in its ``Context``."""

    def __init__(self, data: InteractionData, config: Config, threads: Optional[int] = None):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.data, self.cfg, self.threads = data, config, threads
        self._runner: Optional[FederatedRunner] = None

    @property
    def runner(self) -> FederatedRunner:
        if self._runner is None:
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            self._runner = FederatedRunner(self.data, self.cfg)
        return self._runner

    def user(self, context: Context) -> int:
        value = context.node_config.get(PARTITION_KEY)
        if isinstance(value, bool) or not isinstance(value, int) \
                or not 0 <= value < self.data.num_users:
            raise ValueError(f"node_config[{PARTITION_KEY!r}] must be a user id in "
                             f"[0, {self.data.num_users}), got {value!r}")
        return value

    def _checked_user(self, msg: Message, context: Context) -> int:
        user = self.user(context)
        asked = int(msg.content[TASK]["user"])
        if asked != user:
            raise ValueError(f"a message for user {asked} reached the node of user {user}")
        return user

    def _vectors(self, context: Context, user: int) -> dict:
        if STATE_VECTORS in context.state:
            return context.state[STATE_VECTORS].to_torch_state_dict()
        # First contact: the same initial vector the in-process runner draws for this user.
        return {name: v[user].clone() for name, v in self.runner.user_vectors.items()}

    def query(self, msg: Message, context: Context) -> Message:
        return Message(RecordDict({TASK: ConfigRecord({"user": self.user(context)})}),
                       reply_to=msg)

    def train(self, msg: Message, context: Context) -> Message:
        runner, cfg = self.runner, self.cfg
        user = self._checked_user(msg, context)
        # The server's round: a per-round subspace's seed and compress()'s k-means seeds
        # depend on it, not on this runner's own count.
        runner.round_index = int(msg.content[TASK]["round"])
        view = runner.view(user)
        model = runner.download(user, view)  # the structure; its tables are replaced below
        received = msg.content[DOWNLOAD].to_torch_state_dict()
        reason = runner.check_update(received, view)
        if reason is not None:
            raise ValueError(f"user {user}: bad download: {reason}")
        params = dict(model.named_parameters())
        vectors = self._vectors(context, user)
        with torch.no_grad():
            for key, value in received.items():
                params[key].copy_(value)
            for name, value in vectors.items():
                params[f"user_{name}"].copy_(value)
        if cfg.optimizer_state == "persistent" and STATE_OPTIMIZER in context.state:
            runner.optimizer_states[user] = _from_bytes(
                context.state[STATE_OPTIMIZER]["state"])
        start = ({k: v.detach().clone() for k, v in model.named_parameters()
                  if k.startswith("item_")} if runner.compressor is not None else None)
        gen = torch.Generator()
        gen.set_state(msg.content[RNG].to_torch_state_dict()["state"])
        loss = runner.local_train(user, model, gen)
        context.state[STATE_VECTORS] = ArrayRecord(_as_sent(
            runner.kept_user_vectors(vectors, model)))
        if cfg.optimizer_state == "persistent":
            context.state[STATE_OPTIMIZER] = ConfigRecord(
                {"state": _to_bytes(runner.optimizer_states.pop(user))})
        update = runner.upload(user, model, view)
        content = RecordDict({RNG: ArrayRecord({"state": gen.get_state()}),
                              RESULT: MetricRecord({"loss": float(loss)})})
        if runner.compressor is not None and runner.check_update(update, view) is None:
            content.update(self._compressed(runner, user, update, start, view))
        else:
            content[UPDATE] = ArrayRecord(_as_sent(update))
        return Message(content, reply_to=msg)

    @staticmethod
    def _compressed(runner: FederatedRunner, user: int, update: dict, start: dict,
                    view: ClientView) -> dict:
        received, sent = runner.compress(user, update, start, view)
        parts, meta = {}, {}
        for key in start:
            enc = received[key].enc
            parts.update({f"{key}|{p}": t for p, t in enc.parts.items()})
            meta.update({f"{key}|kind": enc.kind, f"{key}|rows": enc.rows,
                         f"{key}|dim": enc.dim, f"{key}|bits": enc.bits,
                         f"{key}|bits_int32": enc.bits_int32, f"{key}|size": enc.size,
                         f"{key}|error": float(enc.error)})
        head = {k: v for k, v in update.items() if not k.startswith("item_")}
        return {UPDATE: ArrayRecord(_as_sent(head)), ENCODED: ArrayRecord(_as_sent(parts)),
                ENCODED_META: ConfigRecord(meta),
                SENT: ConfigRecord({k: (v if isinstance(v, bool) else float(v))
                                    for k, v in sent.items() if v is not None})}

    @torch.no_grad()
    def evaluate(self, msg: Message, context: Context) -> Message:
        user = self._checked_user(msg, context)
        state = msg.content[GLOBAL].to_torch_state_dict()
        head = None
        if self.cfg.arch == "neumf":
            head = Head(self.cfg.dim)
            head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        result = user_metrics(self.data, self.cfg, user, self._vectors(context, user),
                              {k: v for k, v in state.items() if not k.startswith("head.")},
                              head, round_index=int(msg.content[TASK].get("round", 0)))
        return Message(RecordDict({METRICS: MetricRecord(
            {k: float(v) for k, v in result.items()})}), reply_to=msg)


def user_metrics(data: InteractionData, cfg: Config, user: int, vectors: dict, tables: dict,
                 head: Optional[Head], round_index: int = 0) -> dict:
    """``FederatedRunner.evaluate``'s metrics for one user: its vectors ``vectors`` (``gmf``,
    ``mlp``) against the global ``tables`` and ``head``, on the data's test protocol. With
    ``cfg.refit_epochs`` the device first refits its serving vectors to the global model as
    the runner does after ``round_index`` rounds (``fastfair.fl.serve``)."""
    users = torch.tensor([user])
    arch, ks = cfg.arch, tuple(cfg.ks)
    if cfg.refit_epochs:
        vectors = {k: v[0] for k, v in
                   serve.refit_with(cfg, data, users, tables, head, round_index).items()}
    gmf = vectors["gmf"][None]
    mlp = vectors["mlp"][None] if arch == "neumf" else None
    if data.protocol == "loo":
        def rows(_, items):
            if arch == "mf":
                return score("mf", gmf[:, None], None, tables["gmf"][items], None, None)
            return score("neumf", gmf[:, None], mlp[:, None], tables["gmf"][items],
                         tables["mlp"][items], head)
        return metrics.sampled_metrics(rows, users, data.test_items[users],
                                       data.test_negatives[users], ks=ks)
    return metrics.full_ranking_metrics(
        lambda _: score_all_items(arch, gmf, mlp, tables["gmf"], tables.get("mlp"), head),
        users, data.train_indptr, data.train_items, data.test_indptr, data.test_items,
        data.num_items, ks=ks)


def make_client_app(device: Callable[[Context], Device]) -> ClientApp:
    """A ``ClientApp`` whose train / evaluate / query handlers run on ``device(context)``."""
    app = ClientApp()

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return device(context).query(msg, context)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return device(context).train(msg, context)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return device(context).evaluate(msg, context)

    return app


def make_server_app(strategy: Callable[[Context], FairStrategy],
                    timeout: float = 3600.0) -> ServerApp:
    """A ``ServerApp`` running ``strategy(context)`` for its config's rounds."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        strategy(context).start_run(grid, timeout=timeout)

    return app


# ---------------------------------------------------------------------------------------------
# Deployment: apps configured by the run config (``flwr run`` / SuperLink + SuperNodes)
# ---------------------------------------------------------------------------------------------

def config_from_run_config(run_config: dict) -> tuple:
    """``(data, Config)`` from a Flower run config: ``dataset`` (default ``synthetic``),
    ``data-dir``, and for synthetic data ``users``, ``items``, ``data-seed``,
    ``max-interactions``; every other key is a ``Config`` field with ``-`` for ``_``
    (``clients-per-round = 10``; ``ks`` as an int or ``"10,20"``)."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values, data_args = {}, {}
    for key, value in dict(run_config).items():
        if key in DATA_KEYS:
            data_args[key] = value
            continue
        name = key.replace("-", "_")
        if name not in fields:
            raise ValueError(f"unknown run-config key {key!r}: neither a data key {DATA_KEYS} "
                             "nor a fastfair Config field")
        if name == "ks":
            value = tuple(int(k) for k in str(value).split(",")) if isinstance(value, str) \
                else (value,) if isinstance(value, int) else tuple(value)
        values[name] = value
    dataset = str(data_args.pop("dataset", "synthetic"))
    data_dir = data_args.pop("data-dir", None) or None
    key = dataset.strip().lower()
    if key in DATASETS and DATASETS[key][1] is None:
        kwargs = {name: int(data_args[k]) for k, name in (
            ("users", "num_users"), ("items", "num_items"), ("data-seed", "seed"),
            ("max-interactions", "max_interactions")) if k in data_args}
        data = load_dataset(dataset, data_dir, **kwargs)
    else:
        if data_args:
            raise ValueError(f"{sorted(data_args)}: only for the synthetic dataset, not "
                             f"{dataset!r}")
        data = load_dataset(dataset, data_dir)
    config = Config(**values)
    config.check(data)
    return data, config


def _cached(build: Callable[[dict], object]) -> Callable[[Context], object]:
    """``build(run_config)``, built once per process and run config."""
    cache: dict = {}

    def get(context: Context):
        key = repr(sorted(dict(context.run_config).items()))
        if key not in cache:
            cache.clear()
            cache[key] = build(dict(context.run_config))
        return cache[key]
    return get


client_app = make_client_app(_cached(lambda rc: Device(*config_from_run_config(rc))))
server_app = make_server_app(lambda context: FairStrategy(
    *config_from_run_config(context.run_config)))


# ---------------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------------

def simulate(data: InteractionData, config: Config, *, on_eval=None, num_cpus: Optional[int] = None,
             client_cpus: int = 1, timeout: float = 3600.0,
             verbose: bool = False) -> FairStrategy:
    """Run ``config`` on ``data`` in Flower's simulation engine (Ray): one virtual node per user,
    ``num_cpus`` for Ray (default: all cores), ``client_cpus`` per running client (so
    ``num_cpus // client_cpus`` clients train at once, each with that many torch threads).
    Returns the strategy (``records``, ``rounds``, ``runner`` with the final global model)."""
    from flwr.simulation import run_simulation

    config.check(data)
    if num_cpus is None:
        num_cpus = os.cpu_count() or 1
    for name, value in (("num_cpus", num_cpus), ("client_cpus", client_cpus)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if client_cpus > num_cpus:
        raise ValueError(f"client_cpus={client_cpus} is more than num_cpus={num_cpus}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    strategy = FairStrategy(data, config, on_eval=on_eval, connect_timeout=timeout)
    device = Device(data, config, threads=client_cpus)
    run_simulation(
        server_app=make_server_app(lambda _: strategy, timeout=timeout),
        client_app=make_client_app(lambda _: device),
        num_supernodes=data.num_users,
        backend_config={"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
                        "init_args": {"num_cpus": num_cpus, "log_to_driver": verbose,
                                      "logging_level": logging.INFO if verbose
                                      else logging.ERROR}},
        verbose_logging=verbose)
    if len(strategy.rounds) != config.rounds:
        raise RuntimeError(f"the Flower run stopped after {len(strategy.rounds)} of "
                           f"{config.rounds} rounds (see Flower's log above)")
    return strategy


def run_flower(data: InteractionData, config: Config, *, on_eval=None, **kwargs) -> list:
    """``fastfair.fl.runner.train`` through Flower's simulation engine: the evaluation records
    (round statistics, metrics, totals), each also passed to ``on_eval``. Keyword arguments as
    for ``simulate``."""
    return simulate(data, config, on_eval=on_eval, **kwargs).records
