#!/usr/bin/env bash
# The GPU checks in one go, as README's "On GPUs" section reports them: the machine, the tests
# marked gpu (the transformer's among them: dropout's CUDA streams, an exact resume with dropout and
# sequence parallelism, resharding to NCCL at world size 1 for both models, NCCL TP=2 where there
# are 2 GPUs), both bash scripts for both models and their comparison, the benchmark on the GPU,
# then the whole suite.
# Logs and results go to $OUT (default gpu_checks/). Each part has its own time limit; the suite
# gets what is left of BUDGET_S (default 560 s) and is cut off there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHON=${PYTHON:-python3}
part() { echo "== $1 ($(date +%T))"; }

part machine
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl',
'.'.join(map(str, torch.cuda.nccl.version())), torch.cuda.device_count(), 'GPU(s)')"; } 2>&1 | tee "$OUT/machine.txt"

part "gpu tests"
timeout 240 "$PYTHON" -m pytest -q -rA -m gpu -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"

part "bash scripts"
{ DATA_DIR=/tmp/gpu_data timeout 60 bash bash_train.sh --out_dir runs/serial | tail -3
  DATA_DIR=/tmp/gpu_data timeout 90 bash bash_parallel_train.sh --out_dir runs/tensor_parallel | tail -12
  "$PYTHON" compare_runs.py runs/serial runs/tensor_parallel
  DATA_DIR=/tmp/gpu_data timeout 60 bash bash_train.sh --out_dir runs/serial64 --dtype float64 | tail -1
  "$PYTHON" train.py --data_dir /tmp/gpu_data --dtype float64 --device cpu --update_freq 50 --out_dir runs/cpu64 | tail -1
  echo "serial float64, CUDA vs CPU:"; "$PYTHON" compare_runs.py runs/cpu64 runs/serial64
  "$PYTHON" -c "import json; c = json.load(open('runs/tensor_parallel/config.json')); print({k: c[k] for k in
('backend', 'device', 'backend_note', 'float32_matmul_precision')})"
  # The transformer: 2 ranks on one GPU over gloo with CUDA tensors (NCCL where there are 2 GPUs),
  # dropout on both sides of the split regions, then the same with sequence parallelism.
  for sp in "" --sequence_parallel; do
    DATA_DIR=/tmp/gpu_tokens timeout 90 bash bash_train.sh --model transformer --dtype float64 \
        --out_dir runs/transformer_serial | tail -1
    DATA_DIR=/tmp/gpu_tokens timeout 120 bash bash_parallel_train.sh --model transformer --dtype float64 \
        $sp --out_dir runs/transformer_tp | tail -4
    echo "transformer float64 ${sp:-(no SP)}, serial vs TP=2:"
    "$PYTHON" compare_runs.py runs/transformer_serial runs/transformer_tp --rtol 5e-14
  done
  # bf16 on the GPU (cuBLAS, its own reductions): serial, two reordered runs, TP=2, the verdict.
  for k in "" 1 2; do
    "$PYTHON" train.py --data_dir /tmp/gpu_data --dtype bfloat16 ${k:+--reorder_seed $k} \
        --update_freq 100 --out_dir runs/bf16_serial$k | tail -1
  done
  DATA_DIR=/tmp/gpu_data timeout 90 bash bash_parallel_train.sh --dtype bfloat16 --out_dir runs/bf16_tp \
      | tail -1
  echo "bfloat16, serial vs TP=2 against the reordered runs:"
  "$PYTHON" compare_runs.py runs/bf16_serial runs/bf16_tp --noise runs/bf16_serial1 runs/bf16_serial2
  # Pipeline parallelism with CUDA tensors: 2 stages on one GPU over gloo (host-staged sends),
  # interleaved, against serial with the same micro-batches (NCCL's p2p where there are 2 GPUs).
  "$PYTHON" train.py --model transformer --num_layers 4 --dtype float64 --micro_batch_size 8 \
      --data_dir /tmp/gpu_tokens --update_freq 100 --out_dir runs/pp_serial | tail -1
  timeout 120 "$PYTHON" scripts/launch.py --standalone --nproc_per_node 2 parallel_train.py \
      --model transformer --num_layers 4 --dtype float64 --micro_batch_size 8 \
      --data_dir /tmp/gpu_tokens --update_freq 100 --tensor_model_parallel_size 1 \
      --pipeline_model_parallel_size 2 --virtual_pipeline_model_parallel_size 2 \
      --out_dir runs/pp_interleaved | tail -3
  echo "transformer float64, serial vs PP=2 x V=2:"
  "$PYTHON" compare_runs.py runs/pp_serial runs/pp_interleaved --rtol 1e-12
  # The distributed optimizer with CUDA tensors: 2 replicas on one GPU over gloo, bf16 and Adam,
  # against the plain optimizer (bitwise on CPU at DP 2), and its bytes per parameter (12).
  for do in "" --use_distributed_optimizer; do
    timeout 120 "$PYTHON" scripts/launch.py --standalone --nproc_per_node 2 parallel_train.py \
        --model transformer --dtype bfloat16 --optimizer adam --init_lr 1e-3 \
        --data_dir /tmp/gpu_tokens --update_freq 100 --tensor_model_parallel_size 1 $do \
        --out_dir runs/do${do:+_on} | grep -A1 "^Memory"
  done
  echo "transformer bf16 Adam at DP 2, plain vs distributed optimizer:"
  "$PYTHON" compare_runs.py runs/do runs/do_on --rtol 1e-300
  # Context parallelism with CUDA tensors: 2 context ranks on one GPU over gloo (the ring's
  # batch_isend_irecv host-staged, the positions moved to the GPU), each variant against serial.
  "$PYTHON" train.py --model transformer --num_layers 2 --dtype float64 --data_dir /tmp/gpu_tokens \
      --update_freq 100 --num_iterations 50 --out_dir runs/cp_serial | tail -1
  for cp in p2p all_gather a2a; do
    timeout 120 "$PYTHON" scripts/launch.py --standalone --nproc_per_node 2 parallel_train.py \
        --model transformer --num_layers 2 --dtype float64 --data_dir /tmp/gpu_tokens \
        --update_freq 100 --num_iterations 50 --tensor_model_parallel_size 1 \
        --context_parallel_size 2 --cp_comm_type $cp --out_dir runs/cp_$cp | grep "(met)"
    echo "transformer float64, serial vs C=2 $cp:"
    "$PYTHON" compare_runs.py runs/cp_serial runs/cp_$cp --rtol 1e-12
  done
  # The data-parallel average in buckets during backward, with CUDA tensors (gloo stages them
  # through the host): the same numbers as without it, bit for bit at DP 2.
  for ov in "" --overlap_grad_reduce; do
    timeout 120 "$PYTHON" scripts/launch.py --standalone --nproc_per_node 2 parallel_train.py \
        --model transformer --dtype float32 --data_dir /tmp/gpu_tokens --update_freq 100 \
        --num_iterations 50 --tensor_model_parallel_size 1 $ov --ddp_bucket_size 20000 \
        --out_dir runs/ov${ov:+_on} | tail -1
  done
  echo "transformer float32 at DP 2, without vs with --overlap_grad_reduce:"
  "$PYTHON" compare_runs.py runs/ov runs/ov_on --rtol 1e-300
  # The distributed optimizer's bucketed reduce-scatter and the parameter gather waited for by
  # forward pre-hooks, with CUDA tensors: bit for bit against the distributed optimizer alone.
  for ov in "" "--overlap_grad_reduce --overlap_param_gather"; do
    timeout 120 "$PYTHON" scripts/launch.py --standalone --nproc_per_node 2 parallel_train.py \
        --model transformer --dtype float32 --data_dir /tmp/gpu_tokens --update_freq 100 \
        --num_iterations 50 --tensor_model_parallel_size 1 --use_distributed_optimizer $ov \
        --ddp_bucket_size 20000 --out_dir runs/dov${ov:+_on} | tail -1
  done
  echo "transformer float32 at DP 2, distributed optimizer, without vs with both overlaps:"
  "$PYTHON" compare_runs.py runs/dov runs/dov_on --rtol 1e-300
  # Iteration cost in a full run: 1000 more iterations, timed from outside.
  for n in 200 1200; do TIMEFORMAT="serial, $n iterations: %R s"; time "$PYTHON" train.py --data_dir /tmp/gpu_data \
      --num_iterations $n --update_freq 10 --eval_interval 100000 --out_dir /tmp/t_s >/dev/null; done
} 2>&1 | tee "$OUT/scripts.txt"

part benchmark
timeout 200 "$PYTHON" -m benchmarks.bench_step --out "$OUT/benchmark_gpu.json" --plot "$OUT/benchmark_gpu.png" 2>&1 \
    | tee "$OUT/benchmark.txt" | grep -v "^  .* collectives per step"

part "whole suite"
# pytest-xdist, where installed, runs tests side by side: the suite is latency-bound, not compute-bound.
XDIST=$("$PYTHON" -c "import xdist" 2>/dev/null && echo "-n ${WORKERS:-6}")
timeout $(( ${BUDGET_S:-560} - SECONDS )) "$PYTHON" -m pytest -q -p no:cacheprovider $XDIST 2>&1 | tail -40 \
    | tee "$OUT/suite.txt"
part done
