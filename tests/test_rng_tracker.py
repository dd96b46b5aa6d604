"""Dropout's two streams (Megatron-LM, App. B.2; rng_tracker.py): outside the split region every
tensor-parallel rank draws the same mask, inside it each rank draws its own; both reproducible
from the seed, and drawing inside leaves the outside stream where it was."""

import pytest
import torch
import torch.nn.functional as F

import rng_tracker
from distributed import RankFailed, all_ranks, run_distributed


def _masks():
    ones = torch.ones(64, dtype=torch.float64)
    outside = F.dropout(ones, p=0.5, training=True)
    with rng_tracker.get_rng_tracker().fork():
        inside = F.dropout(ones, p=0.5, training=True)
    after = F.dropout(ones, p=0.5, training=True)
    return outside, inside, after


def _check_streams():
    rng_tracker.model_parallel_manual_seed(1234)
    outside, inside, after = _masks()
    tp = all_ranks(outside).shape[0]
    assert (all_ranks(outside) == outside).all(), "outside the region: the same mask on every rank"
    assert (all_ranks(after) == after).all()
    others = [m for r, m in enumerate(all_ranks(inside)) if r != torch.distributed.get_rank()]
    assert tp == 1 or all(not torch.equal(m, inside) for m in others), \
        "inside the region: a mask of each rank's own"
    # The outside stream did not move while the inside one drew.
    torch.manual_seed(1234)
    ones = torch.ones(64, dtype=torch.float64)
    first, second = F.dropout(ones, 0.5, True), F.dropout(ones, 0.5, True)
    assert torch.equal(first, outside) and torch.equal(second, after)
    # Reproducible from the seed.
    rng_tracker.model_parallel_manual_seed(1234)
    assert all(torch.equal(a, b) for a, b in zip(_masks(), (outside, inside, after)))


def _check_streams_with_fork_ignored():
    """A mutant: dropout inside the region draws from the default stream, as without a tracker."""
    import contextlib
    rng_tracker.RNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    _check_streams()


@pytest.mark.parametrize("tp", [1, 2])
def test_dropout_masks_agree_outside_and_differ_inside(tp):
    run_distributed(_check_streams, tp)


def test_the_check_catches_dropout_without_the_tracker():
    with pytest.raises(RankFailed, match="AssertionError: inside the region: a mask of each "
                                         "rank's own"):
        run_distributed(_check_streams_with_fork_ignored, 2)
