"""Dropout's random numbers under tensor parallelism: Megatron's RNG tracker, on CPU and CUDA.

Megatron-LM (Shoeybi et al., 2019), App. B.2: dropout outside the
model-parallel regions (after a block's row-parallel output, before the
residual) acts on a tensor every rank holds whole, so every rank must draw
the same mask, or the replicas part; dropout inside a region (the attention
probabilities of this rank's heads) acts on this rank's part only, so each
rank must draw a mask of its own, or the "random" mask repeats across the
split. Hence two streams:

  * the default generator, seeded identically on every tensor-parallel rank:
    the outside dropouts draw from it;
  * a tensor-model-parallel generator, seeded per rank, kept by the tracker:
    the inside dropouts draw from it, under `get_rng_tracker().fork()`.

The tracker's second use: activation recomputation (recompute.py) runs a block
again in backward, and it must draw the masks it drew the first time, from
every stream; the tracker's `get_states` / `set_states` are what it saves and
puts back, with the default generators' (`default_generator_states`).

As Megatron's `model_parallel_cuda_manual_seed` and `get_cuda_rng_tracker`
(tensor_parallel/random.py), with the CPU generator tracked beside the CUDA
one, so the same code runs where there is no GPU. (Once rng_tracker.py at the root, where a
random.py would have shadowed Python's own; inside core/tensor_parallel/ it takes Megatron's name.)
"""

from contextlib import contextmanager

import torch

from core import parallel_state as ps
from core import wire

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TENSOR_PARALLEL_SEED_OFFSET = 2718  # Megatron's: keeps the two streams' seeds apart
# Context parallelism (core/context_parallel/): each rank of a context-parallel group holds other
# tokens, so the dropout outside the split regions (the whole hidden state on every TP rank) must
# draw a mask of its own per context rank, the same on its TP ranks: a third stream. (Megatron
# draws it from the default generator, the same mask on every context rank, for other tokens.)
CONTEXT_PARALLEL_RNG = "context-parallel-rng"
_CONTEXT_PARALLEL_SEED_OFFSET = 1618


class RNGDeviceError(RuntimeError):
    """Dropout drawn on a device the tracker's stream was not seeded for (a bug in the caller)."""


def default_generator_states(cuda: bool):
    """(CPU state, CUDA state or None) of the default generators; the CUDA one where the run's
    tensors live on a GPU. Reading it initialises CUDA, which runs any seeding still queued."""
    return torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None


def set_default_generator_states(states):
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


class RNGStatesTracker:
    """Named generator states; `fork(name)` draws from one of them instead of the default."""

    def __init__(self):
        self.states = {}

    def add(self, name, seed, cuda=False):
        """A stream seeded with `seed`, on the CPU generator and, with `cuda`, the GPU's.

        The CUDA state is read (so CUDA initialised) before seeding: torch.manual_seed only
        queues the CUDA seeding while CUDA is not initialised, and the last queued seed wins,
        so the default CUDA generator would otherwise end up with this stream's seed and both
        dropouts would draw from one stream (Megatron tracks the CUDA state for this reason).
        """
        if name in self.states:
            raise ValueError(f"RNG state {name!r} exists already")
        default = default_generator_states(cuda)
        torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
        self.states[name] = default_generator_states(cuda)
        set_default_generator_states(default)

    def get_states(self):
        """Every stream's state, as Megatron's tracker returns them: what activation recomputation
        (recompute.py) puts back before it replays a forward."""
        return dict(self.states)

    def set_states(self, states):
        self.states = dict(states)

    @contextmanager
    def fork(self, name=MODEL_PARALLEL_RNG, device=None):
        """Draw from the named stream inside the block; the default stream is left where it was.

        `device`: where the block's tensors live (default: parallel_state's device, where it is
        set). A stream seeded for the CPU has no CUDA state, so CUDA dropout inside would draw
        from the default generator, the same mask on every rank: refused in one line.
        """
        cuda = self.states[name][1] is not None
        device = device or (wire.get_device() if wire.device_is_set() else None)
        if device is not None and (torch.device(device).type == "cuda") != cuda:
            raise RNGDeviceError(
                f"dropout on {torch.device(device).type} inside fork({name!r}), but the stream was "
                f"seeded for {'cuda' if cuda else 'cpu'}: call model_parallel_manual_seed(seed, "
                "device) with the device the model runs on")
        default = default_generator_states(cuda)
        set_default_generator_states(self.states[name])
        try:
            yield
        finally:
            self.states[name] = default_generator_states(cuda)  # it goes on from here next time
            set_default_generator_states(default)


_RNG_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _RNG_TRACKER


def model_parallel_manual_seed(seed: int, device=None) -> None:
    """Seed both streams: the default one alike on every tensor-parallel rank (outside the split
    region), the tracker's one differently on each (inside it). `device`: where the run's
    tensors live (default: parallel_state's device); on a GPU the CUDA generators are seeded and
    tracked too."""
    torch.manual_seed(seed)
    seed_tensor_parallel_stream(seed, device)


def seed_tensor_parallel_stream(seed: int, device=None) -> None:
    """Seed the tracker's streams only: the model-parallel one differently on each tensor- and
    context-parallel rank, the context-parallel one (with C > 1) on each context rank (also when
    a checkpoint is resumed at another size: the saved streams were the old split's)."""
    tp_rank, tp, cp_rank, cp = 0, 1, 0, 1
    if ps.model_parallel_is_initialized():
        tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        cp_rank, cp = ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()
    cuda = torch.device(device or wire.get_device()).type == "cuda"
    _RNG_TRACKER.states.clear()
    _RNG_TRACKER.add(MODEL_PARALLEL_RNG,
                     seed + _TENSOR_PARALLEL_SEED_OFFSET + tp_rank + tp * cp_rank, cuda)
    if cp > 1:
        _RNG_TRACKER.add(CONTEXT_PARALLEL_RNG, seed + _CONTEXT_PARALLEL_SEED_OFFSET + cp_rank,
                         cuda)
