"""Draw the tensor-parallel ToyModel (after Megatron-LM, Fig. 3a) to assets/toy_tensor_parallel.png.

    python draw_diagram.py --tp 2 --input_size 64 --batch_size 32
    python draw_diagram.py --sequence_parallel     # assets/toy_sequence_parallel.png
    python draw_diagram.py --model transformer     # assets/transformer_tensor_parallel.png
    python draw_diagram.py --pp 2 --virtual 2 --num_layers 8   # assets/pipeline_stages.png

One row per tensor-parallel rank: the replicated input X, f, X·A_i and its
ReLU, the partial product Y_i·B_i, g's all-reduce, the replicated fc and the
loss, with the shapes of each tensor and which operator communicates when.
With --sequence_parallel (Korthikanti et al., 2022, Sec. 4.2.2), everything
outside the split region holds only the rank's rows, f becomes an all-gather
and g a reduce-scatter.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402

from core.pipeline_parallel.schedules import chunk_layers  # noqa: E402
from parallel_layers import vocab_size_with_padding  # noqa: E402
from plot_runs import save  # noqa: E402
from training.operations import ArgumentParser, check_output, given_flags  # noqa: E402

COMPUTE, REPLICATED, COMM, ROWS = "#dbe9f6", "#e8e8e8", "#fdd9a8", "#dcefd6"
# x centre and width of each column, in axis units (0..100).
COLUMNS = {"X": (6, 9), "f": (16.5, 4.5), "XA": (28, 12), "relu": (38.5, 5), "YB": (49.5, 12),
           "g": (61, 4.5), "Z": (71, 9), "fc": (82, 9), "loss": (93, 8)}
ROW = 16  # vertical distance between ranks


def box(ax, column, y, text, color, height=11, columns=COLUMNS):
    x, w = columns[column]
    ax.add_patch(FancyBboxPatch((x - w / 2, y - height / 2), w, height, boxstyle="round,pad=0.4",
                                fc=color, ec="#555555", lw=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=8.5)


def arrow(ax, a, b, y, columns=COLUMNS):
    (xa, wa), (xb, wb) = columns[a], columns[b]
    ax.annotate("", xy=(xb - wb / 2 - 0.5, y), xytext=(xa + wa / 2 + 0.5, y),
                arrowprops=dict(arrowstyle="-|>", color="#333333", lw=1))


def outside_boxes(tp, r, input_size, batch_size, sequence_parallel):
    """(text, color) of rank r's boxes outside the split region: replicated, or its rows only."""
    if not sequence_parallel:
        return dict(X=(f"X\n{batch_size}x{input_size}\n(replicated)", REPLICATED),
                    Z=(f"Z = Σ Yi·Bi\n{batch_size}x{input_size}", REPLICATED),
                    fc=(f"fc (replicated)\n{input_size}x1\n→ {batch_size}x1", REPLICATED),
                    loss=("MSE loss\n(same on\nevery rank)", REPLICATED))
    n = batch_size // tp
    rows = f"rows {r * n}..{(r + 1) * n - 1}"
    return dict(X=(f"X{r + 1}\n{n}x{input_size}\n({rows})", ROWS),
                Z=(f"Z{r + 1}: its rows\nof Σ Yi·Bi\n{n}x{input_size}", ROWS),
                fc=(f"fc (replicated)\n{input_size}x1\n→ {n}x1", ROWS),
                loss=(f"MSE of its\n{n} rows, summed\nover ranks", ROWS))


def draw(tp, input_size, hidden_size, batch_size, path, sequence_parallel=False):
    h = hidden_size // tp
    rows = [(tp - 1 - r) * ROW + 22 for r in range(tp)]
    top, bottom = rows[0] + 9, rows[-1] - 9
    fig, ax = plt.subplots(figsize=(15, 1.55 * tp + 2.6))
    ax.set_xlim(-3, 100)
    ax.set_ylim(0, top + 9)
    ax.axis("off")

    # The tensor-parallel region, between f and g: each rank holds 1/TP of A and B.
    left, right = COLUMNS["f"][0], COLUMNS["g"][0]
    ax.add_patch(Rectangle((left, bottom), right - left, top - bottom,
                           fc="#f4f8fc", ec="#9bbbd9", ls="--", lw=1, zorder=0))
    ax.text((COLUMNS["f"][0] + COLUMNS["g"][0]) / 2, top + 1.5,
            f"tensor-parallel region: rank i holds A_i ({input_size}x{h}, its rows of "
            f"mlp.fc1.weight) and B_i ({h}x{input_size}, its columns of mlp.fc2.weight)",
            ha="center", fontsize=9, color="#3a6ea5")

    for r, y in enumerate(rows):
        i = r + 1
        ax.text(-2.5, y, f"rank {r}", ha="left", va="center", fontsize=9, fontweight="bold")
        outside = outside_boxes(tp, r, input_size, batch_size, sequence_parallel)
        box(ax, "X", y, *outside["X"])
        box(ax, "XA", y, f"X·A{i}\n{batch_size}x{input_size} · {input_size}x{h}\n"
                         f"= {batch_size}x{h}", COMPUTE)
        box(ax, "relu", y, f"ReLU\n→ Y{i}", COMPUTE)
        box(ax, "YB", y, f"Y{i}·B{i}\n{batch_size}x{h} · {h}x{input_size}\n= "
                         f"{batch_size}x{input_size} (partial)",
            COMPUTE)
        for column in ("Z", "fc", "loss"):
            box(ax, column, y, *outside[column])
        for a, b in [("X", "f"), ("f", "XA"), ("XA", "relu"), ("relu", "YB"), ("YB", "g"),
                     ("g", "Z"), ("Z", "fc"), ("fc", "loss")]:
            arrow(ax, a, b, y)

    # f and g span every rank: they are the only places ranks talk to each other.
    mid, span = (top + bottom) / 2, top - bottom - 2
    shape = f"{batch_size}x{input_size}"
    if not sequence_parallel:
        f, g = "f", "g"
        f_note = ("f   forward: identity\n    backward: all-reduce dL/dX\n"
                  f"    ({shape}; skipped when X\n    needs no gradient, as here)")
        g_note = f"g   forward: all-reduce Σ Yi·Bi\n    ({shape})\n    backward: identity"
        title = (f"Tensor-parallel ToyModel, TP={tp} "
                 "(after Megatron-LM, Shoeybi et al. 2019, Fig. 3a)")
    else:
        f, g = "all-\ngather\nrows", "reduce-\nscatter\nrows"
        f_note = (f"f → forward: all-gather X's rows ({shape})\n"
                  "    backward: reduce-scatter dL/dX (skipped:\n    X needs no gradient, as "
                  "here)\n    fc1 saves only Xi and all-gathers it\n    again in backward for "
                  "dL/dA_i")
        g_note = (f"g → forward: reduce-scatter Σ Yi·Bi ({shape})\n"
                  "    backward: all-gather dL/dZ\n    after backward: one all-reduce of fc's\n    "
                  f"gradient and the loss ({input_size + 1} floats)")
        title = (f"Sequence-parallel ToyModel, TP={tp} (after Korthikanti et al. 2022, Sec. 4.2.2; "
                 f"green: this rank's rows only)")
    box(ax, "f", mid, f, COMM, height=span)
    box(ax, "g", mid, g, COMM, height=span)
    for column, note in (("f", f_note), ("g", g_note)):
        ax.text(COLUMNS[column][0], bottom - 2.5, note, ha="left", va="top", fontsize=8.5,
                family="monospace")
    ax.text(50, top + 6, f"{title}: input {input_size}, hidden {hidden_size}, batch {batch_size}",
            ha="center", fontsize=11)
    ax.set_ylim(bottom - 13, top + 9)
    fig.tight_layout()
    save(fig, path)
    return [t.get_text() for t in ax.texts]  # what the figure says, for the tests


# ---------------------------------------------------------------------------
# The toy transformer (--model transformer).
#
# One row per tensor-parallel rank, left to right: the tokens; this rank's rows
# of the word embeddings and g's all-reduce of the lookups; one block, with f
# before this rank's heads (Fig. 3b) and g after the output projection, f before
# this rank's MLP columns and g after its rows (Fig. 3a); f before the output
# layer, this rank's vocabulary slice of the logits, and the cross-entropy's
# two small all-reduces. Replicated pieces (positions, LayerNorms, residuals)
# are grey; the orange operators are the only places the ranks talk.

TRANSFORMER_COLUMNS = {"tok": (3.5, 6), "emb": (12, 8.5), "g0": (19, 2.5), "ln1": (24.5, 6),
           "f1": (30, 2.5), "attn": (38, 10.5), "g1": (46, 2.5), "ln2": (51.5, 6),
           "f2": (57, 2.5), "mlp": (64.5, 9.5), "g2": (72, 2.5), "f3": (76.5, 2.5),
           "logits": (84, 9), "ar": (91, 2.5), "ce": (97, 5.5)}


def draw_transformer(tp, width, heads, vocab_size, seq_length, batch_size, path):
    """The picture, written to `path`; returns what it says (for the tests)."""
    padded = vocab_size_with_padding(vocab_size, tp)
    v, h = padded // tp, heads // tp
    rows = [(tp - 1 - r) * ROW + 22 for r in range(tp)]
    top, bottom = rows[0] + 9, rows[-1] - 9
    fig, ax = plt.subplots(figsize=(19, 1.55 * tp + 2.8))
    ax.set_xlim(-3, 101)
    ax.axis("off")
    tokens = f"{batch_size}x{seq_length}"
    for r, y in enumerate(rows):
        ax.text(-2.5, y, f"rank {r}", ha="left", va="center", fontsize=9, fontweight="bold")
        first = r * v
        real = f"{first}..{min(first + v, vocab_size) - 1}" if first < vocab_size else "none"
        pad = f"\n+{first + v - vocab_size} padded" if first + v > vocab_size else ""
        boxes = {
            "tok": (f"tokens\n{tokens}\n(replicated)", REPLICATED),
            "emb": (f"E_{r}: vocab rows\n{real}{pad}\nothers look up 0", COMPUTE),
            "ln1": ("+ positions\nLN_1\n(replicated)", REPLICATED),
            "attn": ((f"head {r}" if h == 1 else f"heads {r * h}..{r * h + h - 1}")
                     + "\nQKV, softmax·V,\ndense: their columns", COMPUTE),
            "ln2": ("+ residual\nLN_2\n(replicated)", REPLICATED),
            "mlp": (f"fc1: A_{r}\nReLU\nfc2: B_{r} (partial)", COMPUTE),
            "logits": (f"+ residual, LN_f\nlogits of vocab\n{first}..{first + v - 1}"
                       f"\n{tokens}x{v}", COMPUTE),
            "ce": ("loss\n(same on\nevery\nrank)", REPLICATED),
        }
        for column, (text, color) in boxes.items():
            box(ax, column, y, text, color, columns=TRANSFORMER_COLUMNS)
        order = list(TRANSFORMER_COLUMNS)
        for a, b in zip(order, order[1:]):
            arrow(ax, a, b, y, columns=TRANSFORMER_COLUMNS)
    mid, span = (top + bottom) / 2, top - bottom - 2
    for column, text in (("g0", "g"), ("f1", "f"), ("g1", "g"), ("f2", "f"), ("g2", "g"),
                         ("f3", "f"), ("ar", "all-\nreduce\nmax,\nΣexp,\nz_t")):
        box(ax, column, mid, text, COMM, height=span, columns=TRANSFORMER_COLUMNS)
    notes = (f"g after the embedding: all-reduce of the lookups ({tokens}x{width}).  "
             f"Block: f (backward all-reduce) before this rank's heads and MLP columns, g "
             f"(forward all-reduce) after their row-parallel outputs: 2 + 2 per block "
             f"(Fig. 4).\nOutput layer tied to E: f, then this rank's {v} vocabulary columns; "
             f"the cross-entropy all-reduces the max, the sum of exponentials and the target's "
             f"logit ({tokens} numbers each), never the {tokens}x{vocab_size} logits.")
    ax.text(50, bottom - 2.5, notes, ha="center", va="top", fontsize=8.5)
    title = (f"Tensor-parallel ToyTransformer, TP={tp} (after Megatron-LM, Sec. 3, Fig. 3b): "
             f"width {width}, {heads} heads, vocabulary {vocab_size}"
             + (f" (padded to {padded})" if padded != vocab_size else "")
             + f", batch {batch_size}, sequence {seq_length}")
    ax.text(50, top + 4, title, ha="center", fontsize=11)
    ax.set_ylim(bottom - 11, top + 8)
    fig.tight_layout()
    save(fig, path)
    return [t.get_text() for t in ax.texts]


def draw_stages(pp, virtual, num_layers, model, path):
    """The pipeline's stages (Narayanan et al., 2021): one row per stage, its chunks of layers
    (Megatron's layout: chunk c of stage r holds layers (c P + r) L ... (c P + r + 1) L - 1),
    the point-to-point sends between them and the tied embeddings' sum; returns its texts."""
    fig, ax = plt.subplots(figsize=(4.2 * virtual + 5, 1.3 * pp + 2.2))
    ax.set_xlim(-4, 100)
    ax.axis("off")
    width = 88 / virtual
    rows = [(pp - 1 - s) * ROW + 12 for s in range(pp)]
    for s, y in enumerate(rows):
        ax.text(-3.5, y, f"stage {s}", ha="left", va="center", fontsize=9, fontweight="bold")
        for c in range(virtual):
            layers = chunk_layers(num_layers, pp, s, virtual, c)
            if model == "toy":
                text = "MLP: fc1, ReLU, fc2" if s == 0 else "fc, loss"
            else:
                text = (("embeddings\n" if s == 0 and c == 0 else "")
                        + (f"block {layers[0]}" if len(layers) == 1 else
                           f"blocks {layers[0]}..{layers[-1]}")
                        + ("\nLN_f, output layer\n(embeddings' copy), loss"
                           if s == pp - 1 and c == virtual - 1 else ""))
            x = 6 + c * width + width / 2
            ax.add_patch(FancyBboxPatch((x - width * 0.38, y - 5.5), width * 0.76, 11,
                                        boxstyle="round,pad=0.4", fc=COMPUTE, ec="#555555"))
            ax.text(x, y, (f"chunk {c}: " if virtual > 1 else "") + text, ha="center",
                    va="center", fontsize=8)
            if s < pp - 1:  # the activation forward, its gradient back
                ax.annotate("", (x, rows[s + 1] + 6), (x, y - 6),
                            arrowprops=dict(arrowstyle="<->", color="#c26a00"))
            elif c < virtual - 1:  # the last stage's chunk c on to stage 0's chunk c + 1
                ax.annotate("", (x + width * 0.62, rows[0] - 5), (x + width * 0.38, y + 5),
                            arrowprops=dict(arrowstyle="<->", color="#c26a00", ls="--"))
    notes = ("orange: point to point, the activation down to the next stage, its gradient back "
             "up (a micro-batch at a time)")
    if virtual > 1:
        notes += f";\nthe last stage's chunk c sends on to stage 0's chunk c + 1 ({virtual} laps)"
    if model == "transformer" and pp > 1:
        notes += ";\nthe embeddings on stage 0 and their copy on the last stage: gradients " \
                 "summed over the embedding group after backward"
    ax.text(50, rows[-1] - 9, notes, ha="center", va="top", fontsize=8.5)
    title = (f"Pipeline parallelism, {pp} stages" + (f" x {virtual} chunks" if virtual > 1
                                                     else "") + f": the {model}"
             + (f", {num_layers} blocks" if model == "transformer" else ""))
    ax.text(50, rows[0] + 9, title, ha="center", fontsize=11)
    ax.set_ylim(rows[-1] - 16, rows[0] + 13)
    fig.tight_layout()
    save(fig, path)
    return [t.get_text() for t in ax.texts]


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])  # one-line errors
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    p.add_argument("--input_size", type=int, default=64)
    p.add_argument("--hidden_size", type=int, default=None, help="default: 32 x input_size")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--sequence_parallel", action="store_true",
                   help="draw sequence parallelism: rows split outside the tensor-parallel region")
    p.add_argument("--out", default=None,
                   help="default: assets/toy_tensor_parallel.png, or "
                        "assets/toy_sequence_parallel.png")
    p.add_argument("--model", choices=["toy", "transformer"], default="toy",
                   help="transformer: the block of transformer.py, split by heads and vocabulary "
                        "(assets/transformer_tensor_parallel.png)")
    p.add_argument("--vocab_size", type=int, default=50, help="transformer")
    p.add_argument("--seq_length", type=int, default=16, help="transformer")
    p.add_argument("--num_attention_heads", type=int, default=4, help="transformer")
    p.add_argument("--pp", type=int, default=None,
                   help="draw the pipeline's stages instead (assets/pipeline_stages.png)")
    p.add_argument("--virtual", type=int, default=None, help="with --pp: chunks per stage "
                                                              "(default 1)")
    p.add_argument("--num_layers", type=int, default=None,
                   help="with --pp: the transformer's blocks (default: one per chunk)")
    args = p.parse_args(argv)
    given = given_flags(p, argv)
    if args.pp is not None:
        return stages_main(p, args, [flag for flag in TENSOR_PARALLEL_ONLY if flag in given])
    if pipeline_only := [flag for flag in ("--virtual", "--num_layers") if flag in given]:
        p.error(f"{' and '.join(pipeline_only)} draw{'s' if len(pipeline_only) == 1 else ''} "
                "the pipeline's stages: add --pp P (e.g. --pp 2 --virtual 2 --model transformer)"
                "; without --pp the picture is the tensor-parallel split")
    sizes = ["tp", "input_size", "batch_size", "hidden_size", "vocab_size", "seq_length",
             "num_attention_heads"]
    for name in sizes:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    kind = "sequence" if args.sequence_parallel else "tensor"
    default = ("assets/transformer_tensor_parallel.png" if args.model == "transformer" else
               f"assets/toy_{kind}_parallel.png")
    check_output(p, "--out", args.out or default, ".png")
    if args.model == "transformer":
        if args.num_attention_heads % args.tp:
            p.error(f"--num_attention_heads {args.num_attention_heads} must be divisible by "
                    f"--tp {args.tp}")
        out = args.out or default
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        return draw_transformer(args.tp, args.input_size, args.num_attention_heads,
                                args.vocab_size, args.seq_length, args.batch_size, out)
    hidden = args.hidden_size or 32 * args.input_size
    if hidden % args.tp:
        p.error(f"--hidden_size {hidden} is not divisible by --tp {args.tp}")
    if args.sequence_parallel and args.batch_size % args.tp:
        p.error(f"--sequence_parallel splits the {args.batch_size} rows of a batch between "
                f"{args.tp} ranks: choose a --batch_size divisible by --tp")
    out = args.out or default
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    return draw(args.tp, args.input_size, hidden, args.batch_size, out, args.sequence_parallel)


# The tensor-parallel picture's flags, which the pipeline's (--pp) does not draw.
TENSOR_PARALLEL_ONLY = ("--tp", "--sequence_parallel", "--input_size", "--hidden_size",
                        "--batch_size", "--vocab_size", "--seq_length", "--num_attention_heads")


def stages_main(p, args, left_out=()):
    """draw_diagram.py --pp: its checks, then the picture; a note on the flags of the
    tensor-parallel picture given (left_out), which this one does not draw."""
    args.virtual = 1 if args.virtual is None else args.virtual
    if args.pp <= 0 or args.virtual <= 0:
        p.error(f"--pp and --virtual must be positive integers, got {args.pp} and {args.virtual}")
    if args.model == "toy" and (args.pp != 2 or args.virtual != 1):
        p.error("the toy model has two stages (the MLP | fc): --pp 2, no --virtual; or --model "
                "transformer")
    layers = args.num_layers or args.pp * args.virtual
    if layers % (args.pp * args.virtual):
        p.error(f"--num_layers {layers} cannot be split evenly into {args.pp * args.virtual} "
                "chunks")
    out = args.out or "assets/pipeline_stages.png"
    check_output(p, "--out", out, ".png")
    if left_out:
        print(f"note: --pp draws the pipeline's stages only (one row per stage, its chunks and "
              f"blocks); {' and '.join(left_out)} {'is' if len(left_out) == 1 else 'are'} left "
              "out of it: draw the tensor-parallel picture without --pp")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    return draw_stages(args.pp, args.virtual, layers, args.model, out)


if __name__ == "__main__":
    main()
