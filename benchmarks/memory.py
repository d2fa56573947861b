"""Peak resident memory of one forward+backward step, measured in a fresh process (Linux).

A process that already ran steps keeps freed memory resident (allocator caches, glibc heaps) and
reuses it, so its high-water mark no longer rises: the step has to be the first of its kind in
its process. ``python benchmarks/memory.py IMPL`` builds the case, warms the kernels up on a tiny
table (Numba compiles there, not in the measured step), resets ``VmHWM`` through
``/proc/self/clear_refs``, runs one step and prints the rise of the peak over the resident size
just before it, in MB.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys


def status_kb(key: str) -> int:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``, ...) in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_step_mb(impl: str) -> float:
    """Run this file for ``impl`` in a fresh interpreter and return its measurement."""
    out = subprocess.run([sys.executable, __file__, impl], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_step_mb"])


def _main(impl: str) -> None:
    from test_cpu_embedding_bag import CASE, make_inputs, make_module
    tiny = dict(CASE, num_embeddings=1000, bags=4)
    warm = make_module(impl, tiny)
    idx, off, grad = make_inputs(tiny)
    warm(idx, off).backward(grad)
    module = make_module(impl, CASE)
    indices, offsets, grad = make_inputs(CASE)
    del warm
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kb("VmRSS")
    module(indices, offsets).backward(grad)
    print(json.dumps({"peak_step_mb": (status_kb("VmHWM") - base) / 1024}))


if __name__ == "__main__":
    _main(sys.argv[1])
