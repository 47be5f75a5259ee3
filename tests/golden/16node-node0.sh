#!/usr/bin/env bash
# meshplan: node 0 of 16 for plan c7bfcdab53 (tp=8 pp=8 dp=2). Run this on node 0.
# Arguments are passed on to the executor; relative paths in them (--metrics, --data,
# --checkpoint-dir) are relative to the directory you run this script from.
set -euo pipefail
# plan.json lies beside this script; the subshell leaves the working directory alone.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export MESHPLAN_NODE_INDEX=0
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
RDZV_ENDPOINT="${MESHPLAN_RDZV_ENDPOINT:-node0.example:29500}"
# Restarts (torchrun --max-restarts, or running this again) resume from the newest
# complete checkpoint here; after a node loss see `meshplan replan`.
DEFAULT_CHECKPOINT_DIR="$HERE/checkpoints"
CHECKPOINT_DIR="${MESHPLAN_CHECKPOINT_DIR:-$DEFAULT_CHECKPOINT_DIR}"
exec torchrun --nnodes=16 --nproc-per-node=8 --node-rank=0 --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id=meshplan-c7bfcdab53 --max-restarts=3 -m executor.train --plan "$HERE/plan.json" --device cuda --steps 100 --data /data/tokens.bin --checkpoint-dir "$CHECKPOINT_DIR" --checkpoint-every 100 --resume "$@"
