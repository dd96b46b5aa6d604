"""The load of a mixture of experts over training: each expert's share of the routed tokens, per
iteration, from metrics.csv's tokens_expert_* columns (--num_experts runs, training/metrics.py).

    python scripts/plot_moe_load.py runs/moe_no_aux runs/moe_aux \\
        --labels "no load-balancing loss" "--moe_aux_loss_coeff 0.1" --out assets/moe_load.png

One panel per run; a dashed line at 1/E, the share of perfect balance, and in each title the
imbalance, the busiest expert's tokens over the mean (Megatron logs the same ratio), averaged
over the last 20 iterations.
"""

import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plot_runs import save  # noqa: E402
from training.operations import ArgumentParser, check_output  # noqa: E402


def expert_load(run_dir):
    """(iterations, [iterations, E] tokens per expert) of a run; None if it routed nothing."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = list(csv.DictReader(f))
    experts = sorted((c for c in (rows[0] if rows else {}) if c.startswith("tokens_expert_")),
                     key=lambda c: int(c.rsplit("_", 1)[1]))
    if not experts:
        return None
    return (np.array([int(r["iteration"]) for r in rows]),
            np.array([[float(r[c]) for c in experts] for r in rows]))


def imbalance(tokens, last=20):
    """The busiest expert's tokens over the mean, averaged over the `last` iterations."""
    tail = tokens[-last:]
    return float(np.mean(tail.max(1) / tail.mean(1)))


def plot(loads, labels, path):
    fig, axes = plt.subplots(1, len(loads), figsize=(5.5 * len(loads), 4), sharey=True,
                             squeeze=False)
    for ax, (iterations, tokens), label in zip(axes[0], loads, labels):
        share = tokens / tokens.sum(1, keepdims=True)
        for e in range(share.shape[1]):
            ax.plot(iterations, share[:, e], lw=1, label=f"expert {e}")
        ax.axhline(1 / share.shape[1], color="k", ls="--", lw=1, label="1/E")
        ax.set_title(f"{label}\nbusiest / mean: {imbalance(tokens):.2f} (last 20 iterations)",
                     fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of the routed tokens")
    axes[0][-1].legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    save(fig, path)


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])  # one-line errors
    p.add_argument("runs", nargs="+", help="--num_experts runs' --out_dir")
    p.add_argument("--labels", nargs="+", default=None, help="one name per run")
    p.add_argument("--out", default="assets/moe_load.png")
    args = p.parse_args(argv)
    check_output(p, "--out", args.out, ".png")
    labels = args.labels or args.runs
    if len(labels) != len(args.runs):
        p.error(f"--labels names {len(labels)} runs, but {len(args.runs)} are given")
    loads = [expert_load(run) for run in args.runs]
    if None in loads:
        p.error(f"{args.runs[loads.index(None)]} has no metrics.csv with tokens_expert_* "
                "columns: give the --out_dir of a --num_experts run")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot(loads, labels, args.out)
    for run, (_, tokens) in zip(args.runs, loads):
        print(f"{run}: busiest / mean {imbalance(tokens):.2f} over the last 20 iterations")


if __name__ == "__main__":
    main()
