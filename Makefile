# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all mutants bench clean default-model chromium

install: $(STAMP)

# Re-installs when pyproject.toml changes; the editable install keeps src/ live.
$(STAMP): pyproject.toml
	@echo "make: installing iqpir with its dev and demo extras into $(VENV) (PyTorch with its CUDA libraries, the"
	@echo "      face detectors, ONNX Runtime, OpenVINO, NNCF, scikit-image: 6.6 GB; a few minutes on a fresh machine)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/iqpir demo --out demo-output

# The packaged default model (src/iqpir/weights): fetch the photos (apt-get download), train, write the
# weights and the model card. Hours on 2 cores; `make default-model` again resumes the training exactly.
DEFAULT_WORK ?= runs/default-model
DEFAULT_STEPS ?= 10000
default-model: $(STAMP)
	$(PY) -m iqpir.training.default_model data --work $(DEFAULT_WORK)
	$(PY) -m iqpir.training.default_model train --work $(DEFAULT_WORK) --steps $(DEFAULT_STEPS) --threads 2
	$(PY) -m iqpir.training.default_model write --work $(DEFAULT_WORK) --out src/iqpir/weights

# The browser test's headless Chromium: found, or installed where this runs as root with apt-get.
chromium:
	@bash tools/ensure_chromium.sh

# The default suite: offline, CPU, under 3 minutes on 2 cores. Two worker processes (pytest-xdist),
# each test file on one of them: most tests run one torch thread, so one process left a core idle.
test: $(STAMP) chromium
	OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile

# Everything, the slow tests included.
test-all: $(STAMP) chromium
	OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m ''

# Plants the bugs the tests exist for (tools/mutants.py lists them) in a temporary copy, one at
# a time, and fails if the tests miss one. Not part of CI: it runs the DDP tests several times.
mutants: $(STAMP)
	OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 $(PY) tools/mutants.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
