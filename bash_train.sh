#!/usr/bin/env bash
# Train the serial ToyModel with the original's settings.
# Extra arguments go to train.py and override these: bash bash_train.sh --dtype float64
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-data}

[ -f "$DATA_DIR/xtrain.npy" ] || "$PYTHON" prepare_data.py --data_dir "$DATA_DIR"

"$PYTHON" train.py \
    --data_dir "$DATA_DIR" \
    --input_size 64 \
    --batch_size 32 \
    --init_lr 0.001 \
    --momentum 0.9 \
    --num_iterations 200 \
    --update_freq 10 \
    "$@"
