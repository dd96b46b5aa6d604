"""What parallelism adds after backward, before the optimizer: Megatron's finalize_model_grads
(megatron/core/distributed/finalize_model_grads.py), called once per step by the loop.

After backward each rank's gradients are not yet the model's:

  * data parallelism: each replica's are its own rows' (Megatron-LM, App. B.1): averaged over
    the replicas;
  * sequence parallelism (Korthikanti et al., 2022, Sec. 4.2.2): the parameters used outside
    the split region (the LayerNorms, ToyModel's fc; marked `grad_is_partial`) saw 1/TP of the
    rows on each rank, so their gradients are partial sums, summed over the tensor-parallel
    group (Megatron's `_allreduce_layernorm_grads`);
  * pipeline parallelism (Narayanan et al., 2021): the tied word embeddings live on the first
    stage (the lookup) and the last (the output layer), each copy with the gradient of its own
    use; summed over the embedding group, both take the step the serial model's one weight
    takes, and stay equal (Megatron's `_allreduce_embedding_grads`).

The loss the ranks report is finished alongside: the sum of the micro-batches' shares, averaged
over the replicas where the model says it is a partial sum (`loss_is_partial`: ToyModel's under
sequence parallelism), and sent from the pipeline's last stage, where it is computed, to all.
"""

import torch

import communication as comm
import parallel_state as ps
from distrib_optimizer import DistributedOptimizer
from sequence_parallel import allreduce_sequence_parallel_grads


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
    if isinstance(optimizer, DistributedOptimizer):  # the other sums, then each replica its shard
        loss = reduce_scatter_over_data_parallel_replicas(optimizer, loss, partial)
        return comm.broadcast_from_last_stage(loss.detach())
    if ps.get_data_parallel_world_size() > 1:  # replicas saw different rows: average them
        loss = average_over_data_parallel_replicas(params, loss, partial)
    elif partial or any(getattr(p, "grad_is_partial", False) for p in params):
        loss = allreduce_sequence_parallel_grads(params, loss, partial)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        allreduce_embedding_grads([p.grad for p in params if getattr(p, "shared_embedding", 0)])
    return comm.broadcast_from_last_stage(loss.detach())


def allreduce_embedding_grads(grads):
    """The tied word embeddings' two gradients summed: the first stage's (the lookup's) and the
    last stage's (the output layer's), of the parameters marked `shared_embedding` by the model
    (the stages between hold neither)."""
    if grads:
        comm.sum_over_embedding_group(grads)


def average_over_data_parallel_replicas(params, loss, loss_is_partial):
    """Average every gradient and the loss over the data-parallel replicas; returns the loss.

    Each rank's shards of the split weights over its data-parallel group; what every
    tensor-parallel rank holds, whole (fc's gradient, the loss) or under sequence parallelism as
    its rows' part (`grad_is_partial` parameters), in one all-reduce over all ranks
    (communication.average_replicated says why). The sequence-parallel sums ride along: the
    partial parts add up over the tensor-parallel ranks in the same all-reduce.
    """
    loss = loss.detach().reshape(1).clone()
    kind = lambda p: ("split" if getattr(p, "tensor_model_parallel", False) else
                      "partial" if getattr(p, "grad_is_partial", False) else "whole")
    grads = {"split": [], "partial": [], "whole": []}
    for p in params:
        grads[kind(p)].append(p.grad)
    grads["partial" if loss_is_partial else "whole"].append(loss)
    comm.average_over_data_parallel(grads["split"])
    comm.average_replicated(grads["whole"], grads["partial"])
    return loss[0]


def reduce_scatter_over_data_parallel_replicas(optimizer, loss, loss_is_partial):
    """--use_distributed_optimizer (distrib_optimizer.py): each replica keeps the average of its
    shard of the gradients (a reduce-scatter of the buffers) instead of all of them; returns the
    loss, averaged beside.

    The other sums come first, on the whole gradients (each parameter's `main_grad`, its view of
    the buffer): sequence parallelism's over the tensor-parallel group and the tied embeddings'
    over the embedding group. A sum commutes with the average, so this order gives the plain
    optimizer's gradients; the older Megatron's order too (Megatron today reduce-scatters first
    and then sums the embeddings' shards, which it can because it gives the shared embedding a
    bucket of its own, the same shards on both stages).
    """
    params = optimizer.params  # the model's
    partial = [p.main_grad for p in params if getattr(p, "grad_is_partial", False)]
    if partial:
        comm.sum_over_tensor_parallel(partial)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        allreduce_embedding_grads([p.main_grad for p in params
                                   if getattr(p, "shared_embedding", False)])
    loss = loss.detach().reshape(1).clone()
    if ps.get_data_parallel_world_size() > 1 or loss_is_partial:
        comm.average_replicated(*(([], [loss]) if loss_is_partial else ([loss], [])))
    optimizer.finish_grad_sync()
    return loss[0]
