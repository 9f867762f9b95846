# The two commands of the README: `make demo` (main job on the embedded phantom) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,plots]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) run_guidance.py demo --out out/demo
	$(PY) run_guidance.py demo --no-tracker --out out/demo-no-tracker

# Two workers (one per core of the target machine), one test file each at a time: the
# end-to-end tests wait on real time, and a file's fixtures are built once.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(PY) -m flake8

bench: $(STAMP)
	$(PY) run_guidance.py bench drr

clean:
	rm -rf $(VENV) out build *.egg-info
