#!/usr/bin/env bash
# One prepared GPU check for OPDLM (one GPU, under 10 minutes on an H100; about 5 expected): the sampler (cached block
# diffusion vs HF autoregressive generate, tokens/s), an OPDLM training step (tokens/s, peak GPU memory) on a ~0.3B
# Qwen3 built from a config, and sdpa vs flex attention on the training row (forward + backward time, agreement).
# Prints markdown tables; exits non-zero if a part fails or the two attention kernels disagree.
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine
#   bash benchmarks/gpu_check.sh --tiny     # the same code paths with tiny sizes (CPU works)
#
# Needs torch (CUDA build), transformers, trl, accelerate, datasets and peft installed; the package itself is used
# from this checkout (PYTHONPATH), nothing is downloaded (random weights, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "transformers", "trl", "accelerate", "datasets", "peft") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {missing} (pip install -e . with your CUDA torch first)")
import torch, transformers, trl
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, trl {trl.__version__}")
PY
timeout "${GPU_CHECK_TIMEOUT:-570}" python benchmarks/gpu_check.py "$@"
