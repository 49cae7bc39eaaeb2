# The two commands a fresh machine needs: `make demo` and `make test`.
# Everything else (venv, Python packages, NSQ binaries) is installed on demand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIPELINE := $(VENV)/bin/pipeline
STAMP := $(VENV)/.installed
# Two pytest workers (pytest-xdist), a test file to each at a time: most tests wait on real nsqd,
# supervisord and workers, so two of them share the two cores well.
PYTEST_ARGS ?= -n 2 --dist loadfile --durations=15
# The venv holds only the framework (`pipeline`); the reference stages, producers, chaos
# harness and benchmarks are imported from this checkout, by the commands below and the
# workers they start.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: setup demo lint test down clean bench soak chaos fuzz

# compileall: bytecode for the project's own modules (pip compiles the libraries). With
# PYTHONDONTWRITEBYTECODE set, every worker start would compile them again: ~0.1 s of CPU
# on each restart. Up-to-date files are skipped, so this is quick.
setup: $(STAMP)
	@$(PIPELINE) install-nsq >/dev/null
	@$(PIPELINE) install-toxiproxy >/dev/null
	@$(PY) -m compileall -q pipeline consumers producers chaos benchmarks >/dev/null

# Reinstall only when the package metadata changes, so a second `make setup` is fast.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

demo: setup
	$(PIPELINE) demo

# The gates (docs/ARCHITECTURE.md): lint and import order, types, and the layer contract.
lint: setup
	$(VENV)/bin/ruff check pipeline
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: setup lint
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

# Throughput, CPU, memory and restart time side by side with the baselines;
# several minutes, so not part of `make test`. Writes bench/results.{json,md}.
bench: setup
	$(PY) -m benchmarks.run

# The keyed pipeline's crash test at full length: 200,000 ticks replayed at
# 2,500/s while feature and signal replicas are SIGKILLed every 1-3 s; outputs
# must equal the offline reference. A few minutes, so not part of `make test`
# (which runs the same test with 50,000 ticks).
soak: setup
	NSQ_PIPELINE_KILL_TICKS=200000 NSQ_PIPELINE_KILL_RATE=2500 \
	$(PY) -m pytest -s -o timeout=900 tests/test_market.py -k sigkilled

# The chaos suite: every scenario in chaos/scenarios in full, then the soak (1,000,000
# records on 3 nsqd with replicated topics, under scenario 1 combined with 5-7 and an nsqd
# SIGKILL a minute); long, so not part of `make test`.
# Writes docs/RELIABILITY.md. A quick proof: make chaos CHAOS_ARGS='--only-soak --soak-records 3000 --soak-duration 10'
CHAOS_ARGS ?=
chaos: setup
	$(PIPELINE) chaos suite $(CHAOS_ARGS)

# Generated bad messages mixed with good ones through a running primes pipeline: no worker
# crashes, every bad one dead-lettered with a reason, every good one delivered. FUZZ_COUNT=1000 for a quick run.
FUZZ_COUNT ?= 100000
fuzz: setup
	$(PY) tests/fuzz_pipeline.py --count $(FUZZ_COUNT)

down:
	@if [ -x $(PIPELINE) ]; then $(PIPELINE) down; else echo "nothing to stop (no $(VENV))"; fi

clean: down
	rm -rf $(VENV) var
