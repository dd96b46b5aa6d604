"""bench_step.py's results read: one row per variant, the papers' counts beside ours, the
targets, the picture (assets/benchmark.png)."""

import numpy as np

from benchmarks import bench_transformer
from benchmarks.configs import CONFIGS, describe


def summarize_loop(name, result):
    times = np.array(result["times"]) * 1e3
    return dict(variant=name, tp=result["tp"], mean_ms=float(times.mean()),
                median_ms=float(np.median(times)),
                p10_ms=float(np.percentile(times,
                                           10)), p90_ms=float(np.percentile(times,
                                                                            90)), steps=len(times),
                device=result["device"])


def summarize(name, result, cfg, ceiling):
    """One variant's row; the GEMM ceiling where it was timed (the ToyModel's five GEMMs)."""
    times = np.array(result["times"]) * 1e3
    tp = result.get("tp", 1)
    median = float(np.median(times))
    row = dict(variant=name, tp=tp, median_ms=median, p10_ms=float(np.percentile(times, 10)),
               p90_ms=float(np.percentile(times, 90)), steps=len(times), gflops=None,
               ceiling_gflops=None, fraction_of_ceiling=None, memory=result["memory"],
               comm=result.get("comm", {}), device=result["device"])
    if ceiling:  # five GEMMs, see ceiling_worker
        flops = 10 * cfg["batch_size"] * cfg["input_size"] * cfg["hidden_size"] / tp
        ideal_ms = sum(ceiling[tp]["seconds"].values()) * 1e3
        row.update(gflops=flops / median / 1e6, ceiling_gflops=flops / ideal_ms / 1e6,
                   fraction_of_ceiling=ideal_ms / median)
    return row


def paper_count(cfg, tp, elem=4):
    """The papers' collectives per step at tensor-parallel size tp."""
    if cfg.get("model") == "transformer":
        return bench_transformer.paper_count(cfg, tp, elem)
    return mlp_paper_count(cfg, tp, elem)


def mlp_paper_count(cfg, tp, elem=4):
    """Per MLP step, batch x input fp32 each, and the bytes each rank sends in a ring of tp ranks.
    Megatron-LM Sec. 3: one all-reduce in forward (g), one in backward (f). Korthikanti et al.
    (2022, Sec. 4.2.2): forward all-gather + reduce-scatter, backward two all-gathers (one
    re-gathers fc1's input) + reduce-scatter."""
    n = cfg["batch_size"] * cfg["input_size"] * elem
    return dict(tensor_parallel=dict(calls=dict(all_reduce=2),
                                     ring_bytes=2 * 2 * (tp - 1) * n // tp),
                sequence_parallel=dict(calls=dict(all_gather=3, reduce_scatter=2),
                                       ring_bytes=5 * (tp - 1) * n // tp))


def print_report(config, cfg, rows, loops):
    base = next(r for r in rows if r["variant"] == "serial-1t")["median_ms"]
    print(f"\n== {config}: {describe(cfg)} ==")
    print(f"{'variant':<13}{'median ms':>11}{'p10-p90 ms':>17}{'vs serial-1t':>13}{'GFLOP/s':>9}"
          f"{'of ceiling':>11}{'params+grads+optim':>20}{'saved act. in/out':>22}{'peak':>10}")
    for r in rows:
        m, act = r["memory"], r["memory"]["activations"]
        state = (m["params"] + m["grads"] + m["optimizer"]) / 2**20
        gemms = (f"{r['gflops']:>9.1f}{r['fraction_of_ceiling']:>10.0%}" if r["gflops"]
                 else f"{'-':>9}{'-':>10} ")  # no GEMM ceiling timed for the transformer
        print(f"{r['variant']:<13}{r['median_ms']:>11.3f}{r['p10_ms']:>8.3f}-{r['p90_ms']:<8.3f}"
              f"{base / r['median_ms']:>12.2f}x{gemms}"
              f"{state:>16.1f} MiB{act['inside'] / 2**10:>11.1f} /"
              f"{act['outside'] / 2**10:>6.1f} KiB"
              f"{m['peak'] / 2**20:>7.0f} MiB")
    for r in rows:
        for case, c in r["comm"].items():
            sent = ""
            if "ring_bytes" in c:
                sent = f", sent per rank in a ring {sum(c['ring_bytes'].values())} bytes"
            print(f"  {r['variant']} collectives per step ({case.replace('_', ' ')}): "
                  f"{c['calls']}{sent}")
    print(f"  peak: {rows[0]['memory']['peak_kind']}")
    if loops:
        print("  Whole training iteration (batch delivery, step, bookkeeping), ms:")
        for r in loops:
            print(f"  {r['variant']:<18} mean {r['mean_ms']:8.3f}   median {r['median_ms']:8.3f}   "
                  f"p10-p90 {r['p10_ms']:.3f}-{r['p90_ms']:.3f}")
    tp = max(r["tp"] for r in rows)
    paper = paper_count(cfg, tp)
    if cfg.get("model") == "transformer":
        print(f"  Megatron-LM per step at TP={tp}: {paper['tensor_parallel']} (per block 2 "
              "all-reduces of batch x sequence x width each way, the embedding's, the output "
              "layer's f, the cross-entropy's 2 small ones), instead of gathering "
              f"{paper['logits_gathered_instead']} bytes of logits. Sequence parallelism: see "
              "docs/sequence-parallelism.md.")
        return
    print(f"  Papers, per MLP step at TP={tp} (batch x input fp32 each): Megatron-LM "
          f"{paper['tensor_parallel']}; sequence parallel {paper['sequence_parallel']}. Ours skips "
          "what carries dL/dX when the input needs no gradient; sequence parallelism adds a small "
          "all-reduce of fc's gradient and the loss.")


TARGETS = [  # (config, variant, reference, limit, statistic): variant <= limit x reference
    ("original", "loop-ours-tp2", "loop-dtensor-tp2", 0.45, "mean_ms"),
    ("compute_heavy", "loop-ours-tp2", "loop-serial", 0.6, "mean_ms"),
    ("original", "ours-tp2", "dtensor-tp2", 0.6, "median_ms"),
    ("compute_heavy", "ours-tp2", "serial-1t", 0.55, "median_ms"),
    ("compute_heavy", "ours-tp2", "dtensor-tp2", 1.0, "median_ms"),
    ("original", "ours-tp1", "serial-1t", 1.05, "median_ms"),
    ("compute_heavy", "ours-tp1", "serial-1t", 1.05, "median_ms"),
]


def check_targets(results):
    """The issue's targets, as ratios measured in this one run; a target whose variants did not
    run here (too few GPUs, another config) is said to be skipped."""
    checks = []
    print("\nTargets:")
    for config, variant, reference, limit, stat in TARGETS:
        name = f"{config}: {variant} <= {limit} x {reference} ({stat.split('_')[0]})"
        rows = {r["variant"]: r for r in results.get(config, [])}
        if variant not in rows or reference not in rows:
            print(f"  skipped {name}: not measured here")
            continue
        ratio = rows[variant][stat] / rows[reference][stat]
        checks.append(dict(target=name, ratio=ratio, limit=limit, met=ratio <= limit))
        print(f"  {'met    ' if ratio <= limit else 'MISSED '} {name}: ratio {ratio:.2f}")
    return checks


def plot_loops(loop_ax, loop_rows):
    mean = [r["mean_ms"] for r in loop_rows]
    loop_ax.bar([r["variant"] for r in loop_rows], mean, color=[
        "#7f7f7f" if "serial" in r["variant"]
        else "#ff7f0e" if "dtensor" in r["variant"] else "#1f77b4"
        for r in loop_rows])
    for i, m in enumerate(mean):
        loop_ax.text(i, m, f"{m:.3g}", ha="center", va="bottom", fontsize=8)
    loop_ax.set_ylabel("ms per training iteration (mean)", fontsize=9)
    loop_ax.set_ylim(0, 1.2 * max(mean))
    loop_ax.grid(axis="y", alpha=0.3)


def plot(results, loops, path, per_rank="one thread per rank"):
    """Top: ms per step. Middle: ms per whole training iteration (mean). Bottom: activations saved
    for backward per rank, inside the split region and outside it (sequence parallelism's 1/TP)."""
    import matplotlib.pyplot as plt

    from plot_runs import save  # first: it sets the Agg backend
    with_loops = any(loops.values())  # the transformer alone has none: no middle row then
    fig, axes = plt.subplots(3 if with_loops else 2, len(results),
                             figsize=(max(8, 6 * len(results)), 10.5 if with_loops else 8),
                             squeeze=False,
                             gridspec_kw=dict(height_ratios=[3, 2, 2] if with_loops else [3, 2]))
    for column, (config, rows) in zip(axes.T, results.items()):
        ax, mem_ax = column[0], column[-1]
        loop_ax, loop_rows = (column[1] if with_loops else None), loops[config]
        if loop_ax is not None and loop_rows:
            plot_loops(loop_ax, loop_rows)
        elif loop_ax is not None:
            loop_ax.text(0.5, 0.5, "whole training loops: timed for the ToyModel only",
                         ha="center", va="center", fontsize=9, transform=loop_ax.transAxes)
            loop_ax.set_axis_off()
        names = [r["variant"] for r in rows]
        med = np.array([r["median_ms"] for r in rows])
        err = np.array([[m - r["p10_ms"] for m, r in zip(med, rows)],
                        [r["p90_ms"] - m for m, r in zip(med, rows)]])
        colors = ["#7f7f7f" if n.startswith("serial") else "#6baed6" if n.startswith("ours-sp")
                  else "#1f77b4" if n.startswith("ours") else "#ff7f0e" for n in names]
        ax.bar(names, med, yerr=err, color=colors, capsize=4)
        for i, (m, r) in enumerate(zip(med, rows)):  # above the error bar, clear of its cap
            ax.text(i, r["p90_ms"], f"{m:.3g}", ha="center", va="bottom", fontsize=8)
        cfg = CONFIGS[config]
        ax.set_title(f"{config}: {describe(cfg)}", fontsize=10 if len(describe(cfg)) < 60 else 8)
        ax.set_ylabel("ms per training step (median, p10-p90)")
        ax.tick_params(axis="x", labelbottom=False)
        ax.grid(axis="y", alpha=0.3)

        inside = np.array([r["memory"]["activations"]["inside"] for r in rows]) / 2**10
        outside = np.array([r["memory"]["activations"]["outside"] for r in rows]) / 2**10
        mem_ax.bar(names, inside, color="#c6dbef", label="inside the split region (1/TP with TP)")
        mem_ax.bar(names, outside, bottom=inside, color="#74c476",
                   label="outside it: the layers' inputs, the residual stream, the loss's "
                   "(1/TP with SP)")
        for i, (a, b) in enumerate(zip(inside, outside)):
            mem_ax.text(i, a + b, f"{b:.3g}", ha="center", va="bottom", fontsize=8, color="#238b45")
        mem_ax.set_ylabel("saved for backward, KiB per rank")
        mem_ax.set_ylim(0, 1.3 * (inside + outside).max())
        mem_ax.tick_params(axis="x", rotation=30)
        mem_ax.grid(axis="y", alpha=0.3)
        mem_ax.legend(fontsize=7.5, loc="upper right")
    loops_too = ", and one whole iteration of each training loop" if with_loops else ""
    fig.suptitle(f"One training step{loops_too}, {per_rank}\n"
                 "(grey: serial, blue: ours, light blue: ours with --sequence_parallel, orange: "
                 "PyTorch DTensor TP)",
                 fontsize=10)
    fig.tight_layout()
    save(fig, path)
