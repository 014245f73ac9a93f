#!/usr/bin/env bash
# Download the wheels the lent GPU machine lacks (it cannot reach a registry).
# Run here, in the repository root: bash scripts/fetch_gpu_wheels.sh [--unsloth]
#   .whl/          the plain stack: bitsandbytes (stripped to its CUDA 13 libraries), liger-kernel, datasets
#   .whl_unsloth/  with --unsloth: unsloth 2026.10.9 + unsloth_zoo and what they need that the image lacks,
#                  for the benchmark's Unsloth rows only (installed into a separate --target, put on
#                  PYTHONPATH for those rows alone, so every other row runs on the plain stack)
# Then each device call carries ".whl" (and ".whl_unsloth") and starts with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=.:/tmp/site || exit
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/unsloth .whl_unsloth/*.whl
#   (bench/run_bench.py --unsloth-site /tmp/unsloth adds it for the Unsloth rows)
# The GPU image has torch, triton, transformers, peft, accelerate, numpy, pandas, pyarrow, fsspec, xxhash, requests,
# tqdm and huggingface-hub already; only what is missing travels (everything carried must stay under 64 MiB, so
# bitsandbytes loses its CUDA 11/12, ROCm and XPU libraries and unsloth its web UI, `studio/`).
set -euo pipefail
cd "$(dirname "$0")/.."
for dir in .whl .whl_unsloth; do
  grep -qxF "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
done
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
           --platform any)
fetch() {  # fetch DIR SPEC...
  local dir=$1; shift
  mkdir -p "$dir"
  for spec in "$@"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" -d "$dir" "$spec"
  done
}
fetch .whl \
  "bitsandbytes==${BNB_VERSION:-0.50.2}"   `# QLoRA (NF4) and 8-bit AdamW` \
  "liger-kernel==${LIGER_VERSION:-0.8.5}"  `# the liger fused linear cross-entropy` \
  "datasets==${DATASETS_VERSION:-4.4.1}"   `# data loading (thinktune.data) for the GPU test run` \
  "dill==0.4.0" "multiprocess==0.70.18"    `# datasets' needs that the image lacks` \
  "gguf==0.19.0"                           `# GGUF export and its read-back test`
# the image's CUDA is 13: the other libraries of bitsandbytes only cost transfer size
for wheel in .whl/bitsandbytes-*.whl; do
  zip -q -d "$wheel" 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' 'bitsandbytes/libbitsandbytes_rocm*.so' \
    'bitsandbytes/libbitsandbytes_xpu*.so' || true
done
if [[ "${1:-}" == "--unsloth" ]]; then
  fetch .whl_unsloth "unsloth==2026.10.9" "unsloth_zoo==2026.10.9" "trl==1.15.0" "datasets==4.8.5" \
    "torchao==0.18.0" tyro msgspec cut_cross_entropy hf_transfer "dill==0.4.0" "multiprocess==0.70.18" \
    docstring-parser typeguard shtab
  for wheel in .whl_unsloth/unsloth-2026*.whl; do
    zip -q -d "$wheel" 'studio/*' || true
  done
fi
du -sh .whl .whl_unsloth 2>/dev/null || du -sh .whl
