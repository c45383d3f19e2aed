# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv (Python 3.11) on first use and installs requirements.txt.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench addon clean-venv

$(STAMP): requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; bpy==5.0.1 needs Python 3.11 exactly"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and alone, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check npbgpp_core kernels headless_train blender_addon tests bench build_addon.py
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m blender_addon.demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) bench/bench_rasterizer.py
	$(PY) bench/bench_render.py

addon: $(STAMP)
	$(PY) build_addon.py

clean-venv:
	rm -rf $(VENV)
