# One virtualenv for everything; torch is pinned to the CPU build that installs from a local
# file here, so nothing pulls GBs of CUDA wheels.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
TORCH   ?= torch==2.13.0

.PHONY: setup test demo bench clean

$(VENV)/.ready: setup.py pyproject.toml CMakeLists.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q setuptools wheel pybind11 numpy scipy numba triton pytest pytest-benchmark
	$(VPY) -m pip install -q --no-build-isolation -e ".[test]"
	$(VPY) -m fastfair.info
	touch $@

setup: $(VENV)/.ready

# The whole test suite (Triton kernels under TRITON_INTERPRET=1 when there is no GPU).
test: setup
	$(VPY) -m pytest tests -q -ra

# The main command: every method on three tier mixes of the synthetic default (half the users
# at full capacity, half at 1/2, 1/8 or 1/64); prints the table, writes it, the plot, the records
# and the checkpoints to runs/demo. 1-2 minutes on 2 CPU cores.
DEMO_ARGS ?= --rounds 30 --eval-every 5 --lr 0.01 --tiers 2:0-1 --tiers 2:0-3 --tiers 2:0-6
demo: setup
	$(VPY) -m fastfair compare --out runs/demo --overwrite $(DEMO_ARGS)

# The CPU microbenchmark of the embedding ops and its table.
bench: setup
	$(VPY) -m pytest benchmarks/test_cpu_embedding_bag.py -q --benchmark-columns=median,iqr,rounds \
		--benchmark-json=benchmarks/results/cpu_embedding_bag.json
	$(VPY) benchmarks/report.py benchmarks/results/cpu_embedding_bag.json

clean:
	rm -rf $(VENV) build *.egg-info fastfair/_C*.so
