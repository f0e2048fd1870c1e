# `make run`: install into .venv (Python 3.12 or 3.13) from requirements.lock and fit the bundled example on CPU.
# `make test`: same install, then the test suite (CPU, 8 simulated devices); `make test-all` adds the slow tests.
# `make lint`: ruff. `make lock`: re-resolve requirements.lock from the ranges in requirements.txt.
# `PYTHON=python3.12 make test VENV=.venv312`: another interpreter (scripts/find_python.sh takes $PYTHON first).
# `make test-jax JAX=0.11.2`: the suite in a one-off venv (.venv-jax-0.11.2) with that jax and today's newest
# releases of everything else that requirements.txt allows (not the lock): checks the ranges, not one resolution.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.10
# Two pytest workers, whole files per worker: XLA compiles on one thread, so two processes keep both cores busy.
PYTEST_ARGS := -q -n 2 --dist loadfile

.PHONY: run test test-all test-jax lint lock install bench clean-venv

run: $(STAMP)
	$(PY) train.py --config configs/demo.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow" tests $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $$(sh scripts/find_python.sh) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

# Universal resolution (markers for every platform and Python >= 3.12), so one lock serves 3.12 and 3.13.
lock:
	@test -x $(PY) || $$(sh scripts/find_python.sh) -m venv $(VENV)
	$(PY) -m pip install --quiet "uv==$(UV_VERSION)"
	$(PY) -m uv pip compile requirements.txt --universal --python-version 3.12 --upgrade \
	  --custom-compile-command "make lock" -o requirements.lock

JAX_VENV := .venv-jax-$(JAX)
test-jax:
	@test -n "$(JAX)" || { echo "usage: make test-jax JAX=0.11.2" >&2; exit 2; }
	@test -x $(JAX_VENV)/bin/python || $$(sh scripts/find_python.sh) -m venv $(JAX_VENV)
	$(JAX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(JAX_VENV)/bin/python -m pip install --quiet -r requirements.txt "jax==$(JAX)" "jaxlib==$(JAX)"
	$(JAX_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(JAX_VENV)/bin/python -m pip list 2>/dev/null | grep -E "^(jax|jaxlib|flax|optax|orbax-checkpoint|numpy) "
	$(JAX_VENV)/bin/python -m pytest $(PYTEST_ARGS) -m "not slow" tests $(ARGS)

bench: $(STAMP)
	$(PY) -m dreamcraft_jax.bench render $(ARGS)

clean-venv:
	rm -rf $(VENV) .venv-jax-*
