"""Device capacity tiers: which users hold how big an item table, and the nested table sizes.

A tier is a device class: ``fraction`` is the size of its item table relative to the dense
``num_items x dim`` table, ``share`` the fraction of users whose device is of that class.

Tier notation (``parse_tiers``), whitespace around tokens ignored::

    spec     := power | skewed | explicit
    power    := B ":" a ("-" a)*          equal shares of users at capacities B**-a
    skewed   := "s" B ":" q ":" a "-" b   a fraction q of the users at B**-a, the rest at B**-b
    explicit := entry ("," entry)*        entry := fraction ":" share
    B        := integer >= 2              a := integer >= 0            q := number in (0, 1)
    number   := decimal ("0.125", "1e-3") or p/q ("1/8")

``2:0-1`` is half the users at 1 and half at 1/2, ``2:0-1-2-3`` quarters at 1, 1/2, 1/4, 1/8,
``s2:0.9:0-1`` 90% at 1 and 10% at 1/2, ``1:0.25,1/8:0.5,1/1024:0.25`` lists tiers directly. A
spec whose head (before the first colon) is an integer >= 2 is the power form; no explicit
fraction can be above 1, so the forms never overlap.

These are the strings of the FAIR reference code (``--fair_compressions`` in apd10/FLCF), which
accepts the base 2 only. It gives user ``i`` of ``N`` (ids ordered by decreasing activity in its
data sets) exponent ``floor(i P / N)`` of ``P``, so the first exponent goes to the heaviest users,
and ``--fair_randomize_user`` shuffles that. Here tiers are sorted by capacity and
``assign_tiers(..., by_activity=...)`` gives the largest capacities to the heaviest users, which
is the reference's behaviour for exponents written in increasing order (all its examples); the
default is a seeded shuffle. The reference's skewed form puts users with ``i / N <= q`` at
``B**-a``, ``floor(q N) + 1`` of them (all ``N`` for ``s2:0.9:0-1`` with ``N = 10``); here every
share is rounded to whole users by largest remainders instead (9 and 1).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from fractions import Fraction
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..kernels import hashing
from ..kernels.functional import HashSpec, _int, nested_size

# Shares of a tier list must sum to 1 within this.
SHARE_TOLERANCE = 1e-9
# Beyond this exponent even B = 2 underflows a float64 to zero.
MAX_EXPONENT = 1074

_EXPECTED = ("expected 'B:a-b-...' (e.g. '2:0-1'), 'sB:q:a-b' (e.g. 's2:0.9:0-1') or "
             "'fraction:share,...' (e.g. '1:0.25,1/8:0.5,1/1024:0.25')")
_NUMBER = re.compile(r"[+-]?(?:\d+/\d+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)", re.ASCII)
_EXPONENTS = re.compile(r"\d+(?:\s*-\s*\d+)*", re.ASCII)
_INTEGER = re.compile(r"\d+", re.ASCII)


@dataclasses.dataclass(frozen=True)
class Tier:
    """A device class: item-table ``fraction`` of the dense table and ``share`` of the users,
    both floats in ``(0, 1]``. Fraction 1 is a device that holds the dense table."""

    fraction: float
    share: float

    def __post_init__(self):
        for name in ("fraction", "share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"tier {name} must be a real number, got "
                                f"{type(value).__name__} {value!r}")
            value = float(value)
            if not 0 < value <= 1:
                raise ValueError(f"tier {name} must be in (0, 1], got {value}")
            object.__setattr__(self, name, value)

    @property
    def label(self) -> str:
        """The fraction as people write it: ``"1"``, ``"1/1024"``, ``"0.3"``."""
        return fraction_label(self.fraction)


def fraction_label(value: float) -> str:
    """``1/2**k`` and other simple fractions as ``"a/b"``; anything else as ``%g``."""
    exact = Fraction(value).limit_denominator(1 << 20)
    if float(exact) == value and exact.denominator > 1 and exact.numerator < 10:
        return f"{exact.numerator}/{exact.denominator}"
    return f"{value:g}"


TierSpec = Union[str, Sequence[Union[Tier, Sequence[float]]]]


def _bad(spec: str, detail: str) -> ValueError:
    return ValueError(f"tier spec {spec!r}: {detail}; {_EXPECTED}")


def _number(spec: str, token: str, what: str) -> Fraction:
    token = token.strip()
    if not _NUMBER.fullmatch(token):
        raise _bad(spec, f"{what} {token!r} is not a number")
    try:
        return Fraction(token)
    except ZeroDivisionError:
        raise _bad(spec, f"{what} {token!r} divides by zero") from None


def _base(spec: str, token: str) -> int:
    token = token.strip()
    if not _INTEGER.fullmatch(token) or int(token) < 2:
        raise _bad(spec, f"base {token!r} is not an integer >= 2")
    return int(token)


def _exponents(spec: str, token: str) -> list[int]:
    if not _EXPONENTS.fullmatch(token.strip()):
        raise _bad(spec, f"{token.strip()!r} is not a '-'-separated list of integers >= 0")
    exponents = [int(a) for a in token.split("-")]
    if max(exponents) > MAX_EXPONENT:
        raise _bad(spec, f"exponent {max(exponents)} exceeds {MAX_EXPONENT} (capacity underflows)")
    return exponents


def _parse_string(spec: str) -> list[tuple[Fraction, Fraction]]:
    """(fraction, share) pairs of a tier string, exact, unmerged."""
    text = spec.strip()
    fields = text.split(":")
    if len(fields) < 2:
        raise _bad(spec, "no ':'")
    head = fields[0].strip()
    if head[:1] == "s":
        if len(fields) != 3:
            raise _bad(spec, f"the skewed form takes 3 ':'-separated fields, got {len(fields)}")
        base = _base(spec, head[1:])
        q = _number(spec, fields[1], "user fraction")
        if not 0 < q < 1:
            raise _bad(spec, f"user fraction {fields[1].strip()!r} is not in (0, 1)")
        exponents = _exponents(spec, fields[2])
        if len(exponents) != 2:
            raise _bad(spec, f"the skewed form takes 2 exponents, got {len(exponents)}")
        return [(Fraction(1, base ** exponents[0]), q), (Fraction(1, base ** exponents[1]), 1 - q)]
    if _INTEGER.fullmatch(head) and int(head) >= 2:
        if len(fields) != 2:
            raise _bad(spec, f"the power form takes 2 ':'-separated fields, got {len(fields)}")
        exponents = _exponents(spec, fields[1])
        base = int(head)
        return [(Fraction(1, base ** a), Fraction(1, len(exponents))) for a in exponents]
    pairs = []
    for entry in text.split(","):
        parts = entry.split(":")
        if len(parts) != 2:
            raise _bad(spec, f"entry {entry.strip()!r} is not 'fraction:share'")
        fraction = _number(spec, parts[0], "fraction")
        share = _number(spec, parts[1], "share")
        for what, token, value in (("fraction", parts[0], fraction), ("share", parts[1], share)):
            if not 0 < value <= 1:
                raise _bad(spec, f"{what} {token.strip()!r} is not in (0, 1]")
        pairs.append((fraction, share))
    return pairs


def _pair(item, position: int) -> tuple:
    if isinstance(item, Tier):
        return item.fraction, item.share
    if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
        raise TypeError(f"tiers[{position}] must be a Tier or a (fraction, share) pair, got "
                        f"{type(item).__name__} {item!r}")
    return item[0], item[1]


def parse_tiers(spec: TierSpec) -> tuple[Tier, ...]:
    """Tiers from the notation above, or from a sequence of ``Tier`` / ``(fraction, share)``.

    Every fraction and share must be in ``(0, 1]`` and the shares must sum to 1 within
    ``SHARE_TOLERANCE``. Tiers of equal fraction are merged (their shares added) and the result
    runs from the largest capacity to the smallest; tier indices everywhere in this module are
    positions in it. Raises ``ValueError`` quoting the spec when it does not parse.
    """
    if isinstance(spec, str):
        pairs = _parse_string(spec)
        for value in (v for pair in pairs for v in pair):
            if float(value) == 0:
                raise _bad(spec, "a capacity or share underflows to 0.0 as a float")
        tiers = [Tier(float(f), float(s)) for f, s in pairs]
    elif isinstance(spec, Sequence) and not isinstance(spec, bytes):
        if not spec:
            raise ValueError("tier list is empty")
        tiers = [Tier(*_pair(item, i)) for i, item in enumerate(spec)]
    else:
        raise TypeError(f"tiers must be a tier string or a sequence of Tier / (fraction, share), "
                        f"got {type(spec).__name__} {spec!r}")
    total = math.fsum(t.share for t in tiers)
    if abs(total - 1) > SHARE_TOLERANCE:
        raise ValueError(f"tier spec {spec!r}: shares sum to {total!r}, not 1")
    merged: dict[float, list[float]] = {}
    for t in tiers:
        merged.setdefault(t.fraction, []).append(t.share)
    return tuple(Tier(f, min(1.0, math.fsum(merged[f]))) for f in sorted(merged, reverse=True))


def _tier_counts(num_users: int, shares: Sequence[float]) -> list[int]:
    """Whole users per tier: largest remainders (ties to the larger capacity), then every empty
    tier takes one user from the tier furthest above its quota."""
    total = math.fsum(shares)
    quotas = [s / total * num_users for s in shares]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[:num_users - sum(counts)]:
        counts[i] += 1
    for i, c in enumerate(counts):
        if c == 0:
            donor = max((j for j in range(len(counts)) if counts[j] > 1),
                        key=lambda j: (counts[j] - quotas[j], -j))
            counts[donor] -= 1
            counts[i] = 1
    return counts


def assign_tiers(num_users: int, tiers: TierSpec, *, seed: int = 0,
                 by_activity: Optional[Tensor] = None, by_id: bool = False) -> Tensor:
    """The tier index of every user: int64 ``[num_users]``, indexing ``parse_tiers(tiers)``.

    Tier ``t`` gets ``share_t * num_users`` users rounded to whole users (largest remainders,
    counts summing to ``num_users``), and at least one user, so ``num_users`` must be at least the
    number of tiers. Users are placed by a permutation seeded with ``seed``; with
    ``by_activity`` (interaction counts, one per user) the most active users get the largest
    capacities instead, ties going to the lower user id, and ``seed`` is unused; with ``by_id``
    users take the tiers in id order, the first ones the largest (the FAIR reference code).
    """
    tiers = parse_tiers(tiers)
    num_users = _int("num_users", num_users, 1)
    seed = _int("seed", seed, 0, 2**64 - 1)
    if num_users < len(tiers):
        raise ValueError(f"num_users {num_users} is fewer than the {len(tiers)} tiers; every tier "
                         f"needs at least one user")
    counts = _tier_counts(num_users, [t.share for t in tiers])
    labels = torch.repeat_interleave(torch.arange(len(tiers)), torch.tensor(counts))
    if by_id and by_activity is not None:
        raise ValueError("give by_activity or by_id, not both")
    if by_id:
        order = torch.arange(num_users)
    elif by_activity is None:
        order = torch.randperm(num_users, generator=torch.Generator().manual_seed(seed))
    else:
        if not isinstance(by_activity, Tensor):
            raise TypeError(f"by_activity must be a Tensor of interaction counts, got "
                            f"{type(by_activity).__name__}")
        if by_activity.dtype == torch.bool or by_activity.is_complex():
            raise TypeError(f"by_activity must hold real numbers, got {by_activity.dtype}")
        if tuple(by_activity.shape) != (num_users,):
            raise ValueError(f"by_activity must have shape ({num_users},), got "
                             f"{tuple(by_activity.shape)}")
        if by_activity.is_floating_point() and bool(torch.isnan(by_activity).any()):
            raise ValueError("by_activity holds NaN")
        order = torch.sort(by_activity.cpu(), descending=True, stable=True).indices
    out = torch.empty(num_users, dtype=torch.int64)
    out[order] = labels
    return out


def _divisors(n: int) -> list[int]:
    """All divisors of ``n >= 1``; fast for ``nested_size`` outputs (a power of two times < 256)."""
    divisors = [1]
    p = 2
    while n > 1:
        if p * p > n:
            p = n
        e = 0
        while n % p == 0:
            n //= p
            e += 1
        divisors = [d * p ** k for d in divisors for k in range(e + 1)]
        p += 1
    return sorted(divisors)


def tier_specs(num_items: int, dim: int, tiers: TierSpec, *, chunk_size: int = 1,
               seed: int = 0, hash_full: bool = False) -> list[Optional[HashSpec]]:
    """The item-table spec of every tier of ``parse_tiers(tiers)``; ``None`` for fraction 1 (a
    dense table), unless ``hash_full``: then fraction 1 is a hashed array of about
    ``num_items * dim`` slots too (with collisions, as every client of the FAIR reference code
    holds), the largest of the chain.

    Hashed sizes nest: the largest hashed tier gets ``M = nested_size(f_max * num_items * dim,
    chunk_size)`` and every other hashed tier ``M // r`` for the ``r`` dividing
    ``M // chunk_size`` whose size is closest to ``fraction * num_items * dim`` in log scale
    (ties to the smaller size), so ``spec_big.collapse(r) == spec_small``. A request below one
    chunk gets one chunk, the smallest size that divides ``M``.

    Every hashed size divides ``M``; two smaller sizes divide each other only when both ``r`` are
    powers of two up to ``spec_big.max_collapse`` (beyond it, e.g. on small tables, the nearest
    divisor of ``M`` is taken, as 56 and 105 for 1/512 and 1/256 of 1682 x 16 with chunk 1).
    """
    tiers = parse_tiers(tiers)
    num_items = _int("num_items", num_items, 1)
    dim = _int("dim", dim, 1)
    chunk_size = _int("chunk_size", chunk_size, 1)
    seed = _int("seed", seed, 0, hashing.MAX_SEED - 1)
    if not isinstance(hash_full, bool):
        raise TypeError(f"hash_full must be a bool, got {type(hash_full).__name__}")
    hashed = [t.fraction for t in tiers if t.fraction < 1 or hash_full]
    if not hashed:
        return [None] * len(tiers)
    total = num_items * dim
    big = HashSpec(num_items, dim, nested_size(max(hashed) * total, chunk_size), chunk_size, seed)
    sizes = [chunk_size * d for d in _divisors(big.memory_size // chunk_size)]
    specs: list[Optional[HashSpec]] = []
    for t in tiers:
        if t.fraction == 1 and not hash_full:
            specs.append(None)
            continue
        target = t.fraction * total
        size = min(sizes, key=lambda m: (abs(math.log(m / target)), m))
        specs.append(big.collapse(big.memory_size // size))
    return specs


def collapse_factor(big: HashSpec, small: HashSpec) -> int:
    """``r`` with ``big.collapse(r) == small``: the specs must hash alike (all fields but
    ``memory_size`` equal) and ``small.memory_size`` must divide ``big.memory_size``."""
    for name, spec in (("big", big), ("small", small)):
        if not isinstance(spec, HashSpec):
            raise TypeError(f"{name} must be a fastfair.HashSpec, got {type(spec).__name__}")
    for field in ("num_embeddings", "embedding_dim", "chunk_size", "seed", "signed"):
        if getattr(big, field) != getattr(small, field):
            raise ValueError(f"specs do not nest: {field} is {getattr(big, field)!r} in big and "
                             f"{getattr(small, field)!r} in small")
    if big.memory_size % small.memory_size:
        raise ValueError(f"specs do not nest: small memory_size {small.memory_size} does not "
                         f"divide big memory_size {big.memory_size}")
    return big.memory_size // small.memory_size


def describe(tiers: TierSpec, specs: Sequence[Optional[HashSpec]], num_items: int,
             dim: int) -> list[dict]:
    """One row per tier for reports: ``tier``, ``fraction`` (requested), ``share``, ``hashed``,
    ``memory_size``, ``actual_fraction`` (``memory_size / (num_items * dim)``), ``bytes`` (of
    the float32 item table) and ``collapse`` (factor from the largest hashed table; None if
    dense). ``specs`` is ``tier_specs``' output for the same tiers and table."""
    tiers = parse_tiers(tiers)
    num_items = _int("num_items", num_items, 1)
    dim = _int("dim", dim, 1)
    specs = list(specs)
    if len(specs) != len(tiers):
        raise ValueError(f"got {len(specs)} specs for {len(tiers)} tiers")
    for i, s in enumerate(specs):
        if s is not None and not isinstance(s, HashSpec):
            raise TypeError(f"specs[{i}] must be a HashSpec or None, got {type(s).__name__}")
        if s is not None and (s.num_embeddings, s.embedding_dim) != (num_items, dim):
            raise ValueError(f"specs[{i}] is a {s.num_embeddings} x {s.embedding_dim} table, not "
                             f"{num_items} x {dim}")
    hashed = [s for s in specs if s is not None]
    biggest = max(hashed, key=lambda s: s.memory_size) if hashed else None
    rows = []
    for i, (t, s) in enumerate(zip(tiers, specs)):
        size = num_items * dim if s is None else s.memory_size
        rows.append({
            "tier": i,
            "fraction": t.fraction,
            "share": t.share,
            "hashed": s is not None,
            "memory_size": size,
            "actual_fraction": size / (num_items * dim),
            "bytes": 4 * size,
            "collapse": None if s is None else collapse_factor(biggest, s),
        })
    return rows
