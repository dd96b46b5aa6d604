"""Context parallelism's balance, time and activations per rank, measured against the formulas.

    python -m benchmarks.bench_context_parallel          # assets/context_parallel.png and .json
    python -m benchmarks.bench_context_parallel --quick  # C = 2 only: runs/context_parallel_quick.*

On 2 CPU cores shared with other work (AMD EPYC): 13 s, and 6 s with --quick; each C a
torchrun launch of its own.

Each point is C ranks (gloo, one thread each, TP 1) holding s/C tokens of one sequence
(core/context_parallel/), the load-balanced split and the plain one side by side:

1. Work per rank, counted. One forward of the ring (ring_attention, Liu et al., 2023) with
   attention.TRACE on: the query-chunk x key-chunk pairs each rank computes (the causal mask
   zeroes the others whole), and their score elements. Under a causal mask query i sees i + 1
   keys, so the plain split (rank r keeps chunk r of C) gives rank r r + 1 blocks of (s/C)^2:
   max / mean = 2C / (C + 1). Megatron's get_batch_on_this_cp_rank cuts the sequence into 2C
   chunks and gives rank r chunks r and 2C - 1 - r, a short row and a long one: every rank
   2C + 1 of its 4C blocks of (s/2C)^2, max / mean = 1. The counts must equal these exactly.

2. Time of the ring's forward. On 2 shared cores real compute would measure the operating
   system's scheduler (bench_pipeline.py sleeps its stages for the same reason), so each block
   sleeps T x its score elements / (s/C)^2 and needs no core. The ring's steps are synchronous
   (step t + 1 waits for the K/V the previous rank sent after step t), so the forward takes the
   sum over steps of the busiest rank's work: plain C T (rank C - 1 computes a whole block at
   every step), load-balanced (2C + 1) T / 4 (3 blocks of (s/2C)^2 at step 0, 2 at every
   other): plain / balanced = 4C / (2C + 1), 1.6 at C = 2, 1.78 at C = 4, 2 as C grows.
   (Measured 2 to 12 ms above it with T = 20 ms: the formula leaves out the C - 1 transfers
   and the merges.)

3. Activations per rank. The bytes autograd holds for backward after the forward and the loss
   of the toy transformer (transformer.py), every storage counted once at its size (parameters
   aside), at C = 1 and on each of C context ranks, for each way of attending (p2p, all_gather,
   a2a), load-balanced. Everything per token (embeddings, LayerNorms, the MLP, the QKV and
   dense layers' inputs, the loss, the positions' index) is 1/C of C = 1's. The
   attention core (SelfAttention.core_attention) is not 1/C (`core_bytes`, term by term):

       p2p         the C - 1 K/V blocks received (and its own, stacked): all of K/V, as serial
       all_gather  the gathered K/V: all of it, as serial
       a2a         Q, K, V of the whole sequence for heads / C: 1/C of serial's, exactly
       all three   the probabilities of the computed blocks only, (2C + 1) / 4C^2 of serial's
                   s x s (less than 1/C: the skipped blocks hold nothing), their masks, and the
                   online softmax's per-row bookkeeping (each block's output and log-sum-exp,
                   kept for the merges' backward)

4. The picture: the chunks each rank holds, the s x s attention matrix cut into the pairs, each
   computed one coloured by its rank and labelled with its ring step, the counted work, the
   times and the activations against their formulas.
"""

import os
import statistics
import sys
import time
import weakref
from fractions import Fraction

import torch
import torch.distributed as dist

from benchmarks.configs import cpu_name
from benchmarks.launcher import driver_args, driver_cli, launch, print_result, write_results
from core import parallel_state as ps
from core import wire
from core.context_parallel import attention
from core.context_parallel.split import (
    context_parallel_setup,
    get_batch_on_this_cp_rank,
    get_positions_on_every_cp_rank,
)
from core.tensor_parallel.random import model_parallel_manual_seed
from training import initialize
from transformer import ToyTransformer

SIZES, QUICK_SIZES = (2, 4), (2,)  # the context-parallel sizes C
# One ring forward counted: q, k, v (batch, heads, seq, head_dim), float64.
WORK = dict(batch=1, heads=2, seq=64, head_dim=8)
# The ring on sleeping blocks: T seconds per (s/C)^2 block, timed `repeats` times after a warm-up.
SLEEP = dict(block_s=0.020, repeats=7)
QUICK_SLEEP = dict(block_s=0.010, repeats=3)
# The toy transformer whose activations are counted (float32, dropout 0).
MODEL = dict(vocab=50, seq=64, width=32, hidden=128, heads=4, layers=2, batch=4)
VARIANTS = ("p2p", "all_gather", "a2a")
SPLITS = {"balanced": True, "plain": False}
ATOL = 1e-12  # the ring against serial attention, float64 (round-off: ~1e-15)


# ---------------------------------------------------------------------------
# The worker: C ranks, one point.

def worker(args):
    """On each of C ranks: the counted work and the sleeping times of both splits, the saved
    bytes of every variant and of C = 1; rank 0 prints them."""
    torch.set_num_threads(1)
    initialize.init_distributed("gloo", timeout_minutes=5, device="cpu")
    c, rank = dist.get_world_size(), dist.get_rank()
    ps.initialize_model_parallel(1, 1, None, context_parallel_size=c)
    block = attention._block
    try:
        result = dict(
            C=c, work=WORK, model=MODEL, block_s=args.block_s,
            trace={name: count_work(lb) for name, lb in SPLITS.items()},
            times={name: time_ring(lb, args.block_s, args.repeats, args.warmup)
                   for name, lb in SPLITS.items()},
            memory=saved_bytes_of_every_variant())
    finally:  # the test session's rank processes run other tests next
        attention.TRACE, attention._block = None, block
    ps.destroy_model_parallel()
    if rank == 0:
        print_result(result)


def _gather(rows):
    """Every rank's `rows` (a tensor of the same shape on each), in rank order, as lists."""
    return wire.all_gather(rows.contiguous(), dist.group.WORLD).view(-1, *rows.shape).tolist()


def _serial_attention(q, k, v):
    """transformer.py's core_attention on the whole sequence, the reference."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    causal = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).triu(1)
    return scores.masked_fill(causal, float("-inf")).softmax(-1) @ v


def count_work(load_balanced):
    """Every rank's TRACE of one ring forward: [q first, q last, k first, k last, computed,
    ring step] per query-chunk x key-chunk pair. The step is (r - owner) mod C, the owner the
    rank whose positions hold the keys. The output is checked against serial attention."""
    c, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)  # the same sequence on every rank
    shape = (WORK["batch"], WORK["heads"], WORK["seq"], WORK["head_dim"])
    q, k, v = (torch.randn(shape, dtype=torch.float64, generator=g) for _ in range(3))
    positions = get_positions_on_every_cp_rank(WORK["seq"], c, load_balanced)
    mine = lambda t: get_batch_on_this_cp_rank(t, 2, c, rank, load_balanced)
    attention.TRACE = []
    try:
        out = attention.ring_attention(mine(q), mine(k), mine(v), positions,
                                       ps.get_context_parallel_group())
        trace = attention.TRACE
    finally:
        attention.TRACE = None
    error = (out - mine(_serial_attention(q, k, v))).abs().max().item()
    if error > ATOL:
        raise RuntimeError(f"the ring's output is not serial attention's on rank {rank}: "
                           f"max abs error {error:.2e}")
    owner = {p: r for r in range(c) for p in positions[r].tolist()}
    rows = [[*pair[:4], int(pair[4]), (rank - owner[pair[2]]) % c] for pair in trace]
    return _gather(torch.tensor(rows))


def time_ring(load_balanced, block_s, repeats, warmup):
    """Seconds of the ring's forward on sleeping blocks, per repeat the slowest rank's: each
    block sleeps block_s x (its q rows x k rows) / (s/C)^2 and returns zeros (out and lse),
    which the merges take like any block's."""
    c, s = dist.get_world_size(), WORK["seq"]
    positions = get_positions_on_every_cp_rank(s, c, load_balanced)
    q = k = v = torch.zeros(WORK["batch"], WORK["heads"], s // c, WORK["head_dim"])

    def sleeping_block(q, k, v, q_pos, k_pos, dropout=0.0):
        time.sleep(block_s * q.shape[-2] * k.shape[-2] / (s // c) ** 2)
        return q.new_zeros(*q.shape[:-1], v.shape[-1]), q.new_zeros(*q.shape[:-1], 1)

    block, attention._block = attention._block, sleeping_block
    times = []
    try:
        with torch.no_grad():
            for _ in range(warmup + repeats):
                dist.barrier()
                start = time.perf_counter()
                attention.ring_attention(q, k, v, positions, ps.get_context_parallel_group())
                times.append(time.perf_counter() - start)
    finally:
        attention._block = block
    per_rank = _gather(torch.tensor(times[warmup:], dtype=torch.float64))
    return [max(column) for column in zip(*per_rank)]


class SavedStorages:
    """saved_tensors_hooks that note every tensor autograd saves for backward, and where: in the
    attention core (`region` "core") or elsewhere ("rest"). `held()`: the bytes of the storages
    still held, each counted once at its size, parameters aside. (bench_pipeline.py's SavedBytes
    counts each saved tensor's own elements; here views of one storage, as the attention's
    q, k and v of the QKV layer's output, hold that storage once, whole.)"""

    def __init__(self, parameters):
        self.params = {p.untyped_storage().data_ptr() for p in parameters}
        self.saved, self.region = [], "rest"

    def pack(self, t):
        # A detached alias: a node that saves its own output, given back that output, would hold
        # itself (node -> tensor -> grad_fn) and never be freed, nor its branch cut by .detach().
        t = t.detach()
        self.saved.append((weakref.ref(t), self.region))
        return t

    @staticmethod
    def unpack(t):
        return t

    def held(self):
        storages = {}
        for ref, region in self.saved:
            t = ref()
            if t is not None and t.untyped_storage().data_ptr() not in self.params:
                storage = t.untyped_storage()
                storages.setdefault(storage.data_ptr(), (region, storage.nbytes()))
        return {region: sum(n for r, n in storages.values() if r == region)
                for region in ("core", "rest")}


def saved_bytes(variant):
    """{"core", "rest"}: bytes held for backward after the toy transformer's forward and loss;
    variant None: this rank alone on the whole sequence (C = 1), else this context rank's
    tokens."""
    m = MODEL
    model_parallel_manual_seed(0)  # the same model on every rank
    setup = None if variant is None else context_parallel_setup(m["seq"], variant, True)
    model = ToyTransformer(m["vocab"], m["seq"], m["width"], m["hidden"], m["heads"],
                           m["layers"], tensor_parallel=True, context_parallel=setup)
    tokens = torch.randint(m["vocab"], (m["batch"], m["seq"] + 1),
                           generator=torch.Generator().manual_seed(0))
    # Copies: a view would hold the (batch, s + 1) storage, one column more than the inputs.
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if variant is not None:
        c, rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        inputs, targets = (get_batch_on_this_cp_rank(t, 1, c, rank, True)
                           for t in (inputs, targets))
    counter = SavedStorages(model.parameters())
    for block in model.blocks.values():  # this instance's core_attention, marked "core"
        block.attention.core_attention = _in_core(counter, block.attention.core_attention)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        loss = model.loss(model(inputs), targets)
    held = counter.held()
    del loss
    return held


def _in_core(counter, core_attention):
    """core_attention, its saved tensors counted as the core's."""
    def marked(*args):
        counter.region = "core"
        try:
            return core_attention(*args)
        finally:
            counter.region = "rest"
    return marked


def saved_bytes_of_every_variant():
    """{None (C = 1) and each variant: every rank's [core, rest]}."""
    rows = [saved_bytes(variant) for variant in (None, *VARIANTS)]
    per_rank = _gather(torch.tensor([[r["core"], r["rest"]] for r in rows]))
    return {name: [rank[i] for rank in per_rank]
            for i, name in enumerate(("C=1", *VARIANTS))}


# ---------------------------------------------------------------------------
# The formulas and the report (the driver).

def work_formula(c, load_balanced, seq, rows):
    """Score elements each rank computes: plain r + 1 blocks of (s/C)^2, load-balanced 2C + 1
    blocks of (s/2C)^2; `rows` = batch x heads."""
    if load_balanced:
        return [(2 * c + 1) * (seq // (2 * c)) ** 2 * rows] * c
    return [(r + 1) * (seq // c) ** 2 * rows for r in range(c)]


def counted_work(trace, rows):
    """Score elements of each rank's computed pairs (pieces are runs of consecutive positions)."""
    return [sum((ql - qf + 1) * (kl - kf + 1) * rows for qf, ql, kf, kl, computed, _ in pairs
                if computed) for pairs in trace]


def imbalance(work):
    """max / mean, exactly."""
    return Fraction(max(work)) / Fraction(sum(work), len(work))


def time_formula(c, load_balanced, block_s):
    """The ring's forward: the sum over its C steps of the busiest rank's sleep."""
    return block_s * ((2 * c + 1) / 4 if load_balanced else c)


def report_point(r):
    """The point's numbers beside their formulas; exits if a count is not the formula's."""
    c, w = r["C"], r["work"]
    rows = w["batch"] * w["heads"]
    out = dict(C=c, block_s=r["block_s"])
    for name, lb in SPLITS.items():
        counted, formula = counted_work(r["trace"][name], rows), work_formula(c, lb, w["seq"],
                                                                               rows)
        if counted != formula:
            sys.exit(f"error: C={c} {name}: the ring computed {counted} score elements per rank, "
                     f"the formula says {formula}")
        measured, expected = statistics.median(r["times"][name]), time_formula(c, lb,
                                                                              r["block_s"])
        out[name] = dict(work=counted, imbalance=float(imbalance(counted)),
                         imbalance_formula=float(Fraction(2 * c, c + 1) if not lb else 1),
                         time_s=measured, time_formula_s=expected, times_s=r["times"][name])
        print(f"C={c} {name:>8}: score elements per rank {counted}, max/mean "
              f"{out[name]['imbalance']:.3f} (formula {out[name]['imbalance_formula']:.3f}); "
              f"ring forward {1e3 * measured:.1f} ms (formula {1e3 * expected:.1f})", flush=True)
    ratio = out["plain"]["time_s"] / out["balanced"]["time_s"]
    out["time_ratio"], out["time_ratio_formula"] = ratio, 4 * c / (2 * c + 1)
    print(f"C={c} plain / balanced time {ratio:.3f} (formula 4C/(2C+1) = "
          f"{out['time_ratio_formula']:.3f})", flush=True)
    out["memory"] = report_memory(c, r["memory"])
    return out


def core_bytes(variant, c, rank, m=MODEL):
    """Bytes one layer's attention core holds for backward on context rank `rank` (float32, the
    masks' bools 1 byte), term by term from the operations of transformer.py (c = 1) and
    attention.py (load-balanced): {"qkv", "kv", "probabilities", "online_softmax"}."""
    b, s, w, h = m["batch"], m["seq"], m["width"], m["heads"]
    if c == 1:  # q, k, v: views of the QKV layer's output; the causal mask; softmax's output
        return dict(qkv=12 * b * s * w, kv=0, probabilities=s * s + 4 * b * h * s * s,
                    online_softmax=0)
    if variant == "a2a":  # Q, K, V of the whole sequence for heads / C, copied out of the a2a
        qkv, kv, rows = 12 * b * s * w // c, 0, b * h // c
        sees = [a + 1 for a in range(2 * c)]  # query chunk a (of 2C) meets key chunks 0 .. a
    else:  # the QKV layer's output (q is a view of it) and K/V of the whole sequence: the
        # ring's C blocks, its own stacked and the C - 1 received, or all_gather's gathered
        qkv, kv, rows = 12 * b * (s // c) * w, 8 * b * s * w, b * h
        sees = [rank + 1, 2 * c - rank]  # its chunks r and 2C - 1 - r
    n, d = s // (2 * c), w // h  # a block: n queries x n keys
    blocks, merges = sum(sees), sum(sees) - len(sees)
    merged = sum(k for k in sees if k > 1)  # blocks whose lse is merged (a lone block's is not)
    return dict(qkv=qkv, kv=kv,
                probabilities=blocks * (n * n + 4 * rows * n * n),  # mask, exp's output
                # per block: p @ v and its denominator (float), the rows seen (bool); log's input
                # where the lse is merged; per merge: 5 (rows,) floats, 2 bools, both outputs
                online_softmax=blocks * (4 * rows * n * (d + 1) + rows * n) + merged * 4 * rows * n
                + merges * (4 * rows * (5 * n + 2 * n * d) + 2 * rows * n))


def memory_formula(c, variant, rank, rest_serial, m=MODEL):
    """A context rank's bytes: 1/C of C = 1's outside the attention core, plus every layer's
    core."""
    rest = rest_serial // c
    return rest + m["layers"] * sum(core_bytes(variant, c, rank).values())


def report_memory(c, memory):
    """Each variant's bytes per rank against C = 1's, beside 1/C and the formula."""
    serial_core, serial_rest = memory["C=1"][0]
    serial = serial_core + serial_rest
    layers = MODEL["layers"]
    out = dict(serial_bytes=serial, serial_core=serial_core, serial_rest=serial_rest,
               serial_core_formula=layers * sum(core_bytes(None, 1, 0).values()),
               one_over_c=1 / c)
    for variant in VARIANTS:
        per_rank = [sum(r) for r in memory[variant]]
        formula = [memory_formula(c, variant, r, serial_rest) for r in range(c)]
        terms = {k: layers * v for k, v in core_bytes(variant, c, 0).items()}
        out[variant] = dict(bytes=per_rank, formula=formula, match=per_rank == formula,
                            core=[r[0] for r in memory[variant]],
                            rest=[r[1] for r in memory[variant]],
                            ratio=[b / serial for b in per_rank], core_terms_rank0=terms)
        print(f"C={c} {variant:>10}: saved per rank {[round(b / 1024, 1) for b in per_rank]} KiB"
              f" = {[round(b / serial, 3) for b in per_rank]} of C=1's {serial / 1024:.1f} KiB "
              f"(1/C = {1 / c:.3f}); formula {'equal' if per_rank == formula else formula}; "
              f"rank 0's attention core, KiB: " + ", ".join(
                  f"{k} {v / 1024:.1f}" for k, v in terms.items())
              + f" (C=1: {serial_core / 1024:.1f})", flush=True)
    return out


# ---------------------------------------------------------------------------
# The picture.

# Ranks: tab10's first colours; the splits and the variants grey and other hues, not a rank's.
PLAIN_COLOR, BALANCED_COLOR = "0.75", "0.5"
VARIANT_COLORS = {"p2p": "tab:purple", "all_gather": "tab:brown", "a2a": "tab:olive"}


def _holders(pairs_per_rank):
    """[(first position, last, rank)] of the chunks each rank holds: its query pieces."""
    return sorted({(qf, ql, rank) for rank, pairs in enumerate(pairs_per_rank)
                   for qf, ql, *_ in pairs})


def _draw_chunks(ax, trace, c, seq, colors):
    """The sequence as 2C chunks coloured by the rank holding them, load-balanced above plain."""
    chunk = seq // (2 * c)
    for y, name in ((1, "balanced"), (0, "plain")):
        for first, last, rank in _holders(trace[name]):
            for start in range(first, last + 1, chunk):  # plain: 2 of the 2C chunks a rank
                ax.broken_barh([(start, chunk)], (y - 0.4, 0.8), facecolors=colors(rank),
                               edgecolor="white", linewidth=1.5)
                ax.text(start + chunk / 2, y, f"rank {rank}", ha="center", va="center",
                        fontsize=8, color="white", fontweight="bold")
    ax.set_yticks([1, 0], ["load-balanced:\nchunks r, 2C-1-r", "plain:\nchunk r of C"],
                  fontsize=8)
    ax.set_xticks([chunk * (i + 0.5) for i in range(2 * c)],
                  [f"chunk {i}" for i in range(2 * c)], fontsize=7)
    ax.set_xlim(0, seq)
    ax.set_xlabel(f"token position (s = {seq}, {2 * c} chunks of s/2C = {chunk})", fontsize=8)
    ax.set_title(f"Which tokens each of C = {c} context ranks holds: the sequence cut into 2C "
                 "chunks (core/context_parallel/split.py)", fontsize=10)


def _draw_matrix(ax, pairs_per_rank, c, seq, colors, title):
    """The s x s causal attention matrix cut into query-chunk x key-chunk pairs: computed ones
    coloured by their rank, labelled with the ring step; skipped ones white, hatched."""
    from matplotlib.patches import Polygon, Rectangle
    for rank, pairs in enumerate(pairs_per_rank):
        for qf, ql, kf, kl, computed, step in pairs:
            box = dict(xy=(kf, qf), width=kl - kf + 1, height=ql - qf + 1, linewidth=0.8,
                       edgecolor="white" if computed else "0.75")
            if computed:
                ax.add_patch(Rectangle(**box, facecolor=colors(rank), alpha=0.85))
                ax.text(kf + (kl - kf + 1) / 2, qf + (ql - qf + 1) / 2, str(step), ha="center",
                        va="center", fontsize=8, color="white", fontweight="bold", zorder=3)
            else:
                ax.add_patch(Rectangle(**box, facecolor="white", hatch="//"))
    # What the causal mask zeroes inside the computed blocks on the diagonal (key > query).
    ax.add_patch(Polygon([(0, 0), (seq, 0), (seq, seq)], closed=True, facecolor="white",
                         alpha=0.55, edgecolor="none", zorder=2))
    ax.plot([0, seq], [0, seq], color="0.3", linewidth=0.8, zorder=2)
    ax.set_xlim(0, seq)
    ax.set_ylim(seq, 0)
    ax.set_aspect("equal")
    ax.set_xlabel("key position", fontsize=8)
    ax.set_ylabel("query position", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)


def _draw_work(ax, point):
    """Bars of each rank's counted score elements, plain beside load-balanced."""
    c = point["C"]
    for i, (name, color) in enumerate((("plain", PLAIN_COLOR), ("balanced", BALANCED_COLOR))):
        blocks = "2C+1 blocks of (s/2C)^2" if name == "balanced" else "r+1 blocks of (s/C)^2"
        ax.bar([r + (i - 0.5) * 0.4 for r in range(c)], point[name]["work"], 0.4, color=color,
               label=f"{name}, {blocks}: max/mean {point[name]['imbalance']:.2f}")
    ax.set_xticks(range(c), [f"rank {r}" for r in range(c)], fontsize=8)
    ax.set_ylabel("score elements computed (batch x heads x q x k)", fontsize=8)
    ax.set_ylim(0, 1.3 * max(point["plain"]["work"]))  # room for the legend
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"Work per rank, counted (C = {c}): max/mean\n2C/(C+1) = "
                 f"{point['plain']['imbalance_formula']:.2f} plain, 1 load-balanced", fontsize=9)


def _draw_times(ax, points, block_s):
    """The ring's forward on sleeping blocks, plain and load-balanced at each C, the formula a
    black line over each bar."""
    for j, point in enumerate(points):
        for i, (name, color) in enumerate((("plain", PLAIN_COLOR), ("balanced", BALANCED_COLOR))):
            x = j + (i - 0.5) * 0.4
            ax.bar(x, 1e3 * point[name]["time_s"], 0.36, color=color,
                   label=name if j == 0 else None)
            ax.hlines(1e3 * point[name]["time_formula_s"], x - 0.18, x + 0.18, color="black",
                      linewidth=2, label="formula: C T and (2C+1) T / 4" if i + j == 0 else None)
        ax.text(j, 1e3 * point["plain"]["time_s"] * 1.03, f"plain / balanced\n"
                f"{point['time_ratio']:.2f} (4C/(2C+1) = {point['time_ratio_formula']:.2f})",
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(points)), [f"C = {p['C']}" for p in points], fontsize=8)
    ax.set_ylabel("ms, the slowest rank (median)", fontsize=8)
    ax.set_ylim(0, 1.35e3 * max(p["plain"]["time_s"] for p in points))
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"The ring's forward, each block sleeping\nT = {1e3 * block_s:g} ms per "
                 "(s/C)^2 score elements", fontsize=9)


def _draw_memory(ax, points):
    """Each variant's activations on context rank 0 over C = 1's, 1/C a dashed line."""
    width = 0.8 / len(VARIANTS)
    for j, point in enumerate(points):
        memory = point["memory"]
        for i, variant in enumerate(VARIANTS):
            x, ratio = j + (i - 1) * width, memory[variant]["ratio"][0]
            ax.bar(x, ratio, width * 0.9, color=VARIANT_COLORS[variant],
                   label=variant if j == 0 else None)
            ax.text(x, ratio + 0.01, f"{ratio:.2f}", ha="center", va="bottom", fontsize=7)
        ax.hlines(memory["one_over_c"], j - 0.45, j + 0.45, color="black", linestyle="--",
                  label="1/C" if j == 0 else None)
    ax.set_xticks(range(len(points)), [f"C = {p['C']}" for p in points], fontsize=8)
    ax.set_ylabel("bytes saved for backward, over C = 1's", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("Activations saved on context rank 0, over C = 1's\n(the attention core is "
                 "not 1/C; each equals its formula)" if all(
                     p["memory"][v]["match"] for p in points for v in VARIANTS) else
                 "Activations saved on context rank 0, over C = 1's\n(NOT the formula: see the "
                 "report)", fontsize=9)


def plot(points, trace, path):
    """The chunks, the attention matrix of both splits at the largest C, and the measurements."""
    import matplotlib.pyplot as plt

    from plot_runs import save  # first: it sets the Agg backend
    point = points[-1]
    c, seq = point["C"], WORK["seq"]
    colors = plt.get_cmap("tab10")
    fig = plt.figure(figsize=(13, 14))
    grid = fig.add_gridspec(3, 6, height_ratios=[0.9, 3.2, 2.2])
    _draw_chunks(fig.add_subplot(grid[0, :]), trace, c, seq, colors)
    steps = f"number: the ring step, 0 .. {c - 1}; hatched: skipped"
    for col, (name, lb) in enumerate(SPLITS.items()):
        blocks = (f"every rank 2C+1 = {2 * c + 1} of its 4C = {4 * c} blocks" if lb else
                  f"rank r r+1 of its C = {c} blocks")
        _draw_matrix(fig.add_subplot(grid[1, 3 * col:3 * col + 3]), trace[name], c, seq, colors,
                     f"{'Load-balanced' if lb else 'Plain'} split: {blocks}\n(colour: the rank "
                     f"computing the block; {steps})")
    _draw_work(fig.add_subplot(grid[2, 0:2]), point)
    _draw_times(fig.add_subplot(grid[2, 2:4]), points, point["block_s"])
    _draw_memory(fig.add_subplot(grid[2, 4:6]), points)
    fig.suptitle("Context parallelism: the causal load balance of Megatron's "
                 "get_batch_on_this_cp_rank\nin the ring of Ring Attention (Liu et al., 2023), "
                 "counted and timed", fontsize=12)
    fig.tight_layout()
    save(fig, path)


def main():
    args = driver_args(__doc__, "context_parallel", "context",
                       ("block_s", "repeats", "steps", "warmup", "threads", "config", "device"))
    if args.worker:
        args.block_s, args.repeats, args.warmup = float(args.block_s), int(args.steps), \
            int(args.warmup)
        return worker(args)
    sleep = QUICK_SLEEP if args.quick else SLEEP
    runs, points = [], []
    for c in QUICK_SIZES if args.quick else SIZES:
        r = launch("context", "none", sleep["repeats"], 1, ranks=c,
                   extra=("--block_s", str(sleep["block_s"])),
                   module="benchmarks.bench_context_parallel")
        runs.append(r)
        points.append(report_point(r))
    print(f"measured on {cpu_name()}, {os.cpu_count()} cores")
    report = dict(machine=dict(processor=cpu_name(), cpu_count=os.cpu_count(),
                               torch=torch.__version__), work=WORK, model=MODEL,
                  block_s=sleep["block_s"], points=points,
                  traces={r["C"]: r["trace"] for r in runs})
    write_results(report, args.out, lambda path: plot(points, runs[-1]["trace"], path),
                  args.plot)


if __name__ == "__main__":
    driver_cli(main)
