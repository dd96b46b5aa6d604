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

Each layer's forward is Fig. 3a as written: f, this rank's columns, (ReLU),
this rank's rows, g. Two options hand the communication to fused autograd
Functions, each in one marked branch: async_tensor_model_parallel_allreduce
(mappings.py, beside f) and sequence_parallel (sequence_parallel.py).

Parameters: each layer draws the full "master" weight exactly as `nn.Linear`
would, from the (identically seeded) global generator, and keeps its own slice,
as megatron/core/tensor_parallel/layers.py:_initialize_affine_weight_cpu does.
Every tensor-parallel size therefore starts from the same full model as the
serial run. (Megatron also keeps separate RNG streams so dropout differs
inside the split region and agrees outside it, model_parallel_cuda_manual_seed;
the toy model has no dropout, so one generator is enough.)
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from core import parallel_state as ps
from core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    linear_with_async_allreduce,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from core.tensor_parallel.sequence_parallel import (
    linear_with_sequence_parallel,
    reduce_scatter_to_sequence_parallel_region,
)


class ColumnParallelLinear(nn.Module):
    """Y = XA + b with A split along its columns: A = [A_1, ..., A_p], b = [b_1, ..., b_p].

    Rank i holds A_i (stored as fc.weight rows) and computes Y_i = X A_i + b_i.

    gather_output: all-gather [Y_1, ..., Y_p] so every rank holds the full Y;
        False leaves Y split, ready for a RowParallelLinear (Fig. 3a).
    async_tensor_model_parallel_allreduce: f and the matmul as one Function
        (mappings.LinearWithAsyncAllreduce) whose backward overlaps f's
        all-reduce with the weight-gradient matmul; same result as f.
    sequence_parallel: the input is this rank's rows of X (Korthikanti et al.,
        2022); they are all-gathered here (sequence_parallel.py).
    """

    def __init__(self, input_size, output_size, bias=True, gather_output=True,
                 async_tensor_model_parallel_allreduce=False, sequence_parallel=False, dtype=None):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = _check_divisible(output_size, "output size")
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1
        assert not (self.sequence_parallel and gather_output), \
            "sequence parallelism feeds a RowParallelLinear"
        self.async_tensor_model_parallel_allreduce = (
            async_tensor_model_parallel_allreduce and ps.get_tensor_model_parallel_world_size() > 1)
        _master_linear_slice(self, input_size, output_size, bias, dtype, partition_dim=0)

    def forward(self, input_):
        if not (self.sequence_parallel or self.async_tensor_model_parallel_allreduce):
            # Fig. 3a: f (the identity here; it all-reduces dL/dX in backward), then X A_i + b_i.
            input_parallel = copy_to_tensor_model_parallel_region(input_)
            output_parallel = F.linear(input_parallel, self.weight, self.bias)
        elif self.sequence_parallel:  # X arrives as this rank's rows: sequence_parallel.py
            output_parallel = linear_with_sequence_parallel(input_, self.weight, self.bias)
        else:  # f fused with the matmul, its all-reduce overlapping dL/dW: mappings.py
            output_parallel = linear_with_async_allreduce(input_, self.weight, self.bias)
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

    def __init__(self, input_size, output_size, bias=True, input_is_parallel=False,
                 sequence_parallel=False, dtype=None):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = _check_divisible(input_size, "input size")
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1
        assert not (self.sequence_parallel and not input_is_parallel), \
            "sequence parallelism needs input_is_parallel"
        _master_linear_slice(self, input_size, output_size, bias, dtype, partition_dim=1)
        if self.bias is not None and self.sequence_parallel:
            # Added to this rank's rows only: its gradient is partial, to be summed over the group.
            self.bias.grad_is_partial = True

    def forward(self, input_):
        if self.input_is_parallel:
            input_parallel = input_
        else:
            input_parallel = scatter_to_tensor_model_parallel_region(input_)
        output_parallel = F.linear(input_parallel, self.weight)  # Y_i B_i
        if not self.sequence_parallel:
            # g: Z = sum_i Y_i B_i
            output = reduce_from_tensor_model_parallel_region(output_parallel)
        else:  # g becomes a reduce-scatter, each rank keeping its rows: sequence_parallel.py
            output = reduce_scatter_to_sequence_parallel_region(output_parallel)
        return output + self.bias if self.bias is not None else output

    def extra_repr(self):
        return (f"input_size={self.input_size} (per partition {self.input_size_per_partition}), "
                f"output_size={self.output_size}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}")


class VocabParallelEmbedding(nn.Module):
    """An embedding table split along the vocabulary (Megatron-LM, Sec. 3, last paragraphs).

    Rank i holds rows [i V/p, (i+1) V/p) of the (padded) table. A token outside
    that range looks up zeros; the ranks' partial lookups are then summed by
    g, one all-reduce of batch x sequence x width: every rank ends with every
    token's embedding. The same table, tied, is the output layer
    (cross_entropy.py), which is why it is split along the vocabulary.

    num_embeddings: the vocabulary; it is padded to a multiple of the
    tensor-parallel size (`vocab_size_with_padding`, Megatron's
    make_vocab_size_divisible_by) with zero rows that no token looks up.
    init_method: applied to the full serial table after nn.Embedding's own
    init, as a serial model applies it to its nn.Embedding (Megatron's).
    """

    def __init__(self, num_embeddings, embedding_dim, init_method=None, dtype=None):
        super().__init__()
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_padded = vocab_size_with_padding(num_embeddings, tp)
        self.num_embeddings_per_partition = self.num_embeddings_padded // tp
        self.vocab_start_index = rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        # The serial table, drawn as nn.Embedding draws it, padded, and this rank's rows kept.
        master = nn.Embedding(num_embeddings, embedding_dim, dtype=dtype).weight.detach()
        if init_method is not None:
            init_method(master)
        padded = torch.cat([master, master.new_zeros(self.num_embeddings_padded - num_embeddings,
                                                     embedding_dim)])
        self.weight = nn.Parameter(padded.chunk(tp)[rank].clone())
        set_tensor_model_parallel_attributes(self.weight, 0)
        self.weight.vocab_size = num_embeddings  # rows beyond are padding: state dicts drop them

    def forward(self, input_):
        if ps.get_tensor_model_parallel_world_size() == 1:
            return F.embedding(input_, self.weight)
        not_here = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
        local = (input_ - self.vocab_start_index).masked_fill(not_here, 0)
        output_parallel = F.embedding(local, self.weight).masked_fill(not_here.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(output_parallel)  # g: sum the lookups

    def extra_repr(self):
        return (f"num_embeddings={self.num_embeddings} (padded {self.num_embeddings_padded}, "
                f"per partition {self.num_embeddings_per_partition}), "
                f"embedding_dim={self.embedding_dim}")


class LinearWithGradAccumulation(torch.autograd.Function):
    """Y = X W^T whose weight gradient, under bf16 with fp32 main parameters, is computed in fp32
    and added straight to the main gradient: Megatron's gradient_accumulation_fusion
    (LinearWithGradAccumulationAndAsyncCommunication, its wgrad_gemm_accum_fp32 kernel).

    It matters for the tied output layer: its weight is also the embedding table, so autograd
    would add the lookup's gradient and this one in bf16, one rounding more than the model's
    other gradients get; here the lookup's arrives in bf16 (the hook of mixed_precision.py) and
    the two are summed in fp32. Without main gradients (float32, float64) it is F.linear.
    """

    @staticmethod
    def forward(ctx, input_, weight):
        ctx.save_for_backward(input_, weight)
        return F.linear(input_, weight)

    @staticmethod
    def backward(ctx, grad_output):
        input_, weight = ctx.saved_tensors
        rows = lambda t: t.reshape(-1, t.shape[-1])
        grad_input = grad_output @ weight
        add_to_main_grad = getattr(weight, "add_to_main_grad", None)  # mixed_precision.py
        if add_to_main_grad is None:
            return grad_input, rows(grad_output).t() @ rows(input_)
        add_to_main_grad(rows(grad_output).float().t() @ rows(input_).float())  # fp32 products
        return grad_input, None


def linear_with_grad_accumulation(input_, weight):
    return LinearWithGradAccumulation.apply(input_, weight)


def vocab_size_with_padding(vocab_size, tensor_model_parallel_size, make_vocab_size_divisible_by=1):
    """The vocabulary rounded up to a multiple of make_vocab_size_divisible_by x TP (Megatron's
    _vocab_size_with_padding; it pads to 128 x TP for GEMM efficiency, one is enough here)."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


# ---------------------------------------------------------------------------
# Master-weight initialization (Megatron's _initialize_affine_weight_cpu).

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
