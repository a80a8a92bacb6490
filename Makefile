# Set-up and the two commands of the README. `make demo` runs the full pipeline on the
# built-in benchmark; `make test` runs the test suite. Both create .venv first.
PYTHON ?= python3
VENV := .venv
WORKDIR ?= runs/demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/python train.py --config=configs/synthetic.py --workdir=$(WORKDIR)

test: install
	$(VENV)/bin/python -m pytest -q tests

reproduce: install
	$(VENV)/bin/python benchmarks/reproduce.py --seeds 3

.PHONY: install demo test reproduce
