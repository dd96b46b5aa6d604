"""Gradient clipping by the global norm, under tensor, sequence and data parallelism.

    g <- g * min(1, max_norm / (||g|| + 1e-6)),   ||g||^2 = sum over every parameter of the
                                                  *whole model* of its squared gradient

as torch.nn.utils.clip_grad_norm_ computes it on one device. Under tensor
parallelism no rank holds the whole model (Megatron-LM's clip_grad_norm_fp32,
megatron/core/optimizer/clip_grads.py):

  * a split parameter's gradient is a shard: each rank adds its shard's squares,
    and one all-reduce over the tensor-parallel group sums the shards;
  * a replicated parameter (ToyModel's fc, the LayerNorms, biases after g) has the
    whole gradient on every rank: only tensor-parallel rank 0 adds it, or it
    would count TP times (Megatron's param_is_not_tensor_parallel_duplicate);
  * under sequence parallelism the replicated parameters' gradients are partial
    sums until summed over the group: clipping comes after that sum;
  * data-parallel replicas clip after averaging their gradients: every replica
    then holds the same gradients and computes the same norm, with no
    communication of its own;
  * pipeline stages hold different layers: their sums of squares are added over
    the pipeline group too (Megatron sums over the model-parallel group), and the
    last stage's copy of the tied word embeddings is not counted, the first
    stage's is (Megatron's param_is_not_shared): after the embedding group's sum
    both hold the one gradient the serial weight has;
  * a MoE layer's experts under expert parallelism (core/transformer/moe/): each
    rank of an expert-model-parallel group holds other experts (under expert tensor
    parallelism, other shards of them), after their gradients' sum over the ranks
    holding the same ones: their squares are summed over the expert tensor- and
    model-parallel ranks, once, beside the dense layers' (Megatron sums them over
    its expert groups apart, too);
  * under the distributed optimizer (distrib_optimizer.py) each replica holds
    its shard of the gradients, as pieces that carry their parameter's marks:
    every rank's sum is added in one all-reduce over all ranks (as Megatron
    does then): one communicator, so every rank gets the same bits.

Called with the parameters the optimizer updates: the fp32 main parameters
under bf16 (training/mixed_precision.py), so the norm is taken in fp32.
"""

import torch
import torch.distributed as dist

from core import parallel_state as ps
from core import wire


def counted_once(param, sharded=False) -> bool:
    """Does this rank add `param`'s gradient to the global norm? Shards: every rank its own.
    Replicated parameters: rank 0 of the tensor-parallel group only. The tied embeddings: the
    first pipeline stage's copy only. Experts under expert parallelism, and `sharded` (the
    distributed optimizer's pieces, the experts' over every rank of a stage): every rank its
    own."""
    if getattr(param, "shared_embedding", False) and ps.is_pipeline_last_stage(ignore_virtual=True):
        return False
    if getattr(param, "tensor_model_parallel", False) or expert_parallel(param):
        return True
    if sharded and not getattr(param, "allreduce", True):  # the experts' shards: over all ranks
        return True
    return not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_rank() == 0


def get_grad_norm(parameters, sharded=False) -> torch.Tensor:
    """The gradient norm of the whole model, the same on every rank (a 0-dim tensor: no wait
    for the device). `sharded`: each data-parallel rank holds its shard of the gradients."""
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:  # no gradient yet, on any rank alike: 0, as torch's clip_grad_norm_ says
        return torch.zeros(())
    squares, experts = parameters[0].grad.new_zeros(1), parameters[0].grad.new_zeros(1)
    for p in (p for p in parameters if counted_once(p, sharded)):
        (experts if expert_parallel(p) and not sharded else squares).add_(p.grad.pow(2).sum())
    if sharded:  # every rank holds its own part: one sum over all of them, as Megatron's
        _sum_squares(squares, dist.group.WORLD)
        return squares[0].sqrt()
    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        # + the other ranks' shards (and their zero for replicated ones)
        _sum_squares(squares, ps.get_tensor_model_parallel_group())
    if any(map(expert_parallel, parameters)):  # + the other experts (and shards), once each
        squares += _sum_expert_squares(experts, ps.get_expert_tensor_and_model_parallel_group())
    if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        _sum_squares_over_stages(squares, ps.get_pipeline_model_parallel_group())  # + other stages
    return squares[0].sqrt()


@wire.collective("grad_norm_all_reduce", wire.ALL_REDUCE, summed=True)
def _sum_squares(squares, group):
    """Every rank's sum of squares, summed over `group`, in place."""
    dist.all_reduce(squares, group=group)
    return squares


@wire.collective("grad_norm_expert_all_reduce", wire.ALL_REDUCE, summed=True)
def _sum_expert_squares(squares, group):
    """Every rank's experts' sum of squares, summed over the expert tensor- and model-parallel
    `group`, in place."""
    dist.all_reduce(squares, group=group)
    return squares


@wire.collective("grad_norm_pipeline_all_reduce", wire.ALL_REDUCE, summed=True)
def _sum_squares_over_stages(squares, group):
    """Every stage's sum of squares, summed over the pipeline `group`, in place."""
    dist.all_reduce(squares, group=group)
    return squares


def clip_grad_norm(parameters, max_norm: float, sharded=False) -> torch.Tensor:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)), in place; returns the norm
    before clipping. Always multiplies (by 1 when under the limit), as clip_grad_norm_ does:
    no branch on a device value, so no wait for the device."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = get_grad_norm(parameters, sharded)
    coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in parameters:
        p.grad.mul_(coefficient)
    return norm


def expert_parallel(param) -> bool:
    """An expert spread over the expert-model- (and tensor-) parallel groups: each rank holds
    other experts, or other shards of them."""
    return not getattr(param, "allreduce", True) and ps.model_parallel_is_initialized() and \
        ps.get_expert_tensor_and_model_parallel_group() is not None
