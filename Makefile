# `make test` and `make demo` set up .venv on their own; `make setup` does only that.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
# Threads for a small CPU box; raise them on a bigger one (make test OMP_NUM_THREADS=8).
OMP_NUM_THREADS ?= 2

STAMP := $(VENV)/.pivot_mega-installed
TEST_ENV := OMP_NUM_THREADS=$(OMP_NUM_THREADS) MKL_NUM_THREADS=$(OMP_NUM_THREADS) \
	TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup test demo clean distclean

setup: $(STAMP)

# torch goes in first and on its own: resolving the project's `torch>=2.6` with no torch installed
# would fetch the newest CUDA build of torch and its GBs of CUDA wheels.
$(STAMP): setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install torch==$(TORCH_VERSION)
	$(VENV)/bin/pip install -e '.[test]'
	touch $@

test: setup
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q tests $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/pivot-mega demo --out runs/demo

clean:
	rm -rf build dist *.egg-info .pytest_cache runs/demo
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
