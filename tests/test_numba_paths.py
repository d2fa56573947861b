"""The numba backend: its backward schemes (private copies, partitioned slots, the serial scatter
of small launches) must all match the reference, and its threading must coexist with torch's."""
import pytest
import torch

import fastfair
from fastfair.kernels import numba_backend

from testing import assert_close_to_fp64, make_bags, rand

pytestmark = pytest.mark.skipif(
    not numba_backend.available(torch.device("cpu"))[0],
    reason=f"numba backend unavailable: {numba_backend.available(torch.device('cpu'))[1]}")

# (PRIVATE_BYTES, PARALLEL_MIN_WORK) that force each scheme on small inputs.
PATHS = {"private": (1 << 62, 0), "partitioned": (0, 0), "serial": (1 << 62, 1 << 62)}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode,with_psw", [("sum", True), ("mean", False)])
def test_every_bag_path_matches_the_reference(path, mode, with_psw, monkeypatch):
    if numba_backend.numba.get_num_threads() < 2:
        pytest.skip("numba runs one thread: every scheme reduces to the serial scatter")
    private_bytes, min_work = PATHS[path]
    monkeypatch.setattr(numba_backend, "PRIVATE_BYTES", private_bytes)
    monkeypatch.setattr(numba_backend, "PARALLEL_MIN_WORK", min_work)
    gen = torch.Generator().manual_seed(7)
    # memory_size below the scattered work, so the private-copy scheme is eligible.
    spec = fastfair.HashSpec(3001, 19, memory_size=4 * 53, chunk_size=4, seed=11)
    lengths = [0, 1, 17, 3, 40, 0, 9]
    idx, off = make_bags(spec.num_embeddings, lengths, gen, torch.int64, "cpu")
    w = rand(spec.memory_size, gen, torch.float32, "cpu")
    psw = rand(idx.shape, gen, torch.float32, "cpu") if with_psw else None
    grad = rand((len(lengths), spec.embedding_dim), gen, torch.float32, "cpu")
    results = []
    for backend, dtype in (("numba", torch.float32), ("reference", torch.float32),
                           ("reference", torch.float64)):
        wb = w.to(dtype, copy=True).requires_grad_()
        pb = None if psw is None else psw.to(dtype)
        out = fastfair.embedding_bag(idx, wb, spec, off, mode, pb, backend=backend)
        out.backward(grad.to(dtype))
        results.append((out.detach(), wb.grad))
    for got, ref, ref64 in zip(*results):
        assert_close_to_fp64(got, ref, ref64)


@pytest.mark.parametrize("threshold", [0, 1 << 62])
@pytest.mark.parametrize("dim,chunk,signed", [(19, 4, True), (8, 1, True), (5, 5, False),
                                              (40, 8, True), (3, 1, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_lookups_prefetched_or_not_equal_the_reference(threshold, dim, chunk, signed,
                                                             dtype, monkeypatch):
    """A lookup of one row per index reads arrays past ``ROWS_PREFETCH_BYTES`` in prefetched
    blocks (``_rows_forward``) and smaller ones bag by bag: both equal the reference exactly,
    over block tails, chunks that do not divide the row, signed and unsigned hashes; the
    gradient is the same scatter either way."""
    monkeypatch.setattr(numba_backend, "ROWS_PREFETCH_BYTES", threshold)
    gen = torch.Generator().manual_seed(dim * 31 + chunk)
    spec = fastfair.HashSpec(5003, dim, memory_size=chunk * 977, chunk_size=chunk, seed=5,
                             signed=signed)
    w = rand(spec.memory_size, gen, dtype, "cpu")
    rows = numba_backend.ROW_BLOCK * 3 + 17
    idx = torch.randint(0, spec.num_embeddings, (rows,), generator=gen)
    idx[:2] = torch.tensor([0, spec.num_embeddings - 1])
    out = {}
    for backend in ("numba", "reference"):
        wb = w.clone().requires_grad_()
        got = fastfair.embedding(idx, wb, spec, backend=backend)
        got.backward(rand(got.shape, torch.Generator().manual_seed(1), dtype, "cpu"))
        out[backend] = (got.detach(), wb.grad)
    assert torch.equal(out["numba"][0], out["reference"][0])
    torch.testing.assert_close(out["numba"][1], out["reference"][1])


def test_kernels_leave_torch_threads_alone_and_allow_threads(tmp_path):
    """In a fresh process (numba picks its threading layer at the first launch): torch's thread
    count survives a parallel launch, and launches from several Python threads at once work."""
    import os
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import threading
        import torch
        import fastfair
        torch.set_num_threads(1)
        spec = fastfair.HashSpec(100_000, 16, memory_size=400_000, chunk_size=4, seed=1)
        w = torch.randn(spec.memory_size)
        idx = torch.randint(0, spec.num_embeddings, (40_000,))
        expect = fastfair.embedding(idx, w, spec, backend="numba")
        assert torch.get_num_threads() == 1, torch.get_num_threads()
        results = []
        def work():
            results.append(torch.equal(fastfair.embedding(idx, w, spec, backend="numba"), expect))
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [True] * 4, results
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_prefetch_hint_changes_nothing_and_takes_only_vectors():
    """The fused kernel's prefetch is a hint: a gather that issues it (at the last element too)
    reads what a plain gather reads, and a 2-D array is refused when the caller compiles."""
    import numpy as np
    from numba import njit
    from numba.core.errors import TypingError

    @njit
    def gather(w, idx, hint):
        out = np.empty(idx.shape[0], dtype=w.dtype)
        for i in range(idx.shape[0]):
            if hint:
                _prefetch(w, idx[i])
            out[i] = w[idx[i]]
        return out

    _prefetch = numba_backend._prefetch
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        w = rng.standard_normal(1001).astype(dtype)
        idx = np.concatenate([rng.integers(0, 1001, 500), [1000, 0]])
        np.testing.assert_array_equal(gather(w, idx, True), w[idx])

    @njit
    def on_matrix(w):
        _prefetch(w, 0)

    with pytest.raises(TypingError):
        on_matrix(np.zeros((3, 2)))
