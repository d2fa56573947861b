"""``fastfair.nn.LSHOutputLayer``, its hash families, the PGHash trainer and ``fastfair xc``:
dense equivalence at budget 1, serial = kept tables, the budget and label forcing, the rehash
schedule, lazy optimizer state, checkpoints, chunked top-k, LSH collision behaviour, federated
byte counts and aggregation, the command line, bad input."""
import json
import math

import pytest
import torch

from fastfair.cli import main as cli_main
from fastfair.fl.pghash import XCConfig, XCNet, XCTrainer, evaluate, train
from fastfair.fl.xc import synthetic_xc
from fastfair.nn import LSHFamily, LSHOutputLayer
from testing import gen


def labels_csr(batch, n, g, max_labels=3):
    counts = torch.randint(0, max_labels + 1, (batch,), generator=g)
    offsets = torch.zeros(batch + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    ids = torch.cat([torch.randperm(n, generator=g)[:int(c)] for c in counts])
    return offsets, ids


def dense_loss(z, offsets, ids):
    """Label-normalised softmax cross-entropy over all columns, brute force in float64."""
    logp = torch.log_softmax(z.double(), 1)
    total = z.new_zeros((), dtype=torch.float64)
    for b in range(z.shape[0]):
        y = ids[offsets[b]:offsets[b + 1]]
        if y.numel():
            total = total - logp[b, y].mean()
    return total / z.shape[0]


@pytest.mark.parametrize("hash_", ["pg", "dwta", "simhash", "random"])
def test_budget_one_is_the_dense_layer(hash_):
    g = gen(1)
    layer = LSHOutputLayer(12, 37, hash=hash_, budget=1.0, tables=3, bits=4, sketch_dim=4,
                           backend="reference").double()
    x = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    offsets, ids = labels_csr(5, 37, g)
    out = layer(x, offsets, ids)
    assert torch.equal(out.active, torch.arange(37))
    ref_x = x.detach().clone().requires_grad_()
    ref_w = layer.weight.detach().clone().requires_grad_()
    ref_b = layer.bias.detach().clone().requires_grad_()
    z = ref_x @ ref_w.T + ref_b
    torch.testing.assert_close(out.logits, z)
    loss = layer.loss(out, offsets, ids)
    ref = dense_loss(z, offsets, ids)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(layer.weight.grad.to_dense(), ref_w.grad)
    torch.testing.assert_close(layer.bias.grad.to_dense(), ref_b.grad)


@pytest.mark.parametrize("hash_", ["pg", "dwta", "simhash"])
def test_serial_tables_select_what_kept_tables_select(hash_):
    g = gen(2)
    kw = dict(hash=hash_, budget=0.3, tables=6, bits=4, sketch_dim=4, seed=5,
              backend="reference", signed_fold=hash_ == "pg")
    kept = LSHOutputLayer(16, 203, **kw)
    serial = LSHOutputLayer(16, 203, serial=True, **kw)
    serial.load_state_dict(kept.state_dict())
    for _ in range(3):
        x = torch.relu(torch.randn(9, 16, generator=g))
        offsets, ids = labels_csr(9, 203, g)
        a, b = kept.select(x, ids), serial.select(x, ids)
        assert torch.equal(a, b)
        assert a.numel() == max(kept.m, torch.unique(ids).numel())


def test_budget_and_forced_labels():
    g = gen(3)
    layer = LSHOutputLayer(8, 500, budget=0.1, tables=4, bits=6, sketch_dim=4,
                           backend="reference")
    x = torch.randn(6, 8, generator=g)
    active = layer.select(x)
    assert active.numel() == layer.m == 50
    assert bool((active[1:] > active[:-1]).all())
    many = torch.randperm(500, generator=g)[:80]
    active = layer.select(x, many)
    assert torch.equal(active, torch.sort(many).values)  # labels alone exceed the budget
    few = many[:7]
    active = layer.select(x, few)
    assert active.numel() == 50 and bool(torch.isin(few, active).all())
    layer.force_labels = False
    assert layer.select(x, few).numel() == 50


def test_sampled_softmax_is_labels_plus_random_negatives():
    g = gen(4)
    layer = LSHOutputLayer(8, 300, hash="random", budget=0.05, backend="reference")
    x = torch.randn(4, 8, generator=g)
    ids = torch.tensor([3, 299, 3])
    a1 = layer.select(x, ids)
    a2 = layer.select(x, ids)
    assert a1.numel() == a2.numel() == 15
    assert bool(torch.isin(ids, a1).all()) and bool(torch.isin(ids, a2).all())
    assert not torch.equal(a1, a2)  # a fresh random set each step


def test_rehash_schedule_keeps_tables_between_rehashes():
    g = gen(5)
    layer = LSHOutputLayer(8, 120, budget=0.2, tables=3, bits=4, sketch_dim=4,
                           rehash_every=3, backend="reference")
    x = torch.randn(4, 8, generator=g)
    layer.select(x)
    first = layer._tables
    layer.select(x)
    layer.select(x)
    assert layer._tables is first
    layer.select(x)
    assert layer._tables is not first


def test_sparse_adam_leaves_inactive_neurons_alone():
    g = gen(6)
    layer = LSHOutputLayer(8, 200, budget=0.1, tables=4, bits=5, sketch_dim=4,
                           backend="reference")
    opt = torch.optim.SparseAdam(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    for _ in range(2):
        x = torch.randn(4, 8, generator=g)
        offsets, ids = labels_csr(4, 200, g)
        out = layer(x, offsets, ids)
        opt.zero_grad()
        layer.loss(out, offsets, ids).backward()
        opt.step()
        last = out.active
    moved = torch.nonzero((layer.weight != before).any(1)).view(-1)
    assert moved.numel() > 0
    inactive = torch.ones(200, dtype=torch.bool)
    inactive[last] = False
    state = opt.state[layer.weight]["exp_avg"]
    # Rows never active in either step kept their weights and zero moments.
    never = torch.ones(200, dtype=torch.bool)
    never[moved] = False
    assert bool((state[never] == 0).all())
    assert moved.numel() < 200


def test_checkpoint_resumes_bit_identically():
    g = gen(7)
    kw = dict(budget=0.2, tables=3, bits=4, sketch_dim=4, rehash_every=2, backend="reference")
    a = LSHOutputLayer(8, 90, **kw)
    x = torch.randn(5, 8, generator=g)
    a.select(x)
    b = LSHOutputLayer(8, 90, **kw)
    b.load_state_dict(a.state_dict())
    assert b.steps == a.steps
    with torch.no_grad():
        a.weight.add_(1.0)  # not rehashed until step 2: both must keep using the old tables
        b.weight.add_(1.0)
    assert torch.equal(a.select(x), b.select(x))
    wrong = LSHOutputLayer(8, 90, **{**kw, "bits": 5})
    with pytest.raises(ValueError, match="bits: checkpoint 4 vs module 5"):
        wrong.load_state_dict(a.state_dict())


def test_topk_in_chunks_matches_full_logits():
    g = gen(8)
    layer = LSHOutputLayer(10, 1003, backend="reference").eval()
    x = torch.randn(6, 10, generator=g)
    full = layer(x)
    assert full.shape == (6, 1003)
    for chunk in (7, 1000, 5000):
        v, i = layer.topk(x, 5, chunk=chunk)
        torch.testing.assert_close(v, torch.topk(full, 5).values)
        torch.testing.assert_close(full.gather(1, i), v)


def test_pg_without_fold_is_simhash():
    g = gen(9)
    w = torch.randn(50, 16, generator=g)
    pg = LSHFamily("pg", 16, sketch_dim=16, bits=7, tables=4, seed=3, backend="reference")
    sh = LSHFamily("simhash", 16, bits=7, tables=4, seed=3, backend="reference")
    assert torch.equal(pg.codes(pg.source(w), 0, 4), sh.codes(sh.source(w), 0, 4))
    assert torch.equal(pg.query(w, 0, 4), sh.codes(w, 0, 4).T)


@pytest.mark.parametrize("hash_,kw", [("simhash", {}), ("pg", {"sketch_dim": 8}),
                                      ("pg", {"sketch_dim": 8, "signed_fold": True}),
                                      ("dwta", {"sketch_dim": 16})])
def test_similar_vectors_collide_more(hash_, kw):
    """The LSH property: a neuron close to the query shares its code in more tables than an
    unrelated one (SimHash: P[bit equal] = 1 - angle / pi)."""
    g = gen(10)
    d, tables = 32, 400
    fam = LSHFamily(hash_, d, bits=4, tables=tables, seed=1, backend="reference", **kw)
    q = torch.relu(torch.randn(20, d, generator=g)) + 0.1
    near = q + 0.1 * torch.rand(20, d, generator=g)
    far = torch.relu(torch.randn(20, d, generator=g)) + 0.1
    qc = fam.query(q, 0, tables)
    rate_near = (fam.codes(fam.source(near), 0, tables).T == qc).double().mean()
    rate_far = (fam.codes(fam.source(far), 0, tables).T == qc).double().mean()
    assert rate_near > rate_far + 0.2
    if hash_ == "simhash":
        cos = torch.nn.functional.cosine_similarity(q, near).clamp(-1, 1)
        expect = ((1 - torch.arccos(cos) / math.pi) ** 4).mean()
        assert abs(float(rate_near) - float(expect)) < 0.05


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="bits.*32"):
        LSHOutputLayer(8, 10, bits=32)
    with pytest.raises(ValueError, match="sketch_dim=9 exceeds in_features=8"):
        LSHOutputLayer(8, 10, sketch_dim=9)
    for b in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="budget"):
            LSHOutputLayer(8, 10, budget=b)
    with pytest.raises(ValueError, match="'minhash'"):
        LSHOutputLayer(8, 10, hash="minhash")
    with pytest.raises(ValueError, match="rehash_every=1, got 2"):
        LSHOutputLayer(8, 10, serial=True, rehash_every=2)
    with pytest.raises(ValueError, match="dwta_width must be a power of two, got 3"):
        LSHOutputLayer(8, 10, hash="dwta", dwta_width=3)
    layer = LSHOutputLayer(8, 10, budget=0.5, backend="reference")
    with pytest.raises(ValueError, match=r"label ids\[1\] = 10 is out of range"):
        layer(torch.randn(2, 8), torch.tensor([0, 1, 2]), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"x must be \[batch, 8\], got \(2, 7\)"):
        layer(torch.randn(2, 7))
    with pytest.raises(ValueError, match="label_offsets has 2 entries, expected batch"):
        layer(torch.randn(2, 8), torch.tensor([0, 1]), torch.tensor([3]))


# ---------------------------------------------------------------- trainer and CLI
@pytest.fixture(scope="module")
def tiny_xc():
    return synthetic_xc(600, 300, 200, num_clusters=10, labels_per_point=3,
                        features_per_point=8, seed=1, test_points=200)


def test_training_learns_the_planted_labels(tiny_xc):
    tr, te = tiny_xc
    cfg = XCConfig(method="pg", budget=0.25, tables=8, bits=5, sketch_dim=8, hidden=32,
                   epochs=4, lr=1e-2, batch_size=32, backend="reference")
    trainer = XCTrainer(tr, te, cfg)
    start = trainer.evaluate()["P@1"]
    for _ in range(cfg.epochs):
        trainer.run_epoch()
    assert trainer.evaluate()["P@1"] > start + 0.2


def test_federated_round_counts_bytes_and_keeps_untrained_neurons(tiny_xc):
    tr, te = tiny_xc
    cfg = XCConfig(method="pg", budget=0.1, tables=4, bits=5, sketch_dim=8, hidden=16,
                   epochs=1, lr=1e-2, batch_size=8, devices=3, local_steps=2,
                   force_labels=False, backend="reference")
    trainer = XCTrainer(tr, te, cfg)
    before = trainer.net.out.weight.detach().clone()
    first_before = trainer.net.first.weight.detach().clone()
    trainer.run_round()
    n, d, f = 200, 16, 300
    m = trainer.m
    dense_first = f * d + d
    # Every device: first layer + sketch (rehash round) + m rows and biases down; ids, first
    # layer, rows and biases up; 4 bytes each.
    assert trainer.totals["bytes_down"] == 4 * 3 * (dense_first + n * 8 + m * (d + 1))
    assert trainer.totals["bytes_up"] == 4 * 3 * (m + dense_first + m * (d + 1))
    changed = (trainer.net.out.weight != before).any(1)
    assert 0 < int(changed.sum()) <= 3 * m
    assert not torch.equal(trainer.net.first.weight, first_before)
    # The first layer is the mean of the devices' (equal-sized parts: equal weights).
    locs = [loc["net"].first.weight for loc in trainer.locals]
    torch.testing.assert_close(trainer.net.first.weight, sum(locs) / 3)


def test_device_tiers_give_each_device_its_own_hashes(tiny_xc):
    tr, te = tiny_xc
    cfg = XCConfig(method="pg", budget=0.2, hidden=16, devices=3, batch_size=8,
                   device_tiers="bits=6,tables=5,sketch=4,rehash=2;bits=3,tables=2",
                   backend="reference")
    trainer = XCTrainer(tr, te, cfg)
    fams = [loc["net"].out.family for loc in trainer.locals]
    assert [(f.bits, f.tables, f.sketch_dim) for f in fams] == [(6, 5, 4), (3, 2, 8), (6, 5, 4)]
    assert len({f.seed for f in fams}) == 3  # private: every device its own seed
    assert [loc["net"].out.rehash_every for loc in trainer.locals] == [2, 1, 2]
    trainer.run_round()
    trainer.run_round()
    # Sketch bytes only on rehash rounds: devices 0 and 2 (c=4) once, device 1 (c=8) twice.
    n, d, f = 200, 16, 300
    m = trainer.m
    per_round = 3 * (f * d + d + m * (d + 1))
    assert trainer.totals["bytes_down"] == 4 * (2 * per_round + 2 * n * 4 + 2 * n * 8)
    each = 2 * (f * d + d + m * (d + 1))
    assert [b[0] for b in trainer.device_bytes] == [4 * (each + n * 4), 4 * (each + 2 * n * 8),
                                                   4 * (each + n * 4)]
    assert sum(b[1] for b in trainer.device_bytes) == trainer.totals["bytes_up"]
    for bad, msg in (("bits=0", "must be >= 1"), ("colour=3", "unknown field 'colour'"),
                     ("bits=x", "needs an integer")):
        with pytest.raises(ValueError, match=msg):
            XCConfig(device_tiers=bad).check()


def test_federated_dense_two_devices_trains(tiny_xc):
    tr, te = tiny_xc
    recs = train(tr, te, XCConfig(method="dense", hidden=16, epochs=2, lr=1e-2, batch_size=16,
                                  devices=2, backend="reference"))
    assert len(recs) == 2 and recs[-1]["bytes_up"] > 0
    assert recs[-1]["P@1"] > recs[0]["P@1"] - 0.05 and recs[-1]["loss"] < recs[0]["loss"]
    assert evaluate(XCTrainer(tr, te, XCConfig(method="dense", hidden=16)).net, te)["P@1"] < \
        recs[-1]["P@1"]


def test_cli_xc_runs_and_writes_the_summary(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["xc", "--data", "synthetic", "--points", "300", "--labels", "100",
                     "--features", "80", "--epochs", "1", "--methods", "dense,pg,sampled",
                     "--budgets", "0.5", "--devices", "1,2", "--hidden", "8", "--tables", "4",
                     "--bits", "4", "--batch-size", "32", "--out", str(out), "--quiet"])
    assert code == 0
    summary = (out / "summary.md").read_text()
    assert summary.count("\n| ") == 1 + 6  # header + 3 methods x 2 device counts
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["method"], r["devices"]) for r in records} == {
        (m, d) for m in ("dense", "pg", "sampled") for d in (1, 2)}
    assert json.loads((out / "config.json").read_text())["command"][:2] == ["fastfair", "xc"]
    # The saved model loads back exactly and scores as recorded.
    cfg = XCConfig(method="pg", budget=0.5, hidden=8, tables=4, bits=4, devices=2)
    tr, te = synthetic_xc(300, 80, 100, seed=0, test_points=60)
    net = XCNet(tr.num_features, tr.num_labels, cfg, seed=cfg.seed)
    net.load_state_dict(torch.load(out / "models" / "pg__budget0.5__devices2.pt",
                                   weights_only=True))
    last = [r for r in records if (r["method"], r["devices"]) == ("pg", 2)][-1]
    assert evaluate(net, te)["P@1"] == last["P@1"]


@pytest.mark.parametrize("argv,message", [
    (["--methods", "pg,bogus"], "'bogus' is not one of"),
    (["--budgets", "0.5,2"], "--budgets: 2.0 is outside"),
    (["--data", "no-such-set"], "no folder"),
    (["--bits", "0"], "bits must be an int >= 1, got 0"),
    (["--serial", "--devices", "2"], "--serial applies to centralised runs"),
])
def test_cli_xc_bad_arguments_give_one_line(argv, message, capsys, tmp_path):
    assert cli_main(["xc", "--data", "synthetic", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastfair: error:") and message in err and err.count("\n") == 1


def test_delicious_pg_beats_label_popularity():
    from fastfair.fl.data import default_data_dir
    from fastfair.fl.xc import load_xc_split, precision_at_k
    folder = default_data_dir() / "xc" / "delicious"
    if not folder.is_dir():
        pytest.skip(f"real dataset folder {folder} is absent")
    tr, te = load_xc_split(folder)
    popular = tr.label_counts().topk(5).indices.expand(len(te), 5)
    baseline = precision_at_k(popular, te.label_indptr, te.label_ids)[1]
    recs = train(tr, te, XCConfig(method="pg", budget=0.25, epochs=2, force_labels=False))
    assert recs[-1]["P@1"] > baseline + 0.1


@pytest.mark.parametrize("devices", [1, 3])
def test_trainer_resumes_bit_identically(tiny_xc, tmp_path, devices):
    tr, te = tiny_xc
    cfg = XCConfig(method="pg", budget=0.2, tables=4, bits=5, hidden=16, lr=1e-2, batch_size=32,
                   devices=devices, clients_per_round=min(devices, 2), dropout=0.2,
                   rehash_every=1 if devices == 1 else 3, backend="reference")
    straight = XCTrainer(tr, te, cfg)
    straight.run_epoch()
    straight.run_epoch()
    first = XCTrainer(tr, te, cfg)
    first.run_epoch()
    first.save(tmp_path / "ckpt.pt")
    resumed = XCTrainer.load(tmp_path / "ckpt.pt", tr, te, cfg)
    resumed.run_epoch()
    for (name, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    assert straight.totals == resumed.totals


def test_federated_dropout_and_rejected_updates(tiny_xc):
    tr, te = tiny_xc
    base = dict(method="pg", budget=0.2, tables=4, bits=5, hidden=16, batch_size=8, devices=4,
                backend="reference")
    gone = XCTrainer(tr, te, XCConfig(**base, clients_per_round=3, dropout=1.0))
    before = {k: v.clone() for k, v in gone.net.state_dict().items() if torch.is_tensor(v)}
    gone.run_round()
    assert gone.totals["dropped"] == 3 and gone.totals["bytes_up"] == 0
    assert all(torch.equal(before[k], v) for k, v in gone.net.state_dict().items()
               if torch.is_tensor(v))

    class Poisoned(XCTrainer):
        def _step(self, net, opts, batch, active=None):
            loss = super()._step(net, opts, batch, active)
            if net is self.locals[0]["net"]:
                with torch.no_grad():
                    net.first_bias[0] = float("nan")
            return loss

    bad = Poisoned(tr, te, XCConfig(**base))
    bad.run_round()
    assert bad.totals["rejected"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in bad.net.state_dict().values()
               if torch.is_tensor(v) and v.is_floating_point())
    with pytest.raises(ValueError, match="clients_per_round must be an int in \\[0, devices=4\\]"):
        XCConfig(**base, clients_per_round=5).check()
    with pytest.raises(ValueError, match="dropout must be a probability"):
        XCConfig(**base, dropout=1.5).check()


def test_cli_xc_resume_continues_bit_identically(tmp_path):
    common = ["xc", "--data", "synthetic", "--points", "300", "--labels", "100", "--features",
              "80", "--methods", "pg", "--budgets", "0.5", "--devices", "1,2", "--hidden", "8",
              "--tables", "4", "--bits", "4", "--batch-size", "32", "--quiet"]
    assert cli_main(common + ["--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert cli_main(common + ["--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    assert cli_main(common + ["--epochs", "1", "--out", str(tmp_path / "b")]) == 2  # no --resume
    assert cli_main(common + ["--epochs", "2", "--out", str(tmp_path / "b"), "--resume"]) == 0

    def records(run):
        recs = [json.loads(line) for line in (tmp_path / run / "results.jsonl").read_text()
                .splitlines()]
        return sorted((r["devices"], r["epoch"], r["P@1"], r["loss"], r["bytes_up"]) for r in recs)

    assert records("a") == records("b")
    assert cli_main(common[:-1] + ["--bits", "5", "--epochs", "3", "--out", str(tmp_path / "b"),
                                   "--resume"]) == 2


def test_federated_xc_runs_the_fair_round(tiny_xc):
    """The XC trainer's round is RoundRunner's (FederatedRunner's): same statistics, per-tier
    and per-device bytes, update checks with reasons."""
    from fastfair.fl.rounds import RoundRunner
    from fastfair.fl.runner import FederatedRunner
    assert issubclass(XCTrainer, RoundRunner) and issubclass(FederatedRunner, RoundRunner)
    tr, te = tiny_xc
    cfg = XCConfig(method="pg", budget=0.2, tables=4, bits=5, hidden=16, batch_size=8,
                   devices=4, device_tiers="bits=5;bits=4,sketch=4", backend="reference")

    class WrongShape(XCTrainer):
        def upload(self, device, model, view):
            update = super().upload(device, model, view)
            if device == 2:
                update["out.bias"] = update["out.bias"][1:]
            return update

    trainer = WrongShape(tr, te, cfg)
    seen = []
    real = trainer.aggregate_uploads
    trainer.aggregate_uploads = lambda uploads: (seen.append(uploads), real(uploads))
    stats = trainer.run_round()
    # The rejected update is not averaged in: three uploads reach the aggregation.
    assert len(seen) == 1 and len(seen[0]) == 3
    assert stats["clients"] == 4 and sorted(stats["by_client"]) == [0, 1, 2, 3]
    assert stats["rejected"] == 1 and stats["rejections"][0].startswith("client 2: out.bias has")
    assert {k: v["clients"] for k, v in stats["by_tier"].items()} == {
        "bits=5,tables=4,sketch=8,rehash=1": 2, "bits=4,tables=4,sketch=4,rehash=1": 2}
    for key, i in (("bytes_down", 0), ("bytes_up", 1)):
        assert stats[key] == sum(t[key] for t in stats["by_tier"].values()) \
            == sum(b[i] for b in stats["by_client"].values()) == trainer.totals[key]
        assert sum(b[i] for b in trainer.device_bytes) == trainer.totals[key]
    assert math.isfinite(stats["loss"])
    tiers = trainer.tier_bytes()
    assert tiers == {label: [sum(trainer.device_bytes[d][i] for d in devices) for i in (0, 1)]
                     for label, devices in (("bits=5,tables=4,sketch=8,rehash=1", (0, 2)),
                                            ("bits=4,tables=4,sketch=4,rehash=1", (1, 3)))}
    with pytest.raises(RuntimeError, match="centralised trainer"):
        XCTrainer(tr, te, XCConfig(hidden=16, backend="reference")).run_round()


def test_xc_checkpoint_refuses_another_config(tiny_xc, tmp_path):
    tr, te = tiny_xc
    cfg = XCConfig(method="pg", budget=0.2, tables=4, bits=5, hidden=16, batch_size=32,
                   devices=2, backend="reference")
    trainer = XCTrainer(tr, te, cfg)
    trainer.run_round()
    trainer.save(tmp_path / "ckpt.pt")
    again = XCTrainer.load(tmp_path / "ckpt.pt", tr, te, XCConfig(**{**cfg.__dict__,
                                                                      "epochs": 20}))
    assert again.round_index == 1 and again.totals == trainer.totals
    with pytest.raises(ValueError, match=r"different config: \['bits'\]"):
        XCTrainer.load(tmp_path / "ckpt.pt", tr, te, XCConfig(**{**cfg.__dict__, "bits": 6}))
    torch.save({"net": {}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="not a fastfair xc checkpoint of format"):
        XCTrainer.load(tmp_path / "old.pt", tr, te, cfg)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        XCTrainer.load(tmp_path / "none.pt", tr, te, cfg)
