"""``benchmarks/lsh_bench.py`` end to end at reduced sizes (a smoke run: it checks the script and
the shape of its results, it measures nothing)."""
import json
import pathlib
import subprocess
import sys

import pytest
import torch

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "lsh_bench.py"


@pytest.mark.bench
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the --device cuda path needs a CUDA device"))])
def test_smoke_run_writes_every_measurement(tmp_path, device):
    out = tmp_path / "lsh.json"
    backend = "numba" if device == "cpu" else "auto"
    res = subprocess.run([sys.executable, str(_SCRIPT), "--scale", "2000", "--repeats", "1",
                          "--backend", backend, "--device", device, "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("SMOKE RUN (--scale 2000)")
    doc = json.loads(out.read_text())
    assert doc["neurons"] == 256 and doc["step"]["labels"] == 335
    assert doc["step"]["active_neurons"] == 33  # floor(0.1 * 335)
    for value in (*doc["rehash"]["seconds"].values(), *doc["step"]["seconds"].values()):
        assert value > 0
    assert set(doc["serial_memory"]["measured_peak_rise_mb"]) == {"kept", "serial"}
    assert doc["versions"]["torch"] and doc["device"] == device
    if device == "cuda":
        assert doc["machine"]["gpu"] and doc["rehash"]["backend"] == "triton"
        assert "numpy_reference_approach" not in doc["rehash"]["seconds"]


def test_bad_arguments_are_refused():
    res = subprocess.run([sys.executable, str(_SCRIPT), "--scale", "0"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "must be an integer >= 1, got 0" in res.stderr
