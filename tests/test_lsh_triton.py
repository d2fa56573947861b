"""The Triton kernels of the LSH output-layer ops (``triton_backend.lsh_*``) against the reference
oracles (``reference.lsh_*``), under the Triton interpreter on CPU tensors: fold, periodic Gaussian
codes (fold fused), densified WTA codes (bit-identical) and the label-normalised softmax loss, on
awkward small shapes in float32 and float64, directly and through ``fastfair.kernels.lsh``."""
import pytest
import torch

from fastfair.kernels import backends, lsh, reference as ref
from testing import DTYPES, assert_close_to_fp64, gen, rand

CPU = torch.device("cpu")
WHY = backends.why_not("triton", CPU)
pytestmark = pytest.mark.skipif(bool(WHY), reason=f"triton on cpu: {WHY}")
tb = backends.load("triton")


def signs_for(d, g, dtype):
    return (torch.randint(0, 2, (d,), generator=g) * 2 - 1).to(dtype)


# ---------------------------------------------------------------- fold
# (n, d, c): c = d, d not divisible by c, c = 1, several fold tiles, two column blocks (c > 128).
FOLD_SHAPES = [(1, 5, 5), (7, 13, 4), (37, 10, 3), (7, 9, 1), (5, 300, 7), (3, 200, 130)]


@pytest.mark.parametrize("signed", [False, True], ids=["plain", "signed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fold_matches_reference(dtype, signed):
    g = gen(1)
    for n, d, c in FOLD_SHAPES:
        x = rand((n, d), g, dtype)
        s = signs_for(d, g, dtype) if signed else None
        got = tb.lsh_fold(x, c, s)
        assert got.dtype == dtype and got.shape == (n, c)
        ref64 = ref.lsh_fold(x.double(), c, None if s is None else s.double())
        assert_close_to_fp64(got, ref.lsh_fold(x, c, s), ref64)


# ---------------------------------------------------------------- periodic Gaussian codes
# (n, d, c, L, k): SimHash (c = d), d not divisible by c, the target shape in small (c = 8, k = 8),
# the float32 tl.dot path (c >= 16), several sketch chunks (c > 32), k = 31.
PG_SHAPES = [(1, 5, 5, 1, 1), (7, 13, 4, 3, 5), (37, 128, 8, 5, 8), (7, 40, 20, 2, 8),
             (5, 150, 100, 3, 31), (37, 10, 3, 2, 5)]


def exact_dots(x, proj, signs):
    """float64 ``<proj[l, b], fold(x)_j>`` ``[L, n, k]`` and a bound on its rounding error in the
    input dtype (fold of ``d / c`` terms, dot of ``c``)."""
    L, k, c = proj.shape
    s = None if signs is None else signs.double()
    y = ref.lsh_fold(x.double(), c, s)
    ya = ref.lsh_fold(x.double().abs(), c, None)
    dots = torch.einsum("lbc,nc->lnb", proj.double(), y)
    mag = torch.einsum("lbc,nc->lnb", proj.double().abs(), ya)
    eps = torch.finfo(x.dtype).eps
    return dots, 4 * (x.shape[1] // c + c + 2) * eps * mag


def assert_codes_close(got, x, proj, signs):
    """``got`` equals the reference except for bits whose dot is within rounding of 0."""
    want = ref.lsh_pg_codes(x, proj, signs)
    assert got.dtype == torch.int32 and got.shape == want.shape
    diff = (got ^ want).long()
    if not bool(diff.any()):
        return
    dots, tol = exact_dots(x, proj, signs)
    k = proj.shape[1]
    flipped = ((diff[..., None] >> torch.arange(k)) & 1).bool()
    bad = flipped & (dots.abs() > tol)
    assert not bool(bad.any()), f"bits {torch.nonzero(bad)[:5].tolist()} differ with dots far from 0"


@pytest.mark.parametrize("signed", [False, True], ids=["plain", "signed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pg_codes_match_reference(dtype, signed):
    g = gen(2)
    for n, d, c, L, k in PG_SHAPES:
        x = rand((n, d), g, dtype)
        proj = rand((L, k, c), g, dtype)
        s = signs_for(d, g, dtype) if signed else None
        assert_codes_close(tb.lsh_pg_codes(x, proj, s), x, proj, s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pg_codes_exact_zero_dot_gives_bit_zero(dtype):
    g = gen(3)
    x = rand((7, 12), g, dtype)
    proj = rand((2, 5, 4), g, dtype)
    proj[0, 2] = 0
    proj[1, 4] = 0
    got = tb.lsh_pg_codes(x, proj, None)
    assert not bool((got[0] & 4).any()) and not bool((got[1] & 16).any())
    assert_codes_close(got, x, proj, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pg_codes_through_the_op(dtype):
    """``lsh.pg_codes`` / ``lsh.fold`` with ``backend="triton"``: validation, then the kernel;
    hashing the sketch (``[n, c]`` input, no signs) gives the codes of the full rows."""
    g = gen(4)
    x = rand((11, 21), g, dtype)
    proj = rand((3, 6, 5), g, dtype)
    s = signs_for(21, g, dtype)
    got = lsh.pg_codes(x, proj, s, backend="triton")
    assert_codes_close(got, x, proj, s)
    y = lsh.fold(x, 5, s, backend="triton")
    assert_close_to_fp64(y, lsh.fold(x, 5, s, backend="reference"),
                         ref.lsh_fold(x.double(), 5, s.double()))
    assert_codes_close(lsh.pg_codes(y, proj, backend="triton"), y, proj, None)
    empty = lsh.pg_codes(x[:0], proj, backend="triton")
    assert empty.shape == (3, 0) and empty.dtype == torch.int32


# ---------------------------------------------------------------- densified WTA codes
# (n, d, c, L, nb, bits): one row, widths 2 and 4 come from the parametrisation; the last shape has
# nb log2 w > 31 bits (fields above ``bits`` are dropped).
DWTA_SHAPES = [(1, 9, 6, 2, 3, 3), (7, 20, 10, 3, 4, 4), (37, 30, 16, 4, 5, 5),
               (5, 50, 30, 2, 20, 31)]


def sparse_rows(n, d, g, dtype):
    """Mostly zeros (exact): row 0 all zero, row 2 a single non-zero, the rest ~70% zeros."""
    x = rand((n, d), g, dtype)
    x[torch.rand(n, d, generator=g) < 0.7] = 0
    x[0] = 0
    if n > 2:
        x[2] = 0
        x[2, int(torch.randint(0, d, (1,), generator=g))] = -1.25
    return x


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dwta_codes_identical_to_reference(dtype, width):
    g = gen(5 + width)
    key = 0xDEADBEEF
    for n, d, c, L, nb, bits in DWTA_SHAPES:
        bits = min(bits, nb * (width.bit_length() - 1))
        x = sparse_rows(n, d, g, dtype)
        rows = torch.randperm(d, generator=g)[:c]
        bins = torch.randint(0, c, (L, nb, width), generator=g)
        # No probe leaves every empty bin to the cyclic scan; 32 is the op's setting.
        for probes in ((0, 2, lsh.DWTA_PROBES) if n <= 7 else (0, lsh.DWTA_PROBES)):
            got = tb.lsh_dwta_codes(x, rows, bins, bits, key, probes)
            want = ref.lsh_dwta_codes(x, rows, bins, bits, key, probes)
            assert got.dtype == torch.int32
            assert torch.equal(got, want), (n, d, c, L, nb, bits, probes)
        # Densification stays within a table: a group of tables alone gives the same rows.
        part = tb.lsh_dwta_codes(x, rows, bins[1:], bits, key, lsh.DWTA_PROBES)
        assert torch.equal(part, got[1:]), (n, d, c, L, nb, bits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dwta_codes_through_the_op(dtype):
    g = gen(8)
    x = sparse_rows(13, 24, g, dtype)
    x[5] = rand((24,), g, dtype)  # a dense row: no densification
    rows = torch.randperm(24, generator=g)[:12].int()
    bins = torch.randint(0, 12, (3, 6, 4), generator=g).int()
    for seed in (0, 2**32 - 1):
        got = lsh.dwta_codes(x, rows, bins, 9, seed, backend="triton")
        assert torch.equal(got, lsh.dwta_codes(x, rows, bins, 9, seed, backend="reference"))
    assert lsh.dwta_codes(x[:0], rows, bins, 9, 0, backend="triton").shape == (3, 0)


# ---------------------------------------------------------------- softmax loss
def targets(B, M, g, with_dup=True):
    """CSR of target positions: sample 0 without labels (when B > 1), up to 3 otherwise, and a
    repeated position in the last sample."""
    cnt = torch.randint(1, 4, (B,), generator=g)
    if B > 1:
        cnt[0] = 0
    off = torch.zeros(B + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(cnt, 0)
    pos = torch.randint(0, M, (int(off[-1]),), generator=g)
    if with_dup and int(cnt[-1]) >= 2:
        pos[-1] = pos[-2]
    return off, pos


SOFTMAX_SHAPES = [(1, 1), (4, 1), (6, 37), (3, 1500), (2, 1024)]


def assert_loss_close(got, ref64, dtype):
    if dtype == torch.float64:
        torch.testing.assert_close(got, ref64.to(dtype), rtol=1e-11, atol=1e-12)
    else:
        # float32 accumulation over M terms against the float64 reference.
        torch.testing.assert_close(got.double(), ref64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_loss_matches_reference(dtype):
    g = gen(9)
    for B, M in SOFTMAX_SHAPES:
        z = 3 * rand((B, M), g, dtype)
        off, pos = targets(B, M, g)
        loss, grad = tb.lsh_softmax_loss(z, off, pos)
        assert loss.dtype == dtype and loss.shape == () and grad.dtype == dtype
        want_loss, want_grad = ref.lsh_softmax_loss(z.double(), off, pos)
        assert_loss_close(loss, want_loss, dtype)
        assert_loss_close(grad, want_grad, dtype)
        if B > 1:
            assert not bool(grad[0].any())  # the sample without labels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_loss_through_the_op(dtype):
    g = gen(10)
    B, n = 5, 50
    active = torch.sort(torch.randperm(n, generator=g)[:19]).values
    z = 2 * rand((B, 19), g, dtype)
    label_ids = torch.cat([active[[0, 3]], torch.tensor([active[7], 49 if 49 not in active
                                                          else 48]), active[[7, 7, 11]]])
    label_offsets = torch.tensor([0, 2, 2, 4, 6, 7])
    out = {}
    for name in ("triton", "reference"):
        zz = z.clone().requires_grad_()
        loss = lsh.softmax_loss(zz, active, label_offsets, label_ids, backend=name)
        (2 * loss).backward()
        out[name] = (loss.detach(), zz.grad)
    want_loss, want_grad = ref.lsh_softmax_loss(z.double(), *ref.lsh_targets(
        active, label_offsets, label_ids))
    assert_loss_close(out["triton"][0], want_loss, dtype)
    assert_loss_close(out["triton"][1], 2 * want_grad, dtype)
    e_loss, e_grad = tb.lsh_softmax_loss(z[:, :0], torch.zeros(B + 1, dtype=torch.int64),
                                         torch.zeros(0, dtype=torch.int64))
    assert float(e_loss) == 0 and e_grad.shape == (B, 0)
