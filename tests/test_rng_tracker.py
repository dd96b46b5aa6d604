"""Dropout's two streams (Megatron-LM, App. B.2; core/tensor_parallel/random.py): outside the
split region every tensor-parallel rank draws the same mask, inside it each rank draws its own;
both reproducible from the seed, and drawing inside leaves the outside stream where it was."""

import pytest
import torch
import torch.nn.functional as F

from core import parallel_state as ps
from core.tensor_parallel import random as rng_tracker
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
    assert (all_ranks(outside) == outside).all(), "outside the region: the same mask on every rank"
    assert (all_ranks(after) == after).all()
    others = [m for r, m in enumerate(all_ranks(inside)) if r != torch.distributed.get_rank()]
    assert all(not torch.equal(m, inside) for m in others), \
        "inside the region: a mask of each rank's own"
    # At every TP size, TP 1 included: inside is the tracker's stream, seeded seed + 2718 + TP rank.
    torch.manual_seed(1234 + 2718 + ps.get_tensor_model_parallel_rank())
    assert torch.equal(inside, F.dropout(torch.ones(64, dtype=torch.float64), 0.5, True)), \
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


# ---------------------------------------------------------------------------
# On a GPU (shown here on the CPU, with torch.cuda's seeding as it behaves before CUDA is
# initialised; tests/test_gpu.py has the real thing).

class LazyCuda:
    """torch.cuda's generator as a process sees it before CUDA is initialised: manual_seed_all
    is queued and only the last queued seed is applied, when the state is first read or set."""

    def __init__(self):
        self.generator, self.queued, self.initialised = torch.Generator(), None, False

    def _initialise(self):
        if not self.initialised and self.queued is not None:
            self.generator.manual_seed(self.queued)
        self.initialised = True

    def manual_seed_all(self, seed):
        if self.initialised:
            self.generator.manual_seed(seed)
        else:
            self.queued = seed

    def get_rng_state(self, device="cuda"):
        self._initialise()
        return self.generator.get_state()

    def set_rng_state(self, state, device="cuda"):
        self._initialise()
        self.generator.set_state(state)


def seeded(seed):
    return torch.Generator().manual_seed(seed).get_state()


def test_on_cuda_the_tracker_keeps_dropouts_two_streams_apart(monkeypatch):
    cuda = LazyCuda()
    for name in ("manual_seed_all", "get_rng_state", "set_rng_state"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    rng_tracker.model_parallel_manual_seed(7, torch.device("cuda"))
    _, tracked = rng_tracker.get_rng_tracker().states[rng_tracker.MODEL_PARALLEL_RNG]
    assert tracked is not None, "the tracked stream has a CUDA part"
    # The default CUDA generator holds --seed's stream, the tracker seed + 2718 + TP rank (0).
    assert torch.equal(cuda.get_rng_state(), seeded(7)), "the default stream took the tracker's"
    assert torch.equal(tracked, seeded(7 + 2718))
    with rng_tracker.get_rng_tracker().fork():
        assert torch.equal(cuda.get_rng_state(), seeded(7 + 2718))
        torch.rand(1, generator=cuda.generator)  # a draw inside advances the tracked stream only
    assert torch.equal(cuda.get_rng_state(), seeded(7))
    assert not torch.equal(rng_tracker.get_rng_tracker().states[rng_tracker.MODEL_PARALLEL_RNG][1],
                           seeded(7 + 2718))
    # What a checkpoint saves of the default generators has the CUDA part too.
    cpu, saved = rng_tracker.default_generator_states(cuda=True)
    assert torch.equal(saved, seeded(7))


def test_fork_refuses_a_device_the_stream_was_not_seeded_for(monkeypatch):
    """A stream seeded for the CPU has no CUDA state: CUDA dropout inside fork() would draw from
    the default generator, the same mask on every tensor-parallel rank. One line instead."""
    rng_tracker.model_parallel_manual_seed(7, torch.device("cpu"))
    with pytest.raises(rng_tracker.RNGDeviceError, match=r"^dropout on cuda inside fork\("
                       r"'model-parallel-rng'\), but the stream was seeded for cpu: call "
                       r"model_parallel_manual_seed\(seed, device\) with the device the model "
                       r"runs on$"):
        with rng_tracker.get_rng_tracker().fork(device=torch.device("cuda")):
            pass
    cuda = LazyCuda()
    for name in ("manual_seed_all", "get_rng_state", "set_rng_state"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    rng_tracker.model_parallel_manual_seed(7, torch.device("cuda"))
    with pytest.raises(rng_tracker.RNGDeviceError, match="dropout on cpu .* seeded for cuda"):
        with rng_tracker.get_rng_tracker().fork(device=torch.device("cpu")):
            pass
    with rng_tracker.get_rng_tracker().fork(device=torch.device("cuda")):  # its own device: fine
        pass
