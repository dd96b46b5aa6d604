"""Sequence parallelism's operators (Korthikanti et al., 2022, Sec. 4.2.2) against their
definitions.

Each rank holds different values here, as it does under sequence parallelism. Float64; sums
taken in another order than gloo's differ by round-off only: ATOL as in test_layers.py (measured
there at most 4.4e-16 on values of order 1).
"""

import pytest
import torch

from core import parallel_state as ps
from core import wire as comm
from core.tensor_parallel.sequence_parallel import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from distributed import run_distributed

ATOL = 1e-14
COLS = 3


def value(rank, rows, seed):
    """What rank `rank` holds: any rank can compute any other rank's tensor."""
    return torch.randn(rows, COLS, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(100 * seed + rank))


def close(actual, expected, what):
    err = (actual - expected).abs().max().item()
    assert err <= ATOL, f"{what}: max abs error {err:.3e}"


def _check_operators():
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    rows = 4 * tp  # the global rows; each rank holds rows / tp of them outside the region
    everyone = range(tp)

    # Before the column-parallel layer: all-gather the rows; backward reduce-scatters the gradient.
    x = value(rank, rows // tp, 1).requires_grad_()
    comm.reset_comm_stats()
    y = gather_from_sequence_parallel_region(x)
    assert torch.equal(y, torch.cat([value(r, rows // tp, 1) for r in everyone]))
    y.backward(value(rank, rows, 2))
    close(x.grad, sum(value(r, rows, 2) for r in everyone).chunk(tp)[rank], "gather's backward")
    if tp > 1:
        assert dict(comm.comm_calls) == {"all_gather": 1, "reduce_scatter": 1}
        assert dict(comm.comm_bytes) == {"all_gather": rows // tp * COLS * 8,
                                       "reduce_scatter": rows * COLS * 8}

    # After the row-parallel layer: reduce-scatter the partial sums; backward all-gathers the
    # gradient.
    z = value(rank, rows, 3).requires_grad_()
    out = reduce_scatter_to_sequence_parallel_region(z)
    close(out, sum(value(r, rows, 3) for r in everyone).chunk(tp)[rank], "reduce-scatter")
    out.backward(value(rank, rows // tp, 4))
    assert torch.equal(z.grad, torch.cat([value(r, rows // tp, 4) for r in everyone]))

    # Why it is free: a reduce-scatter followed by an all-gather is an all-reduce.
    t = value(rank, rows, 5)
    with torch.no_grad():
        scattered = reduce_scatter_to_sequence_parallel_region(t.clone())
        both = gather_from_sequence_parallel_region(scattered)
        reduced = t.clone()
        if tp > 1:
            comm.all_reduce(reduced, ps.get_tensor_model_parallel_group())
    close(both, reduced, "all-gather(reduce-scatter(t)) vs all-reduce(t)")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_sequence_parallel_operators(tp):
    run_distributed(_check_operators, tp)
