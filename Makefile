# `make run`: install into .venv (Python >= 3.12) and fit the bundled example on CPU.
# `make test`: same install, then the test suite (CPU, 8 simulated devices).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install bench clean-venv

run: $(STAMP)
	$(PYTHON) train.py --config configs/demo.py $(ARGS)

# Two pytest workers, whole files per worker: XLA compiles on one thread, so two processes keep both cores busy
# (the suite is compile-bound: 14.6 -> 11.9 min on 2 cores).
test: $(STAMP)
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests $(ARGS)

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PYTHON) || $$(sh scripts/find_python.sh) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	$(PYTHON) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

bench: $(STAMP)
	$(PYTHON) -m dreamcraft_jax.bench render $(ARGS)

clean-venv:
	rm -rf $(VENV)
