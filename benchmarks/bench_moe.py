"""The token dispatchers side by side: one MoE layer's forward and backward under expert
parallelism, alltoall against allgather (core/transformer/moe/token_dispatcher.py), their bytes
against the formulas and their time.

    python -m benchmarks.bench_moe          # EP = 2 and 4: assets/moe_dispatchers.png and .json
    python -m benchmarks.bench_moe --quick  # EP = 2 only: runs/moe_dispatchers_quick.*

On 2 CPU cores shared with other work (AMD EPYC): 12 s, 5 s with --quick; each EP a torchrun
launch of its own, EP ranks (gloo, one thread each).

Each rank routes T tokens of width H to E experts (top K; the toy MLP of hidden F each, float32),
E/EP experts on each rank; the same layer, the same tokens, through each dispatcher:

  alltoall   bytes in per rank = 2 (sent + received) H b + E x 8 (the counts): the rows the
             routing sent out and took in, forward and backward; sent = T K whatever the routing,
             received = what the routing gave this rank's experts (balanced: T K as well).
  allgather  bytes in per rank = T (2 H b + E (b + 1)) gathered and EP T (2 H b + E b) reduce-
             scattered: EP x the tokens, whatever the routing.

The two give the same outputs and gradients (to float32's round-off: the sums' order differs) and
their counted bytes must equal the formulas exactly. The times on 2 shared cores measure little
beyond gloo's latency (a few collectives each); they are printed and drawn as measured, the
bytes are the comparison that carries to GPUs: every rank of the all-gather receives EP T token
rows where the all-to-all's receives about T K, EP/K as many, and the reduce-scatter sends them
all back (measured: at EP 2, 410 KiB in per rank against the all-to-all's 513; at EP 4, 682
against 540).
"""

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from benchmarks.configs import cpu_name
from benchmarks.launcher import driver_args, driver_cli, launch, print_result, write_results
from core import parallel_state as ps
from core import wire
from core.transformer.moe.moe_layer import MoELayer
from training import initialize

SIZES, QUICK_SIZES = (2, 4), (2,)  # the expert-parallel sizes EP
LAYER = dict(tokens=256, hidden=64, experts=8, topk=2, ffn=128)  # T per rank, H, E, K, F
REPEATS, QUICK_REPEATS = 20, 5
DISPATCHERS = ("alltoall", "allgather")
ATOL = 1e-5  # the two dispatchers' outputs and gradients, float32 (measured ~1e-7)


def worker(args):
    """On each of EP ranks: both dispatchers' bytes, outputs, gradients and times; rank 0
    prints them."""
    torch.set_num_threads(1)
    initialize.init_distributed("gloo", timeout_minutes=5, device="cpu")
    ep, rank = dist.get_world_size(), dist.get_rank()
    ps.initialize_model_parallel(1, expert_model_parallel_size=ep)
    runs = {d: run_dispatcher(d, int(args.steps)) for d in DISPATCHERS}
    a, b = (runs[d].pop("tensors") for d in DISPATCHERS)
    agree = max((x - y).abs().max().item() for x, y in zip(a, b))
    ps.destroy_model_parallel()
    if rank == 0:
        print_result(dict(EP=ep, layer=LAYER, agree=agree, **runs))


def run_dispatcher(dispatcher, repeats):
    """One layer through `dispatcher`: its bytes and tallies in one forward and backward, its
    output and gradients, and the median time of `repeats` more."""
    from model import MLP
    torch.manual_seed(0)  # every rank the same layer (each keeps its experts)
    layer = MoELayer(LAYER["hidden"], LAYER["experts"], LAYER["topk"],
                     lambda: MLP(LAYER["hidden"], LAYER["ffn"]), parallel=True,
                     dispatcher=dispatcher)
    torch.manual_seed(1 + dist.get_rank())  # each rank its own tokens
    x = torch.randn(LAYER["tokens"], 1, LAYER["hidden"], requires_grad=True)
    wire.reset_comm_stats()
    layer(x).square().sum().backward()
    stats, tallies = wire.comm_stats(), dict(wire.comm_tallies)
    tensors = [layer(x).detach(), x.grad.clone()]
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        layer(x).square().sum().backward()
        times.append(time.perf_counter() - start)
    return dict(bytes={op: s["bytes"] for op, s in stats.items()}, tallies=tallies,
                time_s=statistics.median(times), tensors=tensors)


def formula(dispatcher, ep, tallies):
    """Bytes in per rank, by op, for one forward and backward of the layer (module docstring)."""
    t, h, e, b = LAYER["tokens"], LAYER["hidden"], LAYER["experts"], 4
    if dispatcher == "alltoall":
        rows = tallies["moe_rows_sent"] + tallies["moe_rows_received"]
        return {"moe_all_to_all": 2 * rows * h * b, "moe_counts_all_gather": e * 8}
    return {"moe_all_gather": t * (2 * h * b + e * (b + 1)),
            "moe_reduce_scatter": ep * t * (2 * h * b + e * b)}


def report_point(r):
    """The point's rows, printed: each dispatcher's bytes against the formula, and its time."""
    point = dict(EP=r["EP"], agree=r["agree"])
    for d in DISPATCHERS:
        expected = formula(d, r["EP"], r[d]["tallies"])
        measured = {op: r[d]["bytes"].get(op, 0) for op in expected}
        point[d] = dict(bytes=measured, formula=expected, match=measured == expected,
                        total_kib=sum(measured.values()) / 1024, time_s=r[d]["time_s"],
                        tallies=r[d]["tallies"])
        print(f"EP={r['EP']} {d:>9}: {point[d]['total_kib']:8.1f} KiB in per rank "
              f"({', '.join(f'{op} {v / 1024:.1f}' for op, v in measured.items())}), the "
              f"formula's: {'met' if point[d]['match'] else 'DIFFERS'}; "
              f"{r[d]['time_s'] * 1e3:.2f} ms forward + backward")
    print(f"EP={r['EP']}: the two dispatchers' outputs and gradients agree to {r['agree']:.1e}")
    return point


def plot(points, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.38
    for i, d in enumerate(DISPATCHERS):
        xs = [j + (i - 0.5) * width for j in range(len(points))]
        left.bar(xs, [p[d]["total_kib"] for p in points], width, label=d)
        right.bar(xs, [p[d]["time_s"] * 1e3 for p in points], width, label=d)
    for ax, title in ((left, "bytes in per rank, one forward + backward (KiB)\n= the formulas"),
                      (right, "time of one forward + backward (ms)\n2 shared CPU cores, gloo")):
        ax.set_xticks(range(len(points)), [f"EP = {p['EP']}" for p in points])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"one MoE layer: T {LAYER['tokens']} tokens per rank, H {LAYER['hidden']}, "
                 f"E {LAYER['experts']}, K {LAYER['topk']}", fontsize=10)
    fig.tight_layout()
    from training.metrics import atomic_write
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    print(f"wrote {path}")


def main():
    args = driver_args(__doc__, "moe_dispatchers", "moe",
                       ("steps", "warmup", "threads", "config", "device"))
    if args.worker:
        return worker(args)
    points = []
    for ep in QUICK_SIZES if args.quick else SIZES:
        r = launch("moe", "none", QUICK_REPEATS if args.quick else REPEATS, 0, ranks=ep,
                   module="benchmarks.bench_moe")
        points.append(report_point(r))
    print(f"measured on {cpu_name()}, {os.cpu_count()} cores")
    report = dict(machine=dict(processor=cpu_name(), cpu_count=os.cpu_count(),
                               torch=torch.__version__), layer=LAYER, points=points)
    write_results(report, args.out, lambda path: plot(points, path), args.plot)


if __name__ == "__main__":
    sys.exit(driver_cli(main))
