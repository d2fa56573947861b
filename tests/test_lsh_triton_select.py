"""The Triton kernels of the LSH buckets and the active-set selection (``triton_backend.lsh_buckets``,
``lsh_union_``, ``lsh_pad_``, ``lsh_force_``) against the reference oracles, under the Triton
interpreter on CPU tensors: buckets bit-identical (members ascending, empty buckets, one segment
per table or several), the selection's set, count and marks equal to the reference's (``out``'s
order is free), the trim's rank bit-exact, and the ``ActiveSet`` flow on both backends."""
import pytest
import torch

from fastfair.kernels import backends, lsh, reference as ref
from testing import gen

CPU = torch.device("cpu")
WHY = backends.why_not("triton", CPU)
pytestmark = pytest.mark.skipif(bool(WHY), reason=f"triton on cpu: {WHY}")
tb = backends.load("triton")


# ---------------------------------------------------------------- buckets
@pytest.mark.parametrize("cells", [None, 1, 3 * 8 * 2], ids=["segments", "one-per-table", "two"])
def test_buckets_match_reference(monkeypatch, cells):
    """Bit-identical offsets and members; ``cells`` caps the (table, segment, bucket) counters:
    one segment per block of 128 neurons (default here), one per table, or a few."""
    if cells is not None:
        monkeypatch.setattr(tb, "LSH_BUCKET_CELLS", cells)
    g = gen(1)
    for n in (1, 7, 300):
        for bits in (1, 3, 6):
            codes = torch.randint(0, 1 << bits, (3, n), generator=g, dtype=torch.int32)
            codes[1] &= ~1  # only even codes: odd buckets are empty
            codes[2, : n // 2] = 0  # a large bucket spanning several blocks
            offsets, members = tb.lsh_buckets(codes, bits)
            want_o, want_m = ref.lsh_buckets(codes, bits)
            assert offsets.dtype == torch.int64 and members.dtype == torch.int32
            assert torch.equal(offsets, want_o), (n, bits)
            assert torch.equal(members, want_m), (n, bits)


def test_buckets_through_the_module_and_edge_shapes():
    g = gen(2)
    codes = torch.randint(0, 8, (4, 37), generator=g, dtype=torch.int64)
    got = lsh.buckets(codes, 3, backend="triton")
    want = lsh.buckets(codes, 3, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # every neuron in one bucket; no neuron at all
    same = torch.full((2, 260), 5, dtype=torch.int32)
    assert all(torch.equal(a, b) for a, b in zip(tb.lsh_buckets(same, 3),
                                                 ref.lsh_buckets(same, 3)))
    o, m = tb.lsh_buckets(torch.zeros(2, 0, dtype=torch.int32), 2)
    assert o.shape == (2, 5) and not bool(o.any()) and m.shape == (2, 0)


# ---------------------------------------------------------------- rank
def test_rank_is_bit_exact():
    ids = torch.tensor([0, 1, 2, 77, 2**31 - 2, 2**31 - 1, 12345678], dtype=torch.int64)
    mark = torch.zeros(8, dtype=torch.uint8)
    for key in (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, lsh.trim_key(3)):
        got = tb._lsh_ranks(ids, mark, ids.numel(), key, False)
        assert torch.equal(got, ref.lsh_rank(ids, key)), key
    mark[[1, 6]] = 1
    got = tb._lsh_ranks(mark, mark, 8, 0x9E3779B9, True)
    want = ref.lsh_rank(torch.arange(8), 0x9E3779B9)
    want[[1, 6]] = 2**63 - 1
    assert torch.equal(got, want)


# ---------------------------------------------------------------- selection
def case(n, T, bits, B, g, dup=False):
    codes = torch.randint(0, 1 << bits, (T, n), generator=g, dtype=torch.int32)
    offsets, members = ref.lsh_buckets(codes, bits)
    q = torch.randint(0, 1 << bits, (B, T), generator=g, dtype=torch.int32)
    if dup:
        q[B // 2:] = q[:B - B // 2].clone()  # samples hitting the same buckets as others
    return codes, q, offsets, members


def sizes_after_tables(forced, q, offsets, members):
    """``|A|`` after each table with no budget."""
    mark = torch.zeros(members.shape[1], dtype=torch.bool)
    out = torch.empty(members.shape[1], dtype=torch.int64)
    count = ref.lsh_force_(mark, out, 0, torch.as_tensor(forced, dtype=torch.int64))
    res = []
    for t in range(q.shape[1]):
        count = ref.lsh_union_(mark, out, count, q[:, t:t + 1], offsets[t:t + 1],
                               members[t:t + 1], members.shape[1], 1)
        res.append(count)
    return res


def run_ops(impl, n, m, forced, q, offsets, members, per_table, trim=77, pad=99):
    mark = torch.zeros(n, dtype=torch.bool)
    out = torch.full((n,), -1, dtype=torch.int64)
    count = 0
    if forced is not None:
        count = impl.lsh_force_(mark, out, count, torch.as_tensor(forced, dtype=torch.int64))
    T = q.shape[1]
    for a, b in ([(t, t + 1) for t in range(T)] if per_table else [(0, T)]):
        if count < m:  # ActiveSet does not call the union once full
            count = impl.lsh_union_(mark, out, count, q[:, a:b].contiguous(), offsets[a:b],
                                    members[a:b], m, trim)
    mid = count
    count = impl.lsh_pad_(mark, out, count, m, pad)
    assert isinstance(count, int) and int(mark.sum()) == count
    ids = sorted(out[:count].tolist())
    assert ids == torch.nonzero(mark).view(-1).tolist()  # distinct, and exactly the marks
    return mid, count, ids


@pytest.mark.parametrize("dup", [False, True], ids=["distinct", "dup-codes"])
def test_union_pad_force_match_reference(dup):
    """Budget reached in table 0, in a middle table, never (then the pad); forced labels, also
    beyond the budget; duplicated codes across samples; one table per call or all at once."""
    g = gen(3 + dup)
    n, T = 300, 5
    codes, q, offsets, members = case(n, T, 4, 6, g, dup)
    forced = torch.randint(0, n, (6,), generator=g).tolist()
    forced += forced[:2]  # repeated labels
    nf = len(set(forced))
    sz = sizes_after_tables([], q, offsets, members)
    szf = sizes_after_tables(forced, q, offsets, members)
    assert sz[0] > 1 and sz[1] + 1 < sz[2] < sz[-1] < n
    budgets = [("table 0", None, sz[0] - 1), ("table 0, forced", forced, nf + 1),
               ("middle", None, (sz[1] + sz[2]) // 2), ("middle, forced", forced,
                                                         (szf[1] + szf[2]) // 2),
               ("never, padded", None, sz[-1] + 17), ("never, forced", forced, szf[-1] + 17),
               ("exact", None, sz[-1]), ("all", forced, n),
               ("forced beyond", forced, nf - 2)]
    for what, f, m in budgets:
        want = run_ops(ref, n, m, f, q, offsets, members, False)
        for per_table in (False, True):
            got = run_ops(tb, n, m, f, q, offsets, members, per_table)
            assert got == want, (what, m, per_table)
        if what == "forced beyond":
            assert want[0] == want[1] == nf > m and want[2] == sorted(set(forced))


def test_union_edge_cases():
    g = gen(5)
    # one neuron; every code hits one bucket of everything; no query at all
    for n, bits, B in ((1, 1, 1), (9, 1, 3), (40, 2, 0)):
        codes, q, offsets, members = case(n, 3, bits, B, g)
        for m in range(1, n + 1, max(1, n // 4)):
            assert run_ops(tb, n, m, None, q, offsets, members, False) == \
                run_ops(ref, n, m, None, q, offsets, members, False), (n, m)
    # the pad with keys of 32 bits, and a set already full
    mark = torch.zeros(50, dtype=torch.bool)
    out = torch.empty(50, dtype=torch.int64)
    assert tb.lsh_pad_(mark, out, 0, 50, 0xFFFFFFFF) == 50 and bool(mark.all())
    assert tb.lsh_union_(mark, out, 50, torch.zeros(2, 1, dtype=torch.int32),
                         torch.tensor([[0, 50]]), torch.arange(50, dtype=torch.int32)[None],
                         10, 3) == 50
    assert tb.lsh_force_(mark, out, 50, torch.tensor([], dtype=torch.int64)) == 50


@pytest.mark.parametrize("per_table", [False, True], ids=["all-tables", "serial"])
def test_active_set_flow_equals_reference(per_table):
    """``lsh.ActiveSet(backend="triton")`` with buckets built by the Triton kernels equals
    ``backend="reference"``, for budgets hit in the first, a middle and no table."""
    g = gen(6)
    n, T, bits, B = 500, 6, 5, 8
    codes = torch.randint(0, 1 << bits, (T, n), generator=g, dtype=torch.int32)
    q = torch.randint(0, 1 << bits, (B, T), generator=g, dtype=torch.int32)
    labels = torch.randint(0, n, (10,), generator=g)
    tri = lsh.buckets(codes, bits, backend="triton")
    refb = lsh.buckets(codes, bits, backend="reference")
    sz = sizes_after_tables([], q, *refb)
    for m in (max(1, sz[0] // 2), (sz[2] + sz[3]) // 2, min(n, sz[-1] + 30)):
        for f in (None, labels):
            res = []
            for backend, (offsets, members) in (("triton", tri), ("reference", refb)):
                act = lsh.ActiveSet(n, m, seed=5, backend=backend)
                if f is not None:
                    act.force(f)
                steps = [(t, t + 1) for t in range(T)] if per_table else [(0, T)]
                full = [act.add(q[:, a:b], offsets[a:b], members[a:b]) for a, b in steps]
                before = act.count
                ids = act.pad().ids()
                res.append((full, before, ids.tolist(), act.mark.clone()))
            assert res[0][1:3] == res[1][1:3], (m, f is not None)
            assert res[0][0] == res[1][0] and torch.equal(res[0][3], res[1][3])
