# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch and torchvision are installed FIRST, pinned together, in one pip call: any other
# resolution of torch downloads gigabytes. pyproject.toml keeps only loose lower bounds.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
EXTRAS := data,faiss,vision,text,serve,onnx,milvus,pgvector,rl,dev
STAMP := $(VENV)/.installed
OUT ?= runs/demo

.PHONY: venv system-deps demo figures test test-slow lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

venv: $(STAMP)

# WordNet (Debian's wordnet-base) for the text tests; installed when missing and apt is usable.
system-deps:
	@if [ ! -f /usr/share/wordnet/data.noun ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends wordnet-base; \
	  else echo "wordnet-base is missing and apt is unavailable: WordNet tests will skip"; fi; \
	fi

demo: $(STAMP)
	$(VENV)/bin/mrl demo --out $(OUT)

# The README's demo table from a fresh demo run (seed 0): `make figures`.
figures: demo
	$(PY) tools/readme_tables.py --results $(OUT)/metrics.json

test: $(STAMP) system-deps
	$(PY) -m pytest -m "not slow"

test-slow: $(STAMP) system-deps
	$(PY) -m pytest -m slow

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/heads.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs results .pytest_cache .mypy_cache .ruff_cache
