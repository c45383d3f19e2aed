# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv (Python 3.11) on first use and installs requirements.txt.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench addon gpu-kit gpu-kit-fresh clean-venv

$(STAMP): requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; bpy==5.0.1 needs Python 3.11 exactly"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and alone, pinned, so no later requirement brings another version. Which
	# build pip picks is its index's: plain PyPI on Linux gives the CUDA one (large); a
	# configured wheelhouse (find-links) its own. CPU-only machines: README "Set up".
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

# The ignored .gpurun/ kit for a lent GPU session (bench/gpu_session.py): wheels, the packed
# training corpus, the bench_densify --gpu scene; prints the two device `run` calls. Without
# CORPUS the kit's packed corpus is kept (prepare refuses, before building anything, when none).
# CAPTURES=DIR adds the Z-up training captures of DIR to a corpus that lacks them.
#   make gpu-kit CORPUS=DIR [CAPTURES=DIR] [GPU_KIT_ARGS="--no-densify --scenes 'env_*'"]
gpu-kit: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 10 $(PY) bench/gpu_session.py prepare $(if $(CORPUS),--corpus $(CORPUS)) $(if $(CAPTURES),--captures $(CAPTURES)) $(GPU_KIT_ARGS)

# The same kit on a machine without any corpus (wiped): renders the environment scenes and the
# objects on white the corpus budget carries (ENVS / OBJECTS = auto, or a count) into
# .gpurun/scenes (or CORPUS) with MODEL_CARD's commands, skipping finished ones, packs them with
# the Z-up training captures of CAPTURES (bench/rebuild_captures.py --use training; without it
# the kit is built with a warning) and renders the densify scene. Resumable: run it again after
# an interruption; it prints each part's time and, when stopped, what remains.
#   make gpu-kit-fresh [CAPTURES=/work/captures] [ENVS=6 OBJECTS=6] [CORPUS=/elsewhere] [GPU_KIT_ARGS=--no-densify]
gpu-kit-fresh: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 10 $(PY) bench/gpu_session.py prepare --render-envs $(or $(ENVS),auto) --render-objects $(or $(OBJECTS),auto) $(if $(CAPTURES),--captures $(CAPTURES)) $(if $(CORPUS),--corpus $(CORPUS)) $(GPU_KIT_ARGS)

clean-venv:
	rm -rf $(VENV)
