"""Megatron-style tensor-parallel linear layers.

Megatron-LM (Shoeybi et al., 2019), Sec. 3, Eq. 3 and Fig. 3a. For the MLP
Y = ReLU(XA), Z = YB:

  * A is split by columns, A = [A_1, ..., A_p]; rank i computes Y_i = ReLU(X A_i)
    with no communication, since ReLU acts element-wise   (ColumnParallelLinear)
  * B is split by rows, B = [B_1; ...; B_p]; rank i computes Y_i B_i and the
    sum Z = sum_i Y_i B_i is one all-reduce, g             (RowParallelLinear)

PyTorch stores a Linear weight as (out, in) and computes X W^T, so A's columns
are the rows of fc1.weight (partition_dim 0) and B's rows are the columns of
fc2.weight (partition_dim 1).

Parameters: each layer draws the full "master" weight exactly as `nn.Linear`
would, from the (identically seeded) global generator, and keeps its own slice,
as megatron/core/tensor_parallel/layers.py:_initialize_affine_weight_cpu does.
Every tensor-parallel size therefore starts from the same full model as the
serial run. (Megatron also keeps separate RNG streams so dropout differs
inside the split region and agrees outside it, model_parallel_cuda_manual_seed;
the toy model has no dropout, so one generator is enough.)
"""

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

import parallel_state as ps
from mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)


class LinearWithAsyncAllreduce(torch.autograd.Function):
    """Y = X W^T + b whose backward all-reduces dL/dX while dL/dW is computed.

    Used by ColumnParallelLinear in place of f: f's backward all-reduce of the
    input gradient is issued asynchronously right after dL/dX = dL/dY W is
    known, and the weight-gradient matmul dL/dW = dL/dY^T X runs while it is on
    the wire. Megatron's LinearWithGradAccumulationAndAsyncCommunication,
    without its fused gradient accumulation.

    Autograd asks for dL/dX only when X needs a gradient; when it does not (the
    toy model's X is raw data) neither the matmul nor the all-reduce is done.
    Layers that need no overlap use F.linear, whose backward runs in C++.
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
            reducing = ps.all_reduce(grad_input, async_op=True)
        # Flatten leading dimensions so dL/dW is one (out, in) matmul.
        grad_output_2d = grad_output.reshape(-1, grad_output.shape[-1])
        grad_weight = grad_output_2d.t().matmul(input_.reshape(-1, input_.shape[-1]))
        grad_bias = grad_output_2d.sum(dim=0) if ctx.has_bias else None
        if reducing is not None:
            grad_input = reducing()
        return grad_input, grad_weight, grad_bias


class LinearWithSequenceParallel(torch.autograd.Function):
    """Column-parallel Y = X W^T + b whose input X arrives as this rank's rows.

    Korthikanti et al. (2022), Sec. 4.2.2: forward all-gathers X's rows (in
    place of f's identity) but saves only this rank's rows for backward, 1/TP
    of X's memory. Backward all-gathers them again, asynchronously, while
    dL/dX = dL/dY W is computed; then reduce-scatters dL/dX (f's backward
    all-reduce becomes a reduce-scatter), asynchronously, while
    dL/dW = dL/dY^T X is computed. As Megatron's linear with sequence_parallel.
    As in LinearWithAsyncAllreduce, dL/dX and its reduce-scatter are skipped
    when X needs no gradient.
    """

    @staticmethod
    def forward(ctx, input_, weight, bias):
        ctx.save_for_backward(input_, weight)
        ctx.has_bias = bias is not None
        return F.linear(ps.all_gather(input_, dim=0), weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input_, weight = ctx.saved_tensors
        gathering = ps.all_gather(input_, dim=0, async_op=True)
        grad_input = grad_output.matmul(weight) if ctx.needs_input_grad[0] else None
        total_input = gathering()
        scattering = ps.reduce_scatter(grad_input, async_op=True) if grad_input is not None else None
        grad_output_2d = grad_output.reshape(-1, grad_output.shape[-1])
        grad_weight = grad_output_2d.t().matmul(total_input.reshape(-1, total_input.shape[-1]))
        grad_bias = grad_output_2d.sum(dim=0) if ctx.has_bias else None
        return (scattering() if scattering else None), grad_weight, grad_bias


def _master_linear_slice(layer: nn.Module, in_features, out_features, bias, dtype, partition_dim):
    """Create layer.weight (and bias) as this rank's slice of an nn.Linear's parameters."""
    # Built on the CPU: the same generator and the same draws as the serial model.
    master = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    tp_size = ps.get_tensor_model_parallel_world_size()
    rank = ps.get_tensor_model_parallel_rank()
    weight = master.weight.detach().chunk(tp_size, dim=partition_dim)[rank]
    layer.weight = nn.Parameter(weight.clone())
    set_tensor_model_parallel_attributes(layer.weight, partition_dim)
    if not bias:
        layer.register_parameter("bias", None)
    elif partition_dim == 0:  # the column split splits the bias with the outputs
        layer.bias = nn.Parameter(master.bias.detach().chunk(tp_size)[rank].clone())
        set_tensor_model_parallel_attributes(layer.bias, 0)
    else:  # the row split adds the full bias once, after the reduction
        layer.bias = nn.Parameter(master.bias.detach().clone())


def set_tensor_model_parallel_attributes(param: torch.Tensor, partition_dim: int) -> None:
    """Mark `param` as this rank's slice along `partition_dim` (Megatron's attribute names)."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim


def _check_divisible(size, what):
    tp_size = ps.get_tensor_model_parallel_world_size()
    if size % tp_size != 0:
        raise ps.ParallelConfigError(
            f"{what} {size} is not divisible by the tensor-parallel size {tp_size}; "
            f"choose a size that is a multiple of it")
    return size // tp_size


class ColumnParallelLinear(nn.Module):
    """Y = XA + b with A split along its columns: A = [A_1, ..., A_p], b = [b_1, ..., b_p].

    Rank i holds A_i (stored as fc.weight rows) and computes Y_i = X A_i + b_i.

    gather_output: all-gather [Y_1, ..., Y_p] so every rank holds the full Y;
        False leaves Y split, ready for a RowParallelLinear (Fig. 3a).
    async_tensor_model_parallel_allreduce: replace f by LinearWithAsyncAllreduce,
        overlapping f's backward all-reduce with the weight-gradient matmul.
    sequence_parallel: the input is this rank's rows of X (Korthikanti et al.,
        2022); they are all-gathered here (LinearWithSequenceParallel).
    """

    def __init__(self, input_size, output_size, bias=True, gather_output=True,
                 async_tensor_model_parallel_allreduce=True, sequence_parallel=False, dtype=None):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = _check_divisible(output_size, "output size")
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1
        assert not (self.sequence_parallel and gather_output), "sequence parallelism feeds a RowParallelLinear"
        self.async_tensor_model_parallel_allreduce = (
            async_tensor_model_parallel_allreduce and ps.get_tensor_model_parallel_world_size() > 1)
        _master_linear_slice(self, input_size, output_size, bias, dtype, partition_dim=0)

    def forward(self, input_):
        if self.sequence_parallel:  # input_ holds this rank's rows; the Function gathers them
            return LinearWithSequenceParallel.apply(input_, self.weight, self.bias)
        if self.async_tensor_model_parallel_allreduce:  # f happens inside the linear's backward
            output_parallel = LinearWithAsyncAllreduce.apply(input_, self.weight, self.bias)
        else:
            output_parallel = F.linear(copy_to_tensor_model_parallel_region(input_), self.weight, self.bias)
        if self.gather_output:
            return gather_from_tensor_model_parallel_region(output_parallel)
        return output_parallel

    def extra_repr(self):
        return (f"input_size={self.input_size}, output_size={self.output_size} "
                f"(per partition {self.output_size_per_partition}), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """Y = XA + b with A split along its rows and X along its columns:

        A = [A_1; ...; A_p],  X = [X_1, ..., X_p],  Y = sum_i X_i A_i + b

    The sum is g, one all-reduce in forward; b is added once, after it.

    input_is_parallel: the input is already split (the output of a
        ColumnParallelLinear with gather_output=False); otherwise it is
        scattered here, and gathered again in backward.
    sequence_parallel: g becomes a reduce-scatter, each rank keeping its rows
        of Y (Korthikanti et al., 2022); b is then added to those rows only.
    """

    def __init__(self, input_size, output_size, bias=True, input_is_parallel=False, sequence_parallel=False,
                 dtype=None):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = _check_divisible(input_size, "input size")
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1
        assert not (self.sequence_parallel and not input_is_parallel), "sequence parallelism needs input_is_parallel"
        _master_linear_slice(self, input_size, output_size, bias, dtype, partition_dim=1)
        if self.bias is not None and self.sequence_parallel:
            # Added to this rank's rows only: its gradient is partial, to be summed over the group.
            self.bias.sequence_parallel = True

    def forward(self, input_):
        if self.input_is_parallel:
            input_parallel = input_
        else:
            input_parallel = scatter_to_tensor_model_parallel_region(input_)
        output_parallel = F.linear(input_parallel, self.weight)
        if self.sequence_parallel:  # g becomes a reduce-scatter: each rank keeps its rows of the sum
            output = reduce_scatter_to_sequence_parallel_region(output_parallel)
        else:
            output = reduce_from_tensor_model_parallel_region(output_parallel)
        return output + self.bias if self.bias is not None else output

    def extra_repr(self):
        return (f"input_size={self.input_size} (per partition {self.input_size_per_partition}), "
                f"output_size={self.output_size}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}")


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


def allreduce_sequence_parallel_grads(model: nn.Module, also=()) -> None:
    """Sum over the tensor-parallel group the gradients each rank took from its rows only.

    Parameters used outside the split region (ToyModel's fc, a transformer's
    LayerNorms) see batch / TP rows per rank under sequence parallelism, so
    their gradients are partial sums (Megatron-LM's `_allreduce_layernorm_grads`).
    `also`: more tensors to sum in the same all-reduce (the loss).
    """
    partial = [p.grad for p in model.parameters() if getattr(p, "sequence_parallel", False)]
    ps.sum_over_tensor_parallel(partial + list(also))


# ---------------------------------------------------------------------------
# Serial state dicts <-> tensor-parallel shards.

class StateDictError(ValueError):
    """A state dict that does not fit the model; the message names the keys."""


def load_serial_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Load a serial model's state_dict, keeping this rank's slice of each split parameter.

    Works for the serial model too (nothing is split there). Missing, extra or
    wrongly shaped keys are named in the error.
    """
    params = dict(model.named_parameters())
    missing = sorted(params.keys() - state_dict.keys())
    extra = sorted(state_dict.keys() - params.keys())
    if missing or extra:
        raise StateDictError(f"state dict keys do not match the model: missing {missing}, unexpected {extra}")
    tp_size = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    for name, param in params.items():
        full = state_dict[name]
        dim = getattr(param, "partition_dim", None)
        expected = list(param.shape)
        if dim is not None:
            expected[dim] *= tp_size
        if list(full.shape) != expected:
            raise StateDictError(f"{name} has shape {list(full.shape)}, the model needs {expected}")
        if dim is not None:
            full = full.chunk(tp_size, dim=dim)[ps.get_tensor_model_parallel_rank()]
        with torch.no_grad():
            param.copy_(full)


def gather_serial_state_dict(model: nn.Module) -> dict:
    """The full serial state_dict (on the CPU), put together from every rank's shards."""
    state = {}
    for name, param in model.named_parameters():
        dim = getattr(param, "partition_dim", None)
        full = param.detach() if dim is None else ps.all_gather(param.detach(), dim=dim)
        state[name] = full.cpu().clone()
    return state
