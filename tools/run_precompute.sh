#!/usr/bin/env bash
# One-command precompute, driven by the variables users' existing scripts read:
#   VGGT_MODEL_PATH (required)  DATA_ROOT (required)  BATCH_SIZE (16)  DEVICE (cuda:0)  SKIP_EXISTING (true)
# Writes <image_path>.vggt_cache.pt beside each image plus DATA_ROOT/vggt_cache_manifest.json, which
# training code reads with USE_VGGT_CACHE=true. Extra arguments go to `featstore build` unchanged, e.g.
#   VGGT_MODEL_PATH=/models/VGGT-1B DATA_ROOT=/data/train bash tools/run_precompute.sh --preprocess janusvln
# Several GPUs: NPROC=8 bash tools/run_precompute.sh   (runs under torchrun, one rank per GPU)
set -euo pipefail

if [[ -z "${VGGT_MODEL_PATH:-}" ]]; then
  echo "[ERROR] VGGT_MODEL_PATH is not set: set it to the VGGT-1B checkpoint folder (model.safetensors or model.pt), e.g. VGGT_MODEL_PATH=/models/VGGT-1B bash $0" >&2
  exit 2
fi
if [[ -z "${DATA_ROOT:-}" ]]; then
  echo "[ERROR] DATA_ROOT is not set: set it to the training data root (the folder holding the images and annotations), e.g. DATA_ROOT=/data/train bash $0" >&2
  exit 2
fi
export VGGT_MODEL_PATH DATA_ROOT
export BATCH_SIZE="${BATCH_SIZE:-16}" DEVICE="${DEVICE:-cuda:0}" SKIP_EXISTING="${SKIP_EXISTING:-true}"
PYTHON="${PYTHON:-python3}"

echo "[INFO] VGGT_MODEL_PATH=${VGGT_MODEL_PATH}"
echo "[INFO] DATA_ROOT=${DATA_ROOT}  BATCH_SIZE=${BATCH_SIZE}  DEVICE=${DEVICE}  SKIP_EXISTING=${SKIP_EXISTING}"

if [[ "${NPROC:-1}" -gt 1 ]]; then
  exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" -m featstore build --format per-image "$@"
fi
exec "$PYTHON" -m featstore build --format per-image "$@"
