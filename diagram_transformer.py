"""Draw the toy transformer split across ranks (draw_diagram.py --model transformer).

One row per tensor-parallel rank, left to right: the tokens; this rank's rows
of the word embeddings and g's all-reduce of the lookups; one block, with f
before this rank's heads (Fig. 3b) and g after the output projection, f before
this rank's MLP columns and g after its rows (Fig. 3a); f before the output
layer, this rank's vocabulary slice of the logits, and the cross-entropy's
two small all-reduces. Replicated pieces (positions, LayerNorms, residuals)
are grey; the orange operators are the only places the ranks talk.
"""

import matplotlib.pyplot as plt

from draw_diagram import COMM, COMPUTE, REPLICATED, ROW, arrow, box
from parallel_layers import vocab_size_with_padding
from plot_runs import save

COLUMNS = {"tok": (3.5, 6), "emb": (12, 8.5), "g0": (19, 2.5), "ln1": (24.5, 6),
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
            box(ax, column, y, text, color, columns=COLUMNS)
        order = list(COLUMNS)
        for a, b in zip(order, order[1:]):
            arrow(ax, a, b, y, columns=COLUMNS)
    mid, span = (top + bottom) / 2, top - bottom - 2
    for column, text in (("g0", "g"), ("f1", "f"), ("g1", "g"), ("f2", "f"), ("g2", "g"),
                         ("f3", "f"), ("ar", "all-\nreduce\nmax,\nΣexp,\nz_t")):
        box(ax, column, mid, text, COMM, height=span, columns=COLUMNS)
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
