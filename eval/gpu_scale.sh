#!/usr/bin/env bash
# The GPU half of the scale benchmark, as one short script for a lent GPU machine (its minutes
# are few): SmolLM2 AWQ int4 g64 on the GPU (compare its perplexity with the CPU's committed
# eval/results/smollm2_default numbers, within the standard error), and the Llama-3-8B shape
# (random weights) AWQ int4 g128 with 128 x 512 calibration tokens: wall time and peak GPU
# memory. Needs a CUDA build of torch (pip install torch==2.13.0 from the CUDA index) next to
# `pip install -e .` and the default model and text packages of tools/setup.sh.
#
# Usage (repository root): bash eval/gpu_scale.sh [OUT]   (default eval/results/scale_gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-eval/results/scale_gpu}"
WORK="${WORK:-/tmp/llmquant_gpu}"
mkdir -p "$OUT" "$WORK"
python -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name(0))" \
    | tee "$OUT/device.txt"

# 1. SmolLM2-135M AWQ on the GPU (bfloat16 compute), full recipe, evaluation on.
python -m llmquant.run recipes/llama_w4.yaml --out "$WORK/smollm2_gpu" \
    --set runtime.device=cuda --set 'export=[]' 2>&1 | tail -20 | tee "$OUT/smollm2_gpu.txt"
cp "$WORK/smollm2_gpu/report.json" "$OUT/smollm2_gpu_report.json"

# 2. The Llama-3-8B shape in bfloat16, AWQ int4 g128, 128 x 512 calibration, compressed-tensors.
python tools/make_synthetic_model.py --shape llama-3-8b --dtype bfloat16 "$WORK/llama-3-8b"
start=$(date +%s)
python -m llmquant.run recipes/llama_w4.yaml --out "$WORK/llama3_8b_w4" \
    --set model.source="$WORK/llama-3-8b" --set quant.group_size=128 \
    --set evaluation.enabled=false --set runtime.device=cuda \
    --set 'export=[{kind: compressed-tensors}]' 2>&1 | tail -20 | tee "$OUT/llama3_8b_gpu.txt"
echo "wall_s $(( $(date +%s) - start )) (random weights, shapes of llama-3-8b)" | tee -a "$OUT/llama3_8b_gpu.txt"
cp "$WORK/llama3_8b_w4/report.json" "$OUT/llama3_8b_report.json"
