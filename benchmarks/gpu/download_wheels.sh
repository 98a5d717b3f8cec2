#!/usr/bin/env bash
# Fetch, on a machine with network access, the wheels the GPU machine lacks, into benchmarks/gpu/wheels/ (ignored by
# git; a device run receives it only when its `carry` names it). The GPU machine has Python 3.12, torch 2.11 and
# transformers 5.17; shortv needs transformers >= 5.24 (shortv/_compat.py). Nothing here pulls in torch.
#
#   bash benchmarks/gpu/download_wheels.sh        # about 15 MB
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# transformers: what shortv needs. regex: transformers 5.24 checks regex >= 2025.10.22 at import, and the GPU
# image's own version is not on record. Everything else transformers 5.24 and shortv need is on the GPU image in
# versions they accept (huggingface-hub 1.33 for >=1.31, tokenizers 0.23.2, safetensors 0.8, numpy, packaging,
# pyyaml, tqdm, typer, accelerate 1.15, rich, psutil). Not 5.25: it needs huggingface-hub >= 2.4 and kernels 0.19,
# neither of which the image has, and 5.24 is the oldest release shortv supports, so the GPU check covers it.
PACKAGES=(transformers==5.24.0 regex==2026.11.19)
rm -rf wheels
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d wheels "${PACKAGES[@]}"
ls -l wheels
du -sh wheels
