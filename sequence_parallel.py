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

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

import communication as comm
import parallel_state as ps


def _gather_along_first_dim(input_):
    """Concatenate every rank's rows."""
    return comm.all_gather(input_, dim=0)


def _split_along_first_dim(input_):
    """Keep this rank's rows."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return input_.chunk(tp, dim=0)[rank].contiguous()


def _reduce_scatter_along_first_dim(input_):
    """Sum over ranks and keep this rank's rows of the sum."""
    return comm.reduce_scatter(input_)


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


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Enter the sequence-parallel region: keep this rank's rows; all-gather the gradient."""

    @staticmethod
    def forward(ctx, input_):
        return _split_along_first_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_along_first_dim(grad_output)


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
        return F.linear(_gather_along_first_dim(input_), weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input_, weight = ctx.saved_tensors
        gathering = comm.all_gather(input_, dim=0, async_op=True)
        grad_input = grad_output.matmul(weight) if ctx.needs_input_grad[0] else None
        total_input = gathering()
        scattering = None
        if grad_input is not None:
            scattering = comm.reduce_scatter(grad_input, async_op=True)
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


def allreduce_sequence_parallel_grads(params, loss: torch.Tensor,
                                      loss_is_partial: bool = True) -> torch.Tensor:
    """Sum over the tensor-parallel group what each rank took from its rows only; returns the loss.

    Parameters used outside the split region (ToyModel's fc, a transformer's
    LayerNorms, marked `grad_is_partial`) see 1/TP of the rows per rank, so
    their gradients are partial sums (Megatron-LM's `_allreduce_layernorm_grads`);
    so is each rank's loss in ToyModel, whose loss is taken on each rank's rows.
    (The transformer gathers the sequence before its loss: loss_is_partial=False.)
    One all-reduce carries them all. `params`: the parameters the optimizer updates (under bf16,
    the fp32 main copies, which hold the gradients).
    """
    loss = loss.detach().reshape(1).clone()
    partial = [p.grad for p in params if getattr(p, "grad_is_partial", False)]
    comm.sum_over_tensor_parallel(partial + ([loss] if loss_is_partial else []))
    return loss[0]


@contextmanager
def sequence_parallel_disabled(model: nn.Module):
    """Run forward-only passes (validation) as plain tensor parallelism, on every row.

    They save no activations for backward, so sequence parallelism would save
    nothing there; the weights and the result are the same.
    """
    layers = [m for m in model.modules() if getattr(m, "sequence_parallel", False)]
    for layer in layers:
        layer.sequence_parallel = False
    try:
        yield
    finally:
        for layer in layers:
            layer.sequence_parallel = True
