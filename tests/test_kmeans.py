"""k-means and the action-sharing kernels (``fastfair.kernels.kmeans``): every op against float64
oracles built here and the pure-torch reference, on every live backend; the driver's semantics
(seeded determinism, the iteration cap and tolerance stop, re-seeding, exactness when the rows
take at most k values, the spherical variant) and its error messages."""
import math

import pytest
import torch

from fastfair.kernels import backends, kmeans as km
import testing
from testing import DTYPES, TOL, assert_close_to_fp64, gen, rand

numba_backend = backends.load("numba")
needs_numba = pytest.mark.skipif(
    bool(backends.why_not("numba", torch.device("cpu"))),
    reason=f"numba backend: {backends.why_not('numba', torch.device('cpu'))}")


def op_params(op):
    """``testing.op_params`` for the backends that have ``kmeans_<op>``."""
    return testing.op_params(f"kmeans_{op}")


def small(backend, shapes):
    """The Triton interpreter is slow: it gets the shapes of at most 300 rows."""
    return [s for s in shapes if backend != "triton" or s[0] <= 300]


def dist64(x, c):
    """Exact-ish squared distances in float64 from the differences: ``[N, K]``."""
    diff = x.double()[:, None, :] - c.double()[None, :, :]
    return (diff * diff).sum(-1)


def assert_nearest(x, c, labels, dist2=None):
    """Every label is a nearest centroid up to the rounding of the expansion the kernels use
    (``||c||^2 - 2 <x, c>``, whose error grows with ``||x||^2``, not with the distance), and
    ``dist2``, if given, is the distance to it."""
    d = dist64(x, c)
    assert labels.dtype == torch.int64 and labels.shape == (x.shape[0],)
    if x.shape[0] == 0:
        return
    eps = torch.finfo(x.dtype).eps
    scale = x.double().pow(2).sum(1) + c.double().pow(2).sum(1).max()
    picked = d.gather(1, labels[:, None].cpu())[:, 0]
    slack = 8 * x.shape[1] * eps * scale
    bad = picked > d.min(1).values + slack
    assert not bool(bad.any()), f"rows {torch.nonzero(bad)[:5, 0].tolist()} got a far centroid"
    if dist2 is not None:
        torch.testing.assert_close(dist2.double().cpu(), picked, rtol=x.shape[1] * eps, atol=0)


ASSIGN_SHAPES = [(0, 3, 5), (4, 2, 0), (1, 1, 1), (7, 3, 5), (37, 17, 13), (300, 20, 33),
                 (2000, 70, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", op_params("assign"))
def test_assign_is_the_nearest_centroid(backend, device, dtype):
    g = gen(1)
    for n, k, d in small(backend, ASSIGN_SHAPES):
        # Non-contiguous x: every other column of a wider table.
        x = rand((n, 2 * d), g, dtype, device)[:, ::2]
        c = rand((k, d), g, dtype, device)
        if n > 3:
            c[0] = x[3]  # a row that coincides with a centroid: distance exactly 0
        labels, dist2 = km.assign(x, c, backend=backend)
        assert dist2.dtype == dtype and dist2.device == x.device
        assert_nearest(x, c, labels, dist2)
        if n > 3:
            assert int(labels[3]) == 0 and float(dist2[3]) == 0.0


@pytest.mark.parametrize("backend,device", op_params("assign"))
def test_assign_ties_go_to_the_smallest_index(backend, device):
    g = gen(2)
    x = rand((50, 6), g, torch.float32, device)
    c = rand((5, 6), g, torch.float32, device)
    labels, dist2 = km.assign(x, torch.cat([c, c, c]), backend=backend)
    ref, _ = km.assign(x, c, backend="reference")
    assert bool((labels < 5).all())
    assert_nearest(x, c, labels, dist2)
    assert torch.equal(labels.cpu(), ref.cpu())


@needs_numba
def test_numba_assign_paths_agree(monkeypatch):
    """The BLAS kernel (centroids in one chunk or in chunks of 5 with a remainder, its layout
    built per call or given), the register-blocked one (no scipy), serial and parallel builds:
    the same labels, and the distances of those labels. 1003 rows end in a partial block."""
    g = gen(3)
    x = rand((1003, 19), g)
    c = rand((37, 19), g)
    rows = numba_backend.KMEANS_BLAS_ROWS
    results = []
    for blas, mnk in ((True, 1 << 18), (True, 5 * rows * 19), (False, 1 << 18)):
        for min_work in (1 << 62, 0):
            monkeypatch.setattr(numba_backend, "KMEANS_BLAS", blas)
            monkeypatch.setattr(numba_backend, "KMEANS_BLAS_MNK", mnk)
            monkeypatch.setattr(numba_backend, "PARALLEL_MIN_WORK", min_work)
            results.append(numba_backend.kmeans_assign(x, c))
            layout = numba_backend.kmeans_layout(x)
            assert (layout is None) == (not blas)
            results.append(numba_backend.kmeans_assign(x, c, layout))
    for labels, dist2 in results:
        assert_nearest(x, c, labels, dist2)
        # Labels may differ only at near-ties; where they agree, so do the distances.
        same = labels == results[0][0]
        assert float(same.float().mean()) > 0.99
        assert torch.equal(dist2[same], results[0][1][same])


SUM_SHAPES = [(0, 3, 4), (5, 2, 0), (1, 1, 1), (9, 4, 3), (257, 13, 10), (3000, 40, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", op_params("centroid_sums"))
def test_centroid_sums(backend, device, dtype):
    g = gen(4)
    for n, k, d in small(backend, SUM_SHAPES):
        x = rand((n, d + 3), g, dtype, device)[:, 1:d + 1]
        # Labels from the lower half only, so clusters in the upper half stay empty.
        labels = torch.randint(0, max(1, k // 2), (n,), generator=g).to(device)
        sums, counts = km.centroid_sums(x, labels, k, backend=backend)
        ref, ref_counts = km.centroid_sums(x, labels, k, backend="reference")
        ref64 = torch.zeros(k, d, dtype=torch.float64).index_add_(0, labels.cpu(),
                                                                 x.double().cpu())
        assert sums.shape == (k, d) and sums.dtype == dtype
        assert_close_to_fp64(sums, ref, ref64)
        assert torch.equal(counts.cpu(), torch.bincount(labels.cpu(), minlength=k))
        assert torch.equal(counts.cpu(), ref_counts.cpu())


@needs_numba
def test_numba_sums_do_not_depend_on_the_thread_count(monkeypatch):
    threads = numba_backend.numba.get_num_threads()
    if threads < 2:
        pytest.skip("numba runs one thread")
    g = gen(5)
    x = rand((40_000, 8), g)
    labels = torch.randint(0, 7, (40_000,), generator=g)
    monkeypatch.setattr(numba_backend, "PARALLEL_MIN_WORK", 0)
    got = []
    try:
        for t in (1, threads):
            numba_backend.numba.set_num_threads(t)
            got.append(numba_backend.kmeans_centroid_sums(x, labels, 7))
    finally:
        numba_backend.numba.set_num_threads(threads)
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])


def pack_oracle(values, bits):
    """The stream with Python integers: value j at bit j * bits, little-endian bytes."""
    acc = 0
    for j, v in enumerate(values.tolist()):
        acc |= v << (j * bits)
    n = (values.numel() * bits + 7) // 8
    return torch.tensor(list(acc.to_bytes(n, "little")), dtype=torch.uint8)


@pytest.mark.parametrize("backend,device", op_params("pack"))
def test_pack_and_unpack(backend, device):
    g = gen(6)
    for bits in (1, 2, 3, 5, 7, 8, 9, 13, 31, 32, 33, 62, 63):
        for m in (0, 1, 5, 8, 17, 203):
            hi = 1 << bits
            values = (torch.rand(m, generator=g, dtype=torch.float64) * hi).long().clamp_(0, hi - 1)
            if m >= 2:
                values[0], values[-1] = hi - 1, 0  # the extremes
            values = values.to(device)
            packed = km.pack_indices(values, bits, backend=backend)
            assert packed.dtype == torch.uint8 and packed.numel() == (m * bits + 7) // 8
            assert torch.equal(packed.cpu(), pack_oracle(values.cpu(), bits)), (bits, m)
            assert torch.equal(km.unpack_indices(packed, bits, m, backend=backend), values)


@needs_numba
def test_pack_parallel_build_matches():
    g = gen(7)
    values = torch.randint(0, 1 << 11, (70_001,), generator=g)
    ref = km.pack_indices(values, 11, backend="reference")
    assert torch.equal(numba_backend.kmeans_pack(values, 11), ref)
    assert torch.equal(numba_backend.kmeans_unpack(ref, 11, 70_001), values)


REBUILD_SHAPES = [(5, 0, 2, 3), (1, 1, 1, 1), (40, 17, 6, 7), (500, 300, 33, 20)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", op_params("rebuild_add_"))
def test_rebuild_add(backend, device, dtype):
    """Bit-identical to the reference (one rounded product and one rounded addition per
    element on every backend), with and without scales, into a non-contiguous ``out``."""
    g = gen(8)
    for n, m, k, d in REBUILD_SHAPES:
        base = rand((n, d + 2), g, dtype, device)
        c = rand((k, d), g, dtype, device)
        rows = torch.randperm(n, generator=g)[:m].to(device)
        labels = torch.randint(0, k, (m,), generator=g).to(device)
        scales = rand(m, g, dtype, device)
        for s in (None, scales):
            out = base.clone()[:, 1:d + 1]
            ref = out.clone()
            got = km.rebuild_add_(out, rows, c, labels, s, 0.37, backend=backend)
            km.rebuild_add_(ref, rows, c, labels, s, 0.37, backend="reference")
            assert got is out and torch.equal(out, ref)
            coef = torch.full((m,), 0.37, dtype=dtype, device=device)
            if s is not None:
                coef = coef * s
            ref64 = base[:, 1:d + 1].double().index_add(0, rows, c[labels].double() *
                                                        coef.double()[:, None])
            torch.testing.assert_close(out.double(), ref64, **TOL[dtype])


@pytest.mark.parametrize("backend,device", op_params("rebuild_add_"))
def test_rebuild_with_exact_centroids_is_the_uncompressed_aggregate(backend, device):
    """Centroids that are the touched rows themselves: two clients' rebuilds add exactly what
    ``index_add_`` of their raw updates adds, bit for bit, with repeats across calls."""
    g = gen(9)
    n, d = 30, 8
    table = rand((n, d), g, torch.float32, device)
    expect = table.clone()
    for w in (0.3, 0.7):
        rows = torch.randperm(n, generator=g)[:12].to(device)
        update = rand((12, d), g, torch.float32, device)
        res = km.kmeans(update, 16, backend=backend)
        assert torch.equal(res.centroids[res.labels], update)
        km.rebuild_add_(table, rows, res.centroids, res.labels, None, w, backend=backend)
        expect.index_add_(0, rows, update * w)
    assert torch.equal(table, expect)


# ---------------------------------------------------------------- the driver
def blobs(g, k=5, per=40, d=6, spread=0.01, dtype=torch.float32, device="cpu"):
    """``k`` well-separated groups (centers ~N(0, 10^2), noise ``spread``) and the truth."""
    centers = rand((k, d), g, torch.float64) * 10
    truth = torch.arange(k).repeat_interleave(per)
    x = centers[truth] + spread * rand((k * per, d), g, torch.float64)
    perm = torch.randperm(k * per, generator=g)
    return x[perm].to(dtype).to(device), truth[perm]


def same_partition(a, b):
    """Whether two labelings split the rows the same way (up to renaming the clusters)."""
    pairs = torch.unique(torch.stack([a.cpu(), b.cpu()]), dim=1)
    return pairs.shape[1] == torch.unique(a).numel() == torch.unique(b).numel()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", op_params("seed"))
def test_kmeans_finds_separated_clusters_on_every_backend(backend, device, dtype):
    g = gen(10)
    x, truth = blobs(g, dtype=dtype, device=device)
    for init in km.INITS:
        res = km.kmeans(x, 5, init=init, iters=30, seed=3, backend=backend)
        assert res.centroids.shape == (5, 6) and res.scales is None
        # The labels are the nearest centroids, and the inertia is the reconstruction error.
        assert_nearest(x, res.centroids, res.labels)
        err = (x.double() - res.centroids[res.labels].double()).pow(2).sum()
        assert math.isclose(res.inertia, float(err), rel_tol=1e-5)
        if init == "k-means++":
            # A uniform init often puts two centers in one group, a local minimum where rows
            # near both swap labels by rounding; from k-means++ Lloyd reaches the truth, a
            # fixed point where every centroid is the mean of its rows.
            assert same_partition(res.labels, truth)
            sums, counts = km.centroid_sums(x, res.labels, 5, backend="reference")
            torch.testing.assert_close(res.centroids, sums / counts[:, None].to(dtype),
                                       **TOL[dtype])


@pytest.mark.parametrize("backend,device", op_params("seed"))
def test_kmeans_is_deterministic_per_seed(backend, device):
    g = gen(11)
    x = rand((120 if backend == "triton" else 600, 7), g, torch.float32, device)
    for init in km.INITS:
        a = km.kmeans(x, 9, init=init, seed=5, backend=backend)
        b = km.kmeans(x, 9, init=init, seed=5, backend=backend)
        assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
        assert a.iterations == b.iterations and a.inertia == b.inertia


def test_kmeans_init_draws_the_same_rows_on_every_backend():
    """Backends share the seeded draws; on data without near-ties they pick the same rows."""
    g = gen(12)
    x = rand((150, 5), g)
    picks = {}
    for p in op_params("seed"):
        if p.marks:
            continue
        name, dev = p.values
        res = km.kmeans(x.to(dev), 8, iters=0, seed=2, backend=name)
        picks[name] = res.centroids.cpu()
    if len(picks) < 2:
        pytest.skip(f"only {list(picks)} can run here")
    first = next(iter(picks.values()))
    assert all(torch.equal(c, first) for c in picks.values())


def test_tol_zero_runs_exactly_iters_and_tol_stops_early():
    g = gen(13)
    x = rand((400, 6), g)
    for iters in (0, 1, 7):
        assert km.kmeans(x, 8, iters=iters, tol=0).iterations == iters
    loose = km.kmeans(x, 8, iters=50, tol=0.2)
    assert 1 <= loose.iterations < 50


def test_inertia_never_increases_with_more_iterations():
    g = gen(14)
    x = rand((500, 4), g, torch.float64)
    inertia = [km.kmeans(x, 12, iters=t, tol=0, seed=1).inertia for t in range(8)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(inertia, inertia[1:]))
    assert inertia[-1] < inertia[0]


def test_iters_zero_returns_the_init():
    g = gen(15)
    x = rand((80, 3), g)
    res = km.kmeans(x, 6, iters=0, seed=4)
    assert res.iterations == 0
    # Every centroid is one of the rows, and the rows are labelled with their nearest.
    assert bool((dist64(res.centroids, x).min(1).values == 0).all())
    assert_nearest(x, res.centroids, res.labels)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", op_params("seed"))
def test_at_most_k_distinct_rows_are_reproduced_exactly(backend, device, dtype):
    g = gen(16)
    distinct = rand((10, 7), g, dtype, device)
    x = distinct[torch.randint(0, 10, (300,), generator=g).to(device)]
    x[:10] = distinct  # every distinct row occurs
    for k in (10, 16):
        for init in km.INITS:
            res = km.kmeans(x, k, init=init, backend=backend)
            assert res.centroids.shape == (10, 7) and res.iterations == 0 and res.inertia == 0
            assert torch.equal(res.centroids[res.labels], x)
    # Fewer clusters than distinct rows: k' = k.
    assert km.kmeans(x, 4, backend=backend).centroids.shape == (4, 7)


@pytest.mark.parametrize("dtype,tiny", [(torch.float32, 1e-30), (torch.float64, 1e-170)])
def test_exactness_survives_squares_that_underflow(dtype, tiny):
    """Rows that differ by less than the square root of the smallest subnormal have distance 0
    yet are distinct: the driver checks equality and still reproduces them."""
    base = torch.tensor([[tiny, 0.0], [2 * tiny, 0.0], [5.0, 1.0]], dtype=dtype)
    x = base[torch.tensor([0, 1, 2, 0, 1, 1, 2])]
    res = km.kmeans(x, 3)
    assert res.centroids.shape == (3, 2) and torch.equal(res.centroids[res.labels], x)
    # With k = 2 the two tiny rows must share a centroid; nothing breaks.
    assert km.kmeans(x, 2).centroids.shape == (2, 2)


def test_empty_clusters_are_reseeded_with_the_farthest_rows():
    g = gen(17)
    z = rand((20, 3), g)
    dist2 = torch.rand(20, generator=g)
    sums = rand((4, 3), g)
    counts = torch.tensor([3, 0, 5, 0])
    c = km._update(z, sums, counts, dist2, spherical=False)
    far = torch.argsort(dist2, descending=True)[:2]
    assert torch.equal(c[1], z[far[0]]) and torch.equal(c[3], z[far[1]])
    torch.testing.assert_close(c[[0, 2]], sums[[0, 2]] / counts[[0, 2], None].float())
    # Spherical: a cluster whose directions cancel is re-seeded too, the others made unit.
    sums[2] = 0
    c = km._update(z, sums, torch.tensor([3, 2, 5, 1]), dist2, spherical=True)
    assert torch.equal(c[2], z[far[0]])
    torch.testing.assert_close(c[[0, 1, 3]].norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", op_params("seed"))
def test_spherical(backend, device, dtype):
    g = gen(18)
    dirs = rand((4, 9), g, torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    truth = torch.randint(0, 4, (120,), generator=g)
    s = rand(120, g, torch.float64).abs() + 0.5
    x = (s[:, None] * dirs[truth] + 1e-3 * rand((120, 9), g, torch.float64)).to(dtype)
    x[7] = 0  # a zero row
    x = x.to(device)
    res = km.kmeans(x, 4, spherical=True, iters=30, backend=backend)
    assert res.scales is not None and res.scales.dtype == dtype
    assert int(res.labels[7]) == 0 and float(res.scales[7]) == 0
    keep = torch.arange(120) != 7
    assert same_partition(res.labels[keep], truth[keep])
    torch.testing.assert_close(res.centroids.norm(dim=1).double().cpu(), torch.ones(4,
                               dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # The scales are the least-squares ones, and the inertia is their reconstruction error.
    c = res.centroids[res.labels]
    torch.testing.assert_close(res.scales, (x * c).sum(1), **TOL[dtype])
    err = (x.double() - res.scales[:, None].double() * c.double()).pow(2).sum()
    assert math.isclose(res.inertia, float(err), rel_tol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spherical_exactness_holds_up_to_rounding(dtype):
    """Rows along at most k directions: every centroid is a row's direction and
    ``s_i c_{a(i)}`` is ``x_i`` up to a few float epsilons (relative)."""
    g = gen(19)
    dirs = rand((5, 6), g, dtype)
    # Scales of +-2^e keep x_i / ||x_i|| exact, so rows of one direction share one u_i.
    s = torch.randint(-2, 3, (200,), generator=g).to(dtype).exp2()
    s = s * (torch.randint(0, 2, (200,), generator=g) * 2 - 1).to(dtype)
    x = s[:, None] * dirs[torch.randint(0, 5, (200,), generator=g)]
    x[3] = 0
    u = x / x.norm(dim=1, keepdim=True)
    distinct = torch.unique(u[torch.arange(200) != 3], dim=0).shape[0]
    res = km.kmeans(x, 12, spherical=True)
    assert res.centroids.shape[0] == distinct and res.iterations == 0
    rebuilt = res.scales[:, None] * res.centroids[res.labels]
    eps = torch.finfo(dtype).eps
    live = torch.arange(200) != 3
    err = (rebuilt - x)[live].norm(dim=1) / x[live].norm(dim=1)
    assert float(err.max()) <= 8 * eps
    assert float(rebuilt[3].abs().max()) == 0


def test_spherical_with_only_zero_rows():
    res = km.kmeans(torch.zeros(4, 3), 2, spherical=True)
    assert res.centroids.shape == (1, 3) and float(res.centroids.norm()) == 1
    assert not bool(res.scales.any()) and res.inertia == 0


# ---------------------------------------------------------------- backend choice and errors
def test_auto_picks_a_backend_that_has_the_op(monkeypatch):
    cpu = torch.device("cpu")
    live = "numba" if not backends.why_not("numba", cpu) else "reference"
    assert km._kernel("assign", "auto", cpu) is getattr(backends.load(live), "kmeans_assign")
    monkeypatch.setenv(backends.ENV, "triton")
    if backends.why_not("triton", cpu):
        pytest.skip(f"triton: {backends.why_not('triton', cpu)}")
    with pytest.raises(backends.BackendUnavailableError, match="no kmeans_pack kernel"):
        km.pack_indices(torch.arange(3), 2)
    with pytest.raises(backends.BackendUnavailableError, match="no kmeans_unpack kernel"):
        km.unpack_indices(torch.zeros(1, dtype=torch.uint8), 2, 3, backend="triton")


X = torch.randn(6, 3)
C = torch.randn(2, 3)
L = torch.tensor([0, 1, 0, 1, 1, 0])


def _nan():
    x = X.clone()
    x[4, 1] = float("nan")
    return x


def _inf():
    x = X.clone()
    x[2, 0] = -float("inf")
    return x


BAD_CALLS = [
    (lambda: km.kmeans(torch.empty(0, 3), 2), ValueError, "no rows"),
    (lambda: km.kmeans(torch.empty(3, 0), 2), ValueError, "no columns"),
    (lambda: km.kmeans(X, 0), ValueError, "k must be >= 1, got 0"),
    (lambda: km.kmeans(X, -3), ValueError, "got -3"),
    (lambda: km.kmeans(X, 2.5), TypeError, "k must be an int"),
    (lambda: km.kmeans(X[0], 2), ValueError, r"2-D .* got shape \(3,\)"),
    (lambda: km.kmeans(X[None], 2), ValueError, r"got shape \(1, 6, 3\)"),
    (lambda: km.kmeans(X.long(), 2), TypeError, "torch.int64"),
    (lambda: km.kmeans(X.half(), 2), TypeError, "torch.float16"),
    (lambda: km.kmeans(_nan(), 2), ValueError, r"non-finite value nan at \(4, 1\)"),
    (lambda: km.kmeans(_inf(), 2), ValueError, r"-inf at \(2, 0\)"),
    (lambda: km.kmeans(X, 2, iters=-1), ValueError, "iters must be >= 0, got -1"),
    (lambda: km.kmeans(X, 2, tol=-0.1), ValueError, "tol must be finite and >= 0, got -0.1"),
    (lambda: km.kmeans(X, 2, tol="0"), TypeError, "tol must be a real number"),
    (lambda: km.kmeans(X, 2, init="kmeans"), ValueError, "init must be one of"),
    (lambda: km.kmeans(X, 2, spherical=1), TypeError, "spherical must be a bool"),
    (lambda: km.kmeans(X, 2, seed=-1), ValueError, "seed must be in"),
    (lambda: km.kmeans(X, 2, backend="gpu"), ValueError, "unknown backend 'gpu'"),
    (lambda: km.assign(_nan(), C), ValueError, "x holds a non-finite value nan"),
    (lambda: km.assign(X, C[:0]), ValueError, "at least one row"),
    (lambda: km.assign(X, C[:, :2]), ValueError, "2 columns but x has 3"),
    (lambda: km.assign(X, C.double()), TypeError, "centroids is torch.float64 but x is"),
    (lambda: km.assign(X.numpy(), C), TypeError, "x must be a torch.Tensor, got ndarray"),
    (lambda: km.centroid_sums(X, L.int(), 2), TypeError, "labels must be int64"),
    (lambda: km.centroid_sums(X, L[:4], 2), ValueError, "4 entries, expected 6"),
    (lambda: km.centroid_sums(X, L + 1, 2), ValueError, r"labels\[1\] = 2 is out of range"),
    (lambda: km.centroid_sums(X, L - 1, 2), ValueError, r"labels\[0\] = -1 is out of range"),
    (lambda: km.pack_indices(L, 0), ValueError, r"bits must be in \[1, 63\], got 0"),
    (lambda: km.pack_indices(L, 64), ValueError, "got 64"),
    (lambda: km.pack_indices(torch.tensor([1, 8, 2]), 3), ValueError,
     r"values\[1\] = 8 does not fit in 3 bits"),
    (lambda: km.pack_indices(torch.tensor([1, -2]), 3), ValueError, r"values\[1\] = -2"),
    (lambda: km.pack_indices(L.float(), 3), TypeError, "values must be int64"),
    (lambda: km.unpack_indices(torch.zeros(2, dtype=torch.uint8), 3, 7), ValueError,
     "2 bytes but 7 values of 3 bits take 3"),
    (lambda: km.unpack_indices(torch.zeros(3), 3, 7), TypeError, "1-D uint8"),
    (lambda: km.unpack_indices(torch.zeros(3, dtype=torch.uint8), 3, -1), ValueError,
     "m must be >= 0"),
    (lambda: km.rebuild_add_(X.clone(), torch.tensor([0, 6]), C, torch.tensor([0, 1]), None,
                             1.0), ValueError, r"rows\[1\] = 6 is out of range"),
    (lambda: km.rebuild_add_(X.clone(), torch.tensor([0, 5]), C, torch.tensor([0, 2]), None,
                             1.0), ValueError, r"labels\[1\] = 2 is out of range"),
    (lambda: km.rebuild_add_(X.clone(), torch.tensor([4, 1, 4]), C, torch.tensor([0, 1, 0]),
                             None, 1.0), ValueError, "rows holds 4 more than once"),
    (lambda: km.rebuild_add_(X.clone(), torch.tensor([0]), C, torch.tensor([0]), None,
                             float("nan")), ValueError, "weight must be finite"),
    (lambda: km.rebuild_add_(X.clone(), torch.tensor([0]), C, torch.tensor([0]), None, "1"),
     TypeError, "weight must be a real number"),
    (lambda: km.rebuild_add_(X.clone(), torch.tensor([0]), C, torch.tensor([0]),
                             torch.ones(2), 1.0), ValueError, "scales must be None or a 1-D"),
    (lambda: km.rebuild_add_(X.clone(), torch.tensor([0]), C.double(), torch.tensor([0]), None,
                             1.0), TypeError, "centroids is torch.float64 but out is"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS, ids=[str(i) for i in range(len(BAD_CALLS))])
def test_bad_input_raises_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_validation_leaves_out_untouched():
    out = X.clone()
    with pytest.raises(ValueError):
        km.rebuild_add_(out, torch.tensor([0, 6]), C, torch.tensor([0, 1]), None, 1.0)
    assert torch.equal(out, X)
