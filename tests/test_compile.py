"""torch.compile of models using the hashed modules (no graph break, inductor and aot_eager,
dense and sparse gradients), and opcheck of the ops' sparse and frequency-scaled variants."""
import pytest
import torch
import torch._dynamo
from torch import nn

from fastfair.kernels import ops
from fastfair.nn import HashedEmbedding, HashedEmbeddingBag

from testing import TOL, make_bags, rand

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Tower(nn.Module):
    """Two hashed tables feeding an MLP, as a recommender tower uses them."""

    def __init__(self, bag_sparse: bool, emb_sparse: bool, scale_grad_by_freq: bool = False):
        super().__init__()
        self.bag = HashedEmbeddingBag(1000, 16, compression=0.25, chunk_size=8, mode="sum",
                                      seed=2, padding_idx=3, sparse=bag_sparse,
                                      scale_grad_by_freq=scale_grad_by_freq)
        self.emb = HashedEmbedding(500, 16, compression=0.5, chunk_size=4, seed=5,
                                   sparse=emb_sparse)
        self.mlp = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, idx, off, psw, tokens):
        return self.mlp(self.bag(idx, off, psw) + self.emb(tokens).mean(1)).squeeze(1)


def _inputs(seed: int, bags: int):
    gen = torch.Generator().manual_seed(seed)
    idx, off = make_bags(1000, [(3 * b) % 7 for b in range(bags)], gen)
    idx[::4] = 3
    return idx, off, rand(idx.shape, gen), torch.randint(0, 500, (bags, 3), generator=gen)


def _loss(model, *inputs):
    return (model(*inputs) ** 2).sum()


def _grads(model):
    return [p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()
            for p in model.parameters()]


def _check_compiled_matches_eager(model, backend: str, shapes=(9, 14)):
    compiled = torch.compile(_loss, fullgraph=True, backend=backend)
    for seed, bags in enumerate(shapes):
        inputs = _inputs(seed, bags)
        model.zero_grad(set_to_none=True)
        expect = _loss(model, *inputs)
        expect.backward()
        want = _grads(model)
        model.zero_grad(set_to_none=True)
        got = compiled(model, *inputs)
        got.backward()
        torch.testing.assert_close(got, expect, **TOL[torch.float32])
        for g, w in zip(_grads(model), want):
            torch.testing.assert_close(g, w, **TOL[torch.float32])


@pytest.mark.parametrize("sparse", [False, True])
def test_no_graph_break(sparse):
    """dynamo captures forward and backward of the whole model as one graph."""
    model = _Tower(sparse, sparse, scale_grad_by_freq=True)
    explained = torch._dynamo.explain(_loss)(model, *_inputs(0, 9))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("sparse,freq", [(False, False), (True, True)])
def test_aot_eager_fullgraph(sparse, freq):
    torch.manual_seed(50)
    _check_compiled_matches_eager(_Tower(sparse, sparse, freq), "aot_eager")


def test_inductor_fullgraph_forward_backward():
    """The default backend, generating C++ for the model's own ops around the custom ops (10-20 s
    of compilation on 2 cores, so one model covers both gradient layouts); two batch shapes
    check the recompiled graph too."""
    torch.manual_seed(51)
    _check_compiled_matches_eager(_Tower(bag_sparse=True, emb_sparse=False,
                                         scale_grad_by_freq=True), "inductor")


def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(53)
    w = rand(24, gen, torch.float64, device).requires_grad_()
    idx, off = make_bags(30, [3, 0, 5], gen, device=device)
    idx[2] = 4
    off = torch.cat([off, off.new_full((1,), idx.numel())])  # the raw ops take B + 1 offsets
    tail = torch.cat([off[:-1], off.new_full((1,), idx.numel() - 2)])  # two unbagged elements
    psw = rand(8, gen, torch.float64, device).requires_grad_()
    g = rand((3, 5), gen, torch.float64, device)
    cfg = (5, 2, 7, True)
    return [
        (ops.embedding_bag_op, (w, idx, off, psw, 30, *cfg, 0, 4, "auto", True, False, True)),
        (ops.embedding_bag_op, (w, idx, tail, psw, 30, *cfg, 0, -1, "auto", True, True, True)),
        (ops.embedding_bag_op, (w, idx, off, None, 30, *cfg, 1, 4, "auto", True, True, False)),
        (ops.embedding_bag_op, (w, idx, None, None, 30, *cfg, 0, 4, "auto", True, True, True)),
        (ops.embedding_bag_sparse_backward_op, (g, idx, off, psw.detach(), 24, *cfg, 0, 4, "auto")),
        (ops.embedding_bag_sparse_backward_op, (g, idx, tail, None, 24, *cfg, 1, -1, "auto")),
        (ops.embedding_bag_sparse_backward_op,
         (rand((8, 5), gen, torch.float64, device), idx, None, None, 24, 5, 2, 7, False, 0, -1,
          "auto")),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_sparse_and_frequency_variants(device):
    """The other ops and the plain variants are opchecked in test_ops.py."""
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)
