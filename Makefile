# The two commands a fresh machine needs: `make demo` and `make test`.
# Everything else (venv, Python packages, NSQ binaries) is installed on demand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIPELINE := $(VENV)/bin/pipeline
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test down clean bench fuzz

setup: $(STAMP)
	@$(PIPELINE) install-nsq >/dev/null

# Reinstall only when the package metadata changes, so a second `make setup` is fast.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

demo: setup
	$(PIPELINE) demo

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

# Throughput, CPU, memory and restart time side by side with the baselines;
# several minutes, so not part of `make test`. Writes bench/results.{json,md}.
bench: setup
	$(PY) -m benchmarks.run

# Generated bad messages mixed with good ones through a running primes pipeline: no worker
# crashes, every bad one dead-lettered with a reason, every good one delivered. FUZZ_COUNT=1000 for a quick run.
FUZZ_COUNT ?= 100000
fuzz: setup
	$(PY) tests/fuzz_pipeline.py --count $(FUZZ_COUNT)

down:
	@if [ -x $(PIPELINE) ]; then $(PIPELINE) down; else echo "nothing to stop (no $(VENV))"; fi

clean: down
	rm -rf $(VENV) var
