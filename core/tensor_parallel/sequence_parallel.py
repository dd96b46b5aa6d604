"""Sequence parallelism: tensor parallelism's next step, kept beside Sec. 3, not inside it.

Korthikanti et al. (2022), "Reducing Activation Recomputation in Large
Transformer Models", Sec. 4.2.2, Fig. 5. Tensor parallelism (Megatron-LM,
Sec. 3) leaves every activation outside the split region whole on every rank.
Sequence parallelism keeps only this rank's rows there (the sequence, in a
transformer; the batch rows, here), and f and g become a conjugate pair of
their own:

    f  ->  all-gather the rows in forward,     reduce-scatter the gradient in backward
    g  ->  reduce-scatter the rows in forward, all-gather the gradient in backward

The same bytes on the wire, since a ring all-reduce *is* a reduce-scatter
followed by an all-gather, and 1/TP of the activations outside the region.

Why a file of its own: the layers in parallel_layers.py are Fig. 3a first and
whole, and a reader meets f and g there as the paper draws them. The flag is
Megatron's (`sequence_parallel=True` on ColumnParallelLinear and
RowParallelLinear, `--sequence_parallel` for the run), and so are the names
below; each layer hands over to this file in one marked branch.
"""


import torch
import torch.nn as nn
import torch.nn.functional as F

from core import parallel_state as ps
from core import wire
from core.utils import dist_all_gather_func, dist_reduce_scatter_func, flag_off


@wire.collective("all_gather", wire.ALL_GATHER)
def _gather_along_first_dim(input_, group, async_op=False):
    """Concatenate every rank's rows (with async_op, also torch's handle to wait on)."""
    output = input_.new_empty((group.size() * input_.shape[0], *input_.shape[1:]))
    work = dist_all_gather_func(output, input_, group=group, async_op=async_op)
    return (output, work) if async_op else output


def _split_along_first_dim(input_):
    """Keep this rank's rows."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return input_.chunk(tp, dim=0)[rank].contiguous()


@wire.collective("reduce_scatter", wire.REDUCE_SCATTER, summed=True)
def _reduce_scatter_along_first_dim(input_, group, async_op=False):
    """Sum over ranks and keep this rank's rows of the sum (with async_op, also torch's handle)."""
    output = input_.new_empty((input_.shape[0] // group.size(), *input_.shape[1:]))
    work = dist_reduce_scatter_func(output, input_, group=group, async_op=async_op)
    return (output, work) if async_op else output


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Replaces f: all-gather the rows in forward; reduce-scatter the gradient in backward."""

    @staticmethod
    def forward(ctx, input_):
        group = ps.get_tensor_model_parallel_group()
        return _gather_along_first_dim(input_.contiguous(), group)

    @staticmethod
    def backward(ctx, grad_output):
        group = ps.get_tensor_model_parallel_group()
        return _reduce_scatter_along_first_dim(grad_output.contiguous(), group)


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Replaces g: reduce-scatter the rows in forward; all-gather the gradient in backward."""

    @staticmethod
    def forward(ctx, input_):
        group = ps.get_tensor_model_parallel_group()
        return _reduce_scatter_along_first_dim(input_.contiguous(), group)

    @staticmethod
    def backward(ctx, grad_output):
        group = ps.get_tensor_model_parallel_group()
        return _gather_along_first_dim(grad_output.contiguous(), group)


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Enter the sequence-parallel region: keep this rank's rows; all-gather the gradient."""

    @staticmethod
    def forward(ctx, input_):
        return _split_along_first_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        group = ps.get_tensor_model_parallel_group()
        return _gather_along_first_dim(grad_output.contiguous(), group)


class LinearWithSequenceParallel(torch.autograd.Function):
    """Column-parallel Y = X W^T + b whose input X arrives as this rank's rows.

    Forward all-gathers X's rows (in place of f's identity) but saves only this
    rank's rows for backward, 1/TP of X's memory. Backward all-gathers them
    again, asynchronously, while dL/dX = dL/dY W is computed; then
    reduce-scatters dL/dX (f's backward all-reduce becomes a reduce-scatter),
    asynchronously, while dL/dW = dL/dY^T X is computed. As Megatron's linear
    with sequence_parallel. dL/dX and its reduce-scatter are skipped when X
    needs no gradient.
    """

    @staticmethod
    def forward(ctx, input_, weight, bias):
        ctx.save_for_backward(input_, weight)
        ctx.has_bias = bias is not None
        group = ps.get_tensor_model_parallel_group()
        total_input = _gather_along_first_dim(input_.contiguous(), group)
        return F.linear(total_input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input_, weight = ctx.saved_tensors
        group = ps.get_tensor_model_parallel_group()
        gathering = _gather_along_first_dim(input_.contiguous(), group, async_op=True)
        grad_input = grad_output.matmul(weight) if ctx.needs_input_grad[0] else None
        total_input = gathering()
        scattering = None
        if grad_input is not None:
            scattering = _reduce_scatter_along_first_dim(grad_input, group, async_op=True)
        grad_output_2d = grad_output.reshape(-1, grad_output.shape[-1])
        grad_weight = grad_output_2d.t().matmul(total_input.reshape(-1, total_input.shape[-1]))
        grad_bias = grad_output_2d.sum(dim=0) if ctx.has_bias else None
        return (scattering() if scattering else None), grad_weight, grad_bias


def gather_from_sequence_parallel_region(input_):
    return input_ if _single_rank() else _GatherFromSequenceParallelRegion.apply(input_)


def scatter_to_sequence_parallel_region(input_):
    return input_ if _single_rank() else _ScatterToSequenceParallelRegion.apply(input_)


def reduce_scatter_to_sequence_parallel_region(input_):
    return input_ if _single_rank() else _ReduceScatterToSequenceParallelRegion.apply(input_)


def linear_with_sequence_parallel(input_, weight, bias):
    if _single_rank():
        return F.linear(input_, weight, bias)
    return LinearWithSequenceParallel.apply(input_, weight, bias)


def _single_rank():
    return ps.get_tensor_model_parallel_world_size() == 1


def sequence_parallel_disabled(model: nn.Module):
    """Run forward-only passes (validation) as plain tensor parallelism, on every row.

    They save no activations for backward, so sequence parallelism would save
    nothing there; the weights and the result are the same.
    """
    return flag_off(model, "sequence_parallel")
