"""What every benchmark script records with its results: the CPU, the commit (and whether the
package differed from it), the versions."""
from __future__ import annotations

import pathlib
import platform
import subprocess

import numba
import torch

HERE = pathlib.Path(__file__).resolve().parent


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=HERE).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_changes() -> list:
    """Package files that differ from the recorded commit (the run used the working tree)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "fastfair"],
                             capture_output=True, text=True, check=True, cwd=HERE.parent).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line[3:] for line in out.splitlines()]


def versions() -> dict:
    import numpy

    import fastfair
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": numpy.__version__, "numba": numba.__version__,
           "fastfair": fastfair.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out
