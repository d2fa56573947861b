import os

import torch

# Triton kernels run on CPU tensors only in interpreter mode, which must be chosen before triton is
# imported; on a CUDA machine they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A forced backend would silently change what every test checks.
os.environ.pop("FASTFAIR_BACKEND", None)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "bench: runs a benchmark script end to end on tiny shapes (tens of seconds)")
