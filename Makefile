# The README's two commands. Both create .venv when it is missing and install the pinned set (constraints.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rl-seg-installed

.PHONY: quickstart test test-scenarios install sa2va bench clean

quickstart: $(STAMP)
	$(BIN)/python -m rl_seg.quickstart $(ARGS)

# The suite in two parts, both run by CI (.ci/run): everything but the operator scenarios (under 20 minutes on a
# 2-core machine: 15 minutes on a fresh clone, install included), then the scenarios (tests marked `scenario` in
# pyproject.toml: about 7 minutes more).
test: $(STAMP)
	$(BIN)/python -m pytest -m "not scenario"

test-scenarios: $(STAMP)
	$(BIN)/python -m pytest -m scenario

install: $(STAMP)

# The venv is rebuilt only when the dependency pins change. DeepSpeed compiles its CPU ops on first use
# (about a minute); building them here keeps that out of tests and the first training run.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/python -m rl_seg.deepspeed_ops
	touch $@

# What Sa2VA checkpoints' own remote code imports (timm, einops, torchvision, qwen-vl-utils, sentencepiece).
# PyPI's torchvision wheels are CUDA builds: beside a CPU build of torch they fail to import and break
# `import transformers` for everything else, so a CPU torch is refused here with the way out.
sa2va: $(STAMP)
	@$(BIN)/python -c "import importlib.util as u, sys, torch; sys.exit(0 if torch.version.cuda or (u.find_spec('torchvision') and __import__('torchvision')) else 3)" 2>/dev/null || { \
	  echo "torch $$($(BIN)/python -c 'import torch; print(torch.__version__)') is a CPU build; PyPI's torchvision is a CUDA build and would not import with it."; \
	  echo "Install a matching CPU torchvision first: $(BIN)/pip install torchvision==$$(grep '^torchvision==' constraints.txt | cut -d= -f3) --index-url https://download.pytorch.org/whl/cpu"; \
	  echo "then: $(BIN)/pip install -c constraints.txt -e '.[sa2va]'"; exit 3; }
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[sa2va]'

bench: $(STAMP)
	$(BIN)/python benchmarks/reward_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
