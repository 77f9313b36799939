#!/usr/bin/env bash
# The GPU check, for the day a CUDA machine is lent: the README's first command on the GPU, then the throughput of
# profile inference over the visible GPUs (ranks x 1, nccl) and the sizing rates measured on the GPU.
#
#   bash benchmarks/device_check.sh [RESULTS_DIR]      (default: results)
#
# Writes RESULTS_DIR/device_check/first_command.txt, and distributed_scaling_gpu and sizing_gpu into the
# settings' folder (RESULTS_DIR/ml-100k/<settings fingerprint>/, beside the CPU figures).
#
# Needs a Python with recbole-uip installed (bash install.sh; on a GPU machine with a CUDA build of torch in
# place of constraints.txt's CPU pin). Stops at once, saying so, where no CUDA GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
results="${1:-results}"
export PYTHONUNBUFFERED=1
python -c "import recbole_uip" 2>/dev/null || bash install.sh
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"device_check: no CUDA GPU is visible (torch {torch.__version__}); nothing to check.")
names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(f"device_check: {len(names)} GPU(s) {names}, bf16 {torch.cuda.is_bf16_supported()}, torch {torch.__version__}")
PY
mkdir -p "$results/device_check"
work="$(mktemp -d)"
# 1. The first command, on the GPU (RecBole's use_gpu is on by default; uip_llm_dtype auto picks bf16 there).
start=$(date +%s)
python run_recbole_uip.py --model=DeepFM --dataset=ml-100k --uip=true --show_progress=false \
    --uip_output_dir="$work/out" --checkpoint_dir="$work/saved" 2>&1 | tee "$work/first_command.log" | tail -n 3
echo "first command: $(( $(date +%s) - start )) s" | tee "$results/device_check/first_command.txt"
grep -E "Frozen LLM|UIP: profiles inferred|test result" "$work/first_command.log" | sed -E 's/^.{0,20}(INFO|WARNING) +//' \
    >> "$results/device_check/first_command.txt" || true
# 2. Throughput: every ml-100k user, one EM round, 1..N ranks over the visible GPUs (torchrun, nccl).
python benchmarks/distributed_scaling.py --gpu --users=0 --repeats=1 --variant=gpu --results="$results" \
    --uip_item_batch_size=256
# 3. The sizing rates on the GPU (the README's GPU-hours are estimates until this has run).
python benchmarks/sizing.py --variant=gpu --results="$results" --uip_item_batch_size=256
rm -rf "$work"
