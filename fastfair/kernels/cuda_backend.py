"""CUDA backend: the hand-written kernels compiled into ``fastfair._C`` (``csrc/*.cu``).

Same functions, signatures and math as ``reference``. Tensors cross into the extension as data
pointers and sizes; outputs are allocated here with torch on the inputs' device, and every kernel
runs on torch's current stream of that device (``torch.cuda.current_stream(device).cuda_stream``)
with that device made current, so ordering with surrounding torch work is the usual stream order.

``bag_backward`` scatters with atomics; ``bag_backward_deterministic`` (chosen by ``backends``
under ``torch.use_deterministic_algorithms``) sorts ``N ceil(dim / Z)`` slot keys and sums each
slot in one warp, in a fixed order: the same bits on every run.

The extension is optional. This module imports without it; ``available`` then says why it cannot
run and every op raises ``BackendUnavailableError`` with the same reason.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import hashing
from .backends import BackendUnavailableError

try:
    from fastfair import _C
except ImportError as exc:
    _C = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""

NAME = "cuda"

_FLOATS = (torch.float32, torch.float64)
_INDICES = (torch.int32, torch.int64)


def _not_built_reason() -> str:
    if _C is None:
        return (f"fastfair._C is not built: {_IMPORT_ERROR}. Reinstall with CMake and the CUDA "
                "toolkit on PATH (pip install -v --no-build-isolation -e .) and read the build log")
    if not _C.has_cuda():
        return ("fastfair._C was built without CUDA kernels (no CUDA compiler at build time, or "
                "FASTFAIR_BUILD_CUDA=0); reinstall with nvcc on PATH to enable this backend")
    return ""


def available(device: torch.device) -> tuple[bool, str]:
    reason = _not_built_reason()
    if reason:
        return False, reason
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the cuda backend runs on CUDA tensors only, not on {device.type}"
    if not torch.cuda.is_available():
        return False, "torch sees no usable CUDA device"
    return True, ""


def _ext():
    reason = _not_built_reason()
    if reason:
        raise BackendUnavailableError(reason)
    return _C


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _on(device: torch.device):
    """Makes ``device`` current for the launch: the kernels run on the current device."""
    return torch.cuda.device(device)


def _same_device(device: torch.device, *tensors: torch.Tensor | None) -> None:
    # Raw pointers carry no device: a tensor elsewhere would be an illegal address, not an error.
    for t in tensors:
        if t is not None and t.device != device:
            raise ValueError(f"all tensors must be on {device}, got one on {t.device}")


def _floating(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype not in _FLOATS:
        raise TypeError(f"the cuda backend supports float32 and float64 {what}, got {t.dtype}")
    return t.contiguous()


def _index_array(t: torch.Tensor) -> torch.Tensor:
    return (t if t.dtype in _INDICES else t.long()).contiguous()


def _bag_inputs(indices, offsets, per_sample_weights, dtype):
    """Contiguous kernel inputs, their pointers (0 for None) and the number of output rows."""
    indices = _index_array(indices)
    if offsets is None:
        num_bags, offsets_ptr = indices.numel(), 0
    else:
        offsets = offsets.to(torch.int64).contiguous()
        num_bags, offsets_ptr = max(offsets.numel() - 1, 0), offsets.data_ptr()
    psw_ptr = 0
    if per_sample_weights is not None:
        per_sample_weights = per_sample_weights.to(dtype).contiguous()
        psw_ptr = per_sample_weights.data_ptr()
    return indices, offsets, per_sample_weights, num_bags, offsets_ptr, psw_ptr


def hash_index(rows, dim, memory_size, chunk_size, seed, signed):
    """Materialised addresses (int64) and signs (int8) of ``rows`` ``[N] -> [N, dim]``."""
    ext = _ext()
    rows = _index_array(rows).reshape(-1)
    n = rows.numel()
    idx = torch.empty(n, dim, dtype=torch.int64, device=rows.device)
    sign = torch.empty(n, dim, dtype=torch.int8, device=rows.device)
    ka, ks = hashing.keys(seed)
    with _on(rows.device):
        ext.hash_index_cuda(rows.data_ptr(), rows.element_size(), n, dim, memory_size, chunk_size,
                            ka, ks, bool(signed), idx.data_ptr(), sign.data_ptr(),
                            _stream(rows.device))
    return idx, sign


def bag_forward(weight, indices, offsets, per_sample_weights, dim, chunk_size, seed, signed,
                mode, padding_idx):
    ext = _ext()
    weight = _floating(weight, "weights")
    indices, offsets, psw, num_bags, offsets_ptr, psw_ptr = _bag_inputs(
        indices, offsets, per_sample_weights, weight.dtype)
    _same_device(weight.device, indices, offsets, psw)
    out = torch.empty(num_bags, dim, dtype=weight.dtype, device=weight.device)
    ka, ks = hashing.keys(seed)
    with _on(weight.device):
        ext.bag_forward_cuda(weight.data_ptr(), weight.element_size(), indices.data_ptr(),
                             indices.element_size(), indices.numel(), offsets_ptr, num_bags,
                             psw_ptr, out.data_ptr(), dim, weight.numel(), chunk_size, ka, ks,
                             bool(signed), int(mode), int(padding_idx), _stream(weight.device))
    return out


def _run_backward(launch, grad_out, indices, offsets, per_sample_weights, memory_size, dim,
                  chunk_size, seed, signed, mode, padding_idx):
    """Check the inputs, allocate ``grad_w`` and call ``launch(args, grad_out, indices)`` on
    the device with the arguments both backward kernels take, in their order up to
    ``padding_idx``; the converted inputs those pointers name live until it returns."""
    grad_out = _floating(grad_out, "gradients")
    indices, offsets, psw, num_bags, offsets_ptr, psw_ptr = _bag_inputs(
        indices, offsets, per_sample_weights, grad_out.dtype)
    _same_device(grad_out.device, indices, offsets, psw)
    grad_w = torch.empty(memory_size, dtype=grad_out.dtype, device=grad_out.device)
    ka, ks = hashing.keys(seed)
    args = (grad_out.data_ptr(), grad_out.element_size(), indices.data_ptr(),
            indices.element_size(), indices.numel(), offsets_ptr, num_bags, psw_ptr,
            grad_w.data_ptr(), dim, memory_size, chunk_size, ka, ks, bool(signed), int(mode),
            int(padding_idx))
    with _on(grad_out.device):
        launch(args, grad_out, indices)
    return grad_w


def bag_backward(grad_out, indices, offsets, per_sample_weights, memory_size, dim, chunk_size,
                 seed, signed, mode, padding_idx):
    ext = _ext()

    def launch(args, grad_out, indices):
        ext.bag_backward_cuda(*args, _stream(grad_out.device))

    return _run_backward(launch, grad_out, indices, offsets, per_sample_weights, memory_size,
                         dim, chunk_size, seed, signed, mode, padding_idx)


def bag_backward_deterministic(grad_out, indices, offsets, per_sample_weights, memory_size, dim,
                               chunk_size, seed, signed, mode, padding_idx):
    """``bag_backward`` by sort and segment sum (``csrc/bag_backward_sorted.cu``): the same bits on
    every run. Its workspace (sort keys and values, ``N ceil(dim / Z)`` each) comes from torch's
    allocator on the current stream."""
    ext = _ext()

    def launch(args, grad_out, indices):
        size = ext.bag_backward_deterministic_workspace(
            grad_out.element_size(), indices.numel(), offsets is not None, dim, memory_size,
            chunk_size)
        workspace = torch.empty(size, dtype=torch.uint8, device=grad_out.device)
        ext.bag_backward_deterministic_cuda(*args, workspace.data_ptr(), size,
                                            _stream(grad_out.device))

    return _run_backward(launch, grad_out, indices, offsets, per_sample_weights, memory_size,
                         dim, chunk_size, seed, signed, mode, padding_idx)


def slot_counts(num_embeddings, dim, memory_size, chunk_size, seed, device):
    """cnt[s] = #{(i, k) : idx(i, k) = s} over the whole virtual table (int64)."""
    ext = _ext()
    device = torch.device(device)
    counts = torch.empty(memory_size, dtype=torch.int64, device=device)
    ka, _ = hashing.keys(seed)
    with _on(device):
        ext.slot_counts_cuda(num_embeddings, dim, memory_size, chunk_size, ka, counts.data_ptr(),
                             _stream(device))
    return counts


def fold(weight, factor, counts):
    """Count-weighted collapse ``w'[j] = sum_t c[j+t m'] w[j+t m'] / sum_t c[j+t m']``.

    ``w'[j] = 0`` where every count is 0.
    """
    ext = _ext()
    weight = _floating(weight, "weights")
    counts = counts.to(torch.int64).contiguous()
    _same_device(weight.device, counts)
    if counts.numel() != weight.numel():
        raise ValueError(f"fold: {counts.numel()} counts for {weight.numel()} weights")
    out = torch.empty(weight.numel() // factor, dtype=weight.dtype, device=weight.device)
    with _on(weight.device):
        ext.fold_cuda(weight.data_ptr(), weight.element_size(), weight.numel(), factor,
                      counts.data_ptr(), out.data_ptr(), _stream(weight.device))
    return out


def tile(weight, factor):
    """The same virtual table in an array ``factor`` times bigger: ``out[j] = w[j mod m]``."""
    ext = _ext()
    weight = _floating(weight, "weights")
    out = torch.empty(weight.numel() * factor, dtype=weight.dtype, device=weight.device)
    with _on(weight.device):
        ext.tile_cuda(weight.data_ptr(), weight.element_size(), weight.numel(), factor,
                      out.data_ptr(), _stream(weight.device))
    return out


def aggregate(arrays: Sequence[torch.Tensor], weights, target_size):
    """``out[j] = sum_i weights[i] * arrays[i][j mod len(arrays[i])]`` (every size divides target).

    One pass over ``out``: the arrays reach the kernel as a device table of (pointer, size, weight)
    rows, so any number of them is summed without intermediate arrays.
    """
    ext = _ext()
    if len(arrays) == 0:
        raise ValueError("aggregate needs at least one array")
    dtype, device = arrays[0].dtype, arrays[0].device
    srcs = [_floating(a.to(dtype), "arrays").reshape(-1) for a in arrays]
    _same_device(device, *srcs)
    for a in srcs:
        if a.numel() == 0 or target_size % a.numel() != 0:
            raise ValueError(f"aggregate: array size {a.numel()} does not divide {target_size}")
    coef = torch.as_tensor(weights, dtype=torch.float64).cpu().reshape(-1)
    if coef.numel() != len(srcs):
        raise ValueError(f"aggregate: {coef.numel()} weights for {len(srcs)} arrays")
    table = torch.tensor([[a.data_ptr(), a.numel(), 0] for a in srcs], dtype=torch.int64)
    table[:, 2] = coef.view(torch.int64)
    table = table.to(device)
    out = torch.empty(target_size, dtype=dtype, device=device)
    with _on(device):
        ext.aggregate_cuda(table.data_ptr(), len(srcs), out.element_size(), out.data_ptr(),
                           target_size, _stream(device))
    return out
