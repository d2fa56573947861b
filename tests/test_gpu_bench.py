"""``benchmarks/gpu_bench.py --tiny`` end to end: it runs, writes the JSON and the markdown, and its
correctness checks ran for every implementation that can run here."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
IMPLS = {"triton", "triton (deterministic)", "cuda", "cuda (deterministic)",
         "torch.nn.EmbeddingBag", "reference", "stored-index"}


@pytest.mark.bench
def test_tiny_run_writes_checked_results(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("FASTFAIR_BACKEND", None)
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--md", str(md)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == "fastfair-gpu-bench/1" and doc["tiny"] is True
    assert doc["summary"]["checks_ok"] and not doc["summary"]["failures"]
    for key in ("device", "torch", "triton", "cuda", "commit", "command", "l2_bytes"):
        assert key in doc["env"]
    assert {c["family"] for c in doc["bag_cases"]} == {"fbgemm", "dlrm", "fair"}
    assert {c["batch"]["dist"] for c in doc["bag_cases"]} == {"uniform", "zipf"}
    assert {c["above_l2"] for c in doc["bag_cases"]} == {True, False}
    for case in doc["bag_cases"]:
        assert set(case["checks"]) == IMPLS and set(case["timings"]) == IMPLS | {"copy"}
        ideal = case["ideal_bytes"]
        assert ideal["fwd_bwd"] == ideal["fwd"] + ideal["bwd"]
        for impl in IMPLS:
            chk, t = case["checks"][impl], case["timings"][impl]
            if "skipped" in chk:
                assert chk["skipped"] and impl.startswith("cuda"), (impl, chk)
                continue
            # The check ran (errors and bounds recorded) before anything was timed.
            assert chk["ok"] and chk["forward_err"] <= chk["forward_bound"], (impl, chk)
            assert chk["grad_err"] <= chk["grad_bound"], (impl, chk)
            assert t["fwd_bwd"]["median_ms"] > 0 and t["fwd_bwd"]["pct_copy"] > 0
        assert "fwd_bwd_vs_stored-index" in case["ratios"]["triton"]
    ops = {c["op"] for c in doc["stream_cases"]}
    assert ops == {"fold", "tile", "aggregate", "slot_counts"}
    for case in doc["stream_cases"]:
        assert case["checks"]["triton"]["ok"] and case["checks"]["reference"]["ok"]
    kinds = {t["target"] for t in doc["targets"]}
    assert "forward >= 80% of copy" in kinds and "fold >= 80% of copy" in kinds
    for t in doc["targets"]:
        assert t["met"] in (True, False, None) and (t["met"] is not False or t["missed_by"])
    text = md.read_text()
    assert "## Targets" in text and "stored-index" in text and "missed by" in text
