"""torch's constructor arguments on the hashed modules (sparse gradients, ``_weight``,
``scale_grad_by_freq``, ``max_norm``) and ``fastfair.nn.replace_embeddings``."""
import copy
import inspect

import pytest
import torch
from torch import nn

import fastfair
from fastfair.kernels import hashing
from fastfair.nn import HashedEmbedding, HashedEmbeddingBag, replace_embeddings

from testing import TOL, backend_params, make_bags, rand, virtual_table

BACKENDS = backend_params()
F64 = TOL[torch.float64]


def _array_grad(dense_grad, spec):
    """A^T G: a gradient of the virtual table mapped to the array, with torch indexing only."""
    idx, sign = hashing.index_and_sign(torch.arange(spec.num_embeddings), spec.embedding_dim,
                                       spec.memory_size, spec.chunk_size, spec.seed, spec.signed)
    out = torch.zeros(spec.memory_size, dtype=dense_grad.dtype)
    return out.index_add_(0, idx.reshape(-1), (dense_grad * sign).reshape(-1))


def _touched(rows, spec):
    """The slots a batch's (non-padding, bagged) rows read: what a sparse gradient may name."""
    idx, _ = hashing.index_and_sign(rows, spec.embedding_dim, spec.memory_size, spec.chunk_size,
                                    spec.seed, spec.signed)
    mask = torch.zeros(spec.memory_size, dtype=torch.bool)
    mask[idx.reshape(-1)] = True
    return mask


def _pair(cls, backend="auto", device="cpu", **kwargs):
    """The same module twice, with sparse and with dense gradients, sharing initial weights."""
    sparse = cls(backend=backend, device=device, dtype=torch.float64, sparse=True, **kwargs)
    dense = cls(backend=backend, device=device, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        dense.weight.copy_(sparse.weight)
    return sparse, dense


# (mode, form, padding) of the bag cases; "tail" has elements past the last offset.
BAG_CASES = [("sum", "offsets", None), ("sum", "tail", 4), ("mean", "offsets", 4),
             ("mean", "2d", None), ("sum", "2d", 4)]


def _bag_inputs(case, gen, device):
    mode, form, pad = case
    if form == "2d":
        idx = torch.randint(0, 60, (5, 3), generator=gen)
        idx[1] = 4
        args = (idx,)
    else:
        idx, off = make_bags(60, [3, 0, 1, 5, 2], gen)
        idx[[0, 6]] = 4
        if form == "tail":
            idx = torch.cat([idx, torch.tensor([7, 4, 9])])
            off = torch.cat([off, torch.tensor([11])])
        args = (idx, off)
    psw = rand(args[0].shape, gen, torch.float64) if mode == "sum" else None
    return [a.to(device) for a in args], None if psw is None else psw.to(device)


@pytest.mark.parametrize("case", BAG_CASES, ids=lambda c: f"{c[0]}-{c[1]}-pad{c[2]}")
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sparse_gradient_equals_dense_gradient(backend, device, case):
    gen = torch.Generator().manual_seed(31)
    mode, form, pad = case
    sparse, dense = _pair(HashedEmbeddingBag, backend, device, num_embeddings=60,
                          embedding_dim=11, memory_size=4 * 13, chunk_size=4, seed=3, mode=mode,
                          padding_idx=pad, include_last_offset=form == "tail")
    args, psw = _bag_inputs(case, gen, device)
    grad = None
    results = []
    for module in (sparse, dense):
        p = None if psw is None else psw.clone().requires_grad_()
        out = module(*args, per_sample_weights=p)
        grad = rand(out.shape, gen, torch.float64, device) if grad is None else grad
        out.backward(grad)
        results.append((out.detach(), module.weight.grad, None if p is None else p.grad))
    (out_s, g_s, p_s), (out_d, g_d, p_d) = results
    assert g_s.layout == torch.sparse_coo and g_d.layout == torch.strided
    torch.testing.assert_close(out_s, out_d, **F64)
    torch.testing.assert_close(g_s.to_dense(), g_d, **F64)
    if p_s is not None:
        torch.testing.assert_close(p_s, p_d, **F64)
    # One entry per (bagged, non-padding element, column), at exactly that element's slots.
    idx = args[0].reshape(-1).cpu()
    bagged = idx[:11] if form == "tail" else idx
    rows = bagged[bagged != pad] if pad is not None else bagged
    assert g_s._nnz() == rows.numel() * 11
    assert torch.equal(g_s.coalesce().indices()[0].cpu(),
                       torch.nonzero(_touched(rows, sparse.spec))[:, 0])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sparse_embedding_gradient(backend, device):
    gen = torch.Generator().manual_seed(32)
    sparse, dense = _pair(HashedEmbedding, backend, device, num_embeddings=90, embedding_dim=6,
                          memory_size=3 * 7, chunk_size=3, seed=1, padding_idx=5)
    idx = torch.randint(0, 90, (4, 3), generator=gen)
    idx[0, 1] = 5
    grad = rand((4, 3, 6), gen, torch.float64, device)
    for module in (sparse, dense):
        module(idx.to(device)).backward(grad)
    assert sparse.weight.grad._nnz() == 11 * 6
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad, **F64)


def test_sparse_gradients_accumulate():
    gen = torch.Generator().manual_seed(33)
    sparse, dense = _pair(HashedEmbeddingBag, num_embeddings=50, embedding_dim=8, memory_size=24,
                          chunk_size=2, mode="sum")
    batches = [make_bags(50, [2, 3], gen) for _ in range(2)]
    for module in (sparse, dense):
        for idx, off in batches:
            (module(idx, off) ** 2).sum().backward()
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad, **F64)


def test_sparse_sgd_step_equals_dense_sgd_step():
    gen = torch.Generator().manual_seed(34)
    sparse, dense = _pair(HashedEmbeddingBag, num_embeddings=500, embedding_dim=16,
                          compression=1 / 8, chunk_size=8, mode="sum", padding_idx=0)
    opts = [torch.optim.SGD(m.parameters(), lr=0.3) for m in (sparse, dense)]
    for _ in range(3):
        idx, off = make_bags(500, [4, 1, 0, 6], gen)
        idx[2] = 0
        target = rand((4, 16), gen, torch.float64)
        for module, opt in zip((sparse, dense), opts):
            opt.zero_grad()
            ((module(idx, off) - target) ** 2).sum().backward()
            opt.step()
    assert not torch.equal(sparse.weight, _pair(HashedEmbeddingBag, num_embeddings=500,
                                                 embedding_dim=16, compression=1 / 8,
                                                 chunk_size=8)[0].weight)
    torch.testing.assert_close(sparse.weight, dense.weight, **F64)


def test_sparse_adam_is_lazy_adam_on_the_touched_slots():
    """SparseAdam on the sparse gradient = Adam's update applied only to the slots the batch's
    non-padding rows hash to (moments of the other slots untouched), computed here by hand from
    the dense gradient."""
    gen = torch.Generator().manual_seed(35)
    sparse, dense = _pair(HashedEmbeddingBag, num_embeddings=400, embedding_dim=12,
                          memory_size=4 * 40, chunk_size=4, mode="mean", padding_idx=3, seed=8)
    lr, (b1, b2), eps = 0.05, (0.9, 0.999), 1e-8
    opt = torch.optim.SparseAdam(sparse.parameters(), lr=lr, betas=(b1, b2), eps=eps)
    w = dense.weight.detach().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for step in range(1, 4):
        idx, off = make_bags(400, [3, 2, 5], gen)
        idx[1] = 3
        target = rand((3, 12), gen, torch.float64)
        opt.zero_grad()
        ((sparse(idx, off) - target) ** 2).sum().backward()
        opt.step()
        dense.weight.grad = None
        with torch.no_grad():
            dense.weight.copy_(w)
        ((dense(idx, off) - target) ** 2).sum().backward()
        g = dense.weight.grad
        hit = _touched(idx[idx != 3], dense.spec)
        assert 0 < int(hit.sum()) < w.numel()  # the test must see untouched slots
        m[hit] = b1 * m[hit] + (1 - b1) * g[hit]
        v[hit] = b2 * v[hit] + (1 - b2) * g[hit] ** 2
        size = lr * (1 - b2 ** step) ** 0.5 / (1 - b1 ** step)
        w[hit] -= size * m[hit] / (v[hit].sqrt() + eps)
        torch.testing.assert_close(sparse.weight.detach(), w, **F64)


def test_sparse_double_backward_raises():
    bag = HashedEmbeddingBag(50, 4, memory_size=8, mode="sum", sparse=True)
    loss = (bag(torch.tensor([[1, 2]])) ** 2).sum()
    with pytest.raises(RuntimeError, match="sparse=True have no double backward"):
        torch.autograd.grad(loss, bag.weight, create_graph=True)


def _bag_oracle(V, idx, off, psw, mode, pad, used):
    """torch.nn.EmbeddingBag with scale_grad_by_freq, rebuilt from torch.nn.functional.embedding
    (whose frequency scaling is right; EmbeddingBag's CPU one miscounts in torch 2.13,
    pytorch/pytorch#190063) over the bagged elements."""
    rows = nn.functional.embedding(idx[:used], V, padding_idx=pad, scale_grad_by_freq=True)
    bag = torch.repeat_interleave(torch.arange(off.numel() - 1), off[1:] - off[:-1])
    a = torch.ones(used, dtype=V.dtype) if psw is None else psw[:used]
    if pad is not None:
        a = a * (idx[:used] != pad)
    if mode == "mean":
        count = torch.zeros(off.numel() - 1, dtype=V.dtype).index_add_(0, bag, (a != 0).to(V.dtype))
        a = a / count.clamp(min=1)[bag]
    out = torch.zeros(off.numel() - 1, V.shape[1], dtype=V.dtype)
    return out.index_add_(0, bag, rows * a[:, None])


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("mode,pad", [("sum", None), ("sum", 2), ("mean", 2)])
def test_scale_grad_by_freq_bag(mode, pad, sparse):
    gen = torch.Generator().manual_seed(36)
    bag = HashedEmbeddingBag(30, 8, memory_size=4 * 9, chunk_size=4, mode=mode, padding_idx=pad,
                             scale_grad_by_freq=True, sparse=sparse, include_last_offset=True,
                             dtype=torch.float64, seed=6)
    idx = torch.tensor([1, 2, 1, 3, 1, 2, 7, 1, 7, 1, 5])  # 1 x5, 2 x2, 7 x2 in bags
    off = torch.tensor([0, 3, 5, 5, 9])                     # elements 9, 10 are in no bag
    psw = rand(11, gen, torch.float64).requires_grad_() if mode == "sum" else None
    out = bag(idx, off, per_sample_weights=psw)
    grad = rand(out.shape, gen, torch.float64)
    out.backward(grad)
    V = virtual_table(bag.weight.detach(), bag.spec).requires_grad_()
    p = None if psw is None else psw.detach().clone().requires_grad_()
    ref = _bag_oracle(V, idx, off, p, mode, pad, used=9)
    ref.backward(grad)
    torch.testing.assert_close(out.detach(), ref.detach(), **F64)
    got = bag.weight.grad.to_dense() if sparse else bag.weight.grad
    torch.testing.assert_close(got, _array_grad(V.grad, bag.spec), **F64)
    if psw is not None:  # the per-sample-weight gradient is not scaled (as in torch)
        torch.testing.assert_close(psw.grad, p.grad, **F64)


@pytest.mark.parametrize("sparse", [False, True])
def test_scale_grad_by_freq_embedding_matches_torch(sparse):
    gen = torch.Generator().manual_seed(37)
    emb = HashedEmbedding(40, 6, memory_size=18, chunk_size=3, padding_idx=2, sparse=sparse,
                          scale_grad_by_freq=True, dtype=torch.float64)
    dense = nn.Embedding(40, 6, padding_idx=2, scale_grad_by_freq=True, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(emb.virtual_weight())
    idx = torch.tensor([[1, 2, 1], [9, 1, 2], [9, 30, 1]])
    grad = rand((3, 3, 6), gen, torch.float64)
    emb(idx).backward(grad)
    dense(idx).backward(grad)
    got = emb.weight.grad.to_dense() if sparse else emb.weight.grad
    torch.testing.assert_close(got, _array_grad(dense.weight.grad, emb.spec), **F64)


def test_weight_argument_is_the_array_or_a_dense_table_to_fit():
    gen = torch.Generator().manual_seed(38)
    array = rand(40, gen, torch.float64)
    bag = HashedEmbeddingBag(100, 8, memory_size=40, chunk_size=4, mode="sum", _weight=array)
    assert bag.weight.dtype == torch.float64
    assert bag.weight.data_ptr() == array.data_ptr()  # wrapped, not copied, as torch does
    dense = rand((100, 8), gen, torch.float64)
    fit = HashedEmbeddingBag(100, 8, memory_size=40, chunk_size=4, _weight=dense)
    proj = fastfair.expand_dense(fastfair.project_dense(dense, fit.spec), fit.spec)
    torch.testing.assert_close(fit.virtual_weight(), proj, **F64)
    frozen = HashedEmbedding(100, 8, memory_size=40, chunk_size=4, _weight=array, _freeze=True)
    assert not frozen.weight.requires_grad
    assert HashedEmbedding(100, 8, memory_size=40, _freeze=False).weight.requires_grad


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(_weight=torch.zeros(41)), ValueError, r"must be the 1-D array \[memory_size=40\]"),
    (dict(_weight=torch.zeros(8, 100)), ValueError, r"or a dense table \[100, 8\]"),
    (dict(_weight=torch.zeros(40, dtype=torch.int64)), TypeError, "_weight must be float32"),
    (dict(_weight=[0.0] * 40), TypeError, "_weight must be a Tensor"),
    (dict(_weight=torch.zeros(40), dtype=torch.float64), ValueError, "disagrees with _weight's"),
    (dict(_weight=torch.zeros(40), device="meta"), ValueError, "disagrees with _weight's device"),
    (dict(max_norm=1.0), ValueError, "max_norm=1.0 is not supported by hashed embeddings"),
    (dict(norm_type="l2"), TypeError, "norm_type must be a number"),
    (dict(sparse=1), TypeError, "sparse must be a bool, got int 1"),
    (dict(scale_grad_by_freq="yes"), TypeError, "scale_grad_by_freq must be a bool"),
])
def test_bad_torch_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        HashedEmbeddingBag(100, 8, memory_size=40, **kwargs)


def test_bad_freeze_argument():
    with pytest.raises(TypeError, match="_freeze must be a bool"):
        HashedEmbedding(100, 8, memory_size=40, _freeze=None)


@pytest.mark.parametrize("torch_cls,cls", [(nn.Embedding, HashedEmbedding),
                                           (nn.EmbeddingBag, HashedEmbeddingBag)])
def test_every_torch_constructor_argument_is_accepted(torch_cls, cls):
    """Each keyword torch's constructor takes is one the hashed module takes (it works, or
    raises saying why, as the tests above check); a new torch argument fails here."""
    ours = inspect.signature(cls.__init__).parameters
    mine = set(ours) | set(inspect.signature(cls.__mro__[1].__init__).parameters)
    for name in inspect.signature(torch_cls.__init__).parameters:
        assert name in mine, f"{cls.__name__} does not take torch's argument {name!r}"
    # What DLRM code passes: sum bags with sparse gradients.
    bag = cls(1000, 16, compression=0.1, sparse=True, **({"mode": "sum"} if cls is
                                                          HashedEmbeddingBag else {}))
    assert bag.sparse and "sparse=True" in repr(bag)


# ------------------------------------------------------------------------ replace_embeddings
class _Subclass(nn.Embedding):
    pass


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.bags = nn.ModuleList([
            nn.EmbeddingBag(300, 8, mode="sum", sparse=True, padding_idx=5,
                            include_last_offset=True, dtype=torch.float64),
            nn.EmbeddingBag(20, 8, mode="mean", dtype=torch.float64),
        ])
        self.emb = nn.Embedding(200, 8, padding_idx=0, scale_grad_by_freq=True,
                                dtype=torch.float64)
        self.alias = self.emb
        self.custom = _Subclass(100, 8, dtype=torch.float64)
        self.head = nn.Linear(8, 1, dtype=torch.float64)

    def forward(self, idx, off, psw, tokens):
        x = self.bags[0](idx, off, per_sample_weights=psw) + self.bags[1](tokens)
        return self.head(x + self.emb(tokens).sum(1) + self.alias(tokens[:, :1]).sum(1)
                         + self.custom(tokens).sum(1))


def _model_inputs(gen):
    idx, off = make_bags(300, [3, 0, 4, 2], gen)
    off = torch.cat([off, torch.tensor([idx.numel()])])
    idx[1] = 5
    return idx, off, rand(idx.shape, gen, torch.float64), torch.randint(0, 20, (4, 3),
                                                                        generator=gen)


def test_replace_embeddings_projects_and_keeps_the_forward():
    torch.manual_seed(40)
    gen = torch.Generator().manual_seed(41)
    model = _Model()
    model.bags[0].weight.requires_grad_(False)
    model.eval()
    before = copy.deepcopy(model)
    report = replace_embeddings(model, compression=1 / 4, chunk_size=4, seed=7, min_rows=50)

    bag, small, emb = model.bags[0], model.bags[1], model.emb
    assert isinstance(bag, HashedEmbeddingBag) and isinstance(emb, HashedEmbedding)
    assert type(small) is nn.EmbeddingBag and type(model.custom) is _Subclass
    assert model.alias is emb  # one module under two names stays one module
    assert (bag.mode, bag.padding_idx, bag.include_last_offset) == ("sum", 5, True)
    assert bag.sparse
    assert (emb.padding_idx, emb.scale_grad_by_freq, emb.sparse) == (0, True, False)
    assert bag.weight.dtype == torch.float64 and bag.weight.device.type == "cpu"
    assert not bag.weight.requires_grad and emb.weight.requires_grad
    assert not bag.training and not emb.training
    assert (bag.seed, bag.chunk_size) == (7, 4)
    assert bag.memory_size == fastfair.nested_size(300 * 8 / 4, 4)
    for new, old in ((bag, before.bags[0]), (emb, before.emb)):
        fit = fastfair.project_dense(old.weight.detach(), new.spec)
        proj = fastfair.expand_dense(fit, new.spec)
        torch.testing.assert_close(new.virtual_weight(), proj, **F64)

    # The model's forward is unchanged: the dense model with each table set to its projection.
    with torch.no_grad():
        before.bags[0].weight.copy_(bag.virtual_weight())
        before.emb.weight.copy_(emb.virtual_weight())
    inputs = _model_inputs(gen)
    torch.testing.assert_close(model(*inputs), before(*inputs), **F64)

    names = [t.name for t in report.tables]
    assert names == ["bags.0", "bags.1", "emb", "custom"]
    assert report.replaced == ["bags.0", "emb"]
    by_name = {t.name: t for t in report.tables}
    assert by_name["bags.0"].bytes_before == 300 * 8 * 8
    assert by_name["bags.0"].bytes_after == bag.memory_size * 8
    assert (by_name["emb"].rows, by_name["emb"].dim, by_name["emb"].kind) == (200, 8, "Embedding")
    assert by_name["bags.1"].reason == "20 rows < min_rows=50"
    assert "subclasses torch.nn.Embedding" in by_name["custom"].reason
    assert by_name["custom"].bytes_after == by_name["custom"].bytes_before
    assert report.bytes_before == (300 + 20 + 200 + 100) * 8 * 8
    assert report.bytes_after == (bag.memory_size + 20 * 8 + emb.memory_size + 100 * 8) * 8
    assert report.model_bytes_after == sum(p.numel() * 8 for p in model.parameters())
    assert report.model_bytes_before - report.model_bytes_after == (
        report.bytes_before - report.bytes_after)
    assert "| emb | Embedding | 200 | 8 |" in str(report)


def test_replace_embeddings_random_init_and_meta_device():
    torch.manual_seed(42)
    model = nn.Sequential(nn.Embedding(5000, 16))
    replace_embeddings(model, compression=1 / 2, init="random", sparse=True)
    w = model[0].weight.detach()
    assert model[0].sparse
    assert abs(float(w.std()) - 1) < 0.05  # N(0, 1), not the projection (std about 0.7)
    with torch.device("meta"):
        meta = nn.Sequential(nn.EmbeddingBag(10_000, 8, mode="sum"))
    report = replace_embeddings(meta, compression=1 / 16, init="random")
    assert meta[0].weight.is_meta and report.bytes_after == meta[0].memory_size * 4


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(compression=0), ValueError, r"compression must be in \(0, 1\], got 0"),
    (dict(compression=1.5), ValueError, r"compression must be in \(0, 1\]"),
    (dict(compression="1/8"), TypeError, "compression must be a number"),
    (dict(compression=0.5, chunk_size=0), ValueError, "chunk_size must be >= 1, got 0"),
    (dict(compression=0.5, seed=-1), ValueError, "seed must be in"),
    (dict(compression=0.5, min_rows=-1), ValueError, "min_rows must be >= 0, got -1"),
    (dict(compression=0.5, min_rows=1.5), TypeError, "min_rows must be an int"),
    (dict(compression=0.5, init="zeros"), ValueError, "init must be one of"),
    (dict(compression=0.5, sparse="yes"), TypeError, "sparse must be a bool"),
    (dict(compression=0.5, backend="gpu"), ValueError, "unknown backend 'gpu'"),
])
def test_replace_embeddings_bad_arguments_change_nothing(kwargs, err, match):
    model = _Model()
    with pytest.raises(err, match=match):
        replace_embeddings(model, **kwargs)
    assert type(model.emb) is nn.Embedding


def test_replace_embeddings_refuses_what_it_cannot_hash():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        replace_embeddings([nn.Embedding(10, 2)], compression=0.5)
    with pytest.raises(ValueError, match=r"model is itself a table \(EmbeddingBag\)"):
        replace_embeddings(nn.EmbeddingBag(10, 2), compression=0.5)
    model = nn.ModuleDict({"ok": nn.Embedding(100, 4), "norm": nn.Embedding(100, 4, max_norm=1.0)})
    with pytest.raises(ValueError, match="norm: max_norm=1.0 cannot be hashed"):
        replace_embeddings(model, compression=0.5)
    assert type(model["ok"]) is nn.Embedding  # checked before anything was replaced
    low = nn.ModuleDict({"ok": nn.Embedding(100, 4), "low": nn.Embedding(100, 4).half()})
    with pytest.raises(TypeError, match="low: weight is torch.float16"):
        replace_embeddings(low, compression=0.5)
    assert type(low["ok"]) is nn.Embedding
