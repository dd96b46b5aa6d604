"""The conjugate communication operators of the Megatron-LM paper.

Megatron-LM (Shoeybi et al., 2019), Sec. 3, Fig. 3a: the MLP Y = GeLU(XA)B is
split across ranks with two operators that are each other's transpose:

    f  identity in forward,  all-reduce in backward   (before the column split)
    g  all-reduce in forward, identity in backward    (after the row split)

f and g are `copy_to_tensor_model_parallel_region` and
`reduce_from_tensor_model_parallel_region`; a default tensor-parallel run calls
exactly these. `LinearWithAsyncAllreduce`, beside them, is f fused with the
linear layer after it so that f's backward all-reduce overlaps a matmul: the
option `async_tensor_model_parallel_allreduce`. The scatter/gather pair moves
a tensor between replicated and split-along-the-last-dimension form; the
layers use it for `gather_output=True` and `input_is_parallel=False`.
(Sequence parallelism's pair, which replaces f and g, is in sequence_parallel.py.)

Same layout as megatron/core/tensor_parallel/mappings.py: private helpers that make the
torch.distributed call, one autograd Function per operator, one public lower-case wrapper each.
Each helper is marked @wire.collective: NCCL's rules checked and the call counted around it
(core/wire.py), off the reading path.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from core import parallel_state as ps
from core import wire
from core.utils import dist_all_gather_func


@wire.collective("all_reduce", wire.ALL_REDUCE, summed=True)
def _reduce(input_, group, async_op=False):
    """All-reduce the input over `group` (the tensor-parallel group), in place. With async_op,
    also torch's handle to wait on."""
    work = dist.all_reduce(input_, group=group, async_op=async_op)
    return (input_, work) if async_op else input_


def _split_along_last_dim(input_):
    """Keep this rank's contiguous slice of the last dimension."""
    world_size = ps.get_tensor_model_parallel_world_size()
    return input_.chunk(world_size, dim=-1)[ps.get_tensor_model_parallel_rank()]


@wire.collective("all_gather", wire.ALL_GATHER)
def _gather_along_last_dim(input_, group):
    """Concatenate every rank's slice along the last dimension: gathered into one buffer along
    the first dimension (NCCL's all-gather), then rearranged, as Megatron does."""
    output = input_.new_empty((group.size() * input_.shape[0], *input_.shape[1:]))
    dist_all_gather_func(output, input_, group=group)
    return torch.cat(output.chunk(group.size()), dim=-1)


class _CopyToModelParallelRegion(torch.autograd.Function):
    """f: pass the input to the model-parallel region; all-reduce the gradient."""

    @staticmethod
    def forward(ctx, input_):
        return input_

    @staticmethod
    def backward(ctx, grad_output):
        # Each rank holds only its columns' share of dL/dX; the true gradient is the sum.
        # A contiguous copy: autograd may hand the same buffer to other consumers, and the
        # gradient may be a view (the transformer's is transposed), which NCCL refuses.
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        return _reduce(grad, ps.get_tensor_model_parallel_group())


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    """g: all-reduce the input from the model-parallel region; pass the gradient."""

    @staticmethod
    def forward(ctx, input_):
        # The partial sums Y_i B_i are fresh matmul outputs: reduce them in place.
        ctx.mark_dirty(input_)
        return _reduce(input_, ps.get_tensor_model_parallel_group())

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


class LinearWithAsyncAllreduce(torch.autograd.Function):
    """f followed by Y = X W^T + b, with f's backward all-reduce overlapping dL/dW's matmul.

    Computes what F.linear(copy_to_tensor_model_parallel_region(X), W, b) does
    (tests/test_layers.py checks it), but issues the all-reduce of
    dL/dX = dL/dY W asynchronously and computes dL/dW = dL/dY^T X while it is on
    the wire. Megatron's LinearWithGradAccumulationAndAsyncCommunication, without
    its fused gradient accumulation; ColumnParallelLinear uses it when
    async_tensor_model_parallel_allreduce=True. Autograd asks for dL/dX only
    when X needs a gradient: the toy model's X is raw data, so there is nothing
    to overlap there, and the default run uses f itself.
    """

    @staticmethod
    def forward(ctx, input_, weight, bias):
        ctx.save_for_backward(input_, weight)
        ctx.has_bias = bias is not None
        return F.linear(input_, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input_, weight = ctx.saved_tensors
        grad_input = reducing = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(weight)
            reducing = _reduce(grad_input, ps.get_tensor_model_parallel_group(), async_op=True)
        # Flatten leading dimensions so dL/dW is one (out, in) matmul.
        grad_output_2d = grad_output.reshape(-1, grad_output.shape[-1])
        grad_weight = grad_output_2d.t().matmul(input_.reshape(-1, input_.shape[-1]))
        grad_bias = grad_output_2d.sum(dim=0) if ctx.has_bias else None
        if reducing is not None:
            grad_input = reducing()
        return grad_input, grad_weight, grad_bias


class _ScatterToModelParallelRegion(torch.autograd.Function):
    """Split the input along its last dimension, keep this rank's chunk; gather in backward."""

    @staticmethod
    def forward(ctx, input_):
        return _split_along_last_dim(input_)

    @staticmethod
    def backward(ctx, grad_output):
        group = ps.get_tensor_model_parallel_group()
        return _gather_along_last_dim(grad_output.contiguous(), group)


class _GatherFromModelParallelRegion(torch.autograd.Function):
    """Gather the input from the model-parallel region and concatenate; split in backward."""

    @staticmethod
    def forward(ctx, input_):
        return _gather_along_last_dim(input_.contiguous(), ps.get_tensor_model_parallel_group())

    @staticmethod
    def backward(ctx, grad_output):
        return _split_along_last_dim(grad_output)


# With one rank every operator is the identity: skip the autograd node and its Python cost.

def copy_to_tensor_model_parallel_region(input_):
    return input_ if _single_rank() else _CopyToModelParallelRegion.apply(input_)


def reduce_from_tensor_model_parallel_region(input_):
    return input_ if _single_rank() else _ReduceFromModelParallelRegion.apply(input_)


def linear_with_async_allreduce(input_, weight, bias):
    if _single_rank():
        return F.linear(input_, weight, bias)
    return LinearWithAsyncAllreduce.apply(input_, weight, bias)


def scatter_to_tensor_model_parallel_region(input_):
    return input_ if _single_rank() else _ScatterToModelParallelRegion.apply(input_)


def gather_from_tensor_model_parallel_region(input_):
    return input_ if _single_rank() else _GatherFromModelParallelRegion.apply(input_)


def _single_rank():
    return ps.get_tensor_model_parallel_world_size() == 1
