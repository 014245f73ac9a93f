#!/usr/bin/env bash
# Download the wheels the lent GPU machine lacks (it cannot reach a registry) into .whl/.
# Run here, in the repository root: bash scripts/fetch_gpu_wheels.sh
# Then each device call carries ".whl" and starts with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=.:/tmp/site || exit
# The GPU image has torch, triton, transformers, peft, accelerate, numpy, pandas, pyarrow, fsspec, xxhash, requests,
# tqdm and huggingface-hub already; only what is missing travels (keep the carried tree under 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
           --platform any)
WHEELS=(
  "bitsandbytes==${BNB_VERSION:-0.50.2}"   # QLoRA (NF4) and 8-bit AdamW
  "liger-kernel==${LIGER_VERSION:-0.8.5}"  # optional: the benchmark's liger fused linear cross-entropy
  "datasets==${DATASETS_VERSION:-4.4.1}"   # data loading (thinktune.data) for the GPU test run
  "dill==0.4.0"                            # datasets' needs that the image lacks
  "multiprocess==0.70.18"
)
for spec in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec"
done
ls -la .whl
du -sh .whl
