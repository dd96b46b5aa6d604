#!/usr/bin/env bash
# Train the serial ToyModel with the original's settings.
# Extra arguments go to train.py and override these: bash bash_train.sh --dtype float64
# The toy transformer: bash bash_train.sh --model transformer (its data and lr: scripts/model_defaults.sh)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
. scripts/model_defaults.sh "$@"  # MODEL, DATA_DIR, DATA_FILE

[ -f "$DATA_DIR/$DATA_FILE" ] || "$PYTHON" prepare_data.py --model "$MODEL" --data_dir "$DATA_DIR"

"$PYTHON" train.py \
    --data_dir "$DATA_DIR" \
    --input_size 64 \
    --batch_size 32 \
    --momentum 0.9 \
    --num_iterations 200 \
    --update_freq 10 \
    "$@"
