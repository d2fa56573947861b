"""Backend choice: declarative, explained, overridable.

Each backend module states whether it can run on a device (``available(device) -> (ok, reason)``).
``backend="auto"`` takes the first that fits: for CUDA tensors ``cuda`` then ``triton``, for CPU
tensors ``numba``, and ``reference`` everywhere else. ``FASTFAIR_BACKEND=<name>`` forces one backend
for every call and raises ``BackendUnavailableError`` with the reason when it cannot run.

Determinism. Only the embedding-bag backward can differ from run to run: it adds many virtual
elements into few slots, and the GPU backends' default ``bag_backward`` does so with atomics,
whose order (so the float rounding) changes between runs. When
``torch.are_deterministic_algorithms_enabled()``, ``bag_backward_fn`` returns the backend's
``bag_backward_deterministic`` instead (``triton`` and ``cuda``: sort the (element, chunk) pairs by
slot, then one owner sums each slot in sorted order): bit-identical from run to run, at the cost of
a sort. The flag is read when the backward runs, as torch's own ops read it. ``reference`` and
``numba`` need no second path: ``reference`` uses ``index_add_``, which torch itself makes
deterministic in that mode (and which is sequential on CPU); ``numba`` scatters in a fixed order
for a given thread count. No other op of ``triton``, ``cuda`` or ``numba`` depends on the order of
floating-point atomics (``slot_counts`` adds integers, which commute exactly), and the reference's
``index_add_`` follows torch's setting in every op.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

NAMES = ("reference", "numba", "triton", "cuda")
_MODULES = {
    "reference": "fastfair.kernels.reference",
    "numba": "fastfair.kernels.numba_backend",
    "triton": "fastfair.kernels.triton_backend",
    "cuda": "fastfair.kernels.cuda_backend",
}
_AUTO = {"cuda": ("cuda", "triton", "reference"), "cpu": ("numba", "reference")}
ENV = "FASTFAIR_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for by name cannot run here; the message says why."""


_loaded: dict[str, ModuleType | str] = {}


def load(name: str) -> ModuleType | str:
    """The backend module, or a string saying why it could not be imported."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except ImportError as e:  # a missing optional dependency (numba, triton, the extension)
            _loaded[name] = f"import failed: {e}"
    return _loaded[name]


def auto_order(device: torch.device) -> tuple:
    """The backends ``auto`` tries on ``device``, in order."""
    return _AUTO.get(device.type, ("reference",))


def why_not(name: str, device: torch.device) -> str:
    """Empty string if backend ``name`` can run on ``device``, else the reason it cannot."""
    mod = load(name)
    if isinstance(mod, str):
        return mod
    ok, reason = mod.available(torch.device(device))
    return "" if ok else reason


def check_name(name: str) -> str:
    if name != "auto" and name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {NAMES}")
    return name


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module to run on ``device``; the environment variable wins over ``name``."""
    forced = os.environ.get(ENV, "").strip()
    if forced:
        if forced not in NAMES and forced != "auto":
            raise BackendUnavailableError(f"{ENV}={forced!r} is not one of {NAMES} or 'auto'")
        name = forced
    device = torch.device(device)
    if name == "auto":
        for cand in auto_order(device):
            if not why_not(cand, device):
                return load(cand)
        return load("reference")
    reason = why_not(check_name(name), device)
    if reason:
        src = f"{ENV}={name}" if forced else f"backend={name!r}"
        raise BackendUnavailableError(f"{src} cannot run on {device}: {reason}")
    return load(name)


def kernel(fn: str, backend: str, device: torch.device):
    """Function ``fn`` of the backend that runs it on ``device``.

    ``auto`` (not forced) takes, in ``auto_order(device)``, the first live backend that has ``fn``,
    else ``reference``. A backend named explicitly, or forced with ``FASTFAIR_BACKEND``, that cannot
    run or lacks ``fn`` raises ``BackendUnavailableError`` saying so."""
    name = check_name(backend)
    forced = os.environ.get(ENV, "").strip()
    if name == "auto" and forced in ("", "auto"):
        for cand in auto_order(device):
            mod = load(cand)
            if not why_not(cand, device) and hasattr(mod, fn):
                return getattr(mod, fn)
        return getattr(load("reference"), fn)
    mod = resolve(name, device)
    if not hasattr(mod, fn):
        src = f"{ENV}={forced}" if forced else f"backend={name!r}"
        raise BackendUnavailableError(
            f"{src}: the {mod.NAME} backend has no {fn} kernel (use 'auto' or 'reference')")
    return getattr(mod, fn)


def bag_backward_fn(mod: ModuleType):
    """The embedding-bag backward of backend ``mod`` that torch's determinism setting asks for."""
    if torch.are_deterministic_algorithms_enabled():
        return getattr(mod, "bag_backward_deterministic", mod.bag_backward)
    return mod.bag_backward


def status(device: torch.device) -> dict[str, str]:
    """``{name: "" if live else reason}`` for every backend on ``device``."""
    return {n: why_not(n, device) for n in NAMES}
