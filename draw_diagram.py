"""Draw the tensor-parallel ToyModel (after Megatron-LM, Fig. 3a) to assets/toy_tensor_parallel.png.

    python draw_diagram.py --tp 2 --input_size 64 --batch_size 32

One row per tensor-parallel rank: the replicated input X, f, X·A_i and its
ReLU, the partial product Y_i·B_i, g's all-reduce, the replicated fc and the
loss, with the shapes of each tensor and which operator communicates when.
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402

COMPUTE, REPLICATED, COMM = "#dbe9f6", "#e8e8e8", "#fdd9a8"
# x centre and width of each column, in axis units (0..100).
COLUMNS = {"X": (6, 9), "f": (16.5, 4.5), "XA": (28, 12), "relu": (38.5, 5), "YB": (49.5, 12),
           "g": (61, 4.5), "Z": (71, 9), "fc": (82, 9), "loss": (93, 8)}
ROW = 16  # vertical distance between ranks


def box(ax, column, y, text, color, height=11):
    x, w = COLUMNS[column]
    ax.add_patch(FancyBboxPatch((x - w / 2, y - height / 2), w, height, boxstyle="round,pad=0.4",
                                fc=color, ec="#555555", lw=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=8.5)


def arrow(ax, a, b, y):
    (xa, wa), (xb, wb) = COLUMNS[a], COLUMNS[b]
    ax.annotate("", xy=(xb - wb / 2 - 0.5, y), xytext=(xa + wa / 2 + 0.5, y),
                arrowprops=dict(arrowstyle="-|>", color="#333333", lw=1))


def draw(tp, input_size, hidden_size, batch_size, path):
    h = hidden_size // tp
    rows = [(tp - 1 - r) * ROW + 22 for r in range(tp)]
    top, bottom = rows[0] + 9, rows[-1] - 9
    fig, ax = plt.subplots(figsize=(15, 1.55 * tp + 2.6))
    ax.set_xlim(-3, 100)
    ax.set_ylim(0, top + 9)
    ax.axis("off")

    # The tensor-parallel region, between f and g: each rank holds 1/TP of A and B.
    ax.add_patch(Rectangle((COLUMNS["f"][0], bottom), COLUMNS["g"][0] - COLUMNS["f"][0], top - bottom,
                           fc="#f4f8fc", ec="#9bbbd9", ls="--", lw=1, zorder=0))
    ax.text((COLUMNS["f"][0] + COLUMNS["g"][0]) / 2, top + 1.5,
            f"tensor-parallel region: rank i holds A_i ({input_size}x{h}, its rows of mlp.fc1.weight) "
            f"and B_i ({h}x{input_size}, its columns of mlp.fc2.weight)",
            ha="center", fontsize=9, color="#3a6ea5")

    for r, y in enumerate(rows):
        i = r + 1
        ax.text(-2.5, y, f"rank {r}", ha="left", va="center", fontsize=9, fontweight="bold")
        box(ax, "X", y, f"X\n{batch_size}x{input_size}\n(replicated)", REPLICATED)
        box(ax, "XA", y, f"X·A{i}\n{batch_size}x{input_size} · {input_size}x{h}\n= {batch_size}x{h}", COMPUTE)
        box(ax, "relu", y, f"ReLU\n→ Y{i}", COMPUTE)
        box(ax, "YB", y, f"Y{i}·B{i}\n{batch_size}x{h} · {h}x{input_size}\n= {batch_size}x{input_size} (partial)",
            COMPUTE)
        box(ax, "Z", y, f"Z = Σ Yi·Bi\n{batch_size}x{input_size}", REPLICATED)
        box(ax, "fc", y, f"fc (replicated)\n{input_size}x1\n→ {batch_size}x1", REPLICATED)
        box(ax, "loss", y, "MSE loss\n(same on\nevery rank)", REPLICATED)
        for a, b in [("X", "f"), ("f", "XA"), ("XA", "relu"), ("relu", "YB"), ("YB", "g"), ("g", "Z"),
                     ("Z", "fc"), ("fc", "loss")]:
            arrow(ax, a, b, y)

    # f and g span every rank: they are the only places ranks talk to each other.
    mid, span = (top + bottom) / 2, top - bottom - 2
    box(ax, "f", mid, "f", COMM, height=span)
    box(ax, "g", mid, "g", COMM, height=span)
    ax.text(COLUMNS["f"][0], bottom - 2.5, "f   forward: identity\n    backward: all-reduce dL/dX\n"
            f"    ({batch_size}x{input_size}; skipped when X\n    needs no gradient, as here)",
            ha="left", va="top", fontsize=8.5, family="monospace")
    ax.text(COLUMNS["g"][0], bottom - 2.5, f"g   forward: all-reduce Σ Yi·Bi\n    ({batch_size}x{input_size})\n"
            "    backward: identity", ha="left", va="top", fontsize=8.5, family="monospace")
    ax.text(50, top + 6, f"Tensor-parallel ToyModel, TP={tp} (after Megatron-LM, Shoeybi et al. 2019, Fig. 3a):"
            f" input {input_size}, hidden {hidden_size}, batch {batch_size}", ha="center", fontsize=11)
    ax.set_ylim(bottom - 13, top + 9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    p.add_argument("--input_size", type=int, default=64)
    p.add_argument("--hidden_size", type=int, default=None, help="default: 32 x input_size")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--out", default="assets/toy_tensor_parallel.png")
    args = p.parse_args(argv)
    hidden = args.hidden_size or 32 * args.input_size
    if min(args.tp, args.input_size, hidden, args.batch_size) <= 0 or hidden % args.tp:
        p.error(f"sizes must be positive and --hidden_size {hidden} divisible by --tp {args.tp}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    draw(args.tp, args.input_size, hidden, args.batch_size, args.out)


if __name__ == "__main__":
    main()
