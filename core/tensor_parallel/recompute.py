"""Activation recomputation: keep a block's input, not its activations; run it again in backward.

Korthikanti et al. (2022), "Reducing Activation Recomputation in Large
Transformer Models", Sec. 5 and Table 2. Backward needs what forward computed;
a transformer layer keeps sbh(34 + 5as/h) bytes of it (Sec. 4.1). Recomputing
instead of keeping:

  full       each block runs again from its input in backward: only the input
             is kept (Table 2's 2sbh), for one more forward of every block.
  selective  only the attention core runs again (scores, softmax, dropout, the
             product with V) from Q, K and V: its 5as^2b bytes, the term that
             grows with the sequence squared, go, for a few percent more FLOPs.

`CheckpointFunction` and `checkpoint(function, distribute_saved_activations,
*args)` are Megatron's (megatron/core/tensor_parallel/random.py): PyTorch's
reentrant checkpoint with two changes.

  * Dropout's streams. The forward that runs again must draw the masks the
    first one drew, on every stream, or the gradients are those of other
    masks, silently wrong: the default generators (CPU; CUDA's where the
    tensors are) and the tracker's streams (random.py: attention dropout
    inside the split region; under sequence parallelism every dropout of the
    block) are saved in forward, set before the recomputation and set back
    after it, so that the next forward draws what it would have drawn without
    recomputing.
  * distribute_saved_activations. Without sequence parallelism a block's input
    is whole on every tensor-parallel rank; each rank keeps only its 1/TP of it
    (a 1-D slice) and all-gathers it before the recomputation. Under sequence
    parallelism the input already is this rank's rows, 1/TP, and is kept as it
    is (Megatron refuses both at once for that reason).

transformer.py switches it on with `--recompute_granularity` (Megatron's flag).
"""

import contextlib

import torch

from core import parallel_state as ps
from core import wire
from core.tensor_parallel.random import (
    default_generator_states,
    get_rng_tracker,
    set_default_generator_states,
)
from core.utils import dist_all_gather_func


def _get_all_rng_states(cuda):
    """The default generators' states (the CUDA one where the tensors are) and the tracker's."""
    return default_generator_states(cuda), get_rng_tracker().get_states()


def _set_all_rng_states(states):
    default, tracker = states
    set_default_generator_states(default)
    get_rng_tracker().set_states(tracker)


@contextlib.contextmanager
def _fork_rng(cuda):
    """Every stream back where it was on entry: what runs inside is a replay, not new draws."""
    states = _get_all_rng_states(cuda)
    try:
        yield
    finally:
        _set_all_rng_states(states)


def split_tensor_into_1d_equal_chunks(tensor):
    """This rank's 1/TP of the flattened tensor, in a buffer of its own: the whole one can go."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return tensor.reshape(-1).chunk(tp)[rank].clone()


@wire.collective("all_gather", wire.ALL_GATHER)
def _gather_split_1d_tensor(tensor, group):
    """Every rank's chunk, concatenated: the flattened tensor again."""
    gathered = tensor.new_empty(group.size() * tensor.numel())
    dist_all_gather_func(gathered, tensor, group=group)
    return gathered


def gather_split_1d_tensor(tensor):
    return _gather_split_1d_tensor(tensor, ps.get_tensor_model_parallel_group())


class CheckpointFunction(torch.autograd.Function):
    """Forward: run `run_function` without keeping its activations; keep its inputs (the first one
    split over the tensor-parallel ranks with distribute_saved_activations) and the random states.
    Backward: set the random states back, run it again with autograd on, backpropagate through
    that, and put the streams back where backward found them."""

    @staticmethod
    def forward(ctx, run_function, distribute_saved_activations, *args):
        ctx.run_function = run_function
        ctx.cuda = any(arg.is_cuda for arg in args)
        ctx.rng_states = _get_all_rng_states(ctx.cuda)
        with torch.no_grad():
            outputs = run_function(*args)
        ctx.input_0_shape = None
        if distribute_saved_activations and ps.get_tensor_model_parallel_world_size() > 1:
            ctx.input_0_shape = args[0].shape
            args = (split_tensor_into_1d_equal_chunks(args[0]), *args[1:])
        ctx.save_for_backward(*args)
        return outputs

    @staticmethod
    def backward(ctx, grad_output):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("activation recomputation works with loss.backward(), not "
                               "torch.autograd.grad()")
        inputs = list(ctx.saved_tensors)
        if ctx.input_0_shape is not None:
            inputs[0] = gather_split_1d_tensor(inputs[0]).view(ctx.input_0_shape)
        inputs = [x.detach().requires_grad_(needs)
                  for x, needs in zip(inputs, ctx.needs_input_grad[2:])]
        with _fork_rng(ctx.cuda):
            _set_all_rng_states(ctx.rng_states)  # the masks the first forward drew
            with torch.enable_grad():
                outputs = ctx.run_function(*inputs)
        torch.autograd.backward(outputs, grad_output)
        return (None, None, *(x.grad for x in inputs))


def checkpoint(function, distribute_saved_activations, *args):
    """function(*args), its activations recomputed in backward instead of kept; args: tensors."""
    return CheckpointFunction.apply(function, distribute_saved_activations, *args)
