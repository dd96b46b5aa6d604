"""Causal attention over a sequence split across the C ranks of a context-parallel group: three
ways to let each rank's queries meet every key they may see, each equal to serial attention.

    ring_attention        p2p (Liu et al., 2023, Ring Attention; TE's AttnFuncWithCPAndKVP2P):
                          C - 1 steps, K/V passed to rank r + 1, partial results merged by
                          log-sum-exp; blocks the causal mask zeroes are not computed
    all_gather_attention  Llama 3 (Dubey et al., 2024, Sec. 3.3.2): all-gather K/V, attend
                          locally; backward reduce-scatters dK/dV
    a2a_attention         DeepSpeed-Ulysses (Jacobs et al., 2023): all-to-all from "my tokens,
                          all heads" to "all tokens, heads / C", attend, all-to-all back

Layout: q, k, v are (batch, heads, s / C, head_dim), this rank's tokens for its heads, as
transformer.py's SelfAttention.core_attention takes them; the output has the same layout.
`positions` is the (C, s / C) table of every rank's global positions (split.py); query i sees
key j iff positions j <= i. `group` is the context-parallel process group.

Partial attention, the online softmax (Milakov and Gimelshein, 2018; FlashAttention): a block of
keys gives each query row its output normalised over that block, `out`, and the log of its
softmax denominator, `lse`. Two blocks merge exactly as

    lse = logaddexp(lse1, lse2)     out = exp(lse1 - lse) out1 + exp(lse2 - lse) out2

with the maximum subtracted before any exp, so large logits cannot overflow. A row that sees no
key of a block has lse = -inf and out = 0, and merges to the other block's (no NaN, in forward or
backward). Autograd runs through all of it: each transfer's backward is its adjoint (_Exchange).
"""

import math
from collections import Counter
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F

from core import wire
from core.utils import dist_all_gather_func, dist_reduce_scatter_func

# Query chunk x key chunk pairs since reset_blocks() (a chunk: one of the split's 2C, or C, runs
# of consecutive positions): "computed", or "skipped" (every key after every query: the causal
# mask zeroes the whole block). Every query chunk computes at least its diagonal block.
blocks = Counter()


def reset_blocks() -> None:
    blocks.clear()


# While a list: (first query position, last, first key position, last, computed) of every query
# chunk x key chunk pair, appended in order (benchmarks/bench_context_parallel.py draws a run's).
TRACE = None


# ---------------------------------------------------------------------------
# Partial attention and the log-sum-exp merge.

def _chunks_per_rank(positions):
    """How many runs of consecutive positions rank 0 holds: 2 in the load-balanced split, 1 in
    the plain one; the unit in which blocks are computed or skipped, the same on every rank."""
    pos = positions[0].tolist()
    return 1 + sum(1 for a, b in zip(pos, pos[1:]) if b != a + 1)


def _pieces(pos, n):
    """[(start, end, first position, last position)] of `pos` cut in n equal pieces."""
    size = len(pos) // n
    return [(i * size, (i + 1) * size, int(pos[i * size:(i + 1) * size].min()),
             int(pos[i * size:(i + 1) * size].max())) for i in range(n)]


def _finite(x):
    """x where finite, 0 where -inf: a shift that keeps exp(-inf - shift) = 0, never NaN."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _block(q, k, v, q_pos, k_pos, dropout=0.0):
    """softmax(q k^T / sqrt(d)) v over this block's keys, masked by positions: (out, lse).
    `dropout` drops the probabilities before V, as serial attention does: the mask falls on the
    unnormalised exp, the denominator keeps every key (FlashAttention's order)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    shift = _finite(scores.amax(-1, keepdim=True).detach())  # the max: exp never overflows
    p = torch.exp(scores - shift)
    total = p.sum(-1, keepdim=True)
    seen = total > 0  # a row that sees no key: out 0, lse -inf, and no 0 / 0 in backward
    weights = F.dropout(p, dropout) if dropout else p
    out = (weights @ v) / torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, shift + torch.log(torch.where(seen, total, torch.ones_like(total))),
                      torch.full_like(total, float("-inf")))
    return out, lse


def merge(partial, new):
    """Two (out, lse) of the same query rows, over disjoint keys -> the (out, lse) over both."""
    if partial is None:
        return new
    (out1, lse1), (out2, lse2) = partial, new
    top = _finite(torch.maximum(lse1, lse2).detach())
    total = torch.exp(lse1 - top) + torch.exp(lse2 - top)
    seen = total > 0
    lse = torch.where(seen, top + torch.log(torch.where(seen, total, torch.ones_like(total))),
                      torch.full_like(total, float("-inf")))
    base = _finite(lse)
    return torch.exp(lse1 - base) * out1 + torch.exp(lse2 - base) * out2, lse


def attend(q, kv, positions, chunks, partials=None, dropout=0.0):
    """Add the keys and values kv = (k, v) to each query chunk's partial (out, lse), chunk by
    chunk (`positions` = (q_pos, k_pos), each cut in `chunks` = (q's, k's) equal pieces),
    skipping the pairs the causal mask zeroes. `partials`: one (out, lse) per query chunk, or
    None at first. `dropout`: of the probabilities, drawn from the caller's stream."""
    (k, v), (q_pos, k_pos) = kv, positions
    q_pieces, k_pieces = _pieces(q_pos, chunks[0]), _pieces(k_pos, chunks[1])
    partials = partials or [None] * len(q_pieces)
    for i, (qa, qb, q_first, q_last) in enumerate(q_pieces):
        for ka, kb, k_first, k_last in k_pieces:
            if TRACE is not None:
                TRACE.append((q_first, q_last, k_first, k_last, k_first <= q_last))
            if k_first > q_last:  # every key after every query
                blocks["skipped"] += 1
                continue
            blocks["computed"] += 1
            partials[i] = merge(partials[i], _block(q[..., qa:qb, :], k[..., ka:kb, :],
                                                    v[..., ka:kb, :], q_pos[qa:qb], k_pos[ka:kb],
                                                    dropout))
    return partials


def _output(partials):
    """The query chunks' outputs, laid end to end again (rows that saw nothing: 0)."""
    return torch.cat([out for out, _ in partials], dim=-2)


# ---------------------------------------------------------------------------
# p2p: the ring.

@wire.collective("cp_ring_send", lambda p: Fraction(1))
def _send_next_recv_prev(tensor, group):
    """Send `tensor` to the next rank of the ring, receive the previous rank's: one batch."""
    rank, size = group.rank(), group.size()
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor, dist.get_global_rank(group, (rank + 1) % size), group),
           dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank - 1) % size), group)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


@wire.collective("cp_ring_send_grad", lambda p: Fraction(1))
def _send_prev_recv_next(tensor, group):
    """Backward of the ring's step: the gradient goes back to the rank that sent the block."""
    rank, size = group.rank(), group.size()
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor, dist.get_global_rank(group, (rank - 1) % size), group),
           dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank + 1) % size), group)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _Exchange(torch.autograd.Function):
    """A transfer autograd runs through: forward `op(x, group)`, backward `adjoint(grad, group)`.
    The ring's step (its adjoint sends the gradient back to the rank the block came from), the
    all-gather (adjoint: the reduce-scatter) and the all-to-all (its own adjoint)."""

    @staticmethod
    def forward(ctx, x, group, op, adjoint):
        ctx.group, ctx.adjoint = group, adjoint
        return op(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.adjoint(grad.contiguous(), ctx.group), None, None, None


class _EveryStepBackward(torch.autograd.Function):
    """The output, tied to the last block received, so that backward runs every step of the ring
    on every rank: autograd skips a step whose block no query of this rank saw (rank 0 of the
    plain split sees none of the others'), and its neighbours would then wait for a gradient
    that never comes, or pair with the next one. Backward: the block's gradient gets zeros."""

    @staticmethod
    def forward(ctx, out, kv):
        ctx.kv_shape = kv.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.kv_shape)


def ring_attention(q, k, v, positions, group, dropout=0.0):
    """Step t holds rank (r - t)'s K/V: attend to it, then pass it on (C - 1 shifts in all)."""
    size, rank = group.size(), group.rank()
    kv = torch.stack([k, v])  # one buffer, one send per step
    n, partials = _chunks_per_rank(positions), None
    for step in range(size):
        if step > 0:
            kv = _Exchange.apply(kv, group, _send_next_recv_prev, _send_prev_recv_next)
        owner = (rank - step) % size
        partials = attend(q, (kv[0], kv[1]), (positions[rank], positions[owner]), (n, n),
                          partials, dropout)
    return _EveryStepBackward.apply(_output(partials), kv)


# ---------------------------------------------------------------------------
# all_gather: Llama 3's.

@wire.collective("cp_all_gather", wire.ALL_GATHER)
def _all_gather_kv(tensor, group):
    """Every rank's rows (K/V along the sequence), in rank order."""
    output = tensor.new_empty((group.size() * tensor.shape[0], *tensor.shape[1:]))
    dist_all_gather_func(output, tensor, group=group)
    return output


@wire.collective("cp_reduce_scatter", wire.REDUCE_SCATTER, summed=True)
def _reduce_scatter_kv(tensor, group):
    """The all-gather's adjoint: every rank's gradients of the gathered K/V summed, this rank's
    rows kept."""
    output = tensor.new_empty((tensor.shape[0] // group.size(), *tensor.shape[1:]))
    dist_reduce_scatter_func(output, tensor, group=group)
    return output

def all_gather_attention(q, k, v, positions, group, dropout=0.0):
    """Every rank's K/V, in rank order, then this rank's queries against them."""
    kv = torch.stack([k, v]).movedim(-2, 0)  # (s / C, 2, batch, heads, d): gathered along s
    kv = _Exchange.apply(kv, group, _all_gather_kv, _reduce_scatter_kv).movedim(0, -2)
    n = _chunks_per_rank(positions)
    partials = attend(q, (kv[0], kv[1]), (positions[group.rank()], positions.reshape(-1)),
                      (n, n * group.size()), dropout=dropout)
    return _output(partials)


# ---------------------------------------------------------------------------
# a2a: DeepSpeed-Ulysses.

ALL_TO_ALL = lambda p: Fraction(p - 1, p)  # each rank keeps 1/p of what it holds, sends the rest


@wire.collective("cp_all_to_all", ALL_TO_ALL)
def _all_to_all(tensor, group):
    """Chunk j of the first dimension to rank j; chunk j of the result from rank j."""
    output = torch.empty_like(tensor)
    dist.all_to_all_single(output, tensor, group=group)
    return output


def a2a_attention(q, k, v, positions, group, dropout=0.0):
    """Trade tokens for heads, attend over the whole sequence, trade back."""
    size = group.size()
    batch, heads, s, d = q.shape
    if heads % size:
        raise ValueError(f"{heads} attention heads are not divisible by the context-parallel "
                         f"size {size}; choose --num_attention_heads a multiple of it for a2a")
    qkv = torch.stack([q, k, v]).view(3, batch, size, heads // size, s, d).movedim(2, 0)
    # (C: whose tokens, 3, batch, heads / C, s, d)
    qkv = _Exchange.apply(qkv, group, _all_to_all, _all_to_all)
    qkv = qkv.movedim(0, -3).reshape(3, batch, heads // size, size * s, d)
    everyone = positions.reshape(-1)
    n = _chunks_per_rank(positions) * size
    out = _output(attend(qkv[0], (qkv[1], qkv[2]), (everyone, everyone), (n, n),
                         dropout=dropout))
    out = out.view(batch, heads // size, size, s, d).movedim(2, 0)  # chunk j: rank j's tokens
    # (C: which heads, batch, heads / C, s, d)
    out = _Exchange.apply(out, group, _all_to_all, _all_to_all)
    return out.movedim(0, 1).reshape(batch, heads, s, d)


VARIANTS = {"p2p": ring_attention, "all_gather": all_gather_attention, "a2a": a2a_attention}


def context_parallel_attention(qkv, positions, group, variant="p2p", dropout=0.0):
    """Causal attention for this rank's qkv = (q, k, v), each (batch, heads, s / C, d), by
    `variant`; `dropout` of the probabilities, drawn from the caller's stream (transformer.py:
    this rank's)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown context-parallel attention {variant!r}; choose one of "
                         f"{', '.join(VARIANTS)}")
    return VARIANTS[variant](*qkv, positions, group, dropout)
