"""Device and network heterogeneity profiles, and the simulated round time of a client.

A profile is a set of device classes, each with a share of the clients, a compute rate (flop/s)
and download / upload bandwidths (bit/s), plus a round deadline in seconds. A client's simulated
time for one round with ``K`` actions is::

    T(K) = down_bits / down_bps + (train_flops + cluster_flops(K)) / flops + up_bits(K) / up_bps

with ``train_flops = 3 E P (1 + negatives) f`` (forward + backward ~ 3x forward, ``E`` epochs over
``P`` positives, ``f`` flops of one score: ``2d`` for MF, ``4 d^2 + 6 d`` for NeuMF) and
``cluster_flops(K) = 2 m K d (iters + 1)`` (k-means++ and every Lloyd step compute ``m K``
distances of ``d`` terms for the ``m`` touched rows). It is a model, not a measurement: it makes
the adaptive choice of ``K`` deterministic and reproducible.

User profiles are JSON files::

    {"deadline": 0.5,
     "classes": [{"name": "phone", "share": 0.7, "flops": 2e9, "down_bps": 2e7, "up_bps": 2e6},
                 ...]}
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import torch

FIELDS = ("name", "share", "flops", "down_bps", "up_bps")


@dataclasses.dataclass(frozen=True)
class DeviceClass:
    name: str
    share: float
    flops: float
    down_bps: float
    up_bps: float

    def seconds(self, down_bits: float, flops: float, up_bits: float) -> float:
        return down_bits / self.down_bps + flops / self.flops + up_bits / self.up_bps


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    deadline: float
    classes: tuple

    def assign(self, num_clients: int, seed: int) -> torch.Tensor:
        """A seeded class index per client, in the classes' shares (largest remainder)."""
        shares = torch.tensor([c.share for c in self.classes], dtype=torch.float64)
        counts = torch.floor(shares * num_clients).long()
        rest = num_clients - int(counts.sum())
        order = torch.argsort(shares * num_clients - counts, descending=True, stable=True)
        counts[order[:rest]] += 1
        labels = torch.repeat_interleave(torch.arange(len(self.classes)), counts)
        gen = torch.Generator().manual_seed(seed)
        return labels[torch.randperm(num_clients, generator=gen)]


# Rough orders of magnitude of phones and links, chosen so the classes' best K differ on the
# bundled datasets; users with real numbers pass their own file.
PROFILES = {
    "uniform": Profile("uniform", 0.5, (DeviceClass("device", 1.0, 5e9, 5e7, 1e7),)),
    "mobile": Profile("mobile", 0.5, (
        DeviceClass("flagship-wifi", 0.2, 2e10, 1e8, 2e7),
        DeviceClass("midrange-4g", 0.5, 5e9, 2e7, 2e6),
        DeviceClass("budget-3g", 0.3, 1e9, 2e6, 2.5e5),
    )),
}


def load_profile(spec: str) -> Profile:
    """A built-in profile by name, or one read from a JSON file; every field checked."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"profile must be a built-in name ({', '.join(PROFILES)}) or a JSON "
                         f"file, got {spec!r}")
    if spec in PROFILES:
        return PROFILES[spec]
    if not os.path.isfile(spec):
        raise ValueError(f"profile {spec!r} is neither a built-in profile "
                         f"({', '.join(PROFILES)}) nor a file")
    try:
        with open(spec) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"profile {spec}: not readable JSON ({err})") from None
    if not isinstance(doc, dict) or set(doc) != {"deadline", "classes"}:
        raise ValueError(f"profile {spec}: expected an object with exactly 'deadline' and "
                         f"'classes', got {sorted(doc) if isinstance(doc, dict) else doc!r}")
    deadline = doc["deadline"]
    if not _positive(deadline):
        raise ValueError(f"profile {spec}: deadline must be a positive number, got {deadline!r}")
    classes = doc["classes"]
    if not isinstance(classes, list) or not classes:
        raise ValueError(f"profile {spec}: 'classes' must be a non-empty list")
    out = []
    for i, c in enumerate(classes):
        if not isinstance(c, dict) or set(c) != set(FIELDS):
            raise ValueError(f"profile {spec}: class {i} must have exactly the fields "
                             f"{', '.join(FIELDS)}, got {c!r}")
        if not isinstance(c["name"], str) or not c["name"]:
            raise ValueError(f"profile {spec}: class {i} name must be a non-empty string")
        for key in FIELDS[1:]:
            if not _positive(c[key]):
                raise ValueError(f"profile {spec}: class {c['name']!r} {key} must be a positive "
                                 f"number, got {c[key]!r}")
        out.append(DeviceClass(c["name"], float(c["share"]), float(c["flops"]),
                               float(c["down_bps"]), float(c["up_bps"])))
    total = sum(c.share for c in out)
    if abs(total - 1) > 1e-6:
        raise ValueError(f"profile {spec}: class shares must sum to 1, got {total:g}")
    if len({c.name for c in out}) != len(out):
        raise ValueError(f"profile {spec}: class names must be distinct")
    return Profile(os.path.basename(spec), float(deadline), tuple(out))


def score_flops(arch: str, dim: int) -> int:
    """Flops of one ``s(u, i)``: MF's dot product, or NeuMF's GMF, MLP layer and prediction."""
    return 2 * dim if arch == "mf" else 4 * dim * dim + 6 * dim


def train_flops(arch: str, dim: int, positives: int, epochs: int, negatives: int) -> int:
    return 3 * epochs * positives * (1 + negatives) * score_flops(arch, dim)


def cluster_flops(touched: int, k: int, dim: int, iters: int) -> int:
    return 2 * touched * k * dim * (iters + 1)


def _positive(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and x > 0)
