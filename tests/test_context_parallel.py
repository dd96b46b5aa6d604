"""Context parallelism (issue 38): causal attention over a sequence split across C ranks equals
serial attention on the whole sequence, for each of the three ways (ring, all-gather, a2a) and
both splits (load-balanced, plain); and each moves the bytes its formula says.

Float64. The split attention adds the same exps in another order (blocks merged by log-sum-exp),
so it differs from serial by round-off: measured at most 2.0e-15 on outputs and gradients of
order 1 (C = 2 and 4); ATOL = 1e-12 leaves a wide margin and is far below what a missing block,
a wrong mask or a lost gradient gives (order 0.1).
"""

import itertools
import math

import pytest
import torch
import torch.distributed as dist

from core import wire
from core.context_parallel import attention as cp
from core.context_parallel.split import (
    get_batch_on_this_cp_rank,
    get_positions_on_every_cp_rank,
    get_positions_on_this_cp_rank,
)
from distributed import run_distributed

ATOL = 1e-12
BATCH, HEADS, SEQ, DIM = 2, 4, 16, 3  # SEQ divisible by 2 x 4; HEADS by 4
SPLITS = (True, False)  # load-balanced, plain


def serial_attention(q, k, v):
    """transformer.py's core_attention, in its (batch, heads, seq, head_dim) layout."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    causal = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).triu(1)
    return scores.masked_fill(causal, float("-inf")).softmax(dim=-1) @ v


def _inputs(scale, seq):
    """q, k, v (times `scale`) and the output's gradient, the same on every rank."""
    g = torch.Generator().manual_seed(7)
    return [torch.randn(BATCH, HEADS, seq, DIM, dtype=torch.float64, generator=g) * (
        scale if i < 3 else 1.0) for i in range(4)]


def _close(actual, expected, what):
    err = (actual - expected).abs().max().item()
    assert err <= ATOL, f"{what}: max abs error {err:.3e} > {ATOL:g}"


def _run(variant, load_balanced, scale=1.0, seq=SEQ):
    """This rank's output and q/k/v gradients, next to serial's split the same way; the
    communication and blocks of forward and of backward."""
    c, rank, group = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    q, k, v, dout = _inputs(scale, seq)
    mine = lambda t: get_batch_on_this_cp_rank(t, 2, c, rank, load_balanced)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    serial_attention(*full).backward(dout)
    local = [mine(t).requires_grad_() for t in (q, k, v)]
    positions = get_positions_on_every_cp_rank(seq, c, load_balanced)
    wire.reset_comm_stats()
    cp.reset_blocks()
    out = cp.context_parallel_attention(local, positions, group, variant)
    forward = wire.comm_stats()
    blocks = {"computed": cp.blocks["computed"], "skipped": cp.blocks["skipped"]}
    wire.reset_comm_stats()
    out.backward(mine(dout))
    expected_out = mine(serial_attention(q, k, v))
    return (out, expected_out, [(t.grad, mine(f.grad)) for t, f in zip(local, full)],
            forward, wire.comm_stats(), blocks)


def _expected_blocks(variant, c, rank, load_balanced):
    """Query chunk x key chunk pairs computed and skipped. Ring and all-gather: this rank's
    queries against every key. Plain: chunk r sees chunks 0..r, r + 1 of C. Load-balanced: chunk
    a sees a + 1 of 2C, so chunks r and 2C - 1 - r see (r + 1) + (2C - r) = 2C + 1 of 4C pairs,
    on every rank. a2a: every query (of heads / C) against every key, a triangle of chunks."""
    n = 2 * c if load_balanced else c
    if variant == "a2a":
        return {"computed": n * (n + 1) // 2, "skipped": n * (n - 1) // 2}
    computed = 2 * c + 1 if load_balanced else rank + 1
    return {"computed": computed, "skipped": (4 * c if load_balanced else c) - computed}


def _expected_comm(variant, c, seq):
    """{name: (calls, bytes in per rank, bytes sent per rank in a ring)} of forward and backward.
    B: one rank's block of one of q, k, v, o: batch x heads x s / C x d x 8 bytes."""
    b = BATCH * HEADS * seq // c * DIM * 8
    if variant == "p2p":  # C - 1 steps, each one K/V block sent (and dK/dV back)
        return ({"cp_ring_send": (c - 1, 2 * (c - 1) * b, 2 * (c - 1) * b)},
                {"cp_ring_send_grad": (c - 1, 2 * (c - 1) * b, 2 * (c - 1) * b)})
    if variant == "all_gather":  # this rank's K/V in, the C - 1 others' out: 2 (C - 1) B
        return ({"cp_all_gather": (1, 2 * b, 2 * (c - 1) * b)},
                {"cp_reduce_scatter": (1, 2 * c * b, 2 * (c - 1) * b)})
    a2a = {"cp_all_to_all": (2, 4 * b, 4 * b * (c - 1) // c)}  # Q, K, V there, O back
    return a2a, a2a


def _table(stats):
    return {name: (s["calls"], s["bytes"], s["ring_bytes"]) for name, s in stats.items()}


def _check_every_variant():
    c, rank = dist.get_world_size(), dist.get_rank()
    # seq: chunks of 2 or 4 tokens, and of one token (where a query chunk's last position is
    # its key chunk's first: the diagonal, to be computed, not skipped).
    for variant, load_balanced, seq in itertools.product(cp.VARIANTS, SPLITS, (SEQ, 2 * c)):
        if seq != SEQ and not load_balanced:
            seq = c
        what = f"{variant}, C={c}, {'load-balanced' if load_balanced else 'plain'}, s={seq}"
        out, expected, grads, forward, backward, blocks = _run(variant, load_balanced, seq=seq)
        _close(out, expected, f"{what}: output")
        for name, (grad, serial) in zip("qkv", grads):
            _close(grad, serial, f"{what}: d{name}")
        assert blocks == _expected_blocks(variant, c, rank, load_balanced), (what, blocks)
        assert (_table(forward), _table(backward)) == _expected_comm(variant, c, seq), what


def _check_large_logits():
    """Logits of order 1e4 (exp overflows float64 past 709): the merge subtracts the max first."""
    for variant in cp.VARIANTS:
        out, expected, grads, *_ = _run(variant, True, scale=100.0)
        assert torch.isfinite(out).all(), variant
        _close(out, expected, f"{variant}: output at large logits")
        for name, (grad, serial) in zip("qkv", grads):
            # Gradients of order scale x 1e0: the same relative round-off.
            err = (grad - serial).abs().max().item() / max(1.0, serial.abs().max().item())
            assert err <= ATOL, f"{variant}: d{name} at large logits, relative error {err:.3e}"


def _check_heads_not_divisible():
    q = torch.zeros(1, 3, SEQ // dist.get_world_size(), DIM, dtype=torch.float64)
    positions = get_positions_on_every_cp_rank(SEQ, dist.get_world_size())
    with pytest.raises(ValueError) as e:
        cp.a2a_attention(q, q, q, positions, dist.group.WORLD)
    assert "\n" not in str(e.value) and "not divisible" in str(e.value)


def _check_all(checks):
    for check in checks:
        check()


@pytest.mark.parametrize("c", [2, 4])
def test_context_parallel_attention_equals_serial(c):
    """Every variant, both splits: output, dq, dk, dv; blocks computed and skipped; bytes."""
    checks = [_check_every_variant, _check_heads_not_divisible]
    if c == 4:
        checks.append(_check_large_logits)
    run_distributed(_check_all, c, checks)


def test_the_load_balanced_split_keeps_chunks_r_and_2c_minus_1_minus_r():
    assert get_positions_on_this_cp_rank(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert get_positions_on_this_cp_rank(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert get_positions_on_this_cp_rank(8, 2, 1, load_balanced=False).tolist() == [4, 5, 6, 7]
    table = get_positions_on_every_cp_rank(16, 4)
    assert table[3].tolist() == [6, 7, 8, 9] and table[0].tolist() == [0, 1, 14, 15]
    for load_balanced in SPLITS:  # every position on exactly one rank
        every = get_positions_on_every_cp_rank(24, 3, load_balanced).reshape(-1)
        assert sorted(every.tolist()) == list(range(24))
    x = torch.arange(2 * 8 * 3).view(2, 8, 3)
    part = get_batch_on_this_cp_rank(x, 1, 2, 0)
    assert torch.equal(part, x[:, [0, 1, 6, 7]])
    # The causal work, sum over a rank's positions of (position + 1): equal when balanced.
    work = lambda lb: [int((get_positions_on_this_cp_rank(16, 4, r, lb) + 1).sum())
                       for r in range(4)]
    assert len(set(work(True))) == 1 and work(False) == [10, 26, 42, 58]


@pytest.mark.parametrize("seq, c, load_balanced, divisor", [(10, 3, True, "by 2 x --context"),
                                                            (10, 4, False, "by --context")])
def test_a_sequence_that_does_not_split_is_a_one_line_error(seq, c, load_balanced, divisor):
    with pytest.raises(ValueError) as e:
        get_positions_on_this_cp_rank(seq, c, 0, load_balanced)
    message = str(e.value)
    assert "\n" not in message and f"choose a --seq_length divisible {divisor}" in message, message
    assert "divisible by 2 x --context_parallel_size" in str(
        pytest.raises(ValueError, get_batch_on_this_cp_rank, torch.zeros(6), 0, 2, 0).value)


def test_merge_of_rows_that_see_nothing_is_the_other_block_without_nan():
    """A block whose rows see no key (lse -inf) merges to the other block's, in forward and in
    backward; two such blocks give out 0, lse -inf."""
    q = torch.randn(1, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    empty = cp._block(q, k, k, torch.tensor([0, 1]), torch.tensor([5, 6]))
    assert torch.equal(empty[0], torch.zeros_like(empty[0])) and torch.isneginf(empty[1]).all()
    seen = cp._block(q, k, k, torch.tensor([0, 1]), torch.tensor([0, 1]))
    out, lse = cp.merge(empty, seen)
    _close(out, seen[0], "merge with an empty block")
    both_empty = cp.merge(empty, empty)
    assert torch.equal(both_empty[0], torch.zeros_like(out)) and torch.isneginf(both_empty[1]).all()
    (out.sum() + both_empty[0].sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
