#!/usr/bin/env bash
# The command a lent GPU machine runs (the `device` tool), from the repository root. That machine has
# PyTorch, ONNX Runtime and CUDA but no network: BentoML and the packages it needs travel as wheels in
# .whl/, Fashion-MNIST in .gpu/fashion-mnist/ (both ignored by git; benchmarks/gpu/README.md says how
# to make them). Results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/effnet-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=true
nvidia-smi || true
python3 benchmarks/gpu/session.py --out "$OUT" --budget "${BUDGET:-540}" "$@" 2>&1 | tee "$OUT/console.log"
