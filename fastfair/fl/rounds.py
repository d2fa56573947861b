"""The federated round every task runs: recommendation with FAIR and its baselines
(``fastfair.fl.runner.FederatedRunner``) and extreme classification with on-device LSH
(``fastfair.fl.pghash.XCTrainer``).

``RoundRunner.run_round`` owns what does not depend on the model: sampling, dropout, the order of
the random draws, update checks, byte accounting per client and per tier, the statistics and the
totals. A task supplies the steps of one client as methods:

==========================================  ==================================================
``view(client)``                            what the device holds this round (has ``.tier``)
``tier_label(view)``                        the name its bytes and clients are counted under
``download_bytes(client, view)``            bytes of its download, counted even if it drops out
``download(client, view)``                  the device's model, built from the global one
``snapshot(model)``                         what ``transmit`` needs of the download (or None)
``local_train(client, model, gen)``         trains in place; the mean loss
``keep_private(client, model)``             private state the device keeps across rounds
``upload(client, model, view)``             what the device sends
``check_update(update, view)``              why the update must be rejected, or None
``transmit(client, update, start, view,     what the server receives and its accounting,
down, reason)``                             ``sent["bits"]`` at least
``weight(client)``                          its aggregation weight before normalisation
``aggregate_uploads(uploads)``              ``[(update, view, weight)]`` into the global model
``end_round(accepted)``                     after the loop: ``[(client, weight)]`` of the
                                            clients whose update was aggregated (private
                                            state that depends on all of them)
``account(tier, sent)`` / ``finish(stats)`` task-specific counters, per client and per round
==========================================  ==================================================

A round draws, from the runner's one generator: ``randperm`` of the eligible clients (the first
``clients_per_round`` train), then one uniform number per sampled client, below ``dropout`` for
the clients that download and never return (drawn even when ``dropout`` is 0, so runs that
differ only in dropout sample alike); then the clients train one after another from the same
generator. A dropped client's download is counted; an update ``check_update`` rejects is counted
with its reason and never aggregated.
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch
from torch import Tensor


class RoundRunner:
    """Sampling, dropout, checks and accounting of a federated round (see the module doc).

    ``eligible``: the ids of the clients that may be sampled (int64). The subclass sets
    ``self.totals`` keys of its own on top of ``bytes_down``, ``bytes_up``, ``dropped`` and
    ``rejected``."""

    def __init__(self, seed: int, eligible: Tensor, clients_per_round: int, dropout: float):
        if clients_per_round > eligible.numel():
            raise ValueError(f"clients_per_round={clients_per_round} is larger than the "
                             f"{eligible.numel()} clients that can train")
        self.eligible = eligible
        self.clients_per_round = clients_per_round
        self.dropout = dropout
        self.gen = torch.Generator().manual_seed(seed)
        self.round_index = 0
        self.totals = {"bytes_down": 0, "bytes_up": 0, "dropped": 0, "rejected": 0}

    # Defaults of the optional steps.
    def snapshot(self, model):
        return None

    def keep_private(self, client: int, model) -> None:
        pass

    def account(self, tier: dict, sent: dict) -> None:
        pass

    def finish(self, stats: dict) -> None:
        pass

    def end_round(self, accepted: list) -> None:
        pass

    def begin_round(self) -> None:
        pass

    def draw_clients(self) -> tuple:
        """The round's clients and whether each drops out: the round's first two draws."""
        pick = torch.randperm(self.eligible.numel(), generator=self.gen)[:self.clients_per_round]
        clients = self.eligible[pick].tolist()
        return clients, (torch.rand(len(clients), generator=self.gen) < self.dropout).tolist()

    def run_round(self) -> dict:
        """One round; returns its statistics: clients sampled, returned, dropped and rejected
        (with the reasons), mean loss, bytes per tier, per client (``by_client``: ``[down,
        up]``) and in total, seconds, and what the task's ``finish`` adds."""
        t0 = time.perf_counter()
        self.begin_round()
        clients, drops = self.draw_clients()
        uploads, accepted, losses, reasons = [], [], [], []
        per_tier: dict = {}
        by_client: dict = {}
        for client, dropped in zip(clients, drops):
            view = self.view(client)
            down = self.download_bytes(client, view)
            tier = per_tier.setdefault(self.tier_label(view),
                                       {"clients": 0, "dropped": 0, "rejected": 0,
                                        "bytes_down": 0, "bytes_up": 0})
            tier["clients"] += 1
            tier["bytes_down"] += down
            by_client[client] = [down, 0]
            if dropped:
                tier["dropped"] += 1
                continue
            model = self.download(client, view)
            start = self.snapshot(model)
            losses.append(self.local_train(client, model, self.gen))
            self.keep_private(client, model)
            update = self.upload(client, model, view)
            reason = self.check_update(update, view)
            update, sent = self.transmit(client, update, start, view, down, reason)
            up = -(-sent["bits"] // 8)
            tier["bytes_up"] += up
            by_client[client][1] = up
            self.account(tier, sent)
            if reason is not None:
                tier["rejected"] += 1
                reasons.append(f"client {client}: {reason}")
                continue
            weight = self.weight(client)
            uploads.append((update, view, weight))
            accepted.append((client, weight))
        if uploads:
            self.aggregate_uploads(uploads)
        self.end_round(accepted)
        self.round_index += 1
        stats = {"round": self.round_index, "clients": len(clients),
                 "returned": len(clients) - sum(drops),
                 "dropped": sum(t["dropped"] for t in per_tier.values()),
                 "rejected": len(reasons), "rejections": reasons,
                 "loss": sum(losses) / len(losses) if losses else math.nan,
                 "bytes_down": sum(t["bytes_down"] for t in per_tier.values()),
                 "bytes_up": sum(t["bytes_up"] for t in per_tier.values()),
                 "by_tier": per_tier, "by_client": by_client}
        for key in ("bytes_down", "bytes_up", "dropped", "rejected"):
            self.totals[key] += stats[key]
        self.finish(stats)
        stats["seconds"] = time.perf_counter() - t0
        return stats

    # ------------------------------------------------------------------ checkpoints
    def round_state(self) -> dict:
        """The loop's own state: the generator, the round counter and the totals."""
        return {"generator": self.gen.get_state(), "round": self.round_index,
                "totals": dict(self.totals)}

    def load_round_state(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.round_index = int(state["round"])
        self.totals = dict(state["totals"])

    def save(self, path) -> None:
        """Write ``state_dict()`` atomically (a crash mid-write leaves the previous file)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)


def _all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite. A NaN or Inf makes the sum NaN or Inf, so a
    finite sum settles it with one read and no temporary (a 50x cheaper pass than
    ``isfinite(t).all()`` on a dense Goodreads table); only a sum that overflowed or met a
    non-finite value is checked element by element."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_tensors(update, expected: dict) -> Optional[str]:
    """Why ``update`` is not ``{name: finite float32 tensor of expected[name]'s shape}``, or
    None. A shape entry of None accepts any shape."""
    if not isinstance(update, dict):
        return f"update is a {type(update).__name__}, not a dict"
    if set(update) != set(expected):
        missing, extra = sorted(set(expected) - set(update)), sorted(set(update) - set(expected))
        return f"tensors missing {missing}, unexpected {extra}"
    for key, shape in expected.items():
        t = update[key]
        if not isinstance(t, Tensor) or t.dtype != torch.float32:
            return f"{key} is not a float32 tensor"
        if shape is not None and tuple(t.shape) != tuple(shape):
            return f"{key} has shape {tuple(t.shape)}, expected {tuple(shape)}"
        if not _all_finite(t):
            return f"{key} has NaN or Inf values"
    return None
