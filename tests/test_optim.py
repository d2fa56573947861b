"""DeferredAdam: torch's Adam at the cost of the rows a step uses; ScatterAdam: torch's Adam fed
sparse gradients without a dense one; LazyAdam: SparseAdam's rule, fused."""
import pytest
import torch

from fastfair.kernels import backends
from fastfair.nn import HashedEmbedding
from fastfair.kernels import reference
from fastfair.optim import DeferredAdam, LazyAdam, ScatterAdam

BACKENDS = ["reference", "numba"]


def _batches(num, rows, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    # few rows per step, so most rows miss many steps before they are used again
    return [torch.randint(0, rows, (num,), generator=gen) for _ in range(steps)]


def _train(module, opt, batches, seed, flush=None):
    gen = torch.Generator().manual_seed(seed)
    for step, idx in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        out = module(idx)
        (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum().backward()
        opt.step()
        if flush is not None and step == flush:
            opt.flush()
    if hasattr(opt, "flush"):
        opt.flush()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_embedding_rows_equal_torch_adam(backend, dtype):
    torch.manual_seed(0)
    dense = torch.nn.Embedding(37, 5, dtype=dtype)
    sparse = torch.nn.Embedding(37, 5, sparse=True, dtype=dtype)
    sparse.weight.data.copy_(dense.weight.data)
    batches = _batches(6, 37, 25, seed=1)
    _train(dense, torch.optim.Adam(dense.parameters(), lr=0.05, foreach=False), batches, 2)
    _train(sparse, DeferredAdam(sparse.parameters(), lr=0.05, backend=backend), batches, 2,
           flush=10)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse.weight, dense.weight, **tol)
    assert not torch.equal(dense.weight, sparse.weight.new_zeros(1).expand_as(dense.weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hashed_array_equals_torch_adam(backend):
    torch.manual_seed(3)
    kw = dict(memory_size=96, chunk_size=2, seed=4)
    dense = HashedEmbedding(500, 6, **kw)
    sparse = HashedEmbedding(500, 6, sparse=True, **kw)
    sparse.weight.data.copy_(dense.weight.data)
    batches = [b.view(4, 2) for b in _batches(8, 500, 20, seed=5)]
    _train(dense, torch.optim.Adam(dense.parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-6,
                                   foreach=False), batches, 6)
    _train(sparse, DeferredAdam(sparse.parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-6,
                                backend=backend), batches, 6)
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-5, atol=1e-6)


def _train_nonlinear(module, opt, batches, seed):
    """Training whose gradients depend on the rows' values (``sum r * out^2``), as a model's do."""
    gen = torch.Generator().manual_seed(seed)
    for idx in batches:
        opt.zero_grad(set_to_none=True)
        out = module(idx)
        (out.pow(2) * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum().backward()
        opt.step()
    if hasattr(opt, "flush"):
        opt.flush()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hashed", [False, True])
def test_tracked_modules_train_exactly_as_torch_adam(backend, hashed):
    torch.manual_seed(7)
    if hashed:
        make = lambda sparse: HashedEmbedding(300, 5, memory_size=120, chunk_size=1, seed=2,
                                              sparse=sparse, dtype=torch.float64)  # noqa: E731
    else:
        make = lambda sparse: torch.nn.Embedding(60, 5, sparse=sparse,  # noqa: E731
                                                 dtype=torch.float64)
    dense, tracked, untracked = make(False), make(True), make(True)
    tracked.weight.data.copy_(dense.weight.data)
    untracked.weight.data.copy_(dense.weight.data)
    rows = 300 if hashed else 60
    batches = _batches(5, rows, 30, seed=8)
    _train_nonlinear(dense, torch.optim.Adam(dense.parameters(), lr=0.05, foreach=False),
                     batches, 9)
    opt = DeferredAdam(tracked.parameters(), lr=0.05, backend=backend)
    handle = opt.track(tracked)
    _train_nonlinear(tracked, opt, batches, 9)
    handle.remove()
    _train_nonlinear(untracked, DeferredAdam(untracked.parameters(), lr=0.05, backend=backend),
                     batches, 9)
    torch.testing.assert_close(tracked.weight, dense.weight, rtol=1e-11, atol=1e-12)
    # Without the hook, forwards read rows without their pending steps: not Adam's trajectory.
    assert (untracked.weight - dense.weight).abs().max() > 1e-6


def test_track_refuses_a_module_it_does_not_step():
    a, b = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Embedding(10, 3, sparse=True)
    with pytest.raises(ValueError, match="does not step Embedding"):
        DeferredAdam(a.parameters()).track(b)


def test_dense_gradients_are_plain_adam_and_state_round_trips():
    torch.manual_seed(1)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(16, 4)
    ref = torch.optim.Adam(a.parameters(), lr=0.1, foreach=False)
    opt = DeferredAdam(b.parameters(), lr=0.1)
    for i in range(6):
        for m, o in ((a, ref), (b, opt)):
            o.zero_grad()
            m(x[i:i + 4]).pow(2).sum().backward()
            o.step()
        if i == 2:  # a fresh optimizer loaded from the state continues the same run
            state = opt.state_dict()
            opt = DeferredAdam(b.parameters(), lr=0.1)
            opt.load_state_dict(state)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_rows_never_used_never_move_and_a_step_touches_only_its_rows():
    emb = torch.nn.Embedding(50, 3, sparse=True)
    before = emb.weight.detach().clone()
    opt = DeferredAdam(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    opt.zero_grad()
    emb(torch.tensor([7])).sum().backward()
    opt.step()
    moved = (emb.weight != before).any(1)
    # rows 1 and 2 wait for their deferred step until flush
    assert moved.nonzero().flatten().tolist() == [1, 2, 7]
    snapshot = emb.weight.detach().clone()
    opt.flush()
    assert not torch.equal(emb.weight[1], snapshot[1])
    assert torch.equal(emb.weight[7], snapshot[7]) and torch.equal(emb.weight[0], before[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0), "lr"), (dict(lr=float("nan")), "lr"), (dict(betas=(0.9,)), "betas"),
    (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1), "eps"), (dict(backend="gpu"), "backend")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises((ValueError, Exception), match=match):
        DeferredAdam(torch.nn.Linear(2, 2).parameters(), **kwargs)


def test_state_round_trip_keeps_deferred_rows_exact():
    torch.manual_seed(2)
    a = torch.nn.Embedding(30, 3, sparse=True)
    b = torch.nn.Embedding(30, 3, sparse=True)
    b.load_state_dict(a.state_dict())
    batches = _batches(4, 30, 12, seed=9)
    opt_a = DeferredAdam(a.parameters(), lr=0.05)
    opt_b = DeferredAdam(b.parameters(), lr=0.05)
    for i, idx in enumerate(batches):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(idx).pow(2).sum().backward()
            o.step()
        if i == 5:  # mid-run, with rows still owed deferred steps
            state = opt_b.state_dict()
            opt_b = DeferredAdam(b.parameters(), lr=0.05)
            opt_b.load_state_dict(state)
            assert opt_b.state[b.weight]["last"].dtype == torch.int32
    opt_a.flush()
    opt_b.flush()
    assert torch.equal(a.weight, b.weight)


# ---------------------------------------------------------------- LazyAdam
@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lazy_adam_is_sparse_adam(backend, dtype):
    if backends.why_not(backend, torch.device("cpu")):
        pytest.skip(backends.why_not(backend, torch.device("cpu")))
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(300, 7, generator=g, dtype=dtype)
    bias0 = torch.randn(300, generator=g, dtype=dtype)
    a = [torch.nn.Parameter(p0.clone()), torch.nn.Parameter(bias0.clone())]
    b = [torch.nn.Parameter(p0.clone()), torch.nn.Parameter(bias0.clone())]
    ours = LazyAdam(a, lr=0.05, betas=(0.8, 0.95), eps=1e-6, backend=backend)
    torch_ = torch.optim.SparseAdam(b, lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    touched = torch.zeros(300, dtype=torch.bool)
    for step in range(6):
        rows = torch.randperm(300, generator=g)[:40 + 30 * step]  # sizes around the serial limit
        touched[rows] = True
        vals = torch.randn(rows.numel(), 7, generator=g, dtype=dtype)
        bvals = torch.randn(rows.numel(), generator=g, dtype=dtype)
        for params in (a, b):
            params[0].grad = torch.sparse_coo_tensor(rows[None], vals, (300, 7),
                                                     check_invariants=True)
            params[1].grad = torch.sparse_coo_tensor(rows[None], bvals, (300,),
                                                     check_invariants=True)
        ours.step()
        torch_.step()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), **tol)
        torch.testing.assert_close(ours.state[x]["exp_avg"], torch_.state[y]["exp_avg"], **tol)
    assert torch.equal(a[0][~touched], p0[~touched])  # never-used rows never move
    assert bool((ours.state[a[0]]["exp_avg"][~touched] == 0).all())


def test_lazy_adam_rejects_bad_arguments():
    from fastfair.optim import LazyAdam
    p = [torch.nn.Parameter(torch.zeros(3, 2))]
    with pytest.raises(ValueError, match="lr must be a positive number, got -1"):
        LazyAdam(p, lr=-1)
    with pytest.raises(ValueError, match="betas"):
        LazyAdam(p, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="float32 or float64"):
        LazyAdam([torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))])


# ---------------------------------------------------------------- ScatterAdam
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scatter_adam_is_torch_adam_on_sparse_and_dense_parameters(backend, dtype):
    torch.manual_seed(5)
    kw = dict(memory_size=97, chunk_size=1, seed=2)
    dense_table = HashedEmbedding(300, 6, dtype=dtype, **kw)
    sparse_table = HashedEmbedding(300, 6, sparse=True, dtype=dtype, **kw)
    sparse_table.weight.data.copy_(dense_table.weight.data)
    dense_emb = torch.nn.Embedding(41, 3, dtype=dtype)
    sparse_emb = torch.nn.Embedding(41, 3, sparse=True, dtype=dtype)
    sparse_emb.weight.data.copy_(dense_emb.weight.data)
    head_a = torch.nn.Linear(6, 1, dtype=dtype)  # a dense-gradient parameter beside them
    head_b = torch.nn.Linear(6, 1, dtype=dtype)
    head_b.load_state_dict(head_a.state_dict())
    opts = [torch.optim.Adam([*dense_table.parameters(), *dense_emb.parameters(),
                              *head_a.parameters()], lr=0.02, betas=(0.8, 0.99), eps=1e-6),
            ScatterAdam([*sparse_table.parameters(), *sparse_emb.parameters(),
                         *head_b.parameters()], lr=0.02, betas=(0.8, 0.99), eps=1e-6,
                        backend=backend)]
    gen = torch.Generator().manual_seed(6)
    batches = [(torch.randint(0, 300, (7,), generator=gen),
                torch.randint(0, 41, (5,), generator=gen)) for _ in range(15)]
    for (table, emb, head), opt in zip(((dense_table, dense_emb, head_a),
                                        (sparse_table, sparse_emb, head_b)), opts):
        g = torch.Generator().manual_seed(7)
        for items, rows in batches:
            opt.zero_grad(set_to_none=True)
            loss = (head(table(items)).sum() * torch.randn((), generator=g, dtype=dtype)
                    + (emb(rows) * torch.randn(5, 3, generator=g, dtype=dtype)).sum())
            loss.backward()
            opt.step()
    assert sparse_table.weight.grad.is_sparse and sparse_emb.weight.grad.is_sparse
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for a, b in ((dense_table, sparse_table), (dense_emb, sparse_emb), (head_a, head_b)):
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pb, pa, **tol)
    # The state is torch's Adam's: it loads into torch's optimizer and steps on alike.
    state = opts[1].state_dict()
    plain = torch.optim.Adam([*sparse_table.parameters(), *sparse_emb.parameters(),
                              *head_b.parameters()], lr=0.02)
    plain.load_state_dict(state)
    assert [s["step"].item() for s in plain.state_dict()["state"].values()] == [15.0] * 4
    back = ScatterAdam([*sparse_table.parameters(), *sparse_emb.parameters(),
                        *head_b.parameters()], backend=backend)
    back.load_state_dict(opts[0].state_dict())
    for s, t in zip(back.state.values(), opts[0].state.values()):
        assert torch.equal(s["exp_avg"], t["exp_avg"])


@pytest.mark.parametrize("rows,width", [(1, 1), (17, 1), (33, 3), (64, 8), (2, 13)])
def test_scatter_adam_kernel_matches_the_reference(rows, width):
    gen = torch.Generator().manual_seed(rows * width)
    p = torch.randn(rows, width, generator=gen)
    m = torch.randn(rows, width, generator=gen) * 0.1
    v = torch.rand(rows, width, generator=gen) * 0.01
    if rows > 1:  # a row whose moments are still zero
        v[-1] = 0
        m[-1] = 0
    used = torch.randperm(rows, generator=gen)[:max(1, rows // 3)]
    grad = torch.randn(used.numel(), width, generator=gen)
    grad[0, 0] = 0  # a zero entry in the gradient
    nb = backends.load("numba")
    out = {}
    for name, kernel in (("reference", reference.scatter_adam), ("numba", nb.scatter_adam)):
        state = [t.clone() for t in (p, m, v)]
        kernel(*state, used, grad, 0.013, 1.7, 0.9, 0.999, 1e-8)
        out[name] = state
    for a, b in zip(out["numba"], out["reference"]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
    assert bool((out["numba"][2] >= 0).all())  # no mark left behind in v
    assert not torch.equal(out["numba"][0], p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,width,upto,with_grad", [
    (1, 1, 3, True), (40, 1, 700, False), (33, 3, 250, True), (64, 8, 60, True),
    (7, 13, 1, True), (50, 8, 2000, False)])
def test_deferred_adam_replay_matches_the_step_by_step_reference(dtype, rows, width, upto,
                                                                with_grad):
    """The numba kernel replays missed steps in closed form (a series in eps / sqrt(v)) where
    that is exact to rounding; the reference takes them one by one. Moments span the range
    where the series holds and where it does not (v tiny or zero). The truth is the reference
    in float64: in float32 it rounds every step, so it drifts further from it (to ~4e-6
    relative here) than the numba kernel, which keeps each replay in float64."""
    gen = torch.Generator().manual_seed(rows * width + upto)
    table = 2 * rows + 3
    p = torch.randn(table, width, generator=gen, dtype=torch.float64)
    m = torch.randn(table, width, generator=gen, dtype=torch.float64) * 1e-3
    # sqrt(v) from 1e-14 to 1e-1, r = eps / sqrt(v) from 1e6 down to 1e-7, every 5th row at
    # most 1e-13 (where only the step-by-step replay is accurate); all normal float32 numbers
    v = (10.0 ** (-28 + 26 * torch.rand(table, width, generator=gen, dtype=torch.float64)))
    v[::5] *= 1e-26 / v[::5].max()
    last = torch.randint(0, upto + 1, (table,), generator=gen, dtype=torch.int32)
    zero = int(torch.nonzero(last == 0)[0]) if (last == 0).any() else None
    if zero is not None:
        m[zero] = v[zero] = 0
    used = torch.randperm(table, generator=gen)[:rows]
    grad = (torch.randn(rows, width, generator=gen, dtype=torch.float64) * 1e-2 if with_grad
            else None)
    group = dict(lr=0.01, betas=(0.9, 0.999))
    truth = [t.clone() for t in (p, m, v, last)]
    reference.deferred_adam(*truth, used, grad, upto,
                            *DeferredAdam._constants(group, upto + 1, "cpu"), 0.9, 0.999, 1e-8)
    state = [t.to(dtype, copy=True) for t in (p, m, v)] + [last.clone()]
    backends.load("numba").deferred_adam(
        *state, used, None if grad is None else grad.to(dtype), upto,
        *DeferredAdam._constants(group, upto + 1, "cpu", dtype=dtype), 0.9, 0.999, 1e-8)
    # float32: the inputs' own rounding (6e-8 of p ~ 1) bounds the absolute error
    # float64: m ~ 1e-3 rounds to ~1e-19, which a gradient step that nearly cancels it (m ->
    # 1e-6) leaves as it is: an absolute error, not a relative one
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-18)
    for a, b in zip(state[:3], truth[:3]):
        torch.testing.assert_close(a.double(), b, **tol)
    assert torch.equal(state[3], truth[3])
    moved = state[0] != p.to(dtype)
    assert moved.any() and not moved[torch.isin(torch.arange(table), used, invert=True)].any()


def test_replay_fast_path_bound_meets_each_dtype_tolerance():
    """Elements with r up to ``_fast_r(tol)`` take a fixed number of series terms: the series'
    error bound ``2 r^N / (1 - r)`` must stay within the dtype's tolerance there."""
    nb = backends.load("numba")
    for tol in nb.REPLAY_TOL.values():
        r = nb._fast_r(tol)
        assert 0 < r <= 0.5
        assert 2 * r ** nb.REPLAY_FAST_TERMS / (1 - r) <= tol


@pytest.mark.parametrize("cls", [ScatterAdam, DeferredAdam, LazyAdam])
def test_sparse_gradients_must_be_row_sparse(cls):
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = cls([w])
    w.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2], [1, 0]]), torch.ones(2), (4, 3))
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"one sparse dimension \(rows\), got sparse_dim=2 "
                                         r"for a parameter of shape \(4, 3\)"):
        opt.step()
    assert torch.equal(w.detach(), before)


def test_scatter_adam_rejects_bad_arguments():
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ScatterAdam([w], lr=-1)
    with pytest.raises(ValueError, match="unknown backend|backend"):
        ScatterAdam([w], backend="nope")
