"""The DLRM example: its model, data and metrics, and the script end to end on tiny sizes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastfair.nn import HashedEmbeddingBag, replace_embeddings

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dlrm"
sys.path.insert(0, str(EXAMPLE))
from dlrm import (CRITEO_KAGGLE_ROWS, DLRM, CriteoLikeStream, auc, bags, log_loss,  # noqa: E402
                  table_rows)


def test_auc_is_the_pairwise_ranking_probability():
    gen = torch.Generator().manual_seed(60)
    scores = torch.randint(0, 6, (300,), generator=gen).float()  # many ties
    labels = torch.bernoulli(torch.full((300,), 0.3), generator=gen)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert auc(scores, labels) == pytest.approx(float(pairs.mean()), abs=1e-12)
    with pytest.raises(ValueError, match="both positive and negative"):
        auc(scores, torch.ones(300))
    logits = torch.randn(300, generator=gen)
    p = torch.sigmoid(logits.double())
    want = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    assert log_loss(logits, labels) == pytest.approx(float(want), rel=1e-9)


def test_stream_is_criteo_shaped_and_learnable():
    rows = table_rows(0.001)
    assert len(rows) == 26 and rows[2] == round(CRITEO_KAGGLE_ROWS[2] * 0.001) and rows[8] == 3
    stream = CriteoLikeStream(rows, seed=3)
    dense, ids, labels = stream.batch(20000, torch.Generator().manual_seed(4))
    assert dense.shape == (20000, 13) and ids.shape == (20000, 26)
    assert bool((ids >= 0).all()) and bool((ids < torch.tensor(rows)).all())
    assert abs(float(labels.mean()) - 0.25) < 0.02
    # Zipf: a big table's most frequent id is far above uniform.
    top = torch.bincount(ids[:, 2], minlength=rows[2]).max()
    assert int(top) > 50 * 20000 / rows[2]
    # The planted logit ranks the clicks well above chance.
    assert auc(stream.logit(dense, ids), labels) > 0.7
    with pytest.raises(ValueError, match="scale must be in"):
        table_rows(0)


def test_model_forward_and_hashed_drop_in():
    torch.manual_seed(61)
    rows = table_rows(0.001)
    model = DLRM(rows, dim=8, bottom=(16,), top=(16,))
    stream = CriteoLikeStream(rows, seed=5)
    dense, ids, labels = stream.batch(32, torch.Generator().manual_seed(6))
    dense_logits = model(dense, bags(ids))
    assert dense_logits.shape == (32,)
    report = replace_embeddings(model, compression=0.01, chunk_size=4, min_rows=1000)
    assert report.replaced == [f"tables.{i}" for i, n in enumerate(rows) if n >= 1000]
    assert all(isinstance(model.tables[i], HashedEmbeddingBag) and model.tables[i].sparse
               for i, n in enumerate(rows) if n >= 1000)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, bags(ids)), labels)
    loss.backward()
    assert model.tables[2].weight.grad.is_sparse
    assert report.bytes_after < report.bytes_before / 10


def test_script_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(EXAMPLE / "run.py"), "--out", str(out), "--scale", "0.0005",
           "--steps", "4", "--warmup", "1", "--batch-size", "128", "--eval-samples", "2048",
           "--compressions", "0.1,0.01", "--dim", "8"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert summary in run.stdout
    assert "| dense | 1 |" in summary and "| 0.01 |" in summary
    assert (out / "plot.png").stat().st_size > 10_000
    results = json.loads((out / "results.json").read_text())["results"]
    runs = [(r["compression"], r["grads"]) for r in results]
    assert runs == [(None, "sparse"), (0.1, "sparse"), (0.01, "sparse"), (0.1, "dense"),
                    (0.01, "dense")]
    for r in results:
        assert 0 <= r["auc"] <= 1 and r["log_loss"] > 0 and r["step_ms_median"] > 0
    assert results[1]["embedding_bytes"] < results[0]["embedding_bytes"] / 5
    assert results[2]["embedding_bytes"] < results[1]["embedding_bytes"]
    assert results[3]["embedding_bytes"] == results[1]["embedding_bytes"]

    bad = subprocess.run(cmd[:2] + ["--out", str(out), "--compressions", "0.1,2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "must be in (0, 1], got 2.0" in bad.stderr
