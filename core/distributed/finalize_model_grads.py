"""What parallelism adds after backward, before the optimizer: Megatron's finalize_model_grads
(megatron/core/distributed/finalize_model_grads.py), called once per step by the loop.

After backward each rank's gradients are not yet the model's:

  * data parallelism: each replica's are its own rows' (Megatron-LM, App. B.1): averaged over
    the replicas; context parallelism (core/context_parallel/): each context rank's are its own
    tokens' (its loss the mean over them), so the average is over the replicas and their context
    ranks together (Megatron's get_data_parallel_group(with_context_parallel=True));
  * sequence parallelism (Korthikanti et al., 2022, Sec. 4.2.2): the parameters used outside
    the split region (the LayerNorms, ToyModel's fc; marked `grad_is_partial`) saw 1/TP of the
    rows on each rank, so their gradients are partial sums, summed over the tensor-parallel
    group (Megatron's `_allreduce_layernorm_grads`);
  * pipeline parallelism (Narayanan et al., 2021): the tied word embeddings live on the first
    stage (the lookup) and the last (the output layer), each copy with the gradient of its own
    use; summed over the embedding group, both take the step the serial model's one weight
    takes, and stay equal (Megatron's `_allreduce_word_embedding_grads`);
  * expert parallelism (core/transformer/moe/): a MoE layer's experts (marked `allreduce`
    False, as Megatron marks them) ran on the tokens routed to them from their
    expert-model-parallel group only: summed over the ranks that hold the same experts (the
    expert-data-parallel group), not averaged over the data-parallel one (allreduce_expert_grads).

The loss the ranks report is finished alongside: the sum of the micro-batches' shares, averaged
over the replicas where the model says it is a partial sum (`loss_is_partial`: ToyModel's under
sequence parallelism), and sent from the pipeline's last stage, where it is computed, to all.
Megatron's finalize_model_grads(model, num_tokens, ...) returns nothing and leaves the loss to
its loss function and logging; here the loss rides in the same all-reduces as the gradients,
and every rank reports it (the run checks that the tensor-parallel ranks agree). The private
functions marked @wire.collective are each one torch.distributed call on a buffer the caller
gathered: Megatron's functions of those names also collect the gradients from the model.
"""

from fractions import Fraction

import torch
import torch.distributed as dist

from core import parallel_state as ps
from core import wire
from core.optimizer.distrib_optimizer import DistributedOptimizer, is_expert


def finalize_model_grads(model, optimizer, losses) -> torch.Tensor:
    """Finish every gradient `optimizer` steps with (under bf16 the fp32 main parameters'; under
    --use_distributed_optimizer this rank's shard of the gradient buffers) and the loss from this
    rank's `losses` (the micro-batches' shares of the batch's loss: on the last pipeline stage,
    none before it); returns the loss every rank reports. `model`: this rank's chunks."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Stages before the last stand in a zero in the main dtype: the loss's own (fp32 under bf16,
    # as both models compute it), so the last stage's broadcast below fits it.
    loss = losses[0] if losses else params[0].new_zeros(())
    for share in losses[1:]:  # in order, as train.py adds them
        loss = loss + share
    partial = model[-1].loss_is_partial
    grad_sync = getattr(model, "grad_sync", None)  # --overlap_grad_reduce: param_and_grad_buffer
    if isinstance(optimizer, DistributedOptimizer):  # the other sums, then each replica its shard
        loss = reduce_scatter_over_data_parallel_replicas(optimizer, loss, partial, grad_sync)
        return broadcast_from_last_stage(loss.detach())
    if grad_sync is not None:  # the buckets' averages, launched during backward: waited for
        grad_sync.finish_grad_sync()
        loss = average_loss(loss, partial)
    elif ps.get_data_parallel_world_size(with_context_parallel=True) > 1:  # replicas saw
        # different rows (context ranks other tokens): average them
        loss = average_over_data_parallel_replicas(params, loss, partial)
    elif partial or any(getattr(p, "grad_is_partial", False) for p in params):
        loss = allreduce_sequence_parallel_grads(params, loss, partial)
    if grad_sync is None:  # (--overlap_grad_reduce: the experts' sums launched with their bucket)
        allreduce_expert_grads([p.grad for p in params if is_expert(p)])
    if ps.get_pipeline_model_parallel_world_size() > 1:
        allreduce_embedding_grads([p.grad for p in params if getattr(p, "shared_embedding", 0)])
    return broadcast_from_last_stage(loss.detach())


def allreduce_expert_grads(grads):
    """The experts' gradients summed over the expert-data-parallel group and divided by the
    data-parallel size (x the context-parallel size), in place (Megatron's DDP:
    expert_gradient_scaling_factor, 1 / its data_parallel_world_size).

    Why that divisor: every rank of a stage routes other tokens (other rows, other chunks of a
    sequence), an expert's gradient on a rank is the sum over the tokens that reached it, from
    its expert-model-parallel group; summed over the ranks that hold the expert, every token of
    the stage has been counted once. The dense layers' gradients are averaged over the d data-
    (and context-) parallel ranks, each rank's loss a mean over its own tokens: the experts'
    sum is divided by the same d, whatever the size of their group."""
    if not grads:
        return
    group = ps.get_expert_data_parallel_group()
    d = ps.get_data_parallel_world_size(with_context_parallel=True)
    if group.size() > 1:
        _allreduce_expert_grads(grads, group)
    for g in grads:
        g.div_(d)


@wire.collective("expert_dp_all_reduce", wire.ALL_REDUCE, summed=True)
def _allreduce_expert_grads(coalesced, group, async_op=False):
    """Sum over the expert-data-parallel group, in place (with async_op, and torch's handle)."""
    work = dist.all_reduce(coalesced, group=group, async_op=async_op)
    return (coalesced, work) if async_op else coalesced


def allreduce_embedding_grads(grads):
    """The tied word embeddings' two gradients summed: the first stage's (the lookup's) and the
    last stage's (the output layer's), of the parameters marked `shared_embedding` by the model
    (the stages between hold neither)."""
    if grads:
        _allreduce_embedding_grads(grads, ps.get_embedding_group())


@wire.collective("embedding_all_reduce", wire.ALL_REDUCE, summed=True)
def _allreduce_embedding_grads(coalesced, group):
    """Sum over the embedding group (each pipeline's first and last stage), in place."""
    dist.all_reduce(coalesced, group=group)
    return coalesced


def allreduce_sequence_parallel_grads(params, loss: torch.Tensor,
                                      loss_is_partial: bool = True) -> torch.Tensor:
    """Sum over the tensor-parallel group what each rank took from its rows only; returns the loss.

    Under sequence parallelism (core/tensor_parallel/sequence_parallel.py) the parameters used
    outside the split region (ToyModel's fc, a transformer's LayerNorms, marked
    `grad_is_partial`) see 1/TP of the rows per rank, so their gradients are partial sums; so is
    each rank's loss in ToyModel, whose loss is taken on each rank's rows. (The transformer
    gathers the sequence before its loss: loss_is_partial=False.) One all-reduce carries them all,
    laid end to end in one buffer (wire.collective). `params`: the parameters the optimizer
    updates (under bf16, the fp32 main copies, which hold the gradients).
    """
    loss = loss.detach().reshape(1).clone()
    partial = [p.grad for p in params if getattr(p, "grad_is_partial", False)]
    _allreduce_layernorm_grads(partial + ([loss] if loss_is_partial else []),
                               ps.get_tensor_model_parallel_group())
    return loss[0]


@wire.collective("all_reduce", wire.ALL_REDUCE, summed=True)
def _allreduce_layernorm_grads(coalesced, group):
    """Sum over the tensor-parallel group, in place (Megatron's name: the LayerNorms' are the
    transformer's partial gradients)."""
    dist.all_reduce(coalesced, group=group)
    return coalesced


def average_over_data_parallel_replicas(params, loss, loss_is_partial):
    """Average every gradient and the loss over the data-parallel replicas; returns the loss.

    Each rank's shards of the split weights over its data-parallel group; what every
    tensor-parallel rank holds, whole (fc's gradient, the loss) or under sequence parallelism as
    its rows' part (`grad_is_partial` parameters), in one all-reduce over all ranks
    (average_replicated says why). The sequence-parallel sums ride along: the partial parts add
    up over the tensor-parallel ranks in the same all-reduce.
    """
    loss = loss.detach().reshape(1).clone()
    grads = by_kind(params, [p.grad for p in params])
    grads["partial" if loss_is_partial else "whole"].append(loss)
    if grads["split"]:  # a stage holding only replicated layers (the toy's last: fc) has none,
        # and so have its replicas, the data-parallel group: all of them skip alike
        _average_over_data_parallel(grads["split"],
                                    ps.get_data_parallel_group(with_context_parallel=True))
    average_replicated(grads["whole"], grads["partial"])
    return loss[0]


def by_kind(params, grads):
    """`grads` (of `params`) by how they are averaged: "split" (this rank's shards, over the
    data-parallel group), "whole" and "partial" (every tensor-parallel rank's, over the stage),
    "expert" (allreduce_expert_grads, apart)."""
    kinds = {"split": [], "partial": [], "whole": [], "expert": []}
    for p, g in zip(params, grads):
        kinds["expert" if is_expert(p) else
              "split" if getattr(p, "tensor_model_parallel", False) else
              "partial" if getattr(p, "grad_is_partial", False) else "whole"].append(g)
    return kinds


@wire.collective("dp_all_reduce", wire.ALL_REDUCE, summed=True)
def _average_over_data_parallel(coalesced, group, async_op=False):
    """The average over the data-parallel group (the replicas, with their context ranks), in
    place; with async_op the sum and torch's handle, the caller dividing as the sum lands
    (start_grad_sync)."""
    work = dist.all_reduce(coalesced, group=group, async_op=async_op)
    if async_op:
        return coalesced, work
    return coalesced.div_(group.size())


def start_grad_sync(grads, params):
    """--overlap_grad_reduce, the plain optimizer: launch one bucket's averages (those of
    average_over_data_parallel_replicas, asynchronously, on fewer elements); returns the function
    that waits (param_and_grad_buffer.BucketGroup calls it from backward's hooks; the division
    runs as the sum lands).
    An element sums the same replicas' values as without the overlap, so with two replicas
    (a + b) the result is the same bits; with more, the ring's order may differ by an ulp."""
    kinds = by_kind(params, grads)
    split, rest = kinds["split"], from_tensor_rank_0(kinds["whole"]) + kinds["partial"]
    replicas = ps.get_data_parallel_group(with_context_parallel=True)
    d, waits = replicas.size(), []
    one = lambda tensors: tensors[0] if len(tensors) == 1 else tensors  # (one: no copy, in place)
    # The division as the sum lands, on the backend's thread (wire._off_wire), not at the wait.
    divide = lambda landed: [g.div_(d) for g in (landed if isinstance(landed, list) else [landed])]
    if split:
        waits.append(_average_over_data_parallel(one(split), replicas, async_op=True,
                                                 then=divide))
    if rest:
        waits.append(_average_replicated(one(rest), ps.get_tensor_and_data_parallel_group(), d,
                                         async_op=True, then=divide))
    experts = ps.get_expert_data_parallel_group()  # (allreduce_expert_grads says why)
    if kinds["expert"] and experts.size() == 1:  # on one rank each: / d alone
        divide(kinds["expert"])
    elif kinds["expert"]:  # summed over the ranks holding them, / d
        waits.append(_allreduce_expert_grads(one(kinds["expert"]), experts, async_op=True,
                                             then=divide))

    def finish():
        for wait in waits:
            wait()
    return finish


def average_replicated(whole, partial=()) -> None:
    """Average over data-parallel replicas, in one all-reduce over *all* ranks of the pipeline
    stage (every rank, without pipeline parallelism), tensors that every tensor-parallel rank
    holds: `whole` (fc's gradient, the loss) or, under sequence parallelism, as a partial sum over
    its own rows (`partial`: the sum over the group is the whole).

    Why not the data-parallel groups ([0, 2, 4] and [1, 3, 5] at TP 2), as Megatron does: those
    are separate communicators, and nothing promises that they add in the same order (NCCL picks
    rings and trees per communicator), so fc could drift apart by an ulp between tensor-parallel
    ranks. One all-reduce over one communicator gives every rank the same bits. To make its sum
    the data-parallel sum, only tensor-parallel rank 0 contributes the whole tensors; every rank
    adds its part of the partial ones.
    """
    _average_replicated(from_tensor_rank_0(whole) + list(partial),
                        ps.get_tensor_and_data_parallel_group(),
                        ps.get_data_parallel_world_size(with_context_parallel=True))


def from_tensor_rank_0(whole):
    """`whole`, zeroed on every tensor-parallel rank but 0: the stage's sum is then the
    data-parallel one (average_replicated)."""
    whole = list(whole)
    if ps.get_tensor_model_parallel_rank() != 0:
        for t in whole:
            t.zero_()
    return whole


@wire.collective("replicated_all_reduce", wire.ALL_REDUCE, summed=True)
def _average_replicated(coalesced, group, data_parallel_size, async_op=False):
    """Sum over the pipeline stage's ranks, divided by the data-parallel size (times the
    context-parallel size), in place; with async_op the sum and torch's handle, the caller
    dividing as the sum lands (start_grad_sync)."""
    work = dist.all_reduce(coalesced, group=group, async_op=async_op)
    if async_op:
        return coalesced, work
    return coalesced.div_(data_parallel_size)


def average_loss(loss, loss_is_partial):
    """The loss alone averaged over the replicas (summed over the rows' ranks where partial),
    where its gradients' sums went on without it."""
    loss = loss.detach().reshape(1).clone()
    average_replicated(*(([], [loss]) if loss_is_partial else ([loss], [])))
    return loss[0]


def broadcast_from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    """The pipeline's last stage's `tensor` (the loss) on every stage; as is without one."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    return _broadcast_from_last_stage(tensor.contiguous(), ps.get_pipeline_model_parallel_group())


@wire.collective("pipeline_loss_broadcast", lambda p: Fraction(1))
def _broadcast_from_last_stage(tensor, group):
    """The last stage's `tensor` into every stage's, in place."""
    dist.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(), group=group)
    return tensor


def reduce_scatter_over_data_parallel_replicas(optimizer, loss, loss_is_partial,
                                               grad_sync=None):
    """--use_distributed_optimizer (distrib_optimizer.py): each replica keeps the average of its
    shard of the gradients (a reduce-scatter of the buffers) instead of all of them; returns the
    loss, averaged beside.

    The other sums come first, on the whole gradients (each parameter's `main_grad`, its view of
    the buffer): sequence parallelism's over the tensor-parallel group and the tied embeddings'
    over the embedding group. A sum commutes with the average, so this order gives the plain
    optimizer's gradients; the older Megatron's order too. With --overlap_grad_reduce the
    buckets' reduce-scatters (`grad_sync`), launched during backward, come first, as in Megatron
    today, and the sums after them: each rank's shard is right (the tied embeddings have a bucket
    of their own, the same shards on both stages; the rest of the buffer, never read, is not),
    equal to the other order up to round-off.
    """
    if grad_sync is not None:
        grad_sync.finish_grad_sync()
    params = optimizer.params  # the model's
    partial = [p.main_grad for p in params if getattr(p, "grad_is_partial", False)]
    if partial:
        _allreduce_layernorm_grads(partial, ps.get_tensor_model_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        allreduce_embedding_grads([p.main_grad for p in params
                                   if getattr(p, "shared_embedding", False)])
    if ps.get_data_parallel_world_size(with_context_parallel=True) > 1 or loss_is_partial:
        loss = average_loss(loss, loss_is_partial)
    if grad_sync is None:
        optimizer.finish_grad_sync()
    return loss
