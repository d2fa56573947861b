"""The drop-in modules: torch semantics, consistency of collapse, checkpoints, devices, compile."""
import os

import pytest
import torch
from torch import nn

import fastfair
from fastfair.kernels import backends
from fastfair.nn import HashedEmbedding, HashedEmbeddingBag

from testing import TOL, backend_params, make_bags, rand

BACKENDS = backend_params()


def _dense_grad_to_array(dense_grad, spec):
    """A^T G: the dense gradient mapped back through the hash, with torch indexing only."""
    from fastfair.kernels import hashing
    idx, sign = hashing.index_and_sign(torch.arange(spec.num_embeddings), spec.embedding_dim,
                                       spec.memory_size, spec.chunk_size, spec.seed, spec.signed)
    out = torch.zeros(spec.memory_size, dtype=dense_grad.dtype)
    return out.index_add_(0, idx.reshape(-1), (dense_grad * sign).reshape(-1))


BAG_FORMS = ["1d-offsets", "1d-last-offset", "2d"]


@pytest.mark.parametrize("form", BAG_FORMS)
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bag_equals_torch_embedding_bag_on_virtual_table(backend, device, mode, form):
    gen = torch.Generator().manual_seed(21)
    bag = HashedEmbeddingBag(301, 11, memory_size=4 * 29, chunk_size=4, mode=mode, seed=5,
                             padding_idx=7, include_last_offset=form == "1d-last-offset",
                             backend=backend, dtype=torch.float64, device=device)
    dense = nn.EmbeddingBag(301, 11, mode=mode, padding_idx=7,
                            include_last_offset=form == "1d-last-offset", dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(bag.virtual_weight().cpu())
    if form == "2d":
        idx = torch.randint(0, 301, (5, 4), generator=gen)
        idx[1, :] = 7  # a bag of padding only
        args = (idx,)
    else:
        idx, off = make_bags(301, [3, 0, 1, 6, 2], gen)
        idx[4] = 7
        if form == "1d-last-offset":
            off = torch.cat([off, torch.tensor([idx.numel()])])
        args = (idx, off)
    psw = rand(args[0].shape, gen, torch.float64) if mode == "sum" else None
    out = bag(*[a.to(device) for a in args],
              per_sample_weights=None if psw is None else psw.to(device))
    ref = dense(*args, per_sample_weights=psw)
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float64])
    grad = rand(ref.shape, gen, torch.float64)
    out.backward(grad.to(device))
    ref.backward(grad)
    torch.testing.assert_close(bag.weight.grad.cpu(), _dense_grad_to_array(dense.weight.grad, bag.spec),
                               **TOL[torch.float64])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_embedding_equals_torch_embedding_on_virtual_table(backend, device):
    gen = torch.Generator().manual_seed(22)
    emb = HashedEmbedding(1000, 24, compression=1 / 8, chunk_size=8, seed=3, padding_idx=-1,
                          backend=backend, dtype=torch.float64, device=device)
    assert emb.padding_idx == 999
    dense = nn.Embedding(1000, 24, padding_idx=999, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(emb.virtual_weight().cpu())
        dense.weight[999] = 0  # torch keeps the padding row at zero; ours reads as zero
    idx = torch.randint(0, 1000, (3, 5, 2), generator=gen).to(torch.int32)
    idx[0, 0, 0] = 999
    out = emb(idx.to(device))
    ref = dense(idx.long())
    assert out.shape == (3, 5, 2, 24)
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float64])
    grad = rand(ref.shape, gen, torch.float64)
    out.backward(grad.to(device))
    ref.backward(grad)
    torch.testing.assert_close(emb.weight.grad.cpu(), _dense_grad_to_array(dense.weight.grad, emb.spec),
                               **TOL[torch.float64])


def test_issue_example_and_sizing_rule():
    bag = HashedEmbeddingBag(num_embeddings=10_000_000, embedding_dim=64, compression=1 / 1000,
                             chunk_size=8, mode="sum", seed=0)
    assert bag.memory_size % 8 == 0
    assert abs(bag.compression - 1 / 1000) / (1 / 1000) < 2**-8
    assert bag.spec.max_collapse >= 64
    gen = torch.Generator().manual_seed(23)
    idx, off = make_bags(10_000_000, [20] * 16, gen)
    out = bag(idx, off, per_sample_weights=rand(idx.shape, gen))
    assert out.shape == (16, 64)
    small = bag.collapse(8)
    assert small.memory_size == bag.memory_size // 8
    assert (small.num_embeddings, small.chunk_size, small.seed, small.mode) == (10_000_000, 8, 0, "sum")


def test_collapse_is_the_projection_and_chains_commute():
    torch.manual_seed(24)
    bag = HashedEmbeddingBag(500, 10, memory_size=4 * 48, chunk_size=4, seed=9,
                             dtype=torch.float64, backend="reference")
    V = bag.virtual_weight()
    for f in (2, 3, 4, 16, 48):
        small = bag.collapse(f)
        proj = fastfair.expand_dense(fastfair.project_dense(V, small.spec), small.spec)
        torch.testing.assert_close(small.virtual_weight(), proj)
    # Collapsing 2 then 8 equals collapsing 16 directly, equals 8 then 2.
    a = bag.collapse(2).collapse(8)
    b = bag.collapse(8).collapse(2)
    c = bag.collapse(16)
    torch.testing.assert_close(a.weight, c.weight)
    torch.testing.assert_close(b.weight, c.weight)
    # expand keeps the table exactly.
    torch.testing.assert_close(c.expand(4).virtual_weight(), c.virtual_weight())


def test_collapse_rejects_factors_that_split_chunks():
    bag = HashedEmbeddingBag(100, 8, memory_size=8 * 6, chunk_size=8)
    for bad in (4, 5, 12):
        with pytest.raises(ValueError, match=f"collapse factor {bad} does not divide"):
            bag.collapse(bad)
    with pytest.raises(ValueError, match="factor must be >= 1"):
        bag.collapse(0)
    with pytest.raises(TypeError, match="factor must be an int"):
        bag.collapse(2.0)


def test_from_pretrained_is_the_least_squares_fit():
    torch.manual_seed(25)
    dense = torch.randn(200, 6, dtype=torch.float64)
    bag = HashedEmbeddingBag.from_pretrained(dense, memory_size=300, seed=2, mode="sum")
    assert not bag.weight.requires_grad
    proj = fastfair.expand_dense(fastfair.project_dense(dense, bag.spec), bag.spec)
    torch.testing.assert_close(bag.virtual_weight(), proj)
    # Fitting a table that already lies in the subspace recovers it exactly.
    again = HashedEmbeddingBag.from_pretrained(bag.virtual_weight(), memory_size=300, seed=2)
    torch.testing.assert_close(again.virtual_weight(), bag.virtual_weight())


def test_state_dict_round_trip_and_hash_mismatch(tmp_path):
    torch.manual_seed(26)
    a = HashedEmbeddingBag(1000, 16, compression=0.1, chunk_size=4, seed=3, mode="sum")
    path = tmp_path / "ckpt.pt"
    torch.save(a.state_dict(), path)
    b = HashedEmbeddingBag(1000, 16, compression=0.1, chunk_size=4, seed=3, mode="sum")
    b.load_state_dict(torch.load(path))
    assert torch.equal(a.weight, b.weight)
    idx = torch.randint(0, 1000, (4, 3))
    assert torch.equal(a(idx), b(idx))
    other_seed = HashedEmbeddingBag(1000, 16, compression=0.1, chunk_size=4, seed=4, mode="sum")
    with pytest.raises(ValueError, match="seed: checkpoint 3 vs module 4"):
        other_seed.load_state_dict(torch.load(path))


def test_meta_device_init_then_reset():
    with torch.device("meta"):
        bag = HashedEmbeddingBag(5000, 8, compression=1 / 4, chunk_size=8, seed=1, mode="sum")
    assert bag.weight.is_meta
    idx = torch.randint(0, 5000, (6, 3), device="meta")
    assert bag(idx).shape == (6, 8)
    bag = bag.to_empty(device="cpu")
    bag.reset_parameters()
    w = bag.weight.detach()
    assert bool(w.isfinite().all()) and float(w.std()) > 0.5
    assert bag(torch.randint(0, 5000, (6, 3))).shape == (6, 8)


def test_sequential_extra_repr_and_to():
    model = nn.Sequential(HashedEmbeddingBag(100, 8, memory_size=64, mode="sum"), nn.Linear(8, 1))
    text = repr(model)
    assert "memory_size=64" in text and "mode='sum'" in text
    model = model.to(torch.float64)
    out = model(torch.randint(0, 100, (5, 2)))
    assert out.shape == (5, 1) and out.dtype == torch.float64
    out.sum().backward()
    assert model[0].weight.grad.shape == (64,)


def test_torch_compile_fullgraph_forward_backward():
    torch.manual_seed(27)
    bag = HashedEmbeddingBag(1000, 16, compression=0.25, chunk_size=8, mode="sum", seed=2)
    idx = torch.randint(0, 1000, (40,))
    off = torch.tensor([0, 5, 5, 30])
    psw = torch.rand(40)

    def step(i, o, p):
        return (bag(i, o, p) ** 2).sum()

    expect = step(idx, off, psw)
    expect.backward()
    grad = bag.weight.grad.clone()
    bag.weight.grad = None
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(idx, off, psw)
    got.backward()
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(bag.weight.grad, grad)
    with pytest.raises(IndexError, match="index 1000 is out of range"):
        compiled(torch.tensor([1, 1000, 2]), torch.tensor([0, 1, 2]), torch.rand(3))


DDP_SCRIPT = """
import os, sys, torch
import torch.distributed as dist
from torch import nn
from fastfair.nn import HashedEmbeddingBag
os.environ["MASTER_ADDR"] = "127.0.0.1"
os.environ["MASTER_PORT"] = sys.argv[1]
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(28)
bag = HashedEmbeddingBag(200, 8, memory_size=48, chunk_size=8, mode="sum")
ddp = nn.parallel.DistributedDataParallel(bag)
idx = torch.randint(0, 200, (4, 3))
ddp(idx).sum().backward()
ref = HashedEmbeddingBag(200, 8, memory_size=48, chunk_size=8, mode="sum")
ref.load_state_dict(bag.state_dict())
ref(idx).sum().backward()
torch.testing.assert_close(bag.weight.grad, ref.weight.grad)
print("ddp-ok", flush=True)
# Tearing down DDP's gloo group can deadlock on the GIL (torch's destructor joins a worker that
# waits for it); the check is done, so leave without running destructors.
os._exit(0)
"""


def test_ddp_single_process():
    """DDP wraps the module and its gradient equals the plain module's (in a child process, so a
    hang in torch's process-group teardown cannot stall the suite)."""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-c", DDP_SCRIPT, str(port)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "ddp-ok" in run.stdout, run.stderr[-2000:]


# ---------------------------------------------------------------------------------- bad input
def test_bad_indices_and_offsets():
    bag = HashedEmbeddingBag(100, 8, memory_size=64, mode="sum")
    with pytest.raises(IndexError, match=r"index 100 is out of range: indices must be in \[0, 100\)"):
        bag(torch.tensor([1, 100]), torch.tensor([0]))
    with pytest.raises(IndexError, match="index -3 is out of range"):
        bag(torch.tensor([[1, -3]]))
    with pytest.raises(TypeError, match="int64 or int32 indices, got torch.float32"):
        bag(torch.tensor([1.0, 2.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="offsets\\[0\\] must be 0, got 1"):
        bag(torch.tensor([1, 2, 3]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="non-decreasing: offsets\\[2\\] = 1 < offsets\\[1\\] = 2"):
        bag(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="past the end of input: offset 5 > input length 3"):
        bag(torch.tensor([1, 2, 3]), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="offsets is required"):
        bag(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="offsets must be None when input is 2-D"):
        bag(torch.tensor([[1, 2]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="per_sample_weights must have the shape of input"):
        bag(torch.tensor([1, 2, 3]), torch.tensor([0]), torch.rand(2))
    mean = HashedEmbeddingBag(100, 8, memory_size=64, mode="mean")
    with pytest.raises(ValueError, match="per_sample_weights is only supported with mode='sum'"):
        mean(torch.tensor([1, 2, 3]), torch.tensor([0]), torch.rand(3))
    # validate=False skips the value checks (documented fast path) but keeps shape checks.
    fast = HashedEmbeddingBag(100, 8, memory_size=64, mode="sum", validate=False)
    with pytest.raises(ValueError, match="offsets is required"):
        fast(torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(), ValueError, "exactly one of compression= or memory_size="),
    (dict(compression=0.5, memory_size=8), ValueError, "exactly one of"),
    (dict(compression=0), ValueError, r"compression must be in \(0, 1\], got 0"),
    (dict(compression=1.5), ValueError, r"compression must be in \(0, 1\], got 1.5"),
    (dict(compression="1/8"), TypeError, "compression must be a number"),
    (dict(memory_size=10, chunk_size=4), ValueError, "memory_size 10 is not a multiple of chunk_size 4"),
    (dict(memory_size=0), ValueError, "memory_size must be >= 1, got 0"),
    (dict(memory_size=8, chunk_size=0), ValueError, "chunk_size must be >= 1, got 0"),
    (dict(memory_size=8, seed=-1), ValueError, r"seed must be in \[0, 4294967295\], got -1"),
    (dict(memory_size=8, seed=2**32), ValueError, "seed must be in"),
    (dict(memory_size=8, padding_idx=100), ValueError, r"padding_idx must be in \[-100, 99\], got 100"),
    (dict(memory_size=8, mode="max"), ValueError, "mode='max' is not supported"),
    (dict(memory_size=8, mode="min"), ValueError, "mode must be one of"),
    (dict(memory_size=8, dtype=torch.int64), TypeError, "dtype must be float32 or float64"),
    (dict(memory_size=8, backend="gpu"), ValueError, "unknown backend 'gpu'"),
    (dict(memory_size=8, signed=1), TypeError, "signed must be a bool"),
])
def test_bad_constructor_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        HashedEmbeddingBag(100, 8, **kwargs)


def test_bad_table_shape():
    with pytest.raises(ValueError, match="num_embeddings must be in"):
        HashedEmbedding(0, 8, memory_size=8)
    with pytest.raises(ValueError, match="embedding_dim must be >= 1, got 0"):
        HashedEmbedding(10, 0, memory_size=8)
    with pytest.raises(ValueError, match="num_embeddings must be in"):
        HashedEmbedding(2**32 + 1, 8, memory_size=8)


def test_bad_op_arguments():
    spec = fastfair.HashSpec(50, 4, memory_size=16, chunk_size=2)
    w = torch.randn(16)
    with pytest.raises(ValueError, match="weight must be 1-D of length memory_size=16"):
        fastfair.embedding(torch.tensor([1]), torch.randn(15), spec)
    with pytest.raises(TypeError, match="weight must be float32 or float64, got torch.float16"):
        fastfair.embedding(torch.tensor([1]), w.half(), spec)
    with pytest.raises(ValueError, match="fold factor 3 does not divide the array length 16"):
        fastfair.fold(w, 3, fastfair.slot_counts(spec))
    with pytest.raises(ValueError, match="arrays\\[1\\] has length 3, which does not divide"):
        fastfair.aggregate([w, torch.randn(3)], [1.0, 1.0], 16)
    with pytest.raises(ValueError, match="got 2 arrays but 1 weights"):
        fastfair.aggregate([w, w], [1.0], 16)
    with pytest.raises(ValueError, match="dense must have shape \\(50, 4\\)"):
        fastfair.project_dense(torch.randn(4, 50), spec)


def test_backend_choice_and_forcing(monkeypatch):
    bag = HashedEmbeddingBag(100, 8, memory_size=64, mode="sum", backend="cuda")
    idx = torch.tensor([[1, 2]])
    with pytest.raises(fastfair.BackendUnavailableError, match="backend='cuda' cannot run on cpu"):
        bag(idx)
    monkeypatch.setenv("FASTFAIR_BACKEND", "reference")
    assert torch.isfinite(bag(idx)).all()  # the environment wins over the module's choice
    monkeypatch.setenv("FASTFAIR_BACKEND", "cuda")
    with pytest.raises(fastfair.BackendUnavailableError, match="FASTFAIR_BACKEND=cuda cannot run"):
        HashedEmbeddingBag(100, 8, memory_size=64, mode="sum")(idx)
    monkeypatch.setenv("FASTFAIR_BACKEND", "tpu")
    with pytest.raises(fastfair.BackendUnavailableError, match="FASTFAIR_BACKEND='tpu' is not one of"):
        HashedEmbeddingBag(100, 8, memory_size=64, mode="sum")(idx)
    monkeypatch.delenv("FASTFAIR_BACKEND")
    auto = backends.resolve("auto", torch.device("cpu")).NAME
    assert auto == ("numba" if not backends.why_not("numba", torch.device("cpu")) else "reference")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_virtual_table_is_allocated(backend, device):
    """A 2**32 x 64 virtual table (1 TiB in float32) in a 4096-parameter array: forward and
    backward only work if nothing of the virtual table's size is ever allocated."""
    bag = HashedEmbeddingBag(2**32, 64, memory_size=4096, chunk_size=8, mode="sum",
                             backend=backend, device=device)
    idx = torch.tensor([0, 2**32 - 1, 123456789, 2**31], device=device)
    out = bag(idx, torch.tensor([0, 2], device=device))
    out.sum().backward()
    assert out.shape == (2, 64) and bag.weight.grad.shape == (4096,)
    emb = HashedEmbedding(2**32, 64, memory_size=4096, chunk_size=8, backend=backend, device=device)
    assert emb(idx).shape == (4, 64)


def test_required_backends_are_live():
    """CI names the backends it must exercise; a skip there would hide a broken install."""
    required = [n for n in os.environ.get("FASTFAIR_REQUIRE_BACKENDS", "").split(",") if n]
    if not required:
        pytest.skip("FASTFAIR_REQUIRE_BACKENDS is not set (CI sets it)")
    for name in required:
        device = torch.device("cuda" if name == "cuda" else "cpu")
        assert not backends.why_not(name, device), f"{name}: {backends.why_not(name, device)}"
