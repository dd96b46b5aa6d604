"""Loss-curve pictures of a serial and a tensor-parallel run, written to assets/.

    python plot_runs.py runs/serial runs/tensor_parallel

non_parallel.png     the serial run: train loss each iteration, validation loss
tensor_parallel.png  the parallel run: every tensor-parallel rank's train loss
comparison.png       both runs overlaid and, beneath, |serial - parallel| per
                     iteration on a log axis, with its maximum

    python plot_runs.py runs/serial runs/tensor_parallel --noise runs/reordered_1 runs/reordered_2

draws the round-off band that the reordered runs span (compare_runs.py --noise) under the
difference, and the line a correct run stays below.

    python plot_runs.py A B --labels "stayed at TP=2" "TP=2, then TP=4" --comparison x.png

draws only the comparison of any two runs, under those names.
"""

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from compare_runs import (  # noqa: E402
    NOISE_FACTOR,
    curve_difference,
    read_judged_runs,
    verdict_numbers,
)
from training.metrics import atomic_write  # noqa: E402
from training.operations import ArgumentParser, check_output  # noqa: E402

SERIAL_COLOR, PARALLEL_COLOR, VALID_COLOR = "#1f77b4", "#d62728", "#2ca02c"
BAND_COLOR = "#6baed6"


def describe(config):
    """'input 64, hidden 2048, batch 32, float32, lr 0.001' plus the parallel set-up."""
    if not config:
        return "configuration unknown (no config.json)"
    # What a config.json lacks (an older or hand-edited one) shows as "?", not a KeyError.
    c = {k: "?" if v is None else f"{v:g}" if isinstance(v, float) else v
         for k, v in config.items()}
    c = {k: c.get(k, "?") for k in ("input_size", "hidden_size", "batch_size", "dtype", "init_lr",
                                     "vocab_size", "seq_length", "num_attention_heads",
                                     "num_layers", "tensor_model_parallel_size", "backend",
                                     "device")}
    text = (f"input {c['input_size']}, hidden {c['hidden_size']}, batch {c['batch_size']}, "
            f"{c['dtype']}, lr {c['init_lr']}")
    if config.get("model") == "transformer":
        text = (f"vocab {c['vocab_size']}, seq {c['seq_length']}, width {c['input_size']}, "
                f"{c['num_attention_heads']} heads, {c['num_layers']} block(s), batch "
                f"{c['batch_size']}, {c['dtype']}, lr {c['init_lr']}")
    if "backend" in config:
        device = str(c["device"]).split(":")[0]
        text += f", TP={c['tensor_model_parallel_size']} over {c['backend']} ({device})"
    return text


def rank_columns(metrics):
    columns = [k for k in metrics if k.startswith("train_loss_rank")]
    return sorted(columns, key=lambda k: int(k[len("train_loss_rank"):]))


def plot_losses(ax, metrics, color, label, valid_label, **style):
    ax.plot(metrics["iteration"], metrics["train_loss"], color=color, label=label, **style)
    evaluated = ~np.isnan(metrics["valid_loss"])
    if evaluated.any():
        ax.plot(metrics["iteration"][evaluated], metrics["valid_loss"][evaluated], "o", ms=7,
                mfc="none", mec=color if valid_label is None else VALID_COLOR, label=valid_label)


def model_name(config):
    return "ToyTransformer" if config.get("model") == "transformer" else "ToyModel"


def style_loss_axes(ax, title, config):
    ax.set_yscale("log")  # the loss falls by two orders of magnitude
    ax.set_xlabel("iteration")
    loss = "cross-entropy" if config.get("model") == "transformer" else "MSE"
    ax.set_ylabel(f"{loss} loss (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")  # where it covers the fewest points: the last ones stay in sight


def plot_serial(serial, config, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_losses(ax, serial, SERIAL_COLOR, "train loss (each iteration)", "validation loss")
    style_loss_axes(ax, f"Serial {model_name(config)}\n{describe(config)}", config)
    fig.tight_layout()
    save(fig, path)


def plot_parallel(parallel, config, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    columns = rank_columns(parallel) or ["train_loss"]
    colors = plt.cm.tab10(np.arange(len(columns)))
    for i, (column, color) in enumerate(zip(columns, colors)):
        # Wider lines underneath, so ranks that agree (they must) stay visible on top of each other.
        ax.plot(parallel["iteration"], parallel[column], color=color,
                lw=1.5 + 2.5 * (len(columns) - 1 - i), alpha=0.8,
                label=f"rank {column[15:] or 0} train loss")
    equal = all(np.array_equal(parallel[c], parallel[columns[0]]) for c in columns)
    ax.text(0.02, 0.03, f"{len(columns)} ranks' losses bitwise equal: {'yes' if equal else 'NO'}",
            transform=ax.transAxes, fontsize=9)
    style_loss_axes(ax, f"Tensor-parallel {model_name(config)}, every rank\n{describe(config)}",
                    config)
    fig.tight_layout()
    save(fig, path)


def draw_band(ax, iterations, band, floor, counted):
    """The round-off band (compare_runs.verdict_numbers, in the axis's units) shaded down to
    `floor`, and NOISE_FACTOR times it dashed where spikes count: a correct run's difference
    stays below the line."""
    ax.fill_between(iterations, floor, np.maximum(band, floor), color=BAND_COLOR, alpha=0.35,
                    lw=0, label="round-off band (the reordered runs' spread)")
    ax.plot(iterations, np.where(counted, NOISE_FACTOR * band, np.nan), "--", color=BAND_COLOR,
            lw=1.2, label=f"{NOISE_FACTOR:g} x the band (where spikes count)")


def plot_comparison(serial, parallel, configs, path, labels=("serial", "tensor-parallel"),
                    noise=()):
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    plot_losses(top, serial, SERIAL_COLOR, labels[0], None, lw=5, alpha=0.35)
    plot_losses(top, parallel, PARALLEL_COLOR, labels[1], None, lw=1.3, ls="--")
    style_loss_axes(top, f"{labels[0][0].upper() + labels[0][1:]} vs {labels[1]} (circles: "
                         f"validation loss)\n{describe(configs[1])}", configs[1] or {})
    top.set_xlabel("")

    n = min(len(serial["iteration"]), len(parallel["iteration"]))
    diff = np.abs(serial["train_loss"][:n] - parallel["train_loss"][:n])
    it = serial["iteration"][:n]
    exact = diff == 0  # can't go on a log axis: counted in the legend instead
    names = "serial - parallel" if labels[0] == "serial" else "difference"
    bottom.semilogy(it[~exact], diff[~exact], ".", color="black", ms=4,
                    label=f"|{names}| train loss ({exact.sum()} of {n} iterations exactly 0)")
    i = int(np.argmax(diff))
    _, max_rel = curve_difference(serial, parallel)  # the numbers compare_runs.py reports
    bottom.annotate(f"max {diff[i]:.2e} at iteration {int(it[i])}\n"
                    f"(max relative difference {max_rel:.2e})",
                    xy=(it[i], diff[i]), xytext=(0.03, 0.08), textcoords="axes fraction",
                    fontsize=9, arrowprops=dict(arrowstyle="->", color="gray"))
    if noise:  # the band in absolute terms, beneath the difference, and the verdict
        dtype = (configs[0] or {}).get("dtype", "float32")
        cut = lambda m: {k: c[:n] for k, c in m.items()}  # a run that stopped: as far as it went
        v = verdict_numbers(cut(serial), parallel, [cut(m) for m in noise], dtype)
        band = v["band"][:n] * np.abs(serial["train_loss"][:n])
        floor = diff[~exact].min() / 10 if (~exact).any() else band.min()
        draw_band(bottom, it, band, floor, v["counted"][:n])
        bottom.set_title(f"compare_runs.py --noise: {'MATCH' if v['ok'] else 'DIFFER'}",
                         fontsize=9)
    bottom.set_xlabel("iteration")
    bottom.set_ylabel("absolute difference")
    bottom.grid(True, which="both", alpha=0.3)
    bottom.legend(loc="best", fontsize=8)
    fig.tight_layout()
    save(fig, path)


def save(fig, path):
    """Write `fig` as a PNG; a reader never sees a half-written picture."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])  # one-line errors
    p.add_argument("serial", nargs="?", default="runs/serial")
    p.add_argument("parallel", nargs="?", default="runs/tensor_parallel")
    p.add_argument("--assets", default="assets", help="where the PNGs go")
    p.add_argument("--labels", nargs=2, default=["serial", "tensor-parallel"],
                   metavar=("FIRST", "SECOND"), help="the two runs' names in the comparison")
    p.add_argument("--comparison", default=None, metavar="PNG",
                   help="write only the comparison, here")
    p.add_argument("--noise", nargs="+", default=[], metavar="RUN",
                   help="the first run retrained with --reorder_seed K: its round-off band is "
                        "drawn under the difference")
    args = p.parse_args(argv)
    if args.comparison:
        check_output(p, "--comparison", args.comparison, ".png")
    else:
        check_output(p, "--assets", args.assets, "dir")
    (serial, parallel, *noise), configs = read_judged_runs(
        args.serial, args.parallel, args.noise, cannot="cannot be drawn as one comparison")
    configs = configs[:2]
    if args.comparison:
        os.makedirs(os.path.dirname(os.path.abspath(args.comparison)), exist_ok=True)
        return plot_comparison(serial, parallel, configs, args.comparison, args.labels, noise)
    os.makedirs(args.assets, exist_ok=True)
    plot_serial(serial, configs[0], os.path.join(args.assets, "non_parallel.png"))
    plot_parallel(parallel, configs[1], os.path.join(args.assets, "tensor_parallel.png"))
    plot_comparison(serial, parallel, configs, os.path.join(args.assets, "comparison.png"),
                    noise=noise)


if __name__ == "__main__":
    main()
