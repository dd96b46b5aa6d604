"""When does tensor parallelism pay? The crossover across hidden sizes, measured and predicted.

    python -m benchmarks.scaling            # ~5 minutes on 2 CPU cores
    python -m benchmarks.scaling --quick    # a coarser grid, fewer iterations, one round

The sweep: for each hidden size H of a log grid (input 64, batch 32, the
original's), the whole training iteration of the loop the scripts run
(train.py's serially, parallel_train.py's at TP = 2, and 4 where there are 4
cores or GPUs), timed as bench_step.py times its loops: one thread per rank,
warm-up, median and p10-p90 over the iterations.

The cost model, fitted from separate measurements, never from the sweep:

    serial:  T_1(H) = o_1 + C(H)
    TP = p:  T_p(H) = o_p + C(H / p) + alpha + beta n

  C(w)   one rank's compute at MLP width w: the step of the serial ToyModel
         of width w (a TP rank's shards are that model), timed without the loop
         in processes of one thread, piece by piece: forward with the loss,
         backward (five GEMMs, 10 B I w FLOPs: fc1 forward, fc2 forward, fc2's
         input and weight gradients, fc1's weight gradient; X needs none), and
         the SGD step with momentum over the 2 I w weights (memory-bound). For
         TP = p, p such processes run side by side, as the ranks do: they share
         the memory bus and the last-level cache, and the slowest one counts;
  alpha, beta   the all-reduce's latency and cost per byte, fitted to a
         message-size sweep of the collective itself (n = B I 4 bytes per
         step: g's all-reduce; f's carries nothing, X needs no gradient);
  o_1, o_p   what an iteration costs besides: Python, autograd, the loop and
         its log points; each taken once, at the smallest H, as measured
         minus the model's other terms there.

The predicted crossover H* is where T_1 = T_p; the measured one is
interpolated (log-log) between the two grid points where serial / TP
crosses 1. Writes assets/scaling.json and assets/scaling.png.
"""

import argparse
import json
import os

import numpy as np
import torch

from benchmarks import configs, launcher, scaling_workers
from benchmarks.configs import cpu_name
from benchmarks.launcher import driver_cli, run_side_by_side
from benchmarks.scaling_model import (
    BATCH,
    INPUT,
    allreduce_bytes,
    crossover,
    fit_alpha_beta,
    gemm_flops,
    predict,
)
from training.operations import ArgumentParser, check_output

GRID = [512, 1024, 2048, 4096, 8192, 16384, 32768]
QUICK_GRID = [512, 2048, 8192, 32768]
FIT_SIZES = [2 ** k for k in range(8, 23, 2)]  # the all-reduce's messages: 256 B ... 4 MiB


def run_worker(cmd, ranks=1):
    """One worker of this script on `ranks` ranks; rank 0's RESULT."""
    if ranks > 1:
        cmd = [os.path.join(configs.REPO, "scripts", "launch.py"), "--standalone",
               "--nproc_per_node", str(ranks), *cmd]
    return run_side_by_side(cmd, 1)[0]


def iterations_for(hidden, quick):
    """Enough iterations for a stable median in about a second or two of each point."""
    n = 300 if hidden <= 2048 else 120 if hidden <= 8192 else 60
    return max(20, n // 3) if quick else n


def measure_compute(grid, tp, device):
    """{width: {piece: seconds}} of one rank among tp, tp copies side by side, the slowest."""
    widths = [str(h // tp) for h in grid]
    ranks = run_side_by_side(["-m", "benchmarks.scaling", "--device", device, "--worker",
                              "compute", "--widths", *widths], tp, device)
    return {int(w): {piece: max(r[w][piece] for r in ranks) for piece in ranks[0][w]}
            for w in widths}


def measure_loops(grid, tps, args):
    """{(hidden, tp): seconds of each timed iteration} of the training loops."""
    times = {}
    for hidden in grid:
        steps = args.iterations or iterations_for(hidden, args.quick)
        for tp in (1, *tps):
            print(f"  hidden {hidden}: {'serial' if tp == 1 else f'tp{tp}'}, {steps} iterations",
                  flush=True)
            result = launcher.launch("loop-serial" if tp == 1 else "loop-ours", "original",
                                     steps, args.warmup, ranks=tp,
                                     extra=("--hidden_size", str(hidden)))
            times[hidden, tp] = result["times"]
    return times


def parse_args():
    p = ArgumentParser(description=__doc__.splitlines()[0])  # one-line errors
    p.add_argument("--quick", action="store_true", help="a coarser grid and fewer iterations")
    p.add_argument("--grid", type=int, nargs="+", default=None, help="hidden sizes (default: "
                   f"{GRID}; --quick: {QUICK_GRID})")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iterations", type=int, default=None,
                   help="timed iterations per point (default: 300 at small sizes, fewer at large)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--max_tp", type=int, default=None)
    p.add_argument("--out", help="default: assets/scaling.json; --quick: runs/scaling_quick.json")
    p.add_argument("--plot", help="default: assets/scaling.png; --quick: runs/scaling_quick.png")
    p.add_argument("--worker", choices=["compute", "allreduce"], help=argparse.SUPPRESS)
    p.add_argument("--widths", type=int, nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--sizes", type=int, nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=200, help=argparse.SUPPRESS)
    args = p.parse_args()
    default = "runs/scaling_quick" if args.quick else "assets/scaling"  # a quick look: not assets/
    args.out, args.plot = args.out or default + ".json", args.plot or default + ".png"
    args.grid = sorted(args.grid or (QUICK_GRID if args.quick else GRID))
    if any(h % 4 for h in args.grid) or min(args.grid) < 4:
        p.error("--grid: hidden sizes must be multiples of 4, at least 4")
    if (args.iterations is not None and args.iterations < 1) or args.warmup < 0:
        p.error("--iterations must be at least 1 and --warmup at least 0")
    if args.max_tp is not None and args.max_tp < 1:
        p.error(f"--max_tp must be at least 1, got {args.max_tp}")
    if not args.worker:
        check_output(p, "--out", args.out, ".json")
        check_output(p, "--plot", args.plot, ".png")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "auto":
        args.device = "cuda" if gpus else "cpu"
    return args, gpus


def measure(args, tps):
    """(compute costs {tp: {width: {piece: s}}}, loop times {(hidden, tp): [s]}, the all-reduce's
    seconds per message size, or None at TP 1 alone).

    Shared machines drift by tens of percent within minutes (measured here: the same step
    3.6-6.3 ms a minute apart): the pieces and the loops are measured in alternating rounds
    and pooled, so that both see the same spells."""
    rounds = 1 if args.quick else 2
    runs, loop_times = {tp: [] for tp in (1, *tps)}, {}
    for r in range(rounds):
        for tp in (1, *tps):
            print(f"round {r + 1}/{rounds}: one rank's compute per width, {tp} side by side ...",
                  flush=True)
            runs[tp].append(measure_compute(args.grid, tp, args.device))
        print(f"round {r + 1}/{rounds}: the training loops ...", flush=True)
        for key, times in measure_loops(args.grid, tps, args).items():
            loop_times.setdefault(key, []).extend(times)
    costs = {tp: {w: {piece: float(np.mean([run[w][piece] for run in tp_runs]))
                      for piece in tp_runs[0][w]} for w in tp_runs[0]}
             for tp, tp_runs in runs.items()}
    allreduce_s = None
    if tps:
        print("timing the all-reduce over message sizes ...", flush=True)
        seconds = run_worker(["-m", "benchmarks.scaling", "--device", args.device, "--worker",
                              "allreduce", "--reps", "20" if args.quick else "200",
                              "--sizes", *map(str, FIT_SIZES)], ranks=2)
        allreduce_s = [seconds[str(n)] for n in FIT_SIZES]
    return costs, loop_times, allreduce_s


def predicted_points(grid, costs, loop_times, alpha, beta):
    """(points, the overheads): each grid point measured and predicted; the overheads taken at
    the smallest size only, as measured minus the model's other terms there."""
    width_costs = {tp: {w: sum(c.values()) for w, c in by_width.items()}
                   for tp, by_width in costs.items()}
    points = []
    for (hidden, tp), times in loop_times.items():
        points.append(dict(hidden_size=hidden, variant="serial" if tp == 1 else f"tp{tp}", tp=tp,
                           measured=dict(median=float(np.median(times)),
                                         p10=float(np.percentile(times, 10)),
                                         p90=float(np.percentile(times, 90)),
                                         iterations=len(times))))
    smallest = {pt["tp"]: pt for pt in points if pt["hidden_size"] == grid[0]}
    overheads = {tp: pt["measured"]["median"] - predict(width_costs, alpha, beta,
                                                         {tp: 0.0}, grid[0], tp)
                 for tp, pt in smallest.items()}
    for pt in points:
        pt["predicted"] = predict(width_costs, alpha, beta, overheads, pt["hidden_size"], pt["tp"])
    return points, overheads


def build_report(args, gpus, tps, costs, loop_times, allreduce_s):
    alpha = beta = None
    if allreduce_s is not None:
        alpha, beta = fit_alpha_beta(FIT_SIZES, allreduce_s)
    points, overheads = predicted_points(args.grid, costs, loop_times, alpha, beta)
    report = dict(
        machine=dict(processor=cpu_name(), cpu_count=os.cpu_count(), gpus=gpus,
                     device=args.device, torch=torch.__version__,
                     gpu_name=torch.cuda.get_device_name(0) if args.device == "cuda" else None),
        sizes=dict(input_size=INPUT, batch_size=BATCH, dtype="float32", grid=args.grid),
        model=dict(alpha_s=alpha, beta_s_per_byte=beta, allreduce_bytes=allreduce_bytes(2),
                   overhead_s={str(tp): o for tp, o in overheads.items()},
                   compute_s={str(tp): {str(w): c for w, c in by_width.items()}
                              for tp, by_width in costs.items()},
                   step_gflops={str(tp): {str(w): gemm_flops(w) / (c["forward"] + c["backward"])
                                          / 1e9 for w, c in by_width.items()}
                                for tp, by_width in costs.items()},
                   allreduce_sizes=FIT_SIZES, allreduce_s=allreduce_s),
        points=points)

    def curve(tp, kind):  # seconds per iteration over the grid, in order
        return np.array([pt["measured"]["median"] if kind == "measured" else pt["predicted"]
                         for pt in points if pt["tp"] == tp])

    report["crossover_hidden_size"] = {
        f"tp{tp}": {kind: crossover(args.grid, list(curve(1, kind) / curve(tp, kind)))
                    for kind in ("measured", "predicted")}
        for tp in tps}
    within = [abs(pt["predicted"] / pt["measured"]["median"] - 1) <= 0.3 for pt in points]
    report["targets"] = dict(points_within_30_percent=sum(within), points=len(points))
    return report


def main():
    args, gpus = parse_args()
    if args.worker == "compute":
        return scaling_workers.compute_worker(args)
    if args.worker == "allreduce":
        return scaling_workers.allreduce_worker(args)
    fits = gpus if args.device == "cuda" else os.cpu_count()
    tps = [t for t in (2, 4) if t <= min(args.max_tp or fits, fits)]
    launcher.DEVICE = args.device
    for t in (2, 4):
        if t not in tps:
            print(f"skipped TP={t}: {t} ranks need {t} {'GPUs' if gpus else 'cores'}, this "
                  f"machine has {fits}")
    report = build_report(args, gpus, tps, *measure(args, tps))
    print_report(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    from benchmarks.scaling_plot import plot
    plot(report, args.plot)


def print_report(report):
    m = report["model"]
    if m["alpha_s"] is not None:
        print(f"\nall-reduce: alpha {m['alpha_s'] * 1e6:.0f} us, beta "
              f"{m['beta_s_per_byte'] * 1e12:.1f} ps/byte ({1 / m['beta_s_per_byte'] / 1e9:.2f} "
              f"GB/s); {m['allreduce_bytes']} bytes per step")
    print("overheads: " + ", ".join(f"TP={tp} {o * 1e3:.3f} ms" for tp, o in
                                    m["overhead_s"].items()))
    print(f"{'hidden':>8}{'variant':>8}{'measured ms (p10-p90)':>28}{'predicted ms':>14}"
          f"{'error':>8}")
    for pt in report["points"]:
        me = pt["measured"]
        print(f"{pt['hidden_size']:>8}{pt['variant']:>8}{me['median'] * 1e3:>11.3f} "
              f"({me['p10'] * 1e3:.3f}-{me['p90'] * 1e3:.3f}){pt['predicted'] * 1e3:>14.3f}"
              f"{pt['predicted'] / me['median'] - 1:>+8.0%}")
    for variant, c in report["crossover_hidden_size"].items():
        show = lambda h: "none in the grid" if h is None else f"{h:.0f}"
        print(f"crossover {variant}: measured {show(c['measured'])}, predicted "
              f"{show(c['predicted'])}")
    t = report["targets"]
    print(f"model within 30% of the measured median: {t['points_within_30_percent']} of "
          f"{t['points']} points")


if __name__ == "__main__":
    driver_cli(main)  # Ctrl-C: its workers stopped, one line
