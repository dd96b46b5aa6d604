"""The distributed optimizer's memory, bytes on the wire and time per step, against the formula.

    python -m benchmarks.bench_distrib_optimizer          # assets/distributed_optimizer_memory.*
    python -m benchmarks.bench_distrib_optimizer --quick  # d = 2, Adam: runs/..._quick.*

On 2 shared CPU cores (AMD EPYC, a load average of 9 to 15 from other work): 3 min 28 s, and
25 s with --quick (2026-12-07); twelve points, each a launch of its own.

For the toy transformer at its defaults under bf16 (as Megatron's table is: bf16 parameters,
fp32 main parameters and gradients), at data-parallel sizes d = 1, 2, 4, with SGD + momentum and
with Adam, plain and --use_distributed_optimizer: rank 0's bytes per parameter of each kind,
counted from its tensors (training/optimizer_memory.py), beside P + G + (M + S)/d (Adam:
18 -> 6 + 12/d); the bytes one step sends over the data-parallel group, beside an all-reduce of
the gradient buffer; the median time per step. Each point is parallel_train.py's own model,
optimizer and step on d ranks (one thread each), the data random tokens.
"""

import os
import statistics
import time

import torch

from benchmarks.configs import cpu_name
from benchmarks.launcher import driver_args, driver_cli, launch, print_result, write_results

SIZES = (1, 2, 4)
QUICK_SIZES = (2,)
STEPS, WARMUP = 10, 3
FLAGS = ["--model", "transformer", "--dtype", "bfloat16", "--tensor_model_parallel_size", "1",
         "--init_lr", "1e-3"]


def worker(args):
    """One point: d ranks train a few steps; rank 0 reports its memory, wire and times."""
    from core import parallel_state as ps
    from core import wire
    from core.distributed.finalize_model_grads import finalize_model_grads
    from core.optimizer.distrib_optimizer import DistributedOptimizer
    from core.pipeline_parallel.schedules import get_forward_backward_func
    from parallel_train import build_chunks, forward_step, microbatches, tensor_shape
    from train import make_optimizer, torch_optimizer
    from training import initialize
    from training.arguments import get_parallel_args
    from training.optimizer_memory import formula, optimizer_memory
    torch.set_num_threads(1)
    flags = [*FLAGS, "--optimizer", args.optimizer_name]
    run = get_parallel_args(flags + ["--use_distributed_optimizer"] * (args.distributed == "1"))
    device = initialize.init_distributed("gloo", 5, "cpu")
    ps.initialize_model_parallel(1)
    d = ps.get_data_parallel_world_size()
    model = build_chunks(run, device)
    optimizer = DistributedOptimizer(model, torch_optimizer(run), run.torch_dtype) \
        if run.use_distributed_optimizer else make_optimizer(model, run)
    rows = run.batch_size // d
    torch.manual_seed(ps.get_data_parallel_rank())
    inputs = torch.randint(run.vocab_size, (rows, run.seq_length), device=device)
    targets = torch.randint(run.vocab_size, (rows, run.seq_length), device=device)
    step = get_forward_backward_func(run.pipeline_schedule)
    shape = run.pipeline_tensor_shape = tensor_shape(run, run.micro_batch_size)
    times = []
    for i in range(args.warmup + args.steps):
        wire.reset_comm_stats()  # the last step's are reported
        torch.distributed.barrier()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses = step(forward_step, microbatches(inputs, targets, run), model, shape,
                      run.torch_dtype)
        finalize_model_grads(model, optimizer, losses)
        optimizer.step()
        torch.distributed.barrier()
        times.append(time.perf_counter() - start)
    counted = optimizer_memory(model, optimizer)
    sent = {op: c["ring_bytes"] for op, c in wire.comm_stats().items()}
    grad_buffer = sum(b.grad_data.numel() * b.grad_data.element_size()
                      for b in getattr(optimizer, "buffers", []))
    rank = torch.distributed.get_rank()
    ps.destroy_model_parallel()
    if rank == 0:
        print_result(dict(d=d, optimizer=args.optimizer_name, distributed=args.distributed == "1",
                          bytes={k: v for k, v in counted.items() if k != "numel"},
                          numel=counted["numel"],
                          formula=formula(run, d if args.distributed == "1" else 1),
                          wire=sent, grad_buffer=grad_buffer,
                          step_ms=1e3 * statistics.median(times[args.warmup:])))


def table(results):
    """Markdown: one row per point."""
    lines = ["| optimizer | d | plain / distributed | params | grads | main params | state | "
             "total B/param | formula | sent over DP per step, KiB | ms per step |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        per = {k: v / r["numel"] for k, v in r["bytes"].items()}
        dp = {op: b for op, b in r["wire"].items() if op.startswith("dp_") or
              op == "replicated_all_reduce"}
        sent = " + ".join(f"{op} {b / 1024:.1f}" for op, b in sorted(dp.items())) or "-"
        lines.append(f"| {r['optimizer']} | {r['d']} | "
                     f"{'distributed' if r['distributed'] else 'plain'} | "
                     + " | ".join(f"{per[k]:.2f}" for k in ("parameters", "gradients",
                                                             "main_parameters", "optimizer_state"))
                     + f" | {sum(per.values()):.2f} | {r['formula']:.2f} | {sent} | "
                     f"{r['step_ms']:.1f} |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib.pyplot as plt

    from plot_runs import save  # first: it sets the Agg backend
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ds = [1 + i / 20 for i in range(141)]  # 1 to 8
    for name, state, color in (("Adam", 8, "tab:blue"), ("SGD + momentum", 4, "tab:orange")):
        ax.plot(ds, [6 + (4 + state) / d for d in ds], color=color,
                label=f"{name}, distributed: 6 + {4 + state}/d")
        ax.axhline(6 + 4 + state, color=color, linestyle="--", label=f"{name}, plain: "
                   f"{6 + 4 + state}")
        for r in results:
            if r["optimizer"] == {"Adam": "adam"}.get(name, "sgd"):
                ax.plot(r["d"], sum(r["bytes"].values()) / r["numel"],
                        "o" if r["distributed"] else "s", color=color,
                        markerfacecolor="white" if not r["distributed"] else color)
    ax.set_xlabel("data-parallel size d")
    ax.set_ylabel("bytes per parameter on one rank")
    ax.set_xticks([1, 2, 4, 8])
    ax.set_ylim(0, 20)
    ax.set_title("The distributed optimizer under bf16: measured (points) on the formula (lines)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save(fig, path)


def main():
    args = driver_args(__doc__, "distributed_optimizer_memory", "optimizer",
                       ("optimizer_name", "distributed", "steps", "warmup", "threads", "config",
                        "device"))
    if args.worker:
        args.steps, args.warmup = int(args.steps), int(args.warmup)
        return worker(args)
    results = []
    optimizers = ("adam",) if args.quick else ("adam", "sgd")
    for name in optimizers:
        for d in QUICK_SIZES if args.quick else SIZES:
            for distributed in (False, True):
                extra = ("--optimizer_name", name, "--distributed", str(int(distributed)))
                results.append(launch("optimizer", "none", 2 if args.quick else STEPS,
                                      1 if args.quick else WARMUP, ranks=d, extra=extra,
                                      module="benchmarks.bench_distrib_optimizer"))
                print_result(results[-1])
    print(table(results))
    print(f"measured on {cpu_name()}, {os.cpu_count()} cores")
    write_results(dict(machine=dict(processor=cpu_name(), cpu_count=os.cpu_count(),
                                    torch=torch.__version__), results=results),
                  args.out, lambda path: plot(results, path), args.plot)


if __name__ == "__main__":
    driver_cli(main)
