#!/usr/bin/env bash
# Train the tensor-parallel ToyModel with torchrun, with the original's settings.
# Works on 2 GPUs (nccl) and on a machine with none (gloo, one process per "GPU").
# Extra arguments go to parallel_train.py and override these:
#   GPUS_PER_NODE=4 bash bash_parallel_train.sh --tensor_model_parallel_size 4
#   bash bash_parallel_train.sh --model transformer      # the toy GPT of transformer.py
# Multi-node: run on every node with the same MASTER_ADDR/MASTER_PORT and NNODES,
# and NODE_RANK = 0, 1, ... World size = GPUS_PER_NODE x NNODES = DP x PP x TP.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
. scripts/model_defaults.sh "$@"  # MODEL, DATA_DIR, DATA_FILE

# Megatron sets this so the async input-gradient all-reduce is queued on the GPU
# before the weight-gradient matmul it overlaps with.
export CUDA_DEVICE_MAX_CONNECTIONS=1
# One thread per rank: torchrun's own default, set here so it doesn't print a banner about it.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

GPUS_PER_NODE=${GPUS_PER_NODE:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
for var in GPUS_PER_NODE NNODES; do  # torchrun would answer with a traceback
    [[ ${!var} =~ ^[1-9][0-9]*$ ]] || { echo "error: $var=${!var} must be a positive integer" >&2; exit 2; }
done
MAX_RESTARTS=${MAX_RESTARTS:-0}  # torchrun restarts the group after a failure; with --save/--load it resumes

if [ "$NNODES" = 1 ] && [ -z "${MASTER_PORT:-}" ]; then
    # One node: torchrun picks a free port, so two runs never collide.
    DISTRIBUTED_ARGS=(--standalone --nproc_per_node "$GPUS_PER_NODE")
else
    DISTRIBUTED_ARGS=(--nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
                      --master_addr "${MASTER_ADDR:-localhost}" --master_port "${MASTER_PORT:-6000}")
fi

if [ "$NODE_RANK" = 0 ] && [ -n "${MASTER_PORT:-}" ]; then
    # torchrun would fail with a long traceback; say it in one line instead.
    "$PYTHON" - "$MASTER_PORT" <<'PY' || exit 2
import socket, sys
if not sys.argv[1].isdigit() or not 0 < int(sys.argv[1]) < 65536:
    sys.exit(f"error: MASTER_PORT {sys.argv[1]} is not a port number (1 to 65535)")
port = int(sys.argv[1])
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torchrun's store does
    try:
        s.bind(("", port))
    except OSError:
        sys.exit(f"error: MASTER_PORT {port} is already in use (another run?); choose a free port, "
                 f"or on one node leave MASTER_PORT unset and torchrun picks one")
PY
fi

if [ -n "${MASTER_ADDR:-}" ]; then
    # An address that does not resolve: torchrun would retry for its whole timeout, warning.
    "$PYTHON" -c 'import socket, sys
try:
    socket.getaddrinfo(sys.argv[1], None)
except OSError:
    sys.exit(f"error: MASTER_ADDR {sys.argv[1]} does not resolve; set it to node 0'"'"'s host name or address")' "$MASTER_ADDR" || exit 2
fi

[ "$NODE_RANK" != 0 ] || [ -f "$DATA_DIR/$DATA_FILE" ] || "$PYTHON" prepare_data.py --model "$MODEL" --data_dir "$DATA_DIR"

# scripts/launch.py is torchrun with a one-line failure report (see its docstring).
"$PYTHON" scripts/launch.py "${DISTRIBUTED_ARGS[@]}" --max-restarts "$MAX_RESTARTS" parallel_train.py \
    --data_dir "$DATA_DIR" \
    --input_size 64 \
    --tensor_model_parallel_size 2 \
    --distributed_timeout_minutes 1.0 \
    --batch_size 32 \
    --momentum 0.9 \
    --num_iterations 200 \
    --update_freq 10 \
    --distributed_backend "${BACKEND:-auto}" \
    "$@"
