#!/usr/bin/env bash
# GPU check of the sharded strategies: on ONE CUDA GPU, in bf16, a Qwen2.5-0.5B-shaped model built from
# its config (hidden 896, intermediate 4864, 24 layers, 14 heads, 2 KV heads, vocab 151936, tied
# embeddings; random weights), ULMA with a `copy` reference, synthetic point-wise data (batch 8, up to
# 512 tokens). Runs configs/strategy/fsdp.yaml's strategy (torch FSDP) then fsdp2.yaml's (FSDP2), each
# 30 steps (5 untimed), and prints tokens/s, peak GPU memory and model FLOPs utilisation per strategy;
# then saves a (sharded) checkpoint, exports it with `ulma export` and checks the exported weights.
# Takes about 2-3 minutes; needs no network (HF_HUB_OFFLINE). Extra arguments go to scripts/gpu_check.py,
# e.g. --peak-tflops 312 on a GPU the script does not know, --activation-checkpointing.
#   bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU visible')"
mkdir -p runs/gpu_check
status=0
for strategy in fsdp fsdp2; do
  timeout 150 "$PYTHON" scripts/gpu_check.py --strategy "$strategy" --check-export --out "runs/gpu_check/$strategy.json" "$@" \
    2> "runs/gpu_check/$strategy.log" || { status=1; echo "[gpu_check] $strategy FAILED (see runs/gpu_check/$strategy.log)"; tail -20 "runs/gpu_check/$strategy.log"; }
done
exit $status
