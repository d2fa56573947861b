"""Every op on every live backend against the reference, on fresh random inputs and awkward shapes."""
import pytest
import torch

import fastfair
from fastfair.kernels import backends, ops

from testing import TOL, assert_close_to_fp64, backend_params, make_bags, rand

# (num_embeddings, embedding_dim, chunk_size, memory_size, bag lengths)
CASES = [
    (1, 1, 1, 1, [1]),
    (97, 13, 4, 4 * 37, [0, 1, 5, 0, 17, 3]),
    (1000, 67, 8, 8 * 129, [20] * 9 + [0]),
    (50, 5, 3, 3 * 7, [2, 1, 1]),
    (300, 16, 16, 16 * 11, [7, 0, 9]),
    (4099, 33, 1, 2047, [3, 1, 8, 2, 0, 30, 4]),
    (10, 8, 8, 8, []),
]
# (weight dtype, index dtype, mode, per-sample weights, padding)
VARIANTS = [
    (torch.float32, torch.int64, "sum", False, False),
    (torch.float64, torch.int32, "sum", True, False),
    (torch.float32, torch.int32, "mean", False, True),
    (torch.float64, torch.int64, "mean", False, False),
    (torch.float64, torch.int64, "sum", True, True),
]
BACKENDS = backend_params(include_reference=False)


def _spec(case, seed=0, signed=True):
    n, d, z, m, _ = case
    return fastfair.HashSpec(n, d, memory_size=m, chunk_size=z, seed=seed, signed=signed)


def _run_bag(backend, device, case, variant, gen, seed):
    """Output and gradients of ``backend``, of the reference at the same dtype, and of the
    reference in float64 on the same inputs."""
    dtype, idtype, mode, with_psw, with_pad = variant
    spec = _spec(case, seed=seed, signed=seed % 2 == 0)
    idx, off = make_bags(spec.num_embeddings, case[4], gen, idtype, device)
    if with_pad and idx.numel():
        idx[::3] = idx[0]  # make the padding row actually occur
    pad = int(idx[0]) if with_pad and idx.numel() else None
    w = rand(spec.memory_size, gen, dtype, device)
    psw = rand(idx.shape, gen, dtype, device) if with_psw else None
    grad = rand((len(case[4]), spec.embedding_dim), gen, dtype, device)
    results = []
    for be, dt in ((backend, dtype), ("reference", dtype), ("reference", torch.float64)):
        wb = w.to(dt, copy=True).requires_grad_()
        pb = None if psw is None else psw.to(dt, copy=True).requires_grad_()
        out = fastfair.embedding_bag(idx, wb, spec, off, mode, pb, padding_idx=pad, backend=be)
        out.backward(grad.to(dt))
        results.append((out.detach(), wb.grad, None if pb is None else pb.grad))
    return results


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}-{v[2]}-psw{v[3]}-pad{v[4]}"[6:])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}d{c[1]}z{c[2]}m{c[3]}b{len(c[4])}")
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_embedding_bag_matches_reference(backend, device, case, variant):
    gen = torch.Generator().manual_seed(hash((case[0], case[1], variant[2])) % 2**31)
    got, ref, ref64 = _run_bag(backend, device, case, variant, gen, seed=len(case[4]))
    for g, r, r64 in zip(got, ref, ref64):
        if g is not None:
            assert g.dtype == variant[0]
            assert_close_to_fp64(g, r, r64)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("idtype", [torch.int32, torch.int64])
def test_embedding_matches_reference(backend, device, idtype):
    gen = torch.Generator().manual_seed(5)
    spec = fastfair.HashSpec(333, 21, memory_size=6 * 25, chunk_size=6, seed=9)
    idx = torch.randint(0, 333, (4, 7), generator=gen).to(idtype).to(device)
    w = rand(spec.memory_size, gen, torch.float64, device)
    grad = rand((4, 7, 21), gen, torch.float64, device)
    got = []
    for be in (backend, "reference"):
        wb = w.clone().requires_grad_()
        out = fastfair.embedding(idx, wb, spec, padding_idx=int(idx[1, 2]), backend=be)
        out.backward(grad)
        got.append((out.detach(), wb.grad))
    assert got[0][0].shape == (4, 7, 21)
    assert bool((got[0][0][1, 2] == 0).all())
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    gen = torch.Generator().manual_seed(6)
    spec = fastfair.HashSpec(200, 12, memory_size=64, chunk_size=4, seed=2)
    big_idx = torch.randint(0, 200, (60,), generator=gen).to(device)
    idx = big_idx[::2]
    w = rand(2 * spec.memory_size, gen, torch.float32, device)[::2]
    psw = rand(60, gen, torch.float32, device)[1::2]
    off = torch.tensor([0, 4, 4, 17], device=device)
    assert not idx.is_contiguous() and not w.is_contiguous()
    got = fastfair.embedding_bag(idx, w, spec, off, "sum", psw, backend=backend)
    ref = fastfair.embedding_bag(idx.contiguous(), w.contiguous(), spec, off, "sum",
                                 psw.contiguous(), backend="reference")
    torch.testing.assert_close(got, ref, **TOL[torch.float32])


HASH_SPECS = [(1, 1, 1, 1), (97, 13, 4, 4 * 37), (1000, 67, 8, 8 * 129), (4099, 33, 1, 2047),
              (50, 70, 16, 16 * 3)]


@pytest.mark.parametrize("spec", HASH_SPECS, ids=str)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_hash_index_and_slot_counts_bit_exact(backend, device, spec):
    n, d, z, m = spec
    for seed, signed in ((0, True), (2**32 - 1, False), (77, True)):
        s = fastfair.HashSpec(n, d, memory_size=m, chunk_size=z, seed=seed, signed=signed)
        rows = torch.randint(0, n, (min(n, 64),), device=device)
        for got, ref in zip(fastfair.hash_index(rows, s, backend=backend),
                            fastfair.hash_index(rows.cpu(), s, backend="reference")):
            assert got.dtype == ref.dtype
            assert torch.equal(got.cpu(), ref)
        cnt = fastfair.slot_counts(s, device, backend=backend)
        assert cnt.dtype == torch.int64
        assert torch.equal(cnt.cpu(), fastfair.slot_counts(s, backend="reference"))
        assert int(cnt.sum()) == n * d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fold_tile_aggregate(backend, device, dtype):
    gen = torch.Generator().manual_seed(8)
    spec = fastfair.HashSpec(777, 10, memory_size=4 * 3 * 16, chunk_size=4, seed=4)
    w = rand(spec.memory_size, gen, dtype, device)
    counts = fastfair.slot_counts(spec, device, backend="reference")
    tol = TOL[dtype]
    for f in (1, 2, 3, 16, 48):
        torch.testing.assert_close(fastfair.fold(w, f, counts, backend=backend),
                                   fastfair.fold(w, f, counts, backend="reference"), **tol)
    # A fold with empty slots must give 0 there, not NaN.
    sparse = counts.clone()
    sparse[::5] = 0
    got = fastfair.fold(w, 4, sparse, backend=backend)
    torch.testing.assert_close(got, fastfair.fold(w, 4, sparse, backend="reference"), **tol)
    for f in (1, 3, 7):
        torch.testing.assert_close(fastfair.tile(w, f, backend=backend), w.repeat(f), **tol)
    arrays = [rand(m, gen, dtype, device) for m in (8, 192, 24, 1)]
    weights = [0.5, -1.25, 2.0, 0.1]
    torch.testing.assert_close(fastfair.aggregate(arrays, weights, 192, backend=backend),
                               fastfair.aggregate(arrays, weights, 192, backend="reference"),
                               **tol)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_expand_and_project_dense(backend, device):
    gen = torch.Generator().manual_seed(9)
    spec = fastfair.HashSpec(123, 9, memory_size=3 * 40, chunk_size=3, seed=5)
    w = rand(spec.memory_size, gen, torch.float64, device)
    dense = rand((123, 9), gen, torch.float64, device)
    tol = TOL[torch.float64]
    torch.testing.assert_close(fastfair.expand_dense(w, spec, backend=backend),
                               fastfair.expand_dense(w, spec, backend="reference"), **tol)
    torch.testing.assert_close(fastfair.project_dense(dense, spec, backend=backend),
                               fastfair.project_dense(dense, spec, backend="reference"), **tol)


def _weighted_fit_brute(dense, spec, a):
    """``w[s] = sum a_i g D[i, k] / sum a_i`` over the entries hashed to ``s``, entry by entry."""
    idx, sign = fastfair.hash_index(torch.arange(spec.num_embeddings), spec, backend="reference")
    num = torch.zeros(spec.memory_size, dtype=torch.float64)
    mass = torch.zeros(spec.memory_size, dtype=torch.float64)
    weight = a.double()[:, None].expand(dense.shape)
    num.index_add_(0, idx.flatten(), (weight * sign.double() * dense.double()).flatten())
    mass.index_add_(0, idx.flatten(), weight.flatten())
    return torch.where(mass > 0, num / torch.where(mass > 0, mass, 1), 0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}d{c[1]}z{c[2]}m{c[3]}")
@pytest.mark.parametrize("backend,device", backend_params())
def test_weighted_projection_matches_brute_force(backend, device, case):
    gen = torch.Generator().manual_seed(case[0] + case[3])
    for dtype, signed in ((torch.float64, True), (torch.float32, False)):
        spec = _spec(case, seed=case[1], signed=signed)
        dense = rand((case[0], case[1]), gen, dtype)
        a = rand(case[0], gen, dtype).abs()
        a[::3] = 0  # rows that do not count, and slots whose every row is one of them
        got = fastfair.project_dense(dense.to(device), spec, backend=backend,
                                     row_weights=a.to(device))
        assert got.dtype == dtype
        assert_close_to_fp64(got.cpu(), _weighted_fit_brute(dense, spec, a).to(dtype),
                             _weighted_fit_brute(dense, spec, a))


def test_weighted_projection_is_the_weighted_least_squares_fit():
    gen = torch.Generator().manual_seed(14)
    spec = fastfair.HashSpec(150, 6, memory_size=2 * 97, chunk_size=2, seed=4)
    dense = rand((150, 6), gen, torch.float64)
    a = rand(150, gen, torch.float64).abs() + 0.1
    w = fastfair.project_dense(dense, spec, row_weights=a)
    # The normal equations: the weighted residual is orthogonal to the subspace.
    probe = rand(spec.memory_size, gen, torch.float64)
    residual = a[:, None] * (fastfair.expand_dense(w, spec) - dense)
    torch.testing.assert_close((residual * fastfair.expand_dense(probe, spec)).sum(),
                               torch.zeros((), dtype=torch.float64), atol=1e-10, rtol=0)
    # Equal weights give the plain fit; a heavy row is reproduced beside light ones.
    torch.testing.assert_close(fastfair.project_dense(dense, spec, row_weights=torch.full_like(a, 3.0)),
                               fastfair.project_dense(dense, spec))
    heavy = a.clone()
    heavy[7] = 1e9
    v = fastfair.expand_dense(fastfair.project_dense(dense, spec, row_weights=heavy), spec)
    torch.testing.assert_close(v[7], dense[7], rtol=0, atol=1e-6)
    assert not torch.allclose(fastfair.expand_dense(fastfair.project_dense(dense, spec), spec)[7],
                              dense[7], rtol=0, atol=1e-3)


def test_weighted_projection_rejects_bad_weights():
    spec = fastfair.HashSpec(20, 4, memory_size=16)
    dense = torch.randn(20, 4)
    with pytest.raises(ValueError, match=r"row_weights must have shape \(20,\), got \(19,\)"):
        fastfair.project_dense(dense, spec, row_weights=torch.ones(19))
    bad = torch.ones(20)
    bad[5] = -2.0
    with pytest.raises(ValueError, match="row_weights must be >= 0, got -2.0 at row 5"):
        fastfair.project_dense(dense, spec, row_weights=bad)
    bad[5] = float("nan")
    with pytest.raises(ValueError, match="row_weights holds a non-finite value nan"):
        fastfair.project_dense(dense, spec, row_weights=bad)
    with pytest.raises(TypeError, match="row_weights must be a float32 or float64 Tensor"):
        fastfair.project_dense(dense, spec, row_weights=torch.ones(20, dtype=torch.int64))


# ------------------------------------------------------------------- properties of the reference
def test_reference_matches_torch_embedding_bag_on_virtual_table():
    from testing import virtual_table
    gen = torch.Generator().manual_seed(10)
    spec = fastfair.HashSpec(500, 19, memory_size=5 * 31, chunk_size=5, seed=3)
    w = rand(spec.memory_size, gen, torch.float64)
    idx, off = make_bags(500, [4, 0, 1, 9], gen)
    for mode in ("sum", "mean"):
        got = fastfair.embedding_bag(idx, w, spec, off, mode, backend="reference")
        ref = torch.nn.functional.embedding_bag(idx, virtual_table(w, spec), off, mode=mode)
        torch.testing.assert_close(got, ref, **TOL[torch.float64])


def test_projection_is_orthogonal():
    """P = expand(project(.)) is idempotent and self-adjoint; its residual is orthogonal to S(m)."""
    gen = torch.Generator().manual_seed(11)
    spec = fastfair.HashSpec(211, 7, memory_size=2 * 101, chunk_size=2, seed=1)
    a, b = rand((211, 7), gen, torch.float64), rand((211, 7), gen, torch.float64)

    def proj(x):
        return fastfair.expand_dense(fastfair.project_dense(x, spec, backend="reference"), spec,
                                     backend="reference")

    pa = proj(a)
    torch.testing.assert_close(proj(pa), pa)
    torch.testing.assert_close((proj(a) * b).sum(), (a * proj(b)).sum())
    w = rand(spec.memory_size, gen, torch.float64)
    residual = a - pa
    torch.testing.assert_close((residual * fastfair.expand_dense(w, spec)).sum(),
                               torch.zeros((), dtype=torch.float64), atol=1e-9, rtol=0)


def test_fold_is_the_projection_onto_the_smaller_subspace():
    gen = torch.Generator().manual_seed(12)
    spec = fastfair.HashSpec(400, 12, memory_size=4 * 64, chunk_size=4, seed=6)
    w = rand(spec.memory_size, gen, torch.float64)
    counts = fastfair.slot_counts(spec)
    for f in (2, 4, 16):
        small = spec.collapse(f)
        folded = fastfair.fold(w, f, counts)
        via_dense = fastfair.project_dense(fastfair.expand_dense(w, spec), small)
        torch.testing.assert_close(folded, via_dense)
        # tile is the inverse direction: the small table seen in the big array's coordinates.
        torch.testing.assert_close(fastfair.expand_dense(fastfair.tile(folded, f), spec),
                                   fastfair.expand_dense(folded, small))


# --------------------------------------------------------------------------- autograd and schema
@pytest.mark.parametrize("backend,device", backend_params())
def test_gradcheck_float64(backend, device):
    gen = torch.Generator().manual_seed(13)
    spec = fastfair.HashSpec(40, 6, memory_size=12, chunk_size=3, seed=2)
    w = rand(12, gen, torch.float64, device).requires_grad_()
    idx, off = make_bags(40, [3, 0, 2, 4], gen, device=device)
    psw = rand(9, gen, torch.float64, device).requires_grad_()
    kw = dict(backend=backend)
    for mode in ("sum", "mean"):
        torch.autograd.gradcheck(
            lambda w: fastfair.embedding_bag(idx, w, spec, off, mode, padding_idx=int(idx[1]), **kw),
            (w,))
    torch.autograd.gradcheck(lambda w, p: fastfair.embedding_bag(idx, w, spec, off, "sum", p, **kw),
                             (w, psw))
    torch.autograd.gradgradcheck(
        lambda w, p: fastfair.embedding_bag(idx, w, spec, off, "sum", p, padding_idx=int(idx[2]), **kw),
        (w, psw))
    torch.autograd.gradcheck(lambda w: fastfair.embedding(idx.view(3, 3), w, spec, **kw), (w,))
    counts = fastfair.slot_counts(spec, device)
    torch.autograd.gradcheck(lambda w: fastfair.fold(w, 4, counts, **kw), (w,))
    torch.autograd.gradcheck(lambda w: fastfair.tile(w, 3, **kw), (w,))
    v = rand(4, gen, torch.float64, device).requires_grad_()
    torch.autograd.gradcheck(lambda w, v: fastfair.aggregate([w, v], [0.3, -2.0], 24, **kw), (w, v))
    dense = rand((40, 6), gen, torch.float64, device).requires_grad_()
    torch.autograd.gradcheck(lambda d: fastfair.project_dense(d, spec, counts, **kw), (dense,))
    # The backward op's own backward (double backward of embedding_bag in grad_out).
    g = rand((4, 6), gen, torch.float64, device).requires_grad_()
    bounds = torch.cat([off, off.new_full((1,), idx.numel())])  # the raw op takes B + 1 offsets
    torch.autograd.gradcheck(
        lambda g: ops.embedding_bag_backward_op(g, idx, bounds, None, 12, 6, 3, 2, True, 1, -1,
                                                backend),
        (g,))


def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(14)
    w = rand(24, gen, torch.float64, device).requires_grad_()
    idx, off = make_bags(30, [3, 0, 5], gen, device=device)
    off = torch.cat([off, off.new_full((1,), idx.numel())])  # the raw ops take B + 1 offsets
    psw = rand(8, gen, torch.float64, device).requires_grad_()
    counts = fastfair.slot_counts(fastfair.HashSpec(30, 5, memory_size=24, chunk_size=2), device)
    g = rand((3, 5), gen, torch.float64, device)
    return [
        (ops.embedding_bag_op, (w, idx, off, psw, 30, 5, 2, 7, True, 0, -1, "auto", True)),
        (ops.embedding_bag_op, (w, idx, None, None, 30, 5, 2, 7, False, 0, int(idx[0]), "auto", True)),
        (ops.embedding_bag_op, (w, idx, off, None, 30, 5, 2, 7, True, 1, -1, "auto", True)),
        (ops.embedding_bag_backward_op, (g, idx, off, None, 24, 5, 2, 7, True, 1, -1, "auto")),
        (ops.hash_index_op, (idx, 5, 24, 2, 7, True, "auto")),
        (ops.slot_counts_op, (30, 5, 24, 2, 7, torch.device(device), "auto")),
        (ops.fold_op, (w, 4, counts, "auto")),
        (ops.tile_op, (w, 3, "auto")),
        (ops.aggregate_op, ([w, w[:6].detach().clone()], [0.5, 2.0], 48, "auto")),
    ]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_opcheck_every_op(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


def test_fake_shapes_on_meta():
    spec = fastfair.HashSpec(100, 7, memory_size=30, chunk_size=3)
    w = torch.empty(30, device="meta")
    idx = torch.empty(12, dtype=torch.int64, device="meta")
    off = torch.empty(4, dtype=torch.int64, device="meta")
    out = ops.embedding_bag_op(w, idx, off, None, 100, 7, 3, 0, True, 0, -1, "auto", False)
    assert out.shape == (3, 7) and out.device.type == "meta"
    assert fastfair.embedding(idx.view(3, 4), w, spec, validate=False).shape == (3, 4, 7)
    assert fastfair.slot_counts(spec, "meta").shape == (30,)


# --------------------------------------------------------------------------- deterministic mode
@pytest.fixture
def deterministic(backend, monkeypatch):
    """torch's deterministic mode for one test, restored afterwards; a backend with a separate
    deterministic backward has its atomic one removed, so the test fails if that one runs."""
    mod = backends.load(backend)
    if hasattr(mod, "bag_backward_deterministic"):
        monkeypatch.setattr(mod, "bag_backward", None)
    before, warn = (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn)


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_deterministic_mode_picks_the_sorted_backward(name, monkeypatch):
    mod = backends.load(name)
    if isinstance(mod, str):
        pytest.skip(f"{name}: {mod}")
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert backends.bag_backward_fn(mod) is mod.bag_backward_deterministic
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    assert backends.bag_backward_fn(mod) is mod.bag_backward


DET_VARIANTS = [VARIANTS[2], VARIANTS[4]]


@pytest.mark.parametrize("variant", DET_VARIANTS,
                         ids=lambda v: f"{v[0]}-{v[2]}-psw{v[3]}-pad{v[4]}"[6:])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}d{c[1]}z{c[2]}m{c[3]}b{len(c[4])}")
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic_backward_matches_reference_and_repeats(backend, device, case, variant,
                                                              deterministic):
    gen = torch.Generator().manual_seed(7919 * case[1] + case[3] + DET_VARIANTS.index(variant))
    state = gen.get_state()
    got, ref, ref64 = _run_bag(backend, device, case, variant, gen, seed=case[0])
    for g, r, r64 in zip(got, ref, ref64):
        if g is not None:
            assert_close_to_fp64(g, r, r64)
    again = _run_bag(backend, device, case, variant, gen.set_state(state), seed=case[0])[0]
    for g, h in zip(got, again):
        if g is not None:
            assert torch.equal(g, h), "two runs on the same inputs differ"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic_backward_elements_outside_bags(backend, device, deterministic):
    """Elements after the last offset add nothing, nor do padding rows; bags may be empty; and
    un-pooled lookups (no offsets) take the same path."""
    gen = torch.Generator().manual_seed(15)
    dim, z, m = 11, 4, 4 * 9
    idx = torch.randint(0, 500, (40,), generator=gen).to(device)
    g = rand((4, dim), gen, torch.float32, device)
    psw = rand(40, gen, torch.float32, device)
    calls = [(g, idx, torch.tensor(b, device=device), psw, m, dim, z, 3, True, 0, -1)
             for b in ([0, 3, 3, 17, 17], [0, 0, 0, 0, 0], [0, 40, 40, 40, 40])]
    calls.append((rand((40, dim), gen, torch.float32, device), idx, None, psw, m, dim, z, 3,
                  False, 0, int(idx[5])))
    for args in calls:
        got = ops.embedding_bag_backward_op(*args, backend)
        ref = ops.embedding_bag_backward_op(*args, "reference")
        torch.testing.assert_close(got, ref, **TOL[torch.float32])
        assert torch.equal(got, ops.embedding_bag_backward_op(*args, backend))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic_gradcheck_float64(backend, device, deterministic):
    gen = torch.Generator().manual_seed(16)
    spec = fastfair.HashSpec(40, 5, memory_size=12, chunk_size=3, seed=4)
    w = rand(12, gen, torch.float64, device).requires_grad_()
    idx, off = make_bags(40, [3, 0, 4], gen, device=device)
    psw = rand(7, gen, torch.float64, device).requires_grad_()
    pad = int(idx[0])
    torch.autograd.gradcheck(
        lambda w: fastfair.embedding_bag(idx, w, spec, off, "mean", padding_idx=pad,
                                         backend=backend), (w,))
    torch.autograd.gradcheck(
        lambda w, p: fastfair.embedding_bag(idx, w, spec, off, "sum", p, padding_idx=pad,
                                            backend=backend), (w, psw))
