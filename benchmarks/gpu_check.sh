#!/usr/bin/env bash
# The figures of benchmarks/README.md's current table, on CUDA, in under 5 minutes: the training step at
# 2+2 x 56x56x40 in float32 and under amp (float16 on CUDA) side by side, and the deployed ensemble's sliding
# window on the LA-half geometry in float32, bf16 and fp16. Run from the repository root:
#   bash benchmarks/gpu_check.sh [device]        # device defaults to cuda:0
set -euo pipefail
device="${1:-cuda:0}"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
timeout 150 python benchmarks/train_step.py --device "$device" --forms authors --amp --repeats 5
timeout 120 python benchmarks/inference.py --device "$device" --la --amp --models ensemble --repeats 3
