"""What tensor parallelism costs and buys: time one training step, serial and split.

    python -m benchmarks.bench_step                      # every variant, both configurations
    python -m benchmarks.bench_step --configs original --steps 50

Each variant runs in its own process(es), launched as the trainings are
(python for serial, torchrun for the parallel ones), one thread per rank:

  serial-1t    the serial ToyModel, 1 thread
  serial-Nt    the serial ToyModel, N threads (N = ranks of the parallel runs)
  ours-tpK     our ColumnParallelLinear / RowParallelLinear, K ranks
  ours-sp-tpK  the same with --sequence_parallel: each rank holds batch / K rows
               outside the split region (Korthikanti et al., 2022, Sec. 4.2.2)
  dtensor-tpK  PyTorch's ColwiseParallel / RowwiseParallel (parallelize_module)
               on the same ToyModel, same seed, same data, same K

and, beside the step, the whole training iteration (batch delivery, step,
bookkeeping: what a user waits for), timed between one batch and the next:

  loop-serial       train.py's own loop
  loop-ours-tpK     parallel_train.py's own loop
  loop-dtensor-tpK  the usual loop around DTensor: tensor-parallel rank 0 reads
                    the batch and broadcasts it (Megatron's broadcast_data),
                    the loss is read with .item() every step

On GPUs: steps are timed up to a torch.cuda.synchronize, memory is the peak
GPU memory (torch.cuda.max_memory_allocated), the GEMM ceiling is timed on
the GPU, and CUDA_DEVICE_MAX_CONNECTIONS is 1 as training sets it. The serial
N-threads variant and peak RSS mean something only on a CPU and run there
only; a variant needing more GPUs than the machine has is skipped, saying so.

A step is zero_grad, forward, loss, backward and the SGD step, with the batch
already on every rank (data delivery is timed by the loop variants).
Reported per variant: median and spread over --steps after --warmup, the
collectives issued per step (ours: counted in parallel_state; DTensor: by its
CommDebugMode) beside the Megatron paper's count, parameter/gradient/optimizer
memory per rank against the 1/TP theory, the activations saved for backward
inside and outside the split region (saved_tensors_hooks), peak resident memory, and achieved
GFLOP/s as a fraction of this machine's single-thread GEMM throughput for the
step's own matmul shapes (the ceiling). Writes assets/benchmark.json and
assets/benchmark.png.
"""

import argparse
import json
import os
import sys

import torch

from benchmarks import launcher, step_workers
from benchmarks.configs import CONFIGS, cpu_name
from benchmarks.launcher import driver_cli, launch
from benchmarks.step_report import (
    check_targets,
    paper_count,
    plot,
    print_report,
    summarize,
    summarize_loop,
)
from training.operations import ArgumentParser, check_output

LOOPS = ("loop-serial", "loop-ours", "loop-dtensor")


def parse_args():
    p = ArgumentParser(description=__doc__.splitlines()[0])  # one-line errors
    p.add_argument("--configs", nargs="+", default=["original", "compute_heavy", "transformer"],
                   choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per variant, after --warmup (default: 300 for steps under 10 "
                        "ms, else 30)")
    p.add_argument("--fused_sgd", action="store_true",
                   help="fused SGD for serial and ours (DTensor can't use it); default: standard "
                        "SGD for all")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: the GPUs when there are any, else the CPU")
    p.add_argument("--max_tp", type=int, default=None, help="largest tensor-parallel size "
                                                            "(default: cores or GPUs)")
    p.add_argument("--out", default="assets/benchmark.json")
    p.add_argument("--plot", default="assets/benchmark.png")
    # Worker mode (used by the driver).
    p.add_argument("--worker", choices=["serial", "ours", "dtensor", "ceiling", *LOOPS],
                   help=argparse.SUPPRESS)
    p.add_argument("--config", default="original", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--sequence_parallel", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hidden_size", type=int, default=None, help=argparse.SUPPRESS)  # scaling.py
    args = p.parse_args()
    if (args.steps is not None and args.steps < 1) or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    if args.max_tp is not None and args.max_tp < 1:
        p.error(f"--max_tp must be at least 1, got {args.max_tp}")
    if not args.worker:
        check_output(p, "--out", args.out, ".json")
        check_output(p, "--plot", args.plot, ".png")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and not gpus:
        p.error("--device cuda, but torch sees no CUDA GPU; use --device cpu (or auto)")
    if args.device == "auto":
        args.device = "cuda" if gpus else "cpu"
    return args, gpus


def run_worker(args):
    args.variant = args.worker
    if args.worker in LOOPS:
        return step_workers.loop_worker(args)
    if args.worker == "ceiling":
        return step_workers.ceiling_worker(args)
    return step_workers.worker(args)


def run_config(config, args, tps, on_gpu):
    """Every variant of one configuration: (step rows, loop rows, the GEMM ceilings)."""
    cfg, rows, loop_rows = CONFIGS[config], [], []
    # The GEMM ceiling and the whole-loop variants are the ToyModel's; the transformer's
    # comparison is the step's.
    toy = cfg.get("model") != "transformer"
    # A 1 ms step on shared cores is noisy: take more samples where they are cheap.
    steps = args.steps or (30 if config == "compute_heavy" else 300)
    ceiling = {tp: launch("ceiling", config, steps, 0, extra=("--tp", str(tp)))
               for tp in tps if toy}
    fused = ("--fused_sgd",) if args.fused_sgd else ()
    run = lambda name, *a, extra=(), **k: rows.append(
        summarize(name, launch(*a, **k, extra=fused + extra), cfg, ceiling))
    run("serial-1t", "serial", config, steps, args.warmup, threads=1)
    if max(tps) > 1 and not on_gpu:  # threads of a CPU: no meaning on a GPU
        run(f"serial-{max(tps)}t", "serial", config, steps, args.warmup, threads=max(tps))
    for tp in tps:
        run(f"ours-tp{tp}", "ours", config, steps, args.warmup, ranks=tp)
    for tp in tps[1:]:
        run(f"ours-sp-tp{tp}", "ours", config, steps, args.warmup, ranks=tp,
            extra=("--sequence_parallel",))
    for tp in tps[1:]:
        run(f"dtensor-tp{tp}", "dtensor", config, steps, args.warmup, ranks=tp)
    loop = lambda name, variant, ranks: loop_rows.append(
        summarize_loop(name, launch(variant, config, steps, args.warmup, ranks=ranks)))
    if toy:
        loop("loop-serial", "loop-serial", 1)
        for tp in tps:
            loop(f"loop-ours-tp{tp}", "loop-ours", tp)
        for tp in tps[1:]:
            loop(f"loop-dtensor-tp{tp}", "loop-dtensor", tp)
    return rows, loop_rows, ceiling


def write_report(args, gpus, results, loops, ceilings, targets, tp):
    on_gpu = args.device == "cuda"
    machine = dict(cpu_count=os.cpu_count(), torch=torch.__version__, platform=sys.platform,
                   processor=cpu_name(), gpus=gpus, device=args.device,
                   gpu_name=torch.cuda.get_device_name(0) if on_gpu else None)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".tmp", "w") as f:  # written whole, then renamed
        json.dump(dict(machine=machine, configs={c: CONFIGS[c] for c in results}, results=results,
                       loops=loops, papers={c: paper_count(CONFIGS[c], tp) for c in results},
                       ceiling=ceilings, targets=targets, warmup=args.warmup,
                       fused_sgd=args.fused_sgd),
                  f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    plot(results, loops, args.plot,
         per_rank=f"one GPU per rank ({machine['gpu_name']})" if on_gpu else
         "one thread per rank")


def main():
    args, gpus = parse_args()
    if args.worker:
        return run_worker(args)
    launcher.DEVICE, on_gpu = args.device, args.device == "cuda"
    fits = gpus if on_gpu else os.cpu_count()  # NCCL: a GPU per rank; CPU: a core per rank
    max_tp = args.max_tp or fits
    tps = [t for t in (1, 2, 4) if t <= min(max_tp, fits)]
    too_big = [t for t in (2, 4) if t <= max(max_tp, 2) and t not in tps]
    results, loops, ceilings = {}, {}, {}
    for config in args.configs:
        print(f"benchmarking {config} on {args.device} ...", flush=True)
        for t in too_big:
            needs = "GPUs (NCCL: one per rank)" if on_gpu else "cores"
            print(f"  skipped ours-tp{t}, ours-sp-tp{t}, dtensor-tp{t} and their loops: "
                  f"{t} ranks need {t} {needs}, this machine has {fits}", flush=True)
        results[config], loops[config], ceilings[config] = run_config(config, args, tps, on_gpu)
        print_report(config, CONFIGS[config], results[config], loops[config])
    targets = check_targets({c: results[c] + loops[c] for c in results})
    write_report(args, gpus, results, loops, ceilings, targets, max(tps))


if __name__ == "__main__":
    driver_cli(main)  # Ctrl-C: its workers stopped, one line
