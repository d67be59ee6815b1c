# The README's two commands: `make demo` and `make test`. Both set up .venv on their own
# (idempotent: a stamp file records the installed requirement set).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
# Caches stay inside the work tree; nothing is downloaded at run time.
export HF_HOME := $(CURDIR)/work_dirs/.cache/huggingface
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TORCH_EXTENSIONS_DIR := $(CURDIR)/work_dirs/.cache/torch_extensions
export MPLCONFIGDIR := $(CURDIR)/work_dirs/.cache/matplotlib

.PHONY: setup browser test demo bench clean-venv

# xtuner_plugins_quiet.pth: `xtuner train` without bitsandbytes' and DeepSpeed's import notes (xtuner_plugins/quiet.py)
setup: $(STAMP)
	@$(PY) -c 'from xtuner_plugins.quiet import write_startup_file; write_startup_file()'

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -r requirements.txt
	$(PIP) install -q --no-build-isolation -c constraints.txt deepspeed
	$(PIP) install -q --no-deps -c constraints.txt xtuner
	$(PIP) install -q --no-deps -c constraints.txt gradio
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# The web demo's browser test drives Debian's Chromium through its ChromeDriver (both offline, from apt).
BROWSER := /usr/bin/chromium /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser: $(BROWSER)
$(BROWSER):
	$(SUDO) apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver

# Two pytest-xdist workers, one per core of the 2-core CI machine, each taking whole modules (their module
# fixtures are built once), longest first (tests/conftest.py: the order, one thread each).
TEST_WORKERS ?= 2
test: setup $(BROWSER)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# make demo [NPROC_PER_NODE=2] [DEEPSPEED=zero3]
NPROC_PER_NODE ?= 1
DEEPSPEED ?=
demo: setup
	NPROC_PER_NODE=$(NPROC_PER_NODE) DEEPSPEED=$(DEEPSPEED) $(PY) tools/demo.py

bench: setup
	$(PY) benchmarks/bench_data.py

clean-venv:
	rm -rf $(VENV)
