"""Shared test helpers: the backends live on this machine, dtypes and tolerances, input makers."""
from __future__ import annotations

import pytest
import torch

from fastfair.kernels import backends

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]
# Results are sums of a few dozen products: the gap to the reference is reassociation error.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-11, atol=1e-11)}


def assert_close_to_fp64(got, ref, ref64, factor: float = 2.0):
    """Principled low-precision check: ``got`` may be at most ``factor`` times as far from the
    float64 reference as the same-dtype reference is (plus the dtype's rounding of the result),
    so reassociation by atomics or threads passes and a real bug does not."""
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, ref, **TOL[torch.float64])
        return
    assert got.shape == ref64.shape
    if got.numel() == 0:
        return
    got, ref, ref64 = got.double().cpu(), ref.double().cpu(), ref64.double().cpu()
    eps = torch.finfo(torch.float32).eps
    bound = factor * (ref - ref64).abs().max() + eps * (ref64.abs().max() + 1)
    err = (got - ref64).abs().max()
    assert err <= bound, f"error {float(err):.3g} against float64 exceeds {float(bound):.3g}"


def backend_params(include_reference: bool = True):
    """pytest params ``(backend, device)`` for every backend x device, skipped with the reason
    when that backend cannot run here."""
    out = []
    for dev in DEVICES:
        for name in backends.NAMES:
            if name == "reference" and not include_reference:
                continue
            why = backends.why_not(name, torch.device(dev))
            marks = [pytest.mark.skip(reason=f"{name} on {dev}: {why}")] if why else []
            out.append(pytest.param(name, dev, marks=marks, id=f"{name}-{dev}"))
    return out


def op_params(*fns: str):
    """``backend_params()`` for the backends that have every function ``fns`` (e.g.
    ``"lsh_fold"``), the others skipped with the first missing one named."""
    out = []
    for p in backend_params():
        name, dev = p.values
        marks = list(p.marks)
        missing = [fn for fn in fns if not hasattr(backends.load(name), fn)]
        if not marks and missing:
            marks = [pytest.mark.skip(reason=f"the {name} backend has no {missing[0]} kernel")]
        out.append(pytest.param(name, dev, marks=marks, id=p.id))
    return out


def make_bags(num_embeddings: int, lengths, gen: torch.Generator, index_dtype=torch.int64,
              device="cpu"):
    """Random indices and torch-style offsets (bag starts) for bags of the given lengths."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    n = int(lengths.sum())
    indices = torch.randint(0, num_embeddings, (n,), generator=gen).to(index_dtype)
    offsets = torch.cumsum(lengths, 0) - lengths
    return indices.to(device), offsets.to(device)


def gen(seed: int = 0) -> torch.Generator:
    """A fresh CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def rand(shape, gen: torch.Generator, dtype=torch.float32, device="cpu"):
    """Fresh N(0, 1) values, never zeros."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def virtual_table(weight: torch.Tensor, spec) -> torch.Tensor:
    """The dense table built with torch indexing from the materialised reference hash: an oracle
    independent of every kernel, differentiable by torch's own autograd."""
    from fastfair.kernels import hashing
    rows = torch.arange(spec.num_embeddings, device=weight.device)
    idx, sign = hashing.index_and_sign(rows, spec.embedding_dim, spec.memory_size,
                                       spec.chunk_size, spec.seed, spec.signed)
    return weight[idx] * sign.to(weight.dtype)


def state_equal(a, b) -> bool:
    """Nested dicts / lists of tensors and plain values equal exactly (tensors: same dtype and
    bit-identical values), as a resumed run's state must be."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b
