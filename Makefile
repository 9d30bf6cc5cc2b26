# The README's two commands. Both create .venv when it is missing and install the pinned set (constraints.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rl-seg-installed

.PHONY: quickstart test install bench clean

quickstart: $(STAMP)
	$(BIN)/python -m rl_seg.quickstart $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest

install: $(STAMP)

# The venv is rebuilt only when the dependency pins change. DeepSpeed compiles its CPU ops on first use
# (about a minute); building them here keeps that out of tests and the first training run.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/python -m rl_seg.deepspeed_ops
	touch $@

bench: $(STAMP)
	$(BIN)/python benchmarks/reward_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
