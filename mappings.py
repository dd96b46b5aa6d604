"""The conjugate communication operators of the Megatron-LM paper.

Megatron-LM (Shoeybi et al., 2019), Sec. 3, Fig. 3a: the MLP Y = GeLU(XA)B is
split across ranks with two operators that are each other's transpose:

    f  identity in forward,  all-reduce in backward   (before the column split)
    g  all-reduce in forward, identity in backward    (after the row split)

f and g are `copy_to_tensor_model_parallel_region` and
`reduce_from_tensor_model_parallel_region`. The scatter/gather pair moves a
tensor between replicated and split-along-the-last-dimension form; the layers
use it for `gather_output=True` and `input_is_parallel=False`. Sequence
parallelism's pair, which replaces f and g, is at the end.

Same layout as megatron/core/tensor_parallel/mappings.py: private helpers,
one autograd Function per operator, one public lower-case wrapper each.
"""

import torch

import parallel_state as ps


def _reduce(input_):
    """All-reduce over the tensor-parallel group, in place."""
    ps.all_reduce(input_)
    return input_


def _split_along_last_dim(input_):
    """Keep this rank's contiguous slice of the last dimension."""
    world_size = ps.get_tensor_model_parallel_world_size()
    return input_.chunk(world_size, dim=-1)[ps.get_tensor_model_parallel_rank()]


def _gather_along_last_dim(input_):
    """Concatenate every rank's slice along the last dimension."""
    return ps.all_gather(input_, dim=-1)


def _gather_along_first_dim(input_):
    """Concatenate every rank's rows."""
    return ps.all_gather(input_, dim=0)


def _reduce_scatter_along_first_dim(input_):
    """Sum over ranks and keep this rank's rows of the sum."""
    return ps.reduce_scatter(input_)


class _CopyToModelParallelRegion(torch.autograd.Function):
    """f: pass the input to the model-parallel region; all-reduce the gradient."""

    @staticmethod
    def forward(ctx, input_):
        return input_

    @staticmethod
    def backward(ctx, grad_output):
        # Each rank holds only its columns' share of dL/dX; the true gradient is the sum.
        # Clone: autograd may hand the same buffer to other consumers.
        return _reduce(grad_output.clone())


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    """g: all-reduce the input from the model-parallel region; pass the gradient."""

    @staticmethod
    def forward(ctx, input_):
        # The partial sums Y_i B_i are fresh matmul outputs: reduce them in place.
        ctx.mark_dirty(input_)
        return _reduce(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


class _ScatterToModelParallelRegion(torch.autograd.Function):
    """Split the input along its last dimension, keep this rank's chunk; gather in backward."""

    @staticmethod
    def forward(ctx, input_):
        return _split_along_last_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_along_last_dim(grad_output)


class _GatherFromModelParallelRegion(torch.autograd.Function):
    """Gather the input from the model-parallel region and concatenate; split in backward."""

    @staticmethod
    def forward(ctx, input_):
        return _gather_along_last_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _split_along_last_dim(grad_output)


# Sequence parallelism (Korthikanti et al., 2022, "Reducing Activation Recomputation in Large
# Transformer Models", Sec. 4.2.2, Fig. 5). Outside the tensor-parallel region each rank keeps
# only its rows (the sequence, in a transformer; the batch, here), and f and g above become a
# conjugate pair of their own: the same bytes on the wire, since a ring all-reduce *is* a
# reduce-scatter followed by an all-gather, and 1/TP of the activations outside the region.

class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Replaces f: all-gather the rows in forward; reduce-scatter the gradient in backward."""

    @staticmethod
    def forward(ctx, input_):
        return _gather_along_first_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _reduce_scatter_along_first_dim(grad_output)


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Replaces g: reduce-scatter the rows in forward; all-gather the gradient in backward."""

    @staticmethod
    def forward(ctx, input_):
        return _reduce_scatter_along_first_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_along_first_dim(grad_output)


# With one rank every operator is the identity: skip the autograd node and its Python cost.

def copy_to_tensor_model_parallel_region(input_):
    return input_ if _single_rank() else _CopyToModelParallelRegion.apply(input_)


def reduce_from_tensor_model_parallel_region(input_):
    return input_ if _single_rank() else _ReduceFromModelParallelRegion.apply(input_)


def scatter_to_tensor_model_parallel_region(input_):
    return input_ if _single_rank() else _ScatterToModelParallelRegion.apply(input_)


def gather_from_tensor_model_parallel_region(input_):
    return input_ if _single_rank() else _GatherFromModelParallelRegion.apply(input_)


def gather_from_sequence_parallel_region(input_):
    return input_ if _single_rank() else _GatherFromSequenceParallelRegion.apply(input_)


def reduce_scatter_to_sequence_parallel_region(input_):
    return input_ if _single_rank() else _ReduceScatterToSequenceParallelRegion.apply(input_)


def _single_rank():
    return ps.get_tensor_model_parallel_world_size() == 1
