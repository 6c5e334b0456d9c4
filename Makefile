# Two entry points: `make demo` trains on the bundled demo, `make test` runs the tests.
# Both create the virtual environment .venv from requirements*.txt on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) SimulGen-VAE.py --preset=1 --plot=1 --lc_only=0 --size=small --load_all=1

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf runs checkpoints .pytest_cache
