# rso: the commands the README shows. Each target installs what is missing first.
PYTHON ?= python3
# MNIST: ../shared/data when it is there (this project's machines), else ./data (downloaded on first use).
RSO_DATA_DIR ?= $(if $(wildcard ../shared/data/MNIST/raw),../shared/data,./data)
export RSO_DATA_DIR
RUNS ?= runs
# The CPU wheel of torch: installed only when no torch is importable, so CUDA machines keep theirs.
TORCH_CPU ?= torch==2.13.0

.PHONY: install test mnist-rso mnist-rso-paper mnist-sgd tensorboard bench clean help

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

install: ## install rso and its dependencies (CPU torch when none is present)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_CPU)"
	@$(PYTHON) -c "import rso, numba, tqdm, tensorboard, matplotlib, pytest" 2>/dev/null || $(PYTHON) -m pip install -q -e ".[dev]"

test: install ## run the test suite (a few minutes on 2 CPU cores)
	$(PYTHON) -m pytest -q tests

mnist-rso: install ## train the default RSO run on MNIST (under 15 min on 2 CPU cores)
	$(PYTHON) -m rso.train --run-dir $(RUNS) --name mnist-rso $(ARGS)

mnist-rso-paper: install ## the paper's configuration: paper6, batch 5000, 50 cycles (resumable)
	$(PYTHON) -m rso.train --run-dir $(RUNS) --name mnist-rso-paper --model paper6 --batch-size 5000 --cycles 50 --resume-if-exists $(ARGS)

mnist-sgd: install ## the backprop baseline (SGD with momentum) on the same model
	$(PYTHON) -m rso.train --run-dir $(RUNS) --name mnist-sgd --optimizer sgd $(ARGS)

tensorboard: install ## serve the runs folder on http://localhost:6006
	$(PYTHON) -m tensorboard.main --logdir $(RUNS) --host localhost --port 6006

clean: ## remove runs and caches (not the data)
	rm -rf $(RUNS) .pytest_cache
