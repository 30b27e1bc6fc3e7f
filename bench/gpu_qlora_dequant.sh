#!/usr/bin/env bash
# The QLoRA dequantization A/B of bench/results/nf4_dequant.md: newt's QLoRA train stage with the
# frozen NF4 base dequantized by tensor operations (`kernels: {reference: [nf4_dequant]}`) and by the CUDA kernel
# (kernels/cuda/nf4.cu), same model and data, one call:
#   bash bench/gpu_qlora_dequant.sh llama-3.2-1b        (expects .dev/gpu/newt.xz)
# The two give the same weights bit for bit, so their losses differ only by CUDA training's own
# run-to-run noise (atomics in the attention backward).
exec bash "$(dirname "$0")/gpu_ab.sh" "${1:-llama-3.2-1b}" qlora nf4_dequant
