"""Extreme classification with an LSH output layer (PGHash), centralised or federated.

Network (the reference code's): sparse features ``f`` -> ``Dense(d) + ReLU`` -> output layer
``W [n, d]`` over the ``n`` labels, trained with the label-normalised softmax over each batch's
active neurons (``fastfair.nn.LSHOutputLayer``). Methods: ``dense`` (every neuron, the full
softmax), ``pg``, ``dwta``, ``simhash`` (LSH selection at the budget) and ``sampled`` (the labels
plus random neurons up to the budget: sampled softmax).

Optimisers: Adam on the first layer, ``fastfair.optim.LazyAdam`` (``torch.optim.SparseAdam``'s
rule, fused) on the output layer, so an inactive neuron's weights and moments do not move (unlike
the reference code, whose Adam moves them all). The dense method uses the same pair with every neuron active.

Federated (``devices >= 2``): the round of ``fastfair.fl.rounds.RoundRunner``, the one FAIR's
``FederatedRunner`` runs (sampling, dropout, update checks, byte accounting per device and per
tier, statistics), with the steps of the reference code's loop. The training points are split at
random over the devices. Every round each sampled device, with its own private hash functions (its
seed is drawn from the run's; bits, tables, sketch size and rehash period from its tier):

(``device_tiers``, e.g. ``"bits=8,tables=50,sketch=8,rehash=1;bits=6,tables=10,sketch=4,
rehash=5"``: device ``i`` takes tier ``i mod #tiers``; unnamed fields come from the config):

1. downloads the dense first layer and, on its rehash rounds, what hashing needs of ``W`` (the
   ``[n, c]`` sketch for ``pg``, ``c`` sampled columns for ``dwta``, ``W`` itself for
   ``simhash``), from which it builds its tables;
2. draws its ``local_steps`` batches, computes their hidden vectors and selects its active set
   ``A`` (labels forced in, budget ``floor(budget n)``) from its own data;
3. downloads only ``W[A]`` and ``b[A]``, trains ``local_steps`` steps on them (Adam state kept on
   the device for the first layer and, lazily, for the rows it trains), and uploads the first layer
   and ``W[A], b[A]``.

A round takes ``clients_per_round`` devices (all with 0) without replacement; each drops out after
its download with probability ``dropout``, and an update with a missing tensor, a wrong shape or
dtype, or a NaN/Inf is rejected; both are counted, never averaged in. The server averages the first
layer over the devices that returned (weights = their numbers of points, renormalised) and each
output neuron over those that trained it (renormalised per neuron); neurons nobody trained keep
their value. Bytes down and up are counted exactly per device and per tier (float32 values, int32
ids: the ids of ``A`` go up with the request for ``W[A]``). ``save``/``load`` checkpoint
everything later rounds depend on (models, optimizer states, tables, the random generator,
counters), so a resumed run continues bit-identically; checkpoints load with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Optional

import torch
from torch import Tensor, nn

from ..kernels import hashing
from ..nn.lsh import LSHOutputLayer, select
from ..optim import LazyAdam
from .rounds import RoundRunner, check_tensors
from .xc import XCBatch, XCData, precision_at_k

METHODS = ("dense", "pg", "dwta", "simhash", "sampled")
_HASH = {"dense": "pg", "pg": "pg", "dwta": "dwta", "simhash": "simhash", "sampled": "random"}
_DEVICE_SALT = 0x82EFA98E
BYTES = 4
CHECKPOINT_FORMAT = 2


@dataclasses.dataclass
class XCConfig:
    method: str = "pg"
    budget: float = 0.25
    hidden: int = 128
    sketch_dim: int = 8
    bits: int = 8
    tables: int = 50
    rehash_every: int = 1
    signed_fold: bool = False
    force_labels: bool = True
    serial: bool = False
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 10
    devices: int = 1
    local_steps: int = 1
    seed: int = 0
    backend: str = "auto"
    device_tiers: str = ""
    clients_per_round: int = 0
    dropout: float = 0.0

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("hidden", "sketch_dim", "bits", "tables", "rehash_every", "batch_size",
                     "epochs", "devices", "local_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if (isinstance(self.clients_per_round, bool) or not isinstance(self.clients_per_round, int)
                or not 0 <= self.clients_per_round <= self.devices):
            raise ValueError(f"clients_per_round must be an int in [0, devices={self.devices}] "
                             f"(0: every device), got {self.clients_per_round!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout <= 1):
            raise ValueError(f"dropout must be a probability in [0, 1], got {self.dropout!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
                0 <= self.seed < hashing.MAX_SEED):
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        self.tiers()

    def tiers(self) -> list:
        """The device tiers' hash settings: a list of ``{bits, tables, sketch_dim,
        rehash_every}`` (one tier of the config's own when ``device_tiers`` is empty)."""
        base = {"bits": self.bits, "tables": self.tables, "sketch_dim": self.sketch_dim,
                "rehash_every": self.rehash_every}
        if not self.device_tiers.strip():
            return [base]
        names = {"bits": "bits", "tables": "tables", "sketch": "sketch_dim",
                 "rehash": "rehash_every"}
        out = []
        for part in self.device_tiers.split(";"):
            tier = dict(base)
            for field in filter(None, (f.strip() for f in part.split(","))):
                key, _, value = field.partition("=")
                if key.strip() not in names:
                    raise ValueError(f"device_tiers: unknown field {key.strip()!r} in {part!r} "
                                     f"(expected {', '.join(names)})")
                try:
                    v = int(value)
                except ValueError:
                    raise ValueError(f"device_tiers: {field!r} needs an integer") from None
                if v < 1:
                    raise ValueError(f"device_tiers: {field!r} must be >= 1")
                tier[names[key.strip()]] = v
            out.append(tier)
        return out

    @property
    def effective_budget(self) -> float:
        return 1.0 if self.method == "dense" else self.budget


class XCNet(nn.Module):
    """``features -> EmbeddingBag(sum) + bias -> ReLU -> LSHOutputLayer``."""

    def __init__(self, num_features: int, num_labels: int, cfg: XCConfig, seed: int,
                 tier: Optional[dict] = None):
        super().__init__()
        tier = tier or cfg.tiers()[0]
        g = torch.Generator().manual_seed(seed)
        self.first = nn.EmbeddingBag(num_features, cfg.hidden, mode="sum")
        bound = 1 / math.sqrt(num_features)
        with torch.no_grad():
            self.first.weight.uniform_(-bound, bound, generator=g)
        self.first_bias = nn.Parameter(torch.zeros(cfg.hidden))
        self.out = LSHOutputLayer(cfg.hidden, num_labels, hash=_HASH[cfg.method],
                                  sketch_dim=min(tier["sketch_dim"], cfg.hidden),
                                  bits=tier["bits"], tables=tier["tables"],
                                  budget=cfg.effective_budget,
                                  rehash_every=tier["rehash_every"], signed_fold=cfg.signed_fold,
                                  force_labels=cfg.force_labels, serial=cfg.serial, seed=seed,
                                  backend=cfg.backend)
        with torch.no_grad():
            bound = 1 / math.sqrt(cfg.hidden)
            self.out.weight.uniform_(-bound, bound, generator=g)
            self.out.bias.uniform_(-bound, bound, generator=g)

    def hidden(self, batch) -> Tensor:
        h = self.first(batch.indices, batch.offsets, per_sample_weights=batch.weights)
        return torch.relu(h + self.first_bias)


def _optimizers(net: XCNet, lr: float) -> list:
    return [torch.optim.Adam([net.first.weight, net.first_bias], lr=lr),
            LazyAdam([net.out.weight, net.out.bias], lr=lr, backend=net.out.family.backend)]


def evaluate(net: XCNet, data: XCData, ks=(1, 3, 5), batch_size: int = 1024) -> dict:
    """P@k of the full output layer on ``data`` (top-k in chunks, never ``[B, n]`` at once)."""
    was = net.training
    net.eval()
    tops = []
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            b = data.batch(torch.arange(i, min(i + batch_size, len(data))))
            tops.append(net.out.topk(net.hidden(b), max(ks))[1])
    net.train(was)
    top = torch.cat(tops) if tops else torch.empty(0, max(ks), dtype=torch.int64)
    return {f"P@{k}": v for k, v in precision_at_k(top, data.label_indptr, data.label_ids,
                                                   ks).items()}


def _device_seed(seed: int, device: int) -> int:
    return hashing.fmix32_int((hashing.fmix32_int(seed ^ _DEVICE_SALT) + device * hashing.GOLDEN)
                              & hashing.MASK32)


@dataclasses.dataclass
class XCView:
    """What a device holds in a round: its tier, its round's batches (drawn from its own points)
    and the active set it selected with them; ``source``: the values of ``W``'s hashing source it
    downloaded this round (0 between its rehashes)."""

    tier: int
    batches: list
    active: Tensor
    source: int


class XCTrainer(RoundRunner):
    """Centralised (``devices = 1``) or federated training; ``run_epoch`` then ``evaluate``.
    Federated, ``run_round`` is ``RoundRunner``'s round with the steps below."""

    def __init__(self, train: XCData, test: XCData, cfg: XCConfig):
        cfg.check()
        if train.num_labels != test.num_labels or train.num_features != test.num_features:
            raise ValueError("train and test disagree on num_features / num_labels")
        if cfg.devices > len(train):
            raise ValueError(f"devices={cfg.devices} exceeds the {len(train)} training points")
        super().__init__(cfg.seed, torch.arange(cfg.devices), cfg.clients_per_round or cfg.devices,
                         cfg.dropout)
        self.cfg, self.train_data, self.test = cfg, train, test
        self.net = XCNet(train.num_features, train.num_labels, cfg, cfg.seed)
        self.n = train.num_labels
        self.m = self.net.out.m
        self.totals.update(active=0, steps=0)
        self.epoch = 0
        if cfg.devices == 1:
            self.opts = _optimizers(self.net, cfg.lr)
            return
        self.parts = train.split(cfg.devices, seed=cfg.seed)
        self.tiers = cfg.tiers()
        self.locals = []
        for d in range(cfg.devices):
            net = XCNet(train.num_features, train.num_labels, cfg, _device_seed(cfg.seed, d),
                        self.tiers[d % len(self.tiers)])
            self.locals.append({"net": net, "opts": _optimizers(net, cfg.lr), "tables": None,
                                "round": 0})
        self.device_bytes = [[0, 0] for _ in range(cfg.devices)]  # [down, up] per device
        g = self.net
        self._first_size = g.first.weight.numel() + g.first_bias.numel()

    # ---------------------------------------------------------------- centralised
    def _step(self, net, opts, batch: XCBatch, active=None) -> float:
        x = net.hidden(batch)
        out = net.out(x, batch.label_offsets, batch.label_ids, active=active)
        loss = net.out.loss(out, batch.label_offsets, batch.label_ids)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        self.totals["active"] += out.active.numel()
        self.totals["steps"] += 1
        return float(loss.detach())

    def run_epoch(self) -> dict:
        """One pass over the training data: shuffled batches centralised; federated, as many
        rounds as the largest device needs for one pass (``len // (batch_size local_steps)``),
        each device drawing its round's batches at random from its own points."""
        t0 = time.perf_counter()
        losses = []
        if self.cfg.devices == 1:
            order = torch.randperm(len(self.train_data), generator=self.gen)
            for i in range(0, len(order), self.cfg.batch_size):
                batch = self.train_data.batch(order[i:i + self.cfg.batch_size])
                losses.append(self._step(self.net, self.opts, batch))
        else:
            steps = max(len(p) for p in self.parts) // (self.cfg.batch_size * self.cfg.local_steps)
            losses = [s["loss"] for s in (self.run_round() for _ in range(max(1, steps)))]
            losses = [v for v in losses if not math.isnan(v)]
        self.epoch += 1
        return {"epoch": self.epoch, "loss": sum(losses) / max(len(losses), 1),
                "seconds": time.perf_counter() - t0,
                "active_mean": self.totals["active"] / max(self.totals["steps"], 1)}

    # ---------------------------------------------------------------- a device's round
    def run_round(self) -> dict:
        if self.cfg.devices == 1:
            raise RuntimeError("a centralised trainer (devices=1) has no rounds: use run_epoch")
        return super().run_round()

    def tier_label(self, view: XCView) -> str:
        return self._tier_name(view.tier)

    def _tier_name(self, tier: int) -> str:
        t = self.tiers[tier]
        return (f"bits={t['bits']},tables={t['tables']},sketch={t['sketch_dim']},"
                f"rehash={t['rehash_every']}")

    def view(self, device: int) -> XCView:
        """The device downloads the first layer (and, on its rehash rounds, ``W``'s hashing
        source, from which it builds its tables), draws its round's batches and selects its
        active set from their hidden vectors."""
        cfg, g = self.cfg, self.net
        part, loc = self.parts[device], self.locals[device]
        net, fam = loc["net"], loc["net"].out.family
        with torch.no_grad():
            net.first.weight.copy_(g.first.weight)
            net.first_bias.copy_(g.first_bias)
        batches = [part.batch(torch.randint(0, len(part), (min(cfg.batch_size, len(part)),),
                                            generator=self.gen))
                   for _ in range(cfg.local_steps)]
        source = 0
        if self.m == self.n:
            active = torch.arange(self.n)
        else:
            with torch.no_grad():
                x = torch.cat([net.hidden(b) for b in batches])
                labels = torch.cat([b.label_ids for b in batches]) if cfg.force_labels else None
                tables = None
                if fam.kind != "random":
                    if loc["tables"] is None or loc["round"] % net.out.rehash_every == 0:
                        src = fam.source(g.out.weight.detach())
                        source = src.numel()
                        loc["tables"] = fam.build(src)
                    tables = loc["tables"]
                active = select(fam, x, self.n, self.m, tables=tables, labels=labels,
                                seed=_device_seed(fam.seed, loc["round"]), backend=fam.backend)
        loc["round"] += 1
        return XCView(device % len(self.tiers), batches, active, source)

    def _rows(self, view: XCView) -> int:
        return view.active.numel() * (self.net.out.weight.shape[1] + 1)

    def download_bytes(self, device: int, view: XCView) -> int:
        return BYTES * (self._first_size + view.source + self._rows(view))

    def download(self, device: int, view: XCView):
        """The device's model with ``W[A], b[A]`` downloaded into it."""
        loc, g = self.locals[device], self.net
        with torch.no_grad():
            loc["net"].out.weight[view.active] = g.out.weight[view.active]
            loc["net"].out.bias[view.active] = g.out.bias[view.active]
        return loc, view

    def local_train(self, device: int, model, gen: torch.Generator) -> float:
        loc, view = model
        losses = [self._step(loc["net"], loc["opts"], b, active=view.active)
                  for b in view.batches]
        return sum(losses) / len(losses)

    def upload(self, device: int, model, view: XCView) -> dict:
        net = model[0]["net"]
        return {"first.weight": net.first.weight.detach(), "first_bias": net.first_bias.detach(),
                "out.weight": net.out.weight.detach()[view.active],
                "out.bias": net.out.bias.detach()[view.active]}

    def check_update(self, update, view: XCView) -> Optional[str]:
        g, a = self.net, view.active.numel()
        return check_tensors(update, {
            "first.weight": g.first.weight.shape, "first_bias": g.first_bias.shape,
            "out.weight": (a, g.out.weight.shape[1]), "out.bias": (a,)})

    def transmit(self, device: int, update, start, view: XCView, down: int,
                 reason: Optional[str]) -> tuple:
        # The ids of A (the request for W[A]), then the first layer and W[A], b[A].
        values = view.active.numel() + self._first_size + self._rows(view)
        return update, {"bits": 8 * BYTES * values}

    def weight(self, device: int) -> float:
        return float(len(self.parts[device]))

    def aggregate_uploads(self, uploads: list) -> None:
        """First layer: the weighted mean; each output neuron: the weighted mean over the
        devices that trained it (neurons nobody trained keep their value)."""
        g = self.net
        total = sum(w for _, _, w in uploads)
        first = torch.zeros_like(g.first.weight)
        first_bias = torch.zeros_like(g.first_bias)
        rows = torch.zeros_like(g.out.weight)
        bias = torch.zeros_like(g.out.bias)
        held = torch.zeros(self.n)
        for update, view, w in uploads:
            p = w / total
            first.add_(update["first.weight"], alpha=p)
            first_bias.add_(update["first_bias"], alpha=p)
            rows.index_add_(0, view.active, update["out.weight"], alpha=p)
            bias.index_add_(0, view.active, update["out.bias"], alpha=p)
            held.index_add_(0, view.active, torch.full((view.active.numel(),), p))
        with torch.no_grad():
            g.first.weight.copy_(first)
            g.first_bias.copy_(first_bias)
            hit = torch.nonzero(held > 0).view(-1)
            g.out.weight[hit] = rows[hit] / held[hit, None]
            g.out.bias[hit] = bias[hit] / held[hit]

    def finish(self, stats: dict) -> None:
        for device, (down, up) in stats["by_client"].items():
            self.device_bytes[device][0] += down
            self.device_bytes[device][1] += up

    def tier_bytes(self) -> dict:
        """Bytes ``[down, up]`` so far, summed over the devices of each tier (by its label)."""
        out: dict = {}
        for device, (down, up) in enumerate(self.device_bytes):
            total = out.setdefault(self._tier_name(device % len(self.tiers)), [0, 0])
            total[0] += down
            total[1] += up
        return out

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        state = {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(self.cfg),
                 **self.round_state(), "net": self.net.state_dict(), "epoch": self.epoch}
        if self.cfg.devices == 1:
            state["opts"] = [o.state_dict() for o in self.opts]
        else:
            state["device_bytes"] = [list(b) for b in self.device_bytes]
            state["locals"] = [{"net": loc["net"].state_dict(),
                                "opts": [o.state_dict() for o in loc["opts"]],
                                "tables": list(loc["tables"]) if loc["tables"] else None,
                                "round": loc["round"]} for loc in self.locals]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; the config may differ in ``epochs`` only."""
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a fastfair xc checkpoint of format {CHECKPOINT_FORMAT}")
        config = dataclasses.asdict(self.cfg)
        diff = sorted(k for k in config if k != "epochs" and state["config"].get(k) != config[k])
        if diff:
            raise ValueError(f"checkpoint was taken with a different config: {diff}")
        self.net.load_state_dict(state["net"])
        self.load_round_state(state)
        self.epoch = int(state["epoch"])
        if self.cfg.devices == 1:
            for o, s in zip(self.opts, state["opts"]):
                o.load_state_dict(s)
            return
        self.device_bytes = [list(b) for b in state["device_bytes"]]
        for loc, s in zip(self.locals, state["locals"]):
            loc["net"].load_state_dict(s["net"])
            for o, os_ in zip(loc["opts"], s["opts"]):
                o.load_state_dict(os_)
            loc["tables"] = tuple(s["tables"]) if s["tables"] is not None else None
            loc["round"] = int(s["round"])

    @classmethod
    def load(cls, path, train: XCData, test: XCData, cfg: XCConfig) -> "XCTrainer":
        """The trainer saved at ``path`` (with the same data and config)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint at {path}")
        trainer = cls(train, test, cfg)
        trainer.load_state_dict(torch.load(path, weights_only=True))
        return trainer

    def evaluate(self) -> dict:
        return evaluate(self.net, self.test)


def train(train_data: XCData, test_data: XCData, cfg: XCConfig, on_eval=None,
          eval_every: int = 1, save=None, checkpoint=None) -> list:
    """Train up to ``cfg.epochs`` epochs, evaluating every ``eval_every`` and after the last;
    returns the evaluation records. ``save``: a path where the trained global model's
    ``state_dict`` is written (it loads back with ``torch.load(weights_only=True)`` into an
    ``XCNet`` built with the same config). ``checkpoint``: a path where the whole trainer is saved
    after every epoch; if it exists, training continues from it (bit-identically)."""
    if checkpoint is not None and os.path.exists(checkpoint):
        tr = XCTrainer.load(checkpoint, train_data, test_data, cfg)
    else:
        tr = XCTrainer(train_data, test_data, cfg)
    records = []
    for e in range(tr.epoch + 1, cfg.epochs + 1):
        stats = tr.run_epoch()
        if e % eval_every == 0 or e == cfg.epochs:
            rec = {"method": cfg.method, "budget": cfg.effective_budget, "devices": cfg.devices,
                   **stats, **tr.evaluate(), "bytes_down": tr.totals["bytes_down"],
                   "bytes_up": tr.totals["bytes_up"]}
            if cfg.devices > 1:
                rec["bytes_by_device"] = [list(b) for b in tr.device_bytes]
                rec["bytes_by_tier"] = tr.tier_bytes()
                rec["dropped"], rec["rejected"] = tr.totals["dropped"], tr.totals["rejected"]
            records.append(rec)
            if on_eval is not None:
                on_eval(rec)
        if checkpoint is not None:
            tr.save(checkpoint)
    if save is not None:
        torch.save(tr.net.state_dict(), save)
    return records
