"""HashedEmbeddingBagCollection against TorchRec's own EmbeddingBagCollection.

The oracle is torchrec.EmbeddingBagCollection run (torch.func.functional_call) on the virtual
tables built by torch indexing from the reference hash (testing.virtual_table), so outputs and
the arrays' gradients are checked against TorchRec's pooling and torch's autograd, independently
of every fastfair kernel. Skipped when TorchRec (with an FBGEMM build that loads against this
torch) is not installed.
"""
import os
import tempfile

import pytest
import torch
from torch.func import functional_call

trec = pytest.importorskip(
    "fastfair.integrations.torchrec",
    reason="TorchRec is not installed, or its FBGEMM build does not load against this torch "
           "(see docs/integrations.md: torchrec 1.9.2 + fbgemm-gpu-cpu 1.8.0 with torch 2.13)",
    exc_type=ImportError)

from torchrec import (EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor,  # noqa: E402
                      PoolingType)
from torchrec.modules.embedding_configs import DataType  # noqa: E402

from fastfair.kernels import functional as F  # noqa: E402
from testing import TOL, backend_params, virtual_table  # noqa: E402

HashedEBC = trec.HashedEmbeddingBagCollection


def _tables():
    """Mixed on purpose: two dims, both poolings, a feature ('a') read by two tables, a table
    with two features, sizes that are not powers of two."""
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=97, feature_names=["a", "b"]),
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=33, feature_names=["c"]),
        EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=50, feature_names=["d", "a"],
                           pooling=PoolingType.MEAN),
    ]


ROWS = {"a": 50, "b": 97, "c": 33, "d": 50, "unused": 7}


def _kjt(keys, batch, gen, weighted=False, max_len=4):
    """Random bags (empty ones included), keys in the given order."""
    lengths = torch.randint(0, max_len, (len(keys) * batch,), generator=gen)
    values = torch.cat([torch.randint(0, ROWS[k], (int(lengths[i * batch:(i + 1) * batch].sum()),),
                                      generator=gen) for i, k in enumerate(keys)])
    weights = torch.rand(values.numel(), generator=gen) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths,
                                               weights=weights)


def _reference(module, tables, kjt, weighted=False):
    """TorchRec's collection on the module's virtual tables (differentiable in its arrays)."""
    params = {}
    for group in module._groups:
        virtual = virtual_table(module._array(group), group.spec)
        start = 0
        for name in group.tables:
            n = next(t.num_embeddings for t in tables if t.name == name)
            params[f"embedding_bags.{name}.weight"] = virtual[start:start + n]
            start += n
    ebc = EmbeddingBagCollection(tables=tables, is_weighted=weighted)
    return functional_call(ebc, params, (kjt,))


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-table"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("batch", [1, 5])
def test_matches_torchrec_collection(batched, weighted, batch):
    gen = torch.Generator().manual_seed(batch + 10 * weighted + 100 * batched)
    tables = _tables()
    if weighted:  # per-sample weights need SUM pooling, in torch as in TorchRec
        tables[2].pooling = PoolingType.SUM
    module = HashedEBC(tables, is_weighted=weighted, compression=0.3, chunk_size=2, seed=4,
                       batched=batched)
    # Keys in another order than the tables', plus one the module does not use.
    kjt = _kjt(["d", "unused", "c", "b", "a"], batch, gen, weighted)
    out = module(kjt)
    ref = _reference(module, tables, kjt, weighted)
    assert out.keys() == ref.keys() == ["a@t0", "b", "c", "d", "a@t2"]
    assert out.length_per_key() == [8, 8, 8, 4, 4]
    assert out.values().shape == (batch, 32)
    torch.testing.assert_close(out.values(), ref.values(), **TOL[torch.float32])
    probe = torch.randn(out.values().shape, generator=gen)
    params = list(module.parameters())
    got = torch.autograd.grad((out.values() * probe).sum(), params)
    want = torch.autograd.grad((ref.values() * probe).sum(), params)
    assert sum(float(g.abs().sum()) for g in got) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


@pytest.mark.parametrize("backend,device", backend_params())
def test_every_backend(backend, device):
    gen = torch.Generator().manual_seed(7)
    tables = _tables()
    module = HashedEBC(tables, compression=0.5, backend=backend, device=device)
    kjt = _kjt(["a", "b", "c", "d"], 3, gen).to(torch.device(device))
    out = module(kjt)
    ref = _reference(module, tables, kjt)
    torch.testing.assert_close(out.values(), ref.values(), **TOL[torch.float32])
    probe = torch.randn(out.values().shape, generator=gen).to(device)
    (g,) = torch.autograd.grad((out.values() * probe).sum(), [module.weight])
    (w,) = torch.autograd.grad((ref.values() * probe).sum(), [module.weight])
    torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_one_launch_for_tables_of_one_dim(monkeypatch):
    calls = []
    real = F.embedding_bag

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(trec.F, "embedding_bag", counting)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=n,
                                 feature_names=[f"f{i}"]) for i, n in enumerate([1000, 3, 250])]
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 3, (3 * 4,), generator=gen)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1", "f2"], lengths=lengths,
        values=torch.randint(0, 3, (int(lengths.sum()),), generator=gen))
    HashedEBC(tables, compression=0.05)(kjt)
    assert len(calls) == 1 and calls[0].num_embeddings == 1253
    calls.clear()
    HashedEBC(tables, compression=0.05, batched=False)(kjt)
    assert len(calls) == 3
    calls.clear()
    HashedEBC(_tables(), compression=0.05)(_kjt(["a", "b", "c", "d"], 2, gen))
    assert len(calls) == 2  # one per (dim, pooling) group


def test_tables_in_one_array_do_not_collide_systematically():
    # Equal tables: row i of t0 and row i of t1 must not share their slots.
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=4096,
                                 feature_names=[f"f{i}"]) for i in range(2)]
    module = HashedEBC(tables, compression=0.25)
    spec = module.specs()["t0"]
    rows = torch.arange(4096)
    first, _ = F.hash_index(rows, spec)
    second, _ = F.hash_index(rows + 4096, spec)
    same = (first == second).float().mean().item()
    assert same < 10 / (spec.memory_size // spec.chunk_size) + 0.01


def test_sizes_and_initialisation():
    tables = _tables()
    virtual = sum(t.num_embeddings * t.embedding_dim for t in tables)
    batched = HashedEBC(tables, compression=0.25, chunk_size=4)
    assert batched.weight.numel() == F.nested_size(0.25 * virtual, 4)
    assert sum(p.numel() for p in batched.parameters()) == batched.weight.numel()
    per_table = HashedEBC(tables, memory_size={"t0": 64, "t1": 32, "t2": 16}, batched=False)
    assert [per_table.embedding_bags[t].weight.numel() for t in ("t0", "t1", "t2")] == [64, 32, 16]
    # One table: exactly its config's uniform range; TorchRec's default is +-sqrt(1 / n).
    single = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=400,
                                 feature_names=["f"], weight_init_min=-0.3, weight_init_max=0.1)]
    w = HashedEBC(single, compression=0.5).weight.detach()
    assert w.min() >= -0.3 and w.max() <= 0.1 and w.min() < -0.25 and w.max() > 0.05
    w = HashedEBC(tables, memory_size=5000).weight.detach()
    bound = max(t.get_weight_init_max() for t in tables)
    assert w.abs().max() <= bound and w.std() > 0.25 * bound


def test_checkpoint_round_trip_and_mismatch():
    gen = torch.Generator().manual_seed(3)
    module = HashedEBC(_tables(), compression=0.3)
    state = module.state_dict()
    other = HashedEBC(_tables(), compression=0.3)
    other.load_state_dict(state)
    kjt = _kjt(["a", "b", "c", "d"], 4, gen)
    torch.testing.assert_close(other(kjt).values(), module(kjt).values(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="different hash configuration"):
        HashedEBC(_tables(), compression=0.3, seed=9).load_state_dict(state)


def test_bad_arguments_are_refused():
    tables = _tables()
    with pytest.raises(ValueError, match="exactly one of compression"):
        HashedEBC(tables)
    with pytest.raises(ValueError, match="exactly one of compression"):
        HashedEBC(tables, compression=0.1, memory_size=100)
    with pytest.raises(ValueError, match="compression must be a number in"):
        HashedEBC(tables, compression=1.5)
    with pytest.raises(TypeError, match="batched: memory_size must be an int"):
        HashedEBC(tables, memory_size={"t0": 8})
    with pytest.raises(ValueError, match="one size per table"):
        HashedEBC(tables, memory_size={"t0": 8}, batched=False)
    with pytest.raises(ValueError, match="non-empty list"):
        HashedEBC([], compression=0.1)
    with pytest.raises(TypeError, match="EmbeddingBagConfig"):
        HashedEBC([("t", 10, 4)], compression=0.1)
    with pytest.raises(ValueError, match="Duplicate table name 't0'"):
        HashedEBC(tables + [_tables()[0]], compression=0.1)
    half = [EmbeddingBagConfig(name="h", embedding_dim=4, num_embeddings=10,
                               feature_names=["h"], data_type=DataType.FP16)]
    with pytest.raises(TypeError, match="float32 tables only"):
        HashedEBC(half, compression=0.5)
    with pytest.raises(ValueError, match="is_weighted needs SUM pooling.*t2"):
        HashedEBC(tables, is_weighted=True, compression=0.1)
    with pytest.raises(TypeError, match="batched must be a bool"):
        HashedEBC(tables, compression=0.1, batched=1)
    with pytest.raises(ValueError, match="backend"):
        HashedEBC(tables, compression=0.1, backend="fast")


def test_bad_inputs_are_refused():
    gen = torch.Generator().manual_seed(5)
    module = HashedEBC(_tables(), compression=0.3)
    kjt = _kjt(["a", "b", "c", "d"], 3, gen)
    with pytest.raises(TypeError, match="KeyedJaggedTensor"):
        module(kjt.values())
    with pytest.raises(ValueError, match=r"features \['d'\] are not in"):
        module(_kjt(["a", "b", "c"], 3, gen))
    # Id 40 is a valid row of the stacked virtual table but not of t1 (33 rows).
    bad = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b", "c", "d"], values=torch.tensor([1, 2, 40, 3]),
        lengths=torch.tensor([1, 0, 1, 0, 1, 0, 1, 0]))
    with pytest.raises(IndexError, match="feature 'c': id 40 is out of range for its table of 33"):
        module(bad)
    weighted = HashedEBC([EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10,
                                             feature_names=["f"])], is_weighted=True,
                         compression=0.5)
    with pytest.raises(ValueError, match="has no weights"):
        weighted(KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([1]),
                                                     lengths=torch.tensor([1])))
    variable = KeyedJaggedTensor(keys=["a", "b", "c", "d"], values=torch.tensor([1, 2, 3, 4, 5]),
                                 lengths=torch.tensor([1, 1, 1, 1, 1]),
                                 stride_per_key_per_rank=[[2], [1], [1], [1]])
    with pytest.raises(ValueError, match="variable_stride_per_key"):
        module(variable)


def test_dlrm_under_distributed_model_parallel():
    """The module as TorchRec's DLRM sparse arch, wrapped by DistributedModelParallel (one
    process, gloo): it is not sharded, the model is data parallel, gradients reach the array."""
    import torch.distributed as dist
    from torchrec.distributed import DistributedModelParallel
    from torchrec.models.dlrm import DLRM

    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n,
                                 feature_names=[f"f{i}"]) for i, n in enumerate([1000, 50, 300])]
    torch.manual_seed(0)
    ebc = HashedEBC(tables, compression=0.1)
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=4,
                 dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])
    gen = torch.Generator().manual_seed(2)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1", "f2"], values=torch.randint(0, 50, (18,), generator=gen),
        lengths=torch.ones(18, dtype=torch.int64))
    dense = torch.randn(6, 4, generator=gen)
    expected = model(dense, kjt)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}",
                                rank=0, world_size=1)
        try:
            dmp = DistributedModelParallel(model, device=torch.device("cpu"))
            assert "sparse_arch.embedding_bag_collection.weight" in dict(dmp.named_parameters())
            out = dmp(dense, kjt)
            out.sum().backward()
        finally:
            dist.destroy_process_group()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert ebc.weight.grad is not None and ebc.weight.grad.abs().sum() > 0
