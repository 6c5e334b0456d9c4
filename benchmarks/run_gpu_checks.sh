#!/usr/bin/env bash
# One prepared run of every GPU check (for a machine with one CUDA GPU):
#   1. the CUDA tests of the suite, 2. a short demo training on the GPU with CUDA graphs,
#   3. benchmarks/gpu_check.py (every engine path vs fp32 eager; the full-size step).
# Output goes to $OUT (or ./gpu_out) as gpu_checks.log and gpu_check.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  echo "== environment"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "== CUDA tests"
  python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_data.py tests/test_vae.py
  echo "== demo on the GPU (bf16, CUDA graphs, EMA)"
  work=$(mktemp -d); cp -r input_data preset.txt "$work"/
  (cd "$work" && python3 "$OLDPWD/SimulGen-VAE.py" --preset=1 --plot=2 --lc_only=0 --size=small --load_all=1 \
      --device cuda --set Training_epochs=60 --set n_epoch=20 --set cuda_graphs=1 --set use_ema=1 --set log_every=20)
  echo "== gpu_check"
  python3 benchmarks/gpu_check.py --json "$OUT/gpu_check.json"
} 2>&1 | tee "$OUT/gpu_checks.log"
