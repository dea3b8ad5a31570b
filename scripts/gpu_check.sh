#!/usr/bin/env bash
# GPU check of the sharded strategies: on ONE CUDA GPU, in bf16, a Qwen2.5-0.5B-shaped model built from
# its config (hidden 896, intermediate 4864, 24 layers, 14 heads, 2 KV heads, vocab 151936, tied
# embeddings; random weights), ULMA with a `copy` reference, synthetic point-wise data (batch 8, up to
# 512 tokens). Runs configs/strategy/fsdp.yaml's strategy (torch FSDP) then fsdp2.yaml's (FSDP2), each
# 30 steps (5 untimed), and prints tokens/s, peak GPU memory and model FLOPs utilisation per strategy;
# then saves a (sharded) checkpoint, exports it with `ulma export` and checks the exported weights.
# A third row runs FSDP2 with SmolLM2-135M's shape (hidden 576, 30 layers, vocab 49152; random weights).
# Takes about 3-4 minutes; needs no network (HF_HUB_OFFLINE). Extra arguments go to scripts/gpu_check.py,
# e.g. --peak-tflops 312 on a GPU the script does not know, --activation-checkpointing.
#   bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU visible')"
mkdir -p runs/gpu_check
status=0
for row in fsdp:qwen2.5-0.5b fsdp2:qwen2.5-0.5b fsdp2:smollm2-135m; do
  strategy="${row%%:*}" model="${row#*:}" name="${row/:/-}"
  timeout 150 "$PYTHON" scripts/gpu_check.py --strategy "$strategy" --model "$model" --check-export \
    --out "runs/gpu_check/$name.json" "$@" 2> "runs/gpu_check/$name.log" \
    || { status=1; echo "[gpu_check] $name FAILED (see runs/gpu_check/$name.log)"; tail -20 "runs/gpu_check/$name.log"; }
done
exit $status
