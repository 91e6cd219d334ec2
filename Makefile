# Two commands set up a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/autostructn2v
export AUTOSTRUCTN2V_CACHE_DIR ?= $(CURDIR)/.jax_cache

.PHONY: install demo test bench bench-peers clean

# uv (installed into the venv, a build tool only) resolves and downloads in parallel: a fresh venv
# in ~9 s instead of ~39 s with pip (docs/benchmarks.md, "Test suite time"); pip if uv fails.
# --compile-bytecode: write the .pyc files now, as pip does. Without them every Python process
# compiles jax's sources again where bytecode writing is off (PYTHONDONTWRITEBYTECODE): +2.5 s per
# process, and the tests start ~20 (docs/benchmarks.md).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv 2>/dev/null && $(PY) -m uv pip install -q --compile-bytecode --python $(PY) -e ".[test]" \
		|| { $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q -e ".[test]"; }
	touch $@

install: $(VENV)/.installed

demo: install
	$(CLI) demo-data demo_data
	$(CLI) train --config configs/demo.py --config.input_dir=demo_data/noisy \
		--config.output_dir=demo_run --config.clean_dir=demo_data/clean --config.overwrite=true

test: install
	$(PY) -m pytest -q -n auto --dist worksteal

bench: install
	$(PY) benchmarks/speed.py
	$(PY) benchmarks/quality.py

# CAREamics / PyTorch side by side (builds benchmarks/.peers-venv on first use; see benchmarks/README.md).
bench-peers: install
	$(PY) benchmarks/peers.py $(PEERS_ARGS)

clean:
	rm -rf demo_data demo_run .pytest_cache .jax_cache
