# rso: the commands the README shows. Each target installs what is missing first.
PYTHON ?= python3
# MNIST: ../shared/data when it is there (this project's machines), else ./data (downloaded on first use).
RSO_DATA_DIR ?= $(abspath $(if $(wildcard ../shared/data/MNIST/raw),../shared/data,./data))
export RSO_DATA_DIR
RUNS ?= runs
# The paper's long runs score every chunk in one worker per core (the same decisions in float64; --workers)
WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
# The CPU wheel of torch: installed only when no torch is importable, so CUDA machines keep theirs. On this
# project's machines pip finds torch==2.13.0's CPU wheel on disk; elsewhere, PyPI's Linux wheel of torch pulls
# CUDA, so give the CPU index: make install TORCH_CPU="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# (not the default: a machine that reaches only PyPI would wait on that index's timeouts).
TORCH_CPU ?= torch==2.13.0

.PHONY: install test mnist-rso mnist-rso-paper mnist-sgd tensorboard tensorboard-check bench clean help \
	landscapes overparam compare batch-size depth ablations paper exactness experiments-quick readme record-mnist-rso faults \
	gpu-data gpu-check

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

install: ## install rso and its dependencies (CPU torch when none is present)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q $(TORCH_CPU)
	@$(PYTHON) -c "import rso, numba, tqdm, tensorboard, matplotlib, pytest" 2>/dev/null || $(PYTHON) -m pip install -q -e ".[dev]"

test: install ## run the test suite (a few minutes on 2 CPU cores)
	$(PYTHON) -m pytest -q tests

mnist-rso: install ## train the default RSO run on MNIST (under 15 min on 2 CPU cores; run again, it continues runs/mnist-rso)
	$(PYTHON) -m rso.train --run-dir $(RUNS) --name mnist-rso --resume-if-exists $(ARGS)

record-mnist-rso: install ## copy runs/mnist-rso into results/mnist_rso with an independent evaluation
	$(PYTHON) -m experiments.record_run $(RUNS)/mnist-rso results/mnist_rso

mnist-rso-paper: install ## the authors' configuration (--preset authors: paper6, batch 5000, 50 cycles, wd 1e-4, their BN handling); resumable
	$(PYTHON) -m rso.train --run-dir $(RUNS) --name mnist-rso-paper --preset authors --resume-if-exists --workers $(WORKERS) $(ARGS)

mnist-sgd: install ## the backprop baseline (SGD with momentum) on the same model
	$(PYTHON) -m rso.train --run-dir $(RUNS) --name mnist-sgd --optimizer sgd --batch-size 100 --resume-if-exists $(ARGS)

bench: install ## speed of the scoring engines side by side: fast 1 and N workers, prefix-cache, reference; memory
	$(PYTHON) -m rso.bench $(ARGS)

gpu-data: ## copy MNIST into ./data (gitignored), for a machine that gets the working tree but not ../shared
	@mkdir -p data/MNIST/raw
	@[ "$(RSO_DATA_DIR)" = "$(abspath data)" ] || cp -u $(RSO_DATA_DIR)/MNIST/raw/*.gz data/MNIST/raw/
	@ls data/MNIST/raw

gpu-check: ## the GPU path on one CUDA device in < 8 min: exactness, syncs, bench, paper cycles -> $OUT, else results/gpu
	$(PYTHON) -m rso.gpu_check $(ARGS)

compare: install ## experiment: RSO vs SGD vs Adam on the same model and data -> results/compare
	$(PYTHON) -m experiments.compare $(ARGS)

batch-size: install ## experiment: RSO accuracy and time per cycle vs batch size -> results/batch_size
	$(PYTHON) -m experiments.batch_size $(ARGS)

depth: install ## experiment: 1 to 6 conv layers of the convnet family (paper6-cbr's design) -> results/depth
	$(PYTHON) -m experiments.depth $(ARGS)

ablations: install ## experiment: annealing, sampler, order, chunking, weight decay -> results/ablations
	$(PYTHON) -m experiments.ablations $(ARGS)

paper: install ## experiment: the authors' configuration, accuracy after every cycle (resumable) -> results/paper
	$(PYTHON) -m experiments.paper --workers $(WORKERS) $(ARGS)

exactness: install ## fast vs reference engine over one full cycle: differing decisions in float64/float32 -> results/exactness
	$(PYTHON) -m experiments.exactness $(ARGS)

landscapes: install ## the optimizer family and RSO on 2-D test functions -> results/landscapes
	$(PYTHON) -m experiments.landscapes $(ARGS)

overparam: install ## optimization through an overparameterized network -> results/overparam
	$(PYTHON) -m experiments.overparam --threads 1 $(ARGS)

experiments-quick: install ## every experiment's --quick variant (seconds each; part of make test too)
	$(PYTHON) -m pytest -q tests/test_experiments.py

faults: install ## the fault-injection matrix (kills, signals, lock, full disk, damaged checkpoints) -> results/faults
	$(PYTHON) -m experiments.faults $(ARGS)

readme: install ## regenerate the README's results section from results/
	$(PYTHON) -m experiments.readme_section --update-readme README.md

tensorboard-check: install ## two short runs (RSO, SGD) served by TensorBoard, screenshotted with headless chromium -> results/tensorboard
	$(PYTHON) -m experiments.tensorboard_check $(ARGS)

tensorboard: install ## serve the runs folder on http://localhost:6006
	$(PYTHON) -m tensorboard.main --logdir $(RUNS) --host localhost --port 6006

clean: ## remove runs and caches (not the data)
	rm -rf $(RUNS) .pytest_cache
