#!/usr/bin/env bash
# A run that changes its tensor-parallel size half way, beside one that does not:
#   bash scripts/change_tp_size.sh                  # TP=2 -> TP=4 at iteration 100
#   FROM=4 TO=2 PICTURE=/tmp/change.png bash scripts/change_tp_size.sh --model transformer
# 1. TP=$FROM trains to iteration 100, checkpoints, and stops;
# 2. TP=$TO resumes that checkpoint (parallel_train.py --load cuts the shards for it, momentum
#    included) and finishes at 200, in the same --out_dir;
# 3. TP=$FROM trains 200 iterations without stopping;
# 4. $PICTURE (assets/change_tp_size.png) overlays the two, with their difference beneath.
# Extra arguments go to both trainings. On GPUs, TP=4 needs 4 of them; without, 4 processes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
FROM=${FROM:-2} TO=${TO:-4} RUNS=${RUNS:-runs/change_tp_size}
PICTURE=${PICTURE:-assets/change_tp_size.png}
for var in FROM TO; do
    [[ ${!var} =~ ^[1-9][0-9]*$ ]] || { echo "error: $var=${!var} must be a positive integer" >&2; exit 2; }
done
# Delete only what this script made: RUNS must be new, empty, or one of its earlier outputs.
MARK="$RUNS/.made_by_change_tp_size"
if [ -e "$RUNS" ] && [ ! -e "$MARK" ] && [ -n "$(ls -A "$RUNS" 2>/dev/null || echo file)" ]; then
    echo "error: RUNS=$RUNS exists and was not made by scripts/change_tp_size.sh; name a new" \
         "directory (nothing was changed)" >&2
    exit 2
fi
rm -rf "$RUNS/changed" "$RUNS/stayed" "$RUNS/checkpoints" "$RUNS/log.txt"
if ! mkdir -p "$RUNS" 2>/dev/null || ! touch "$MARK" 2>/dev/null; then
    echo "error: RUNS=$RUNS cannot be made or written; name another directory" >&2
    exit 2
fi
train() { GPUS_PER_NODE=$1 bash bash_parallel_train.sh --tensor_model_parallel_size "$@"; }
train "$FROM" "$@" --num_iterations 100 --save "$RUNS/checkpoints" --save_interval 100 \
    --out_dir "$RUNS/changed" > "$RUNS/log.txt"
train "$TO" "$@" --load "$RUNS/checkpoints" --out_dir "$RUNS/changed" | grep resuming
train "$FROM" "$@" --out_dir "$RUNS/stayed" >> "$RUNS/log.txt"
"$PYTHON" compare_runs.py "$RUNS/stayed" "$RUNS/changed"
"$PYTHON" plot_runs.py "$RUNS/stayed" "$RUNS/changed" --comparison "$PICTURE" \
    --labels "stayed at TP=$FROM" "TP=$FROM, then TP=$TO from iteration 100"
