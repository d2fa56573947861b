"""The LSH ops of PGHash (``fastfair.kernels.lsh``) on every live backend against the pure-torch
reference and against oracles written here from the module's contract: sketches and codes (the
float64 sign of every dot product, bits free to differ only where it is within rounding of 0),
DWTA codes with densification, buckets, the active set (an oracle on Python sets), the softmax
loss (a float64 log_softmax brute force), the autograd of the loss and of ``lsh_linear``, the
numba kernels' independence from their build and thread count, and the validators' errors."""
import math

import pytest
import torch

from fastfair.kernels import backends, hashing, lsh, reference
import testing
from testing import DTYPES, TOL, assert_close_to_fp64, gen, rand

CPU = torch.device("cpu")
NUMBA_WHY = backends.why_not("numba", CPU)
needs_numba = pytest.mark.skipif(bool(NUMBA_WHY), reason=f"numba backend: {NUMBA_WHY}")
# The Triton interpreter (CPU tensors) is slow: it gets at most this many rows.
TRITON_ROWS = 64


def op_params(*ops):
    """``testing.op_params`` for the backends that have ``lsh_<op>`` for every op."""
    return testing.op_params(*(f"lsh_{op}" for op in ops))


def sizes(backend, ns):
    return [n for n in ns if backend != "triton" or n <= TRITON_ROWS]


def signs_of(d, g, dtype, device):
    return (torch.randint(0, 2, (d,), generator=g) * 2 - 1).to(dtype).to(device)


# ---------------------------------------------------------------- fold and PG / SimHash codes
# (n, d, c): one row, d not a multiple of c, c = 1, c = d, T = ceil(d / c) odd and even.
FOLD_SHAPES = [(1, 5, 5), (7, 13, 4), (7, 9, 1), (30, 20, 20), (50, 100, 33), (1000, 128, 8),
               (1000, 300, 7)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", op_params("fold"))
def test_fold(backend, device, dtype):
    g = gen(1)
    for n, d, c in FOLD_SHAPES:
        if n not in sizes(backend, [n]):
            continue
        x = rand((n, d), g, dtype, device)
        for s in (None, signs_of(d, g, dtype, device)):
            got = lsh.fold(x, c, s, backend=backend)
            assert got.dtype == dtype and got.device == x.device and got.shape == (n, c)
            ref = reference.lsh_fold(x.cpu(), c, None if s is None else s.cpu())
            ref64 = reference.lsh_fold(x.double().cpu(), c, None if s is None else s.double().cpu())
            assert_close_to_fp64(got.cpu(), ref, ref64, factor=4.0)


def sketch64(x, c, s):
    """The float64 sketch the codes hash (``x`` itself for SimHash without signs)."""
    x = x.double().cpu()
    if c == x.shape[1] and s is None:
        return x
    return reference.lsh_fold(x, c, None if s is None else s.double().cpu())


def assert_codes(codes, x, proj, s, ref=None):
    """Every bit of ``codes [L, n]`` is the sign of its float64 dot product, except where that is
    within 1e-5 |proj_row| |y_j| of 0; so is every bit of the reference's ``ref``, and the two
    agree outside those places."""
    L, k, c = proj.shape
    assert codes.dtype == torch.int32 and codes.shape == (L, x.shape[0])
    y = sketch64(x, c, s)
    p = proj.double().cpu()
    dots = torch.einsum("lbc,nc->lnb", p, y)
    near = dots.abs() < 1e-5 * p.norm(dim=2)[:, None, :] * y.norm(dim=1)[None, :, None]
    bits = torch.arange(k)
    truth = dots > 0
    for got in (codes, ref):
        if got is None:
            continue
        have = ((got.cpu().long()[:, :, None] >> bits) & 1).bool()
        bad = (have != truth) & ~near
        assert not bool(bad.any()), f"{int(bad.sum())} bits differ from the float64 sign"
    if ref is not None:
        assert bool(((codes.cpu() == ref.cpu()) | near.any(2)).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", op_params("pg_codes"))
def test_pg_codes(backend, device, dtype):
    g = gen(2)
    # (n, d, c): periodic (c < d, d not a multiple of c too) and SimHash (c = d), incl. c > 8.
    shapes = [(1, 6, 6), (7, 13, 4), (7, 20, 20), (1000, 128, 8), (1000, 21, 21), (300, 50, 11)]
    for n, d, c in shapes:
        if n not in sizes(backend, [n]):
            continue
        x = rand((n, d), g, dtype, device)
        for k in (1, 8, 31):
            proj = rand((3, k, c), g, dtype, device)
            for s in (None, signs_of(d, g, dtype, device)):
                codes = lsh.pg_codes(x, proj, s, backend=backend)
                assert codes.device == x.device
                ref = lsh.pg_codes(x.cpu(), proj.cpu(), None if s is None else s.cpu(),
                                   backend="reference")
                assert_codes(codes, x, proj, s, ref)


@pytest.mark.parametrize("backend,device", op_params("pg_codes"))
def test_pg_codes_of_the_sketch_equal_those_of_the_weight(backend, device):
    """Hashing the sketch ``fold(W)`` as is (``c = d``) gives the codes of ``W`` (PGHash: the
    server sends the sketch)."""
    g = gen(3)
    n = 60 if backend == "triton" else 700
    w = rand((n, 64), g, torch.float64, device)
    s = signs_of(64, g, torch.float64, device)
    proj = rand((4, 8, 8), g, torch.float64, device)
    full = lsh.pg_codes(w, proj, s, backend=backend)
    y = lsh.fold(w, 8, s, backend=backend)
    assert_codes(full, w, proj, s)
    assert_codes(lsh.pg_codes(y, proj, backend=backend), y, proj, None, full)


@pytest.mark.parametrize("backend,device", op_params("pg_codes"))
def test_pg_codes_exact_zero_dot_gives_bit_zero(backend, device):
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0],      # zero row: every dot 0
                      [1.5, -2.0, -1.5, 2.0],    # folds (c = 2) to exactly 0
                      [1.0, 1.0, 0.0, 0.0]],     # sketch (1, 1), orthogonal to (1, -1)
                     device=device)
    proj = torch.tensor([[[1.0, -1.0], [-3.0, 3.0], [2.0, 0.5]]], device=device)
    codes = lsh.pg_codes(x, proj, backend=backend).cpu()
    assert codes.tolist() == [[0, 0, 4]]


@pytest.mark.parametrize("backend,device", op_params("fold"))
def test_zero_rows(backend, device):
    """No neurons: ``[0, c]`` sketches, ``[L, 0]`` codes, empty buckets."""
    x = rand((0, 12), gen(14), torch.float32, device)
    proj = rand((2, 3, 4), gen(15), torch.float32, device)
    mod = backends.load(backend)
    if hasattr(mod, "lsh_dwta_codes"):
        rows, bins = torch.arange(6, device=device), torch.zeros(2, 3, 2, dtype=torch.int64,
                                                                 device=device)
        assert lsh.dwta_codes(x, rows, bins, 3, 1, backend=backend).shape == (2, 0)
    if hasattr(mod, "lsh_buckets"):
        offsets, members = lsh.buckets(torch.zeros(2, 0, dtype=torch.int32, device=device), 3,
                                       backend=backend)
        assert members.shape == (2, 0) and not bool(offsets.any())
    assert lsh.pg_codes(x[:, :4], proj, backend=backend).shape == (2, 0)
    assert lsh.pg_codes(x, proj, backend=backend).shape == (2, 0)
    assert lsh.fold(x, 4, backend=backend).shape == (0, 4)


# ---------------------------------------------------------------- DWTA
def dwta_case(n, d, c, L, nb, w, g, dtype, device, sparsity):
    x = rand((n, d), g, dtype)
    x[torch.rand(n, d, generator=g) < sparsity] = 0
    x[0] = 0  # a row whose every bin is empty: its codes are 0
    rows = torch.randperm(d, generator=g)[:c]
    bins = torch.randint(0, c, (L, nb, w), generator=g)
    return x.to(device), rows.to(device), bins.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", op_params("dwta_codes"))
def test_dwta_codes(backend, device, dtype):
    g = gen(4)
    # (w, nb, bits): widths 2, 4, 8; codes cut to fewer bits than the bins give, or to all.
    layouts = [(2, 5, 5), (2, 31, 31), (4, 3, 5), (4, 16, 31), (8, 4, 12), (8, 11, 31), (8, 1, 1)]
    for n in sizes(backend, [1, 7, 1000]):
        for w, nb, bits in layouts:
            for sparsity in (0.0, 0.7, 0.95):
                x, rows, bins = dwta_case(n, 40, 24, 3, nb, w, g, dtype, device, sparsity)
                got = lsh.dwta_codes(x, rows, bins, bits, seed=11, backend=backend)
                ref = lsh.dwta_codes(x.cpu(), rows.cpu(), bins.cpu(), bits, seed=11,
                                     backend="reference")
                assert got.dtype == torch.int32 and got.device == x.device
                assert torch.equal(got.cpu(), ref), (n, w, nb, bits, sparsity)
                assert int(got[:, 0].abs().sum()) == 0
                assert int(got.min()) >= 0 and int(got.max()) < 1 << bits


@pytest.mark.parametrize("backend,device", op_params("dwta_codes"))
def test_dwta_tables_are_independent(backend, device):
    """Densification stays within a table, so building tables one at a time (or with another
    seed for the other tables) gives the same codes."""
    g = gen(5)
    n = 50 if backend == "triton" else 400
    x, rows, bins = dwta_case(n, 30, 20, 4, 6, 4, g, torch.float32, device, 0.85)
    full = lsh.dwta_codes(x, rows, bins, 10, seed=3, backend=backend)
    for t in range(4):
        one = lsh.dwta_codes(x, rows, bins[t:t + 1], 10, seed=3, backend=backend)
        assert torch.equal(one[0], full[t])


def test_dwta_densification_by_hand():
    """One table of 4 bins of width 2 over 8 sampled columns, bins 1 and 3 empty: they take the
    value of the first non-empty bin among their probes (computed here from ``hashing``)."""
    x = torch.tensor([[0.5, 2.0, 0.0, 0.0, 3.0, -1.0, 0.0, 0.0]])
    rows = torch.arange(8)
    bins = torch.arange(8).view(1, 4, 2)
    key = lsh.dwta_key(7)

    def probe(b, a):
        h = hashing.fmix32_int((hashing.fmix32_int(b ^ key) + a * hashing.GOLDEN)
                               & hashing.MASK32)
        return h % 4

    val = {0: 1, 2: 0}  # winners of the non-empty bins: 2.0 at position 1, 3.0 at position 0
    fill = [val[0], None, val[2], None]
    for b in (1, 3):
        fill[b] = next(val[p] for p in (probe(b, a) for a in range(lsh.DWTA_PROBES)) if p in val)
    want = sum(v << b for b, v in enumerate(fill))
    for backend in ("reference",) + (() if NUMBA_WHY else ("numba",)):
        assert lsh.dwta_codes(x, rows, bins, 4, seed=7, backend=backend).tolist() == [[want]]


# ---------------------------------------------------------------- buckets
@pytest.mark.parametrize("backend,device", op_params("buckets"))
def test_buckets(backend, device):
    g = gen(6)
    for n in sizes(backend, [1, 7, 1000]):
        for bits in (1, 3, 10):
            codes = torch.randint(0, 1 << bits, (3, n), generator=g, dtype=torch.int32)
            codes[1] = codes[1] & ~1  # only even codes: odd buckets are empty
            codes = codes.to(device)
            offsets, members = lsh.buckets(codes, bits, backend=backend)
            ref_o, ref_m = lsh.buckets(codes.cpu(), bits, backend="reference")
            assert offsets.dtype == torch.int64 and members.dtype == torch.int32
            assert torch.equal(offsets.cpu(), ref_o) and torch.equal(members.cpu(), ref_m)
            # The contract itself: bucket h of table l holds the j with code h, ascending.
            o, m, cs = offsets.cpu(), members.cpu().long(), codes.cpu()
            assert o.shape == (3, (1 << bits) + 1) and bool((o[:, 0] == 0).all())
            assert bool((o[:, -1] == n).all())
            for t in range(3):
                for h in range(1 << bits):
                    part = m[t, o[t, h]:o[t, h + 1]]
                    assert torch.equal(part, torch.nonzero(cs[t] == h).view(-1))
            if bits > 1 and n > 1:
                assert bool((o[1, 2::2] == o[1, 1::2]).all())  # the odd buckets are empty


# ---------------------------------------------------------------- the active set
def oracle_select(n, m, seed, forced, qcodes, codes):
    """The module docstring's selection on Python sets: ``A = F``; per table while ``|A| < m``
    the new members of the hit buckets, trimmed by ``(fmix32(j ^ k_trim), j)``; then the pad by
    ``(fmix32(j ^ k_pad), j)``. Returns the sorted ids and ``|A|`` before the pad."""
    kt, kp = lsh.trim_key(seed), lsh.pad_key(seed)
    a = set(forced)
    for t in range(codes.shape[0]):
        if len(a) >= m:
            break
        hit = set(qcodes[:, t].tolist())
        new = {j for j, h in enumerate(codes[t].tolist()) if h in hit} - a
        if len(a) + len(new) > m:
            new = sorted(new, key=lambda j: (hashing.fmix32_int(j ^ kt), j))[:m - len(a)]
        a |= set(new)
    before = len(a)
    if len(a) < m:
        free = sorted(set(range(n)) - a, key=lambda j: (hashing.fmix32_int(j ^ kp), j))
        a |= set(free[:m - len(a)])
    return sorted(a), before


def select(backend, device, n, m, seed, forced, qcodes, offsets, members, per_table=False):
    act = lsh.ActiveSet(n, m, seed, device=device, backend=backend)
    if forced is not None:
        act.force(torch.as_tensor(forced, dtype=torch.int64, device=device))
    T = qcodes.shape[1]
    groups = [(t, t + 1) for t in range(T)] if per_table else [(0, T)]
    for a, b in groups:
        act.add(qcodes[:, a:b], offsets[a:b], members[a:b])
    before = act.count
    ids = act.pad().ids()
    # mark and out hold the same set, and exactly count ids
    assert act.count == ids.numel()
    assert torch.equal(torch.nonzero(act.mark).view(-1).cpu(), ids.cpu())
    assert ids.numel() == torch.unique(ids).numel()
    return ids.cpu().tolist(), before


def selection_case(n, T, bits, B, g, device, dup=False):
    codes = torch.randint(0, 1 << bits, (T, n), generator=g, dtype=torch.int32)
    offsets, members = lsh.buckets(codes, bits, backend="reference")
    q = torch.randint(0, 1 << bits, (B, T), generator=g, dtype=torch.int32)
    if dup and B > 1:
        q[B // 2:] = q[:B - B // 2].clone()  # samples that hit the same buckets as others
    return codes, q.to(device), offsets.to(device), members.to(device)


def union_sizes(forced, q, codes):
    """``|A|`` after each table with no budget."""
    a, out = set(forced), []
    for t in range(codes.shape[0]):
        hit = set(q[:, t].tolist())
        a |= {j for j, h in enumerate(codes[t].tolist()) if h in hit}
        out.append(len(a))
    return out


@pytest.mark.parametrize("backend,device", op_params("union_", "pad_", "force_"))
def test_active_set(backend, device):
    """Budget reached in table 0, in a middle table, never (then the pad); forced labels beyond
    the budget; samples with duplicated codes; one table at a time (serial mode) or all at
    once give the same set."""
    g = gen(7)
    for n in (1, 7, 1000):
        T, bits = 5, (1 if n < 10 else 5)
        for dup in (False, True):
            codes, q, offsets, members = selection_case(n, T, bits, 3, g, device, dup)
            forced = torch.randint(0, n, (min(n, 4),), generator=g).tolist()
            forced += forced[:1]  # a repeated label
            sizes_ = union_sizes(forced, q.cpu(), codes)
            budgets = {"table 0": max(1, min(n, len(set(forced)) + 1)),
                       "middle": max(1, (sizes_[1] + sizes_[2]) // 2), "never": n}
            if len(set(forced)) > 1:
                budgets["forced beyond"] = len(set(forced)) - 1
            if n > 10:
                budgets["never, padded"] = min(n, sizes_[-1] + 37)
                assert sizes_[1] < budgets["middle"] < sizes_[2]  # trimmed in table 2
            for what, m in budgets.items():
                for f in (None, forced):
                    want = oracle_select(n, m, 12, f or [], q.cpu(), codes)
                    for per_table in (False, True):
                        got = select(backend, device, n, m, 12, f, q, offsets, members,
                                     per_table)
                        assert got == want, (n, what, m, f is not None, per_table)
                if what == "forced beyond":
                    ids, before = select(backend, device, n, m, 12, forced, q, offsets, members)
                    assert ids == sorted(set(forced)) and before == len(ids) > m


@pytest.mark.parametrize("backend,device", op_params("union_", "pad_", "force_"))
def test_union_kernel_returns_the_reference_set_in_any_order(backend, device):
    """The raw ops: ``out[:count]`` may be in any order, but the set, ``count`` and ``mark``
    equal the reference's; the pad's picks too."""
    g = gen(8)
    n = 1000
    codes, q, offsets, members = selection_case(n, 6, 4, 9, g, device)
    mod, ref = backends.load(backend), reference
    for m in (50, 400, 999, 1000):
        results = []
        for impl in (mod, ref):
            mark = torch.zeros(n, dtype=torch.bool, device=device)
            out = torch.empty(n, dtype=torch.int64, device=device)
            count = impl.lsh_force_(mark, out, 0, torch.tensor([5, 5, 17], device=device))
            count = impl.lsh_union_(mark, out, count, q, offsets, members, m, 77)
            mid = count
            count = impl.lsh_pad_(mark, out, count, m, 99)
            assert count == max(m, 2) and int(mark.sum()) == count
            results.append((mid, count, sorted(out[:count].tolist()), mark.clone().cpu()))
        assert results[0][:3] == results[1][:3] and torch.equal(results[0][3], results[1][3])


# ---------------------------------------------------------------- softmax loss and autograd
def brute_loss(z, active, label_offsets, label_ids):
    """``(1/B) sum_b -mean_{p in P_b} log_softmax(z_b)[p]`` in float64, over the samples with
    an active label (``P_b`` keeps a label's repeats)."""
    pos = {int(a): i for i, a in enumerate(active.tolist())}
    total = z.new_zeros(())
    B = z.shape[0]
    for b in range(B):
        P = [pos[j] for j in label_ids[label_offsets[b]:label_offsets[b + 1]].tolist() if j in pos]
        if P:
            total = total - torch.log_softmax(z[b], 0)[P].mean()
    return total / B


def loss_case(B, M, n, g, dtype, device):
    active = torch.sort(torch.randperm(n, generator=g)[:M]).values
    counts = torch.randint(0, 4, (B,), generator=g)
    counts[0] = max(1, int(counts[0]))
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    labels = torch.randint(0, n, (int(offsets[-1]),), generator=g)
    if labels.numel():
        labels[0] = active[0]  # at least one active label
    z = (3 * rand((B, M), g, torch.float64)).to(dtype).to(device)
    return z, active.to(device), offsets.to(device), labels.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", op_params("softmax_loss"))
def test_softmax_loss(backend, device, dtype):
    """Loss and gradient against the float64 brute force: B = 1 and M = 1, samples with no
    active label (some with no labels at all), repeated labels, larger batches."""
    g = gen(9)
    cases = [(1, 1, 3), (1, 5, 9), (6, 7, 12), (5, 1, 4), (64, 300, 2000)]
    for B, M, n in cases:
        if backend == "triton" and B * M > 4096:
            continue
        z, active, offsets, labels = loss_case(B, M, n, g, dtype, device)
        if labels.numel() > 2:
            labels[1] = labels[0]  # a repeated label weighs twice
        z = z.requires_grad_()
        loss = lsh.softmax_loss(z, active, offsets, labels, backend=backend)
        loss.backward()
        z64 = z.detach().double().cpu().requires_grad_()
        want = brute_loss(z64, active.cpu(), offsets.cpu(), labels.cpu())
        want.backward()
        assert loss.dtype == dtype and loss.shape == () and z.grad.dtype == dtype
        tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss.detach().cpu().double(), want.detach(), **tol)
        torch.testing.assert_close(z.grad.cpu().double(), z64.grad, **tol)


@pytest.mark.parametrize("backend,device", op_params("softmax_loss"))
def test_softmax_loss_without_active_labels_is_zero(backend, device):
    z = rand((3, 4), gen(10), torch.float32, device).requires_grad_()
    active = torch.tensor([1, 3, 5, 7], device=device)
    offsets = torch.tensor([0, 1, 1, 3], device=device)
    labels = torch.tensor([0, 2, 8], device=device)
    loss = lsh.softmax_loss(z, active, offsets, labels, backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not bool(z.grad.any())


def test_softmax_loss_gradcheck():
    g = gen(11)
    z, active, offsets, labels = loss_case(4, 6, 20, g, torch.float64, "cpu")
    labels[1:3] = active[2]
    fn = lambda t: lsh.softmax_loss(t, active, offsets, labels, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z.requires_grad_(),))


def test_lsh_linear_gradcheck_and_sparse_grad():
    g = gen(12)
    x = rand((3, 5), g, torch.float64).requires_grad_()
    w = rand((9, 5), g, torch.float64).requires_grad_()
    b = rand((9,), g, torch.float64).requires_grad_()
    active = torch.tensor([0, 2, 3, 7])
    assert torch.autograd.gradcheck(lambda *t: lsh.lsh_linear(*t, active), (x, w, b))
    assert torch.autograd.gradcheck(lambda *t: lsh.lsh_linear(*t, None, active), (x, w))
    upstream = rand((3, 4), g, torch.float64)
    grads = {}
    for sparse in (False, True):
        for t in (x, w, b):
            t.grad = None
        out = lsh.lsh_linear(x, w, b, active, sparse=sparse)
        torch.testing.assert_close(out, x @ w[active].T + b[active], **TOL[torch.float64])
        out.backward(upstream)
        grads[sparse] = (x.grad.clone(), w.grad, b.grad)
    dense, sparse = grads[False], grads[True]
    assert sparse[1].is_sparse and sparse[2].is_sparse
    assert torch.equal(sparse[1].coalesce().indices()[0], active)
    torch.testing.assert_close(sparse[0], dense[0])
    torch.testing.assert_close(sparse[1].to_dense(), dense[1])
    torch.testing.assert_close(sparse[2].to_dense(), dense[2])
    inactive = torch.ones(9, dtype=torch.bool)
    inactive[active] = False
    assert not bool(dense[1][inactive].any()) and not bool(dense[2][inactive].any())


# ---------------------------------------------------------------- numba: builds and threads
@needs_numba
def test_numba_results_do_not_depend_on_the_build_or_thread_count(monkeypatch):
    """The serial build (small launches), the parallel build at the default thread count and at
    one thread give the same bits: every neuron (table, row) is computed by one task."""
    import numba

    nb = backends.load("numba")
    g = gen(13)
    x = rand((1100, 40), g)
    s = signs_of(40, g, torch.float32, "cpu")
    proj = rand((3, 8, 8), g)
    xs, rows, bins = dwta_case(1100, 40, 24, 3, 5, 4, g, torch.float32, "cpu", 0.8)
    codes = torch.randint(0, 64, (3, 1100), generator=g, dtype=torch.int32)
    z, _, offsets, labels = loss_case(40, 300, 1000, g, torch.float32, "cpu")
    tgt = reference.lsh_targets(torch.arange(300), offsets, labels.clamp(max=299))

    def run():
        return [nb.lsh_fold(x, 8, s), nb.lsh_pg_codes(x, proj, s),
                nb.lsh_pg_codes(x[:, :8].contiguous(), proj, None),
                nb.lsh_dwta_codes(xs, rows, bins, 7, 5, lsh.DWTA_PROBES),
                *nb.lsh_buckets(codes, 6), *nb.lsh_softmax_loss(z, *tgt)]

    monkeypatch.setattr(nb, "PARALLEL_MIN_WORK", 1 << 62)
    serial = run()
    monkeypatch.setattr(nb, "PARALLEL_MIN_WORK", 0)
    threads = numba.get_num_threads()
    try:
        results = [run()]
        numba.set_num_threads(1)
        results.append(run())
    finally:
        numba.set_num_threads(threads)
    for res in results:
        for a, b in zip(serial, res):
            assert a.dtype == b.dtype and torch.equal(a, b)


# ---------------------------------------------------------------- validation
X = torch.randn(4, 8)
BAD_CALLS = [
    (lambda: lsh.pg_codes(X, torch.randn(2, 32, 4)), ValueError,
     r"bits \(proj.shape\[1\]\) must be in \[1, 31\], got 32"),
    (lambda: lsh.buckets(torch.zeros(2, 3, dtype=torch.int32), 21), ValueError,
     r"bits must be in \[1, 20\], got 21"),
    (lambda: lsh.softmax_loss(torch.randn(1, 2), torch.tensor([5, 1]), torch.tensor([0, 1]),
                              torch.tensor([1])), ValueError, "active must be sorted"),
    (lambda: lsh.dwta_codes(X, torch.arange(8), torch.zeros(1, 40, 2, dtype=torch.int64), 32, 0),
     ValueError, r"bits must be in \[1, 31\], got 32"),
    (lambda: lsh.fold(X, 9), ValueError, "sketch_dim=9 exceeds in_features=8"),
    (lambda: lsh.pg_codes(X, torch.randn(2, 4, 9)), ValueError,
     r"sketch_dim \(proj.shape\[2\]\) = 9 must be in \[1, in_features=8\]"),
    (lambda: lsh.ActiveSet(10, 3).force(torch.tensor([0, 10])), ValueError,
     r"label ids\[1\] = 10 is out of range"),
    (lambda: lsh.ActiveSet(10, 3).force(torch.tensor([-4])), ValueError,
     r"label ids\[0\] = -4 is out of range"),
    (lambda: lsh.dwta_codes(X, torch.tensor([0, 8]), torch.zeros(1, 2, 2, dtype=torch.int64),
                            2, 0), ValueError, r"rows\[1\] = 8 is out of range"),
    (lambda: lsh.dwta_codes(X, torch.arange(4), torch.full((1, 2, 2), 4), 2, 0), ValueError,
     r"bins\[0, 0, 0\] = 4 is out of range"),
    (lambda: lsh.buckets(torch.tensor([[0, 9]], dtype=torch.int32), 3), ValueError,
     r"codes\[0, 1\] = 9 is out of range"),
    (lambda: lsh.dwta_codes(X, torch.arange(8), torch.zeros(1, 4, 3, dtype=torch.int64), 2, 0),
     ValueError, r"bin width \(bins.shape\[2\]\) = 3 must be a power of two"),
    (lambda: lsh.dwta_codes(X, torch.arange(8), torch.zeros(1, 4, 6, dtype=torch.int64), 2, 0),
     ValueError, "= 6 must be a power of two"),
    (lambda: lsh.budget_size(0, 100), ValueError, r"budget must be in \(0, 1\], got 0"),
    (lambda: lsh.budget_size(1.5, 100), ValueError, "got 1.5"),
    (lambda: lsh.budget_size(-0.25, 100), ValueError, "got -0.25"),
    (lambda: lsh.budget_size(float("nan"), 100), ValueError, "got nan"),
    (lambda: lsh.budget_size(True, 100), TypeError, "got True"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS, ids=[str(i) for i in range(len(BAD_CALLS))])
def test_bad_input_raises_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_budget_size():
    assert lsh.budget_size(1.0, 7) == 7 and lsh.budget_size(1e-9, 7) == 1
    assert lsh.budget_size(0.05, 205443) == math.floor(0.05 * 205443)
