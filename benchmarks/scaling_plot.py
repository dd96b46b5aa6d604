"""assets/scaling.png from assets/scaling.json (benchmarks/scaling.py): where TP pays.

Top: seconds per training iteration against the hidden size, log-log; the
measured medians with their p10-p90 spread, the cost model's lines, and the
measured and predicted crossovers. Bottom: the speed-up, serial / TP, with 1
(break-even) and p (the limit) drawn.

    python -m benchmarks.scaling_plot assets/scaling.json assets/scaling.png
"""

import json
import sys

import numpy as np

from plot_runs import plt, save  # first: it sets the Agg backend

COLORS = {1: "#7f7f7f", 2: "#1f77b4", 4: "#9467bd"}


def series(report, tp, kind):
    pts = [pt for pt in report["points"] if pt["tp"] == tp]
    hidden = np.array([pt["hidden_size"] for pt in pts])
    if kind == "predicted":
        return hidden, np.array([pt["predicted"] for pt in pts])
    m = [pt["measured"] for pt in pts]
    return hidden, np.array([[x["median"], x["p10"], x["p90"]] for x in m]).T


def plot(report, path):
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8.5), sharex=True,
                                      gridspec_kw=dict(height_ratios=[3, 2]))
    tps = sorted({pt["tp"] for pt in report["points"]})
    for tp in tps:
        name = "serial" if tp == 1 else f"TP={tp}"
        hidden, (median, p10, p90) = series(report, tp, "measured")
        top.errorbar(hidden, median * 1e3, yerr=[(median - p10) * 1e3, (p90 - median) * 1e3],
                     fmt="o", color=COLORS[tp], capsize=3, label=f"{name}, measured (p10-p90)")
        _, predicted = series(report, tp, "predicted")
        top.plot(hidden, predicted * 1e3, "-", color=COLORS[tp], alpha=0.6,
                 label=f"{name}, cost model")
    for tp in tps[1:]:
        c = report["crossover_hidden_size"][f"tp{tp}"]
        for kind, style in (("measured", "-"), ("predicted", ":")):
            if c[kind] is not None:
                for ax in (top, bottom):
                    ax.axvline(c[kind], color=COLORS[tp], ls=style, lw=1)
                top.annotate(f"H* {kind} {c[kind]:.0f}", xy=(c[kind], 0.02 if style == "-"
                             else 0.09), xycoords=("data", "axes fraction"), fontsize=8,
                             color=COLORS[tp], ha="left", rotation=0,
                             xytext=(3, 0), textcoords="offset points")
    top.set_xscale("log", base=2)
    top.set_yscale("log")
    top.set_ylabel("ms per training iteration")
    m, sizes = report["model"], report["sizes"]
    link = ("" if m["alpha_s"] is None else
            f"; all-reduce alpha {m['alpha_s'] * 1e6:.0f} us, "
            f"{1 / m['beta_s_per_byte'] / 1e9:.2g} GB/s")
    machine = report["machine"]
    where = machine["gpu_name"] or f"{machine['cpu_count']} CPU cores, one thread per rank"
    top.set_title(f"Whole training iteration against the hidden size (input {sizes['input_size']}"
                  f", batch {sizes['batch_size']}, float32)\n{where}{link}", fontsize=10)
    top.grid(True, which="both", alpha=0.3)
    top.legend(fontsize=8, loc="upper left")

    serial_m = series(report, 1, "measured")[1][0]
    serial_p = series(report, 1, "predicted")[1]
    for tp in tps[1:]:
        hidden, (median, p10, p90) = series(report, tp, "measured")
        _, predicted = series(report, tp, "predicted")
        bottom.plot(hidden, serial_m / median, "o-", color=COLORS[tp],
                    label=f"TP={tp}, measured (serial / TP medians)")
        bottom.plot(hidden, serial_p / predicted, ":", color=COLORS[tp],
                    label=f"TP={tp}, cost model")
        bottom.axhline(tp, color=COLORS[tp], lw=0.8, alpha=0.5)
        bottom.text(hidden[-1], tp, f"limit {tp} ", va="bottom", ha="right", fontsize=8,
                    color=COLORS[tp])
    bottom.axhline(1, color="black", lw=0.8)
    bottom.text(report["sizes"]["grid"][0], 1, " break-even", va="bottom", fontsize=8)
    bottom.set_xscale("log", base=2)
    bottom.set_xlabel("hidden size H (TP=p: H / p per rank)")
    bottom.set_ylabel("speed-up over serial")
    bottom.set_ylim(0, max(tps) * 1.15)
    bottom.grid(True, which="both", alpha=0.3)
    if len(tps) > 1:
        bottom.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save(fig, path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m benchmarks.scaling_plot SCALING_JSON PNG")
    with open(sys.argv[1]) as f:
        plot(json.load(f), sys.argv[2])
