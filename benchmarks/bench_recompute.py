"""Activation recomputation measured: memory per layer against Korthikanti et al., Table 2; time.

    python -m benchmarks.bench_recompute      # ~3 minutes on 2 cores; --configs, --steps, --max_tp

For the toy transformer at its defaults and at a long sequence, each setting of
Korthikanti et al. (2022) — none, SP (sequence parallelism), selective,
SP + selective, full (and SP + full) — at TP = 1, 2, 4, with dropout 0.1: the
bytes one block saves for backward on each rank (step_measures.saved_activations,
recomputation's checkpoints included), asserted equal to this block's formula
(`activation_terms`: Table 2's terms for its dtype, ReLU, dropout masks and
sizes); the FLOPs of a step (torch's FlopCounterMode: what recomputing repeats);
and, where the ranks have a core or GPU each, the time of a step and of its
forward. One set of processes per TP size holds a model for every setting and
times their steps in turn, so that a shared machine's drift falls on all
alike. A TP size with more ranks than cores is measured for memory and FLOPs
only. Writes assets/recompute.json and assets/recompute.png; exits with an
error if any measured byte count differs from its formula.
"""

import argparse
import json
import os
import statistics
import sys

import numpy as np
import torch

from benchmarks import bench_transformer, launcher
from benchmarks.configs import CONFIGS, SEED, cpu_name, describe
from benchmarks.step_measures import saved_activations, timed_step
from core import parallel_state as ps
from core.tensor_parallel.random import model_parallel_manual_seed
from training import initialize
from training.operations import ArgumentParser, check_output, pin_float32_precision

# name: (sequence_parallel, recompute_granularity, distribute_saved_activations)
SETTINGS = {"none": (False, None, False), "SP": (True, None, False),
            "selective": (False, "selective", False), "SP + selective": (True, "selective", False),
            "full": (False, "full", False), "full, input distributed": (False, "full", True),
            "SP + full": (True, "full", False)}
TPS = (1, 2, 4)


def saved_sizes(dtype=torch.float32, device_type="cpu"):
    """Bytes per element of (activations, dropout's saved mask, LayerNorm's mean and 1/std).

    On a CPU, dropout saves its scaled mask in the activations' dtype (ATen's unfused
    dropout: input * mask) and LayerNorm its statistics in it too; on a GPU the fused
    dropout saves a bool mask, and LayerNorm float32 statistics for 16-bit inputs."""
    e = torch.empty((), dtype=dtype).element_size()
    return (e, 1, max(e, 4)) if device_type == "cuda" else (e, e, e)


def activation_terms(cfg, tp, sequence_parallel=False, recompute_granularity=None,
                     sizes=saved_sizes(), distribute_saved_activations=False):
    """Bytes one block saves for backward on each rank, term by term (Korthikanti et al., Sec. 4.1
    and Table 2, for this block). cfg: seq_length s, batch_size b, input_size h (the width),
    hidden_size H (the MLP's), num_heads a, dropout; sizes: saved_sizes(). Exact where TP divides
    the heads and, under SP, the sequence; a real tp draws the formula's line."""
    s, b, h = cfg["seq_length"], cfg["batch_size"], cfg["input_size"]
    H, a, dropout = cfg["hidden_size"], cfg["num_heads"], cfg.get("dropout", 0) > 0
    e, m, stat = sizes
    t, sp = tp, (tp if sequence_parallel else 1)  # split in the regions; outside them, under SP
    sbh = s * b * h
    if recompute_granularity == "full":  # whole, unless distributed; under SP its rows, 1/t
        return {"the block's input": sbh * e / (t if sequence_parallel or
                                                distribute_saved_activations else 1)}
    terms = {
        "LayerNorms' inputs": 2 * sbh * e / sp,
        "LayerNorms' mean and 1/std": 2 * 2 * s * b * stat / sp,
        "QKV's input": sbh * e / sp,
        "fc1's input": sbh * e / sp,
        "dropout masks after attention and MLP": 2 * sbh * m / sp if dropout else 0,
        "Q, K, V": 3 * sbh * e / t,
        "dense's input": sbh * e / t,
        "ReLU's output (fc2's input)": s * b * H * e / t,
    }
    if recompute_granularity != "selective":  # the attention core, which selective recomputes
        terms.update({
            "softmax's output": a * s * s * b * e / t,
            "attention dropout's mask and output": a * s * s * b * (m + e) / t if dropout else 0,
            "causal mask (bool, every rank)": s * s,
        })
    return terms


def activation_memory_per_layer(cfg, tp, sequence_parallel=False, recompute_granularity=None,
                                sizes=saved_sizes(), distribute_saved_activations=False):
    return sum(activation_terms(cfg, tp, sequence_parallel, recompute_granularity, sizes,
                                distribute_saved_activations).values())


def table2(cfg, tp, sequence_parallel=False, recompute_granularity=None):
    """Korthikanti et al. (2022), Table 2, as printed: bytes per layer with 16-bit activations,
    1-byte dropout masks and an MLP of 4h with GeLU; full recomputation keeps the input whole."""
    s, b, h, a, t = cfg["seq_length"], cfg["batch_size"], cfg["input_size"], cfg["num_heads"], tp
    core = 0 if recompute_granularity == "selective" else 5 * a * s / (h * t)
    if recompute_granularity == "full":
        return s * b * h * 2
    if sequence_parallel:
        return s * b * h * (34 / t + core)
    return s * b * h * (10 + 24 / t + core)


def count_flops(step, batch):
    """FLOPs of one step's forward, loss and backward, recomputation included (FlopCounterMode:
    the matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step.backward(step.loss(*batch))
    step.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def worker(args):
    """On each rank of one TP size: a model per setting (the same seed), what each block saves and
    the FLOPs of a step, then the settings' steps in turn, --steps times after --warmup."""
    cfg = dict(CONFIGS[args.config], dropout=args.dropout)
    torch.set_num_threads(args.threads)
    pin_float32_precision()
    device = initialize.init_distributed("auto", timeout_minutes=5, device=args.device)
    tp = torch.distributed.get_world_size()
    ps.initialize_model_parallel(tp)
    batches = bench_transformer.make_token_batches(cfg, 8, device)
    runs = {}
    for name in args.settings:
        sequence_parallel, granularity, distribute = SETTINGS[name]
        model_parallel_manual_seed(SEED, device)
        model = bench_transformer.build(cfg, True, sequence_parallel, cfg["dropout"],
                                        granularity, distribute).to(device)
        step = bench_transformer.TransformerStep(model)
        runs[name] = dict(step=step, times=[], forward_times=[],
                          optimizer=torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9),
                          per_layer=saved_activations(step, batches[0])["per_layer"],
                          flops=count_flops(step, batches[0]))
    for i in range(args.warmup + args.steps):
        for run in runs.values():
            torch.distributed.barrier()  # the ranks start each step together; not timed
            seconds, forward, _ = timed_step(run["step"], run["optimizer"],
                                                        batches[i % len(batches)], device,
                                                        split_forward=True)
            if i >= args.warmup:
                run["times"].append(seconds)
                run["forward_times"].append(forward)
    ps.destroy_model_parallel()
    if os.environ.get("RANK", "0") == "0":
        keep = ("per_layer", "flops", "times", "forward_times")
        print("RESULT " + json.dumps(dict(tp=tp, device=str(device), settings={
            name: {k: run[k] for k in keep} for name, run in runs.items()})), flush=True)


def measure(config, cfg, tp, settings, steps, warmup, sizes, timed):
    """Every setting at one TP size, in one set of processes: their rows."""
    settings = [name for name in settings if tp > 1 or not SETTINGS[name][0]]  # SP needs 2 ranks
    result = launcher.launch("recompute", config, steps, warmup, ranks=tp,
                               extra=["--dropout", str(cfg["dropout"]), "--settings", *settings],
                               module="benchmarks.bench_recompute")
    rows = []
    for name in settings:
        r, (sequence_parallel, granularity, distribute) = result["settings"][name], SETTINGS[name]
        formula = activation_memory_per_layer(cfg, tp, sequence_parallel, granularity, sizes,
                                              distribute)
        row = dict(setting=name, tp=tp, per_layer=r["per_layer"], formula=formula,
                   match=r["per_layer"] == formula, flops=r["flops"], timed=timed)
        if timed:
            ms = np.array(r["times"]) * 1e3
            row.update(median_ms=float(np.median(ms)), p10_ms=float(np.percentile(ms, 10)),
                       p90_ms=float(np.percentile(ms, 90)),
                       forward_ms=float(statistics.median(r["forward_times"])) * 1e3)
        rows.append(row)
    return rows


def print_report(config, cfg, rows):
    print(f"\n== {config}: {describe(cfg)}, dropout {cfg['dropout']} ==")
    print(f"{'setting':<24}{'TP':>3}{'saved per layer per rank, B':>29}{'formula':>11}"
          f"{'ms/step (p10-p90)':>24}{'forward ms':>12}{'GFLOP/step':>12}")
    for r in rows:
        # The ratios are to "none" at the same TP size; without it measured, none is printed.
        none = next((n for n in rows if n["setting"] == "none" and n["tp"] == r["tp"]), None)
        ratio = lambda key: f"{r[key] / none[key]:.2f}x" if none else "-"
        time = (f"{r['median_ms']:>8.2f} ({r['p10_ms']:.1f}-{r['p90_ms']:.1f}) "
                f"{ratio('median_ms'):>6}" if r["timed"] else "not timed")
        forward = f"{r['forward_ms']:>12.2f}" if r["timed"] else f"{'-':>12}"
        print(f"{r['setting']:<24}{r['tp']:>3}{r['per_layer']:>29,}{int(r['formula']):>11,}"
              f"{'' if r['match'] else ' MISMATCH'}{time:>24}{forward}"
              f"{r['flops'] / 1e9:>8.3f} {ratio('flops')}")


def plot(results, configs, sizes, path):
    """Activation memory per layer per rank against TP: the formulas' lines, the measured points."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from plot_runs import save  # first: it sets the Agg backend
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5.2), squeeze=False)
    colors = {"none": "#7f7f7f", "SP": "#74c476", "selective": "#1f77b4",
              "SP + selective": "#6baed6", "full": "#ff7f0e", "full, input distributed": "#a63603"}
    t = np.linspace(1, max(TPS), 61)
    for ax, (config, rows) in zip(axes[0], results.items()):
        cfg = configs[config]
        for name, color in colors.items():
            sp, granularity, distribute = SETTINGS[name]
            line = [activation_memory_per_layer(cfg, x, sp, granularity, sizes, distribute) / 2**10
                    for x in t]
            points = [r for r in rows if r["setting"] == name]  # none where not measured
            ax.plot(t, line, color=color, lw=1.5)
            ax.plot([r["tp"] for r in points], [r["per_layer"] / 2**10 for r in points], "o",
                    color=color, ms=7, mfc="none" if name.startswith("SP") else color)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(TPS, [str(x) for x in TPS])
        ax.set_xlabel("tensor-parallel size")
        ax.set_ylabel("saved for backward, KiB per layer per rank")
        ax.set_title(f"{config}: {describe(cfg)}, dropout {cfg['dropout']}",
                     fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.legend(handles=[Line2D([], [], color=color, marker="o", label=name,
                               mfc="none" if name.startswith("SP") else color)
                        for name, color in colors.items()],
               loc="lower center", ncol=len(colors), fontsize=9, frameon=False)
    fig.suptitle("Activation memory per layer and rank (Korthikanti et al., Table 2's settings): "
                 "measured (points) on this block's formula (lines); SP + full lies on full",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save(fig, path)


def main():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["transformer", "long_sequence"],
                   choices=[c for c, cfg in CONFIGS.items()
                            if cfg.get("model") == "transformer"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--steps", type=int, default=200, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--max_tp", type=int, default=max(TPS),
                   help="largest TP size measured (memory and FLOPs only beyond the cores or GPUs)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--out", default="assets/recompute.json")
    p.add_argument("--plot", default="assets/recompute.png")
    p.add_argument("--worker", choices=["recompute"], help=argparse.SUPPRESS)  # launcher.launch
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.max_tp < 1 or not 0 < args.dropout < 1:
        p.error("--steps and --max_tp must be at least 1, --warmup at least 0, --dropout in "
                "(0, 1)")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and not gpus:
        p.error("--device cuda, but torch sees no CUDA GPU; use --device cpu (or auto)")
    launcher.DEVICE = args.device = args.device if args.device != "auto" else (
        "cuda" if gpus else "cpu")
    if args.worker:
        return worker(args)
    check_output(p, "--out", args.out, ".json")
    check_output(p, "--plot", args.plot, ".png")
    fits = gpus if args.device == "cuda" else os.cpu_count()
    sizes = saved_sizes(torch.float32, args.device)  # the workers' models are float32
    results, configs = {}, {}
    for config in args.configs:
        cfg = configs[config] = dict(CONFIGS[config], dropout=args.dropout)
        results[config] = []
        for tp in (t for t in TPS if t <= args.max_tp):
            timed = tp <= fits
            print(f"{config}, TP={tp}" + ("" if timed else f": memory and FLOPs only, {tp} ranks "
                                          f"on {fits} {'GPUs' if gpus else 'cores'}") + " ...",
                  flush=True)
            results[config] += measure(config, cfg, tp, args.settings,
                                       args.steps if timed else 1, args.warmup if timed else 0,
                                       sizes, timed)
        print_report(config, cfg, results[config])
    machine = dict(cpu_count=os.cpu_count(), torch=torch.__version__,
                   processor=cpu_name(), device=args.device, gpus=gpus)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)  # checked makeable
    with open(args.out + ".tmp", "w") as f:
        json.dump(dict(machine=machine, configs=configs, saved_sizes=sizes, results=results,
                       steps=args.steps, warmup=args.warmup), f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    plot(results, configs, sizes, args.plot)
    wrong = [f"{c} {r['setting']} TP={r['tp']}" for c, rows in results.items() for r in rows
             if not r["match"]]
    if wrong:
        sys.exit(f"error: measured bytes differ from the formula: {', '.join(wrong)}")


if __name__ == "__main__":
    launcher.driver_cli(main)  # Ctrl-C: its workers stopped, one line
