"""fastfair.fl.xc: the XC-repository parser, XCData, the synthetic generator, precision@k."""
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastfair.fl.xc import (XCBatch, XCData, load_xc, load_xc_split, precision_at_k,
                            synthetic_xc)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write(path, text, crlf=False):
    path.write_bytes(text.replace("\n", "\r\n" if crlf else "\n").encode())
    return path


def _rows(indptr, ids):
    return [ids[indptr[i]:indptr[i + 1]].tolist() for i in range(indptr.numel() - 1)]


def _random_data(seed, n=60, num_features=40, num_labels=30):
    """Random XCData built point by point in Python (rows sorted and unique, some empty)."""
    rng = np.random.default_rng(seed)
    feats, vals, labels = [], [], []
    for _ in range(n):
        f = np.sort(rng.choice(num_features, rng.integers(0, 8), replace=False))
        feats.append(f.tolist())
        vals.append(rng.uniform(0.1, 2.0, f.size).astype(np.float32).tolist())
        labels.append(np.sort(rng.choice(num_labels, rng.integers(0, 5), replace=False)).tolist())

    def csr(rows):
        indptr = torch.tensor([0] + np.cumsum([len(r) for r in rows]).tolist(), dtype=torch.int64)
        return indptr, [x for r in rows for x in r]

    fptr, fids = csr(feats)
    lptr, lids = csr(labels)
    data = XCData(num_features, num_labels, fptr, torch.tensor(fids, dtype=torch.int64),
                  torch.tensor([v for r in vals for v in r], dtype=torch.float32), lptr,
                  torch.tensor(lids, dtype=torch.int64), "random")
    return data, feats, vals, labels


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------

# Point 0: labels 3, 0 (unsorted) and features 4:2 and 1:0.5; point 1: no label (leading space);
# point 2: labels only, no feature; point 3: features only, no leading space; point 4: nothing.
SMALL = ("5 6 4\n"
         "3,0 4:2 1:0.5\n"
         " 0:1.5e-1 5:3\n"
         "2\n"
         "2:1\n"
         "\n")


def test_parse_small_file_exactly(tmp_path):
    data = load_xc(_write(tmp_path / "toy.txt", SMALL), normalize=False)
    assert (data.name, len(data), data.num_features, data.num_labels) == ("toy", 5, 6, 4)
    assert data.feat_indptr.tolist() == [0, 2, 4, 4, 5, 5]
    assert data.feat_indices.tolist() == [1, 4, 0, 5, 2]
    assert data.feat_values.tolist() == pytest.approx([0.5, 2.0, 0.15, 3.0, 1.0])
    assert data.feat_values.dtype == torch.float32
    assert data.label_indptr.tolist() == [0, 2, 2, 3, 3, 3]
    assert data.label_ids.tolist() == [0, 3, 2]
    assert data.label_counts().tolist() == [1, 0, 1, 1]


def test_parse_normalizes_to_unit_rows_and_accepts_crlf(tmp_path):
    data = load_xc(_write(tmp_path / "toy.txt", SMALL, crlf=True))
    assert data.feat_values.tolist() == pytest.approx(
        [0.5 / math.sqrt(4.25), 2 / math.sqrt(4.25), 0.15 / math.sqrt(9.0225),
         3 / math.sqrt(9.0225), 1.0])
    raw = load_xc(tmp_path / "toy.txt", normalize=False)
    assert torch.equal(raw.feat_indices, data.feat_indices)
    assert torch.equal(raw.label_ids, data.label_ids)


def test_parse_trailing_blank_lines_and_no_final_newline(tmp_path):
    a = load_xc(_write(tmp_path / "a.txt", "2 3 3\n0 1:1\n1,2 2:1\n\n\n"), normalize=False)
    b = load_xc(_write(tmp_path / "b.txt", "2 3 3\n0 1:1\n1,2 2:1"), normalize=False)
    for data in (a, b):
        assert _rows(data.label_indptr, data.label_ids) == [[0], [1, 2]]
        assert _rows(data.feat_indptr, data.feat_indices) == [[1], [2]]


def test_parse_values_fast_and_slow_paths(tmp_path):
    values = ["1", "0.084556", "12.5", "7.", ".25", "1e-3", "-2.5", "+3", "1234567890.1234567",
              "3.14159265358979323846"]
    line = " " + " ".join(f"{i}:{v}" for i, v in enumerate(values))
    data = load_xc(_write(tmp_path / "v.txt", f"1 10 1\n{line}\n"), normalize=False)
    expected = np.array([float(v) for v in values], dtype=np.float32)
    assert data.feat_values.numpy().tolist() == expected.tolist()


def test_parse_many_blocks(tmp_path, monkeypatch):
    """Files larger than one parsing block give the same result as one block."""
    from fastfair.fl import xc
    train, _ = synthetic_xc(300, 50, 40, num_clusters=4, test_points=0, seed=3)
    lines = [f"{len(train)} 50 40"]
    for i in range(len(train)):
        labels = ",".join(map(str, _rows(train.label_indptr, train.label_ids)[i]))
        lo, hi = int(train.feat_indptr[i]), int(train.feat_indptr[i + 1])
        feats = " ".join(f"{f}:{v:.6f}" for f, v in zip(train.feat_indices[lo:hi].tolist(),
                                                         train.feat_values[lo:hi].tolist()))
        lines.append(f"{labels} {feats}")
    file = _write(tmp_path / "t.txt", "\n".join(lines) + "\n")
    whole = load_xc(file, normalize=False)
    monkeypatch.setattr(xc, "_BLOCK_BYTES", 1000)
    blocks = load_xc(file, normalize=False)
    for field in ("feat_indptr", "feat_indices", "feat_values", "label_indptr", "label_ids"):
        assert torch.equal(getattr(whole, field), getattr(blocks, field)), field
    assert torch.equal(whole.label_ids, train.label_ids)
    assert torch.allclose(whole.feat_values, train.feat_values, atol=1e-6)
    _write(file, "\n".join(lines[:298] + ["40 1:1"] + lines[299:]) + "\n")
    with pytest.raises(ValueError, match=r"line 299: label id 40 out of range"):
        load_xc(file)


@pytest.mark.parametrize("text, match", [
    ("2 3\n0 1:1\n1 2:1\n", r"line 1: bad header '2 3'"),
    ("x 3 3\n", r"line 1: bad header 'x 3 3'"),
    ("1 0 3\n0 1:1\n", r"line 1: bad header '1 0 3'"),
    ("", r"line 1: bad header ''"),
    ("2 3 3", "header announces 2 points but the file has 0 lines after it"),
    ("3 3 3\n0 1:1\n1 2:1\n", "header announces 3 points but the file has 2 lines"),
    ("1 3 3\n0 1:1\n\n1 2:1\n", "header announces 1 points but line 4, after them, is not"),
    ("2 3 3\n0 1:1\n3 2:1\n", r"line 3: label id 3 out of range \[0, 3\) in field '3'"),
    ("2 3 3\n0 1:1\n1 7:1\n", r"line 3: feature id 7 out of range \[0, 3\) in field '7:1'"),
    ("2 3 3\n0 1:1\n-1 2:1\n", r"line 3: label id -1 out of range"),
    ("2 3 3\n0 -2:1\n1 2:1\n", r"line 2: feature id -2 out of range"),
    ("2 3 3\n0 1:1\n1 x:1\n", r"line 3: unparsable token 'x' in field 'x:1'"),
    ("2 3 3\n0 1:abc\n1 2:1\n", r"line 2: unparsable token 'abc' in field '1:abc'"),
    ("2 3 3\n0 1:1.2.3\n1 2:1\n", r"line 2: unparsable token '1.2.3'"),
    ("2 3 3\n0 1:nan\n1 2:1\n", r"line 2: unparsable token 'nan'"),
    ("2 3 3\n0 1:1e999\n1 2:1\n", r"line 2: unparsable token '1e999'"),
    ("2 3 3\n0,1.5 1:1\n1 2:1\n", r"line 2: unparsable token '1.5' in field '0,1.5'"),
    ("2 3 3\n0 1:1\n1 2:1 2\n", r"line 3: malformed field '2'"),
    ("2 3 3\n0 1:1\n1 2:\n", r"line 3: malformed field '2:'"),
    ("2 3 3\n0,,1 1:1\n1 2:1\n", r"line 2: malformed field '0,,1'"),
    ("2 3 3\n0 1:1:1\n1 2:1\n", r"line 2: malformed field '1:1:1'"),
    ("2 3 3\n0 1:1,2\n1 2:1\n", r"line 2: malformed field '1:1,2'"),
    ("2 3 3\n0 1:1\n1 , 2:1\n", r"line 3: malformed field ','"),
    ("2 3 3\n0,0 1:1\n1 2:1\n", "line 2: label 0 is listed twice"),
    ("2 3 3\n0 1:1\n1 2:1 2:3\n", "line 3: feature 2 is listed twice"),
])
def test_parse_errors_name_file_line_and_token(tmp_path, text, match):
    file = _write(tmp_path / "bad.txt", text)
    with pytest.raises(ValueError, match=match) as err:
        load_xc(file)
    assert str(file) in str(err.value)


def test_parse_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.txt")):
        load_xc(tmp_path / "missing.txt")
    with pytest.raises(TypeError, match="path"):
        load_xc(3)
    _write(tmp_path / "ok.txt", SMALL)
    with pytest.raises(TypeError, match="normalize must be a bool, got 1"):
        load_xc(tmp_path / "ok.txt", normalize=1)


def test_load_split(tmp_path):
    _write(tmp_path / "train.txt", SMALL)
    _write(tmp_path / "test.txt", "1 6 4\n1 2:1\n")
    train, test = load_xc_split(tmp_path)
    assert (len(train), len(test)) == (5, 1)
    assert (train.name, test.name) == (f"{tmp_path.name}/train", f"{tmp_path.name}/test")
    _write(tmp_path / "test.txt", "1 6 5\n1 2:1\n")
    with pytest.raises(ValueError, match="train.txt has 6 features and 4 labels but test.txt "
                                         "6 and 5"):
        load_xc_split(tmp_path)
    (tmp_path / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test.txt"):
        load_xc_split(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_xc_split(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# XCData
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_matches_brute_force(seed):
    data, feats, vals, labels = _random_data(seed)
    idx = torch.from_numpy(np.random.default_rng(seed + 10).integers(0, len(data), 25))
    b = data.batch(idx)
    assert isinstance(b, XCBatch)
    indices, offsets, weights, label_offsets, label_ids = [], [], [], [0], []
    for i in idx.tolist():
        offsets.append(len(indices))
        indices += feats[i]
        weights += vals[i]
        label_ids += labels[i]
        label_offsets.append(len(label_ids))
    assert b.indices.tolist() == indices and b.offsets.tolist() == offsets
    assert b.weights.tolist() == weights and b.weights.dtype == torch.float32
    assert b.label_offsets.tolist() == label_offsets and b.label_ids.tolist() == label_ids
    assert all(t.dtype == torch.int64 for t in (b.indices, b.offsets, b.label_offsets,
                                                b.label_ids))
    # The EmbeddingBag form really is what a bag computes.
    bag = torch.nn.EmbeddingBag(data.num_features, 3, mode="sum")
    out = bag(b.indices, b.offsets, per_sample_weights=b.weights)
    dense = torch.zeros(idx.numel(), data.num_features)
    for r, i in enumerate(idx.tolist()):
        dense[r, feats[i]] = torch.tensor(vals[i])
    assert torch.allclose(out, dense @ bag.weight, atol=1e-5)


def test_batch_and_subset_edge_cases():
    data, feats, _, labels = _random_data(4)
    empty = data.batch(torch.zeros(0, dtype=torch.int64))
    assert empty.offsets.numel() == 0 and empty.label_offsets.tolist() == [0]
    sub = data.subset(torch.tensor([5, 2, 5], dtype=torch.int32))
    assert len(sub) == 3 and sub.name == "random"
    assert _rows(sub.feat_indptr, sub.feat_indices) == [feats[5], feats[2], feats[5]]
    assert _rows(sub.label_indptr, sub.label_ids) == [labels[5], labels[2], labels[5]]
    with pytest.raises(IndexError, match=r"point 60, out of range \[0, 60\)"):
        data.batch(torch.tensor([0, 60]))
    with pytest.raises(IndexError, match="point -1"):
        data.batch(torch.tensor([-1]))
    with pytest.raises(TypeError, match="idx must be an int32 or int64 tensor, got torch.float32"):
        data.batch(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="idx must be a torch.Tensor, got list"):
        data.batch([1])
    with pytest.raises(ValueError, match="idx must be 1-D"):
        data.batch(torch.zeros(2, 2, dtype=torch.int64))


def test_split_is_a_seeded_partition():
    data, _, _, labels = _random_data(5, n=103)
    parts = data.split(4, seed=7)
    assert [len(p) for p in parts] == [26, 26, 26, 25]
    assert parts[0].name == "random[part 0/4]"
    seen = sorted(tuple(r) for p in parts for r in _rows(p.label_indptr, p.label_ids))
    assert seen == sorted(tuple(r) for r in labels)
    assert sum(p.feat_indices.numel() for p in parts) == data.feat_indices.numel()
    again = data.split(4, seed=7)
    other = data.split(4, seed=8)
    assert all(torch.equal(a.feat_indices, b.feat_indices) for a, b in zip(parts, again))
    assert not all(torch.equal(a.label_ids, b.label_ids) for a, b in zip(parts, other))
    assert len(data.split(103)) == 103 and len(data.split(1)[0]) == 103
    with pytest.raises(ValueError, match="num_parts must be <= 103, got 104"):
        data.split(104)
    with pytest.raises(ValueError, match="num_parts must be >= 1, got 0"):
        data.split(0)
    with pytest.raises(TypeError, match="seed must be an int"):
        data.split(2, seed=1.5)


def test_split_covers_every_point_once():
    train, _ = synthetic_xc(500, 100, 50, num_clusters=5, test_points=0)
    keys = []
    for part in train.split(3, seed=1):
        b = part.batch(torch.arange(len(part)))
        keys += [tuple(r) for r in _rows(b.label_offsets, b.label_ids)]
    assert sorted(keys) == sorted(tuple(r) for r in _rows(train.label_indptr, train.label_ids))


def test_validate_names_each_violation():
    data, *_ = _random_data(6)
    ids = data.label_ids.clone()
    first = int(torch.nonzero(torch.diff(data.label_indptr) >= 2)[0])
    lo = int(data.label_indptr[first])
    ids[[lo, lo + 1]] = ids[[lo + 1, lo]]
    indptr = data.feat_indptr.clone()
    indptr[3] = indptr[4] + 1
    values = data.feat_values.clone()
    values[2] = float("inf")
    cases = [
        ({"label_ids": ids}, ValueError, f"label_ids of point {first} are not sorted and unique"),
        ({"feat_indptr": indptr}, ValueError, "feat_indptr decreases at point 3"),
        ({"feat_indices": data.feat_indices + 40}, ValueError, r"out of range \[0, 40\)"),
        ({"feat_values": values}, ValueError, r"feat_values\[2\] = inf is not finite"),
        ({"feat_values": data.feat_values.double()}, TypeError, "feat_values must be a "
                                                                "torch.float32"),
        ({"label_ids": data.label_ids.int()}, TypeError, "label_ids must be a torch.int64"),
        ({"label_indptr": data.label_indptr[:-1]}, ValueError, "both have N \\+ 1 entries"),
        ({"feat_values": data.feat_values[:-1]}, ValueError, "feat_values must match"),
        ({"label_indptr": data.label_indptr + 1}, ValueError, "label_indptr must run from 0"),
        ({"num_labels": 0}, ValueError, "num_labels must be >= 1, got 0"),
        ({"num_features": 2.0}, TypeError, "num_features must be an int"),
        ({"name": None}, TypeError, "name must be a str"),
    ]
    for changes, error, match in cases:
        with pytest.raises(error, match=match):
            dataclasses.replace(data, **changes)


# ----------------------------------------------------------------------------------------------
# precision@k
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_precision_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    b, width, num_labels = 50, 7, 15
    topk = np.stack([rng.choice(num_labels, width, replace=False) for _ in range(b)])
    truth = [rng.choice(num_labels, rng.integers(0, 6), replace=False).tolist() for _ in range(b)]
    truth[0] = []
    offsets = torch.tensor([0] + np.cumsum([len(t) for t in truth]).tolist())
    ids = torch.tensor([x for t in truth for x in t], dtype=torch.int64)
    ks = (1, 2, 5, 7)
    got = precision_at_k(torch.from_numpy(topk), offsets, ids, ks)
    for k in ks:
        expected = sum(len(set(topk[i, :k]) & set(truth[i])) / k for i in range(b)) / b
        assert got[k] == pytest.approx(expected, abs=1e-12)


def test_precision_conventions():
    offsets = torch.tensor([0, 2, 2, 3])
    ids = torch.tensor([4, 1, 0])
    topk = torch.tensor([[1, 4, 2], [0, 1, 2], [-1, 0, 3]])
    # point 0: 1 and 4 hit; point 1 has no label (0); point 2: a missing prediction, then 0.
    got = precision_at_k(topk, offsets, ids, ks=(1, 2, 3))
    assert got == pytest.approx({1: 1 / 3, 2: (1 + 0 + 0.5) / 3, 3: (2 / 3 + 1 / 3) / 3})
    assert precision_at_k(topk, torch.tensor([0, 0, 0, 0]), ids[:0], ks=1) == {1: 0.0}
    assert math.isnan(precision_at_k(topk[:0], offsets[:1], ids[:0], ks=1)[1])
    assert precision_at_k(topk.int(), offsets.int(), ids.int(), ks=[3, 1]).keys() == {1, 3}


@pytest.mark.parametrize("args, error, match", [
    ((torch.tensor([[1, 2, 3, 1, 5]]), torch.tensor([0, 1]), torch.tensor([1])), ValueError,
     r"topk row 0 repeats a label: \[1, 2, 3, 1, 5\]"),
    ((torch.tensor([[1, 2]]), torch.tensor([0, 1]), torch.tensor([1])), ValueError,
     "topk has 2 columns, fewer than the largest k = 5"),
    ((torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([0, 1, 1]), torch.tensor([1])), ValueError,
     "label_offsets must have B \\+ 1 = 2 entries"),
    ((torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([0, 2]), torch.tensor([1])), ValueError,
     "label_offsets must run from 0 to 1"),
    ((torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([0, 1]), torch.tensor([-3])), ValueError,
     "label_ids must be >= 0, got -3"),
    ((torch.tensor([[-2, 2, 3, 4, 5]]), torch.tensor([0, 1]), torch.tensor([1])), ValueError,
     "got -2"),
    ((torch.tensor([[1.0, 2, 3, 4, 5]]), torch.tensor([0, 1]), torch.tensor([1])), TypeError,
     "topk must be an int32 or int64 tensor"),
    ((torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 1]), torch.tensor([1])), ValueError,
     "topk must be 2-D"),
])
def test_precision_rejects_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        precision_at_k(*args)


def test_precision_rejects_bad_ks():
    topk, offsets, ids = torch.tensor([[1, 2]]), torch.tensor([0, 1]), torch.tensor([1])
    with pytest.raises(ValueError, match="every k in ks must be >= 1, got 0"):
        precision_at_k(topk, offsets, ids, ks=(0, 1))
    with pytest.raises(ValueError, match="empty"):
        precision_at_k(topk, offsets, ids, ks=())
    with pytest.raises(TypeError, match="ks must be an int or a sequence"):
        precision_at_k(topk, offsets, ids, ks=None)


# ----------------------------------------------------------------------------------------------
# Synthetic
# ----------------------------------------------------------------------------------------------

SMALL_SYNTH = dict(num_points=3000, num_features=1000, num_labels=500, num_clusters=20,
                   test_points=600)


@pytest.fixture(scope="module")
def synth():
    return synthetic_xc(**SMALL_SYNTH)


def test_synthetic_is_determined_by_its_seed(synth):
    again = synthetic_xc(**SMALL_SYNTH)
    other = synthetic_xc(**SMALL_SYNTH, seed=1)
    for a, b in zip(synth, again):
        for field in ("feat_indptr", "feat_indices", "feat_values", "label_indptr", "label_ids"):
            assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(synth[0].label_ids[:500], other[0].label_ids[:500])


def test_synthetic_shapes_and_ranges(synth):
    train, test = synth
    assert (len(train), len(test)) == (3000, 600)
    for data in synth:
        assert (data.num_features, data.num_labels) == (1000, 500)
        counts = torch.diff(data.label_indptr)
        assert counts.min() >= 1 and counts.max() <= 5
        feats = torch.diff(data.feat_indptr)
        assert feats.min() >= 1 and feats.max() <= 20
        assert 0 <= int(data.label_ids.min()) and int(data.label_ids.max()) < 500
        norms = torch.zeros(len(data)).index_add_(
            0, torch.repeat_interleave(torch.arange(len(data)), feats), data.feat_values ** 2)
        assert torch.allclose(norms, torch.ones(len(data)), atol=1e-5)
    # Zipf popularity: the top 10% labels carry far more than 10% of the assignments.
    counts = train.label_counts().sort(descending=True).values
    assert counts[:50].sum() > 0.35 * counts.sum()
    assert synthetic_xc(50, 10, 4, num_clusters=4, test_points=0)[1].label_indptr.tolist() == [0]


def _dense(data, rows, cols, values):
    out = torch.zeros(len(data), cols)
    owner = torch.repeat_interleave(torch.arange(len(data)), torch.diff(rows))
    out.index_put_((owner, values[0]), values[1], accumulate=True)
    return out


def test_synthetic_is_learnable(synth):
    """Label centroids of the training features (a linear model) rank the test labels far above
    chance and above label popularity."""
    train, test = synth
    x = _dense(train, train.feat_indptr, 1000, (train.feat_indices, train.feat_values))
    ones = torch.ones(train.label_ids.numel())
    y = _dense(train, train.label_indptr, 500, (train.label_ids, ones))
    centroids = torch.nn.functional.normalize(y.T @ x, dim=1)
    x_test = _dense(test, test.feat_indptr, 1000, (test.feat_indices, test.feat_values))
    top = (x_test @ centroids.T).topk(5, dim=1).indices
    model = precision_at_k(top, test.label_indptr, test.label_ids)
    popular = train.label_counts().topk(5).indices.expand(len(test), 5)
    baseline = precision_at_k(popular, test.label_indptr, test.label_ids)
    chance = test.label_ids.numel() / len(test) / 500
    assert model[1] > 20 * chance and model[1] > baseline[1] + 0.2
    assert model[5] > 10 * chance and model[5] > baseline[5] + 0.1


def test_synthetic_at_scale():
    train, test = synthetic_xc(20_000, 20_000, 200_000, num_clusters=500, test_points=1000)
    assert len(train) == 20_000 and train.num_labels == 200_000
    assert int(train.label_ids.max()) < 200_000


@pytest.mark.parametrize("kwargs, error", [
    ({"num_points": 0}, ValueError), ({"num_features": 2.0}, TypeError),
    ({"num_labels": True}, TypeError), ({"num_clusters": 0}, ValueError),
    ({"num_clusters": 20_000}, ValueError), ({"labels_per_point": 0}, ValueError),
    ({"features_per_point": 0}, ValueError), ({"zipf": -1.0}, ValueError),
    ({"zipf": float("nan")}, ValueError), ({"noise": 1.5}, ValueError),
    ({"noise": "0.1"}, TypeError), ({"seed": -1}, ValueError), ({"test_points": -1}, ValueError),
])
def test_synthetic_rejects_bad_arguments(kwargs, error):
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        synthetic_xc(**kwargs)


# ----------------------------------------------------------------------------------------------
# The real dataset
# ----------------------------------------------------------------------------------------------

def test_real_delicious():
    folder = DATA / "xc" / "delicious"
    if not folder.is_dir():
        pytest.skip(f"real dataset folder {folder} is absent (the project's data lives in "
                    f"../shared/data next to the repository)")
    train, test = load_xc_split(folder)
    for data, points, empty in ((train, 12_920, 10), (test, 3185, 4)):
        assert (len(data), data.num_features, data.num_labels) == (points, 500, 983)
        assert int((torch.diff(data.label_indptr) == 0).sum()) == empty
    assert round(train.label_ids.numel() / len(train), 2) == 19.05
    assert round(test.label_ids.numel() / len(test), 2) == 18.91
    assert round(train.feat_indices.numel() / len(train), 1) == 18.5
    # Every value is 1, so normalised rows hold 1 / sqrt(nnz).
    nnz = torch.diff(train.feat_indptr)
    owner = torch.repeat_interleave(torch.arange(len(train)), nnz)
    assert torch.allclose(train.feat_values, nnz[owner].float().rsqrt())
    raw = load_xc(folder / "train.txt", normalize=False)
    assert (raw.feat_values == 1).all() and raw.name == "train"
    first = (folder / "train.txt").read_text().splitlines()[1].split()
    assert raw.label_ids[:raw.label_indptr[1]].tolist() == sorted(map(int, first[0].split(",")))
    assert raw.feat_indices[:raw.feat_indptr[1]].tolist() == sorted(
        int(t.split(":")[0]) for t in first[1:])
