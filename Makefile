# Two entry points, both idempotent, both creating .venv when it is missing:
#   make lab   - set up and open the course in JupyterLab (your working copy in work/)
#   make test  - set up and run every test: lint, unit tests, and every notebook under nbval
# and the course in a real browser (JupyterLab + Chromium): make browser-test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.minigpt-installed
PYTEST_ARGS ?=
# Test processes: notebooks run whole on one worker each (--dist loadfile).
JOBS ?= 2

# Quiet a harmless debugger warning that Python 3.11 kernels print on stderr.
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: setup setup-browser lab work refresh test browser-test lint format unit notebooks execute bench clean course-model

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip uninstall -qq --yes minigpt  # the distribution's name before minigpt-course
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

# JupyterLab refuses to run as root without --allow-root (containers, cloud VMs).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

# The learner's working copy: work/ (gitignored, so `git pull` never touches it) holds
# copies of notebooks/, exercises/ and solutions/. A copy is made only where work/ has
# no file of that name yet: your edits are never overwritten.
COURSE := $(wildcard notebooks/*.ipynb exercises/*.ipynb solutions/*.ipynb)

work:
	@for f in $(COURSE); do \
	  if [ ! -e "work/$$f" ]; then mkdir -p "work/$$(dirname $$f)" && cp "$$f" "work/$$f" && echo "copied $$f to work/$$f"; fi; \
	done

# Replace one working copy with the course's current version (the old one is kept as .bak.ipynb):
#   make refresh NB=notebooks/03_attention.ipynb
refresh:
	@test -n "$(NB)" || { echo 'usage: make refresh NB=notebooks/03_attention.ipynb'; exit 2; }
	@test -f "$(NB)" || { echo "$(NB): no such course notebook"; exit 2; }
	@if [ -e "work/$(NB)" ]; then mv "work/$(NB)" "work/$(NB:.ipynb=.bak.ipynb)" && echo "kept your old copy as work/$(NB:.ipynb=.bak.ipynb)"; fi
	@mkdir -p "work/$$(dirname $(NB))" && cp "$(NB)" "work/$(NB)" && echo "copied $(NB) to work/$(NB)"

lab: setup work
	$(BIN)/jupyter lab --ServerApp.root_dir="$(CURDIR)/work" --LabApp.default_url=/lab/tree/notebooks $(ROOT_FLAG) $(LAB_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The course model is trained (once, then cached) before the notebooks that load it.
test: lint course-model
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile $(PYTEST_ARGS)

course-model: setup
	$(BIN)/python tools/course_model.py

# The course in a real browser (tools/browser_test.py): needs Debian's Chromium
# (apt-get install chromium) and the `browser` extra (Playwright for Python).
BROWSER_STAMP := $(VENV)/.minigpt-browser-installed

setup-browser: $(BROWSER_STAMP)

$(BROWSER_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,browser]"
	@touch $(BROWSER_STAMP)

browser-test: setup-browser course-model
	$(BIN)/python tools/browser_test.py $(BROWSER_ARGS)

unit: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

notebooks: setup course-model
	$(BIN)/python -m pytest notebooks exercises solutions $(PYTEST_ARGS)

# Re-execute notebooks top to bottom in a fresh kernel and store their outputs:
#   make execute NB="notebooks/00_what_is_a_language_model.ipynb"
execute: setup course-model
	$(BIN)/python tools/execute_notebooks.py $(NB)

bench: setup
	@for b in $(filter-out benchmarks/timing.py,$(wildcard benchmarks/*.py)); do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
