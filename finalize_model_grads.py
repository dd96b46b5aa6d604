"""What parallelism adds after backward, before the optimizer: Megatron's finalize_model_grads
(megatron/core/distributed/finalize_model_grads.py), called once per step by the loop.

After backward each rank's gradients are not yet the model's:

  * data parallelism: each replica's are its own rows' (Megatron-LM, App. B.1): averaged over
    the replicas;
  * sequence parallelism (Korthikanti et al., 2022, Sec. 4.2.2): the parameters used outside
    the split region (the LayerNorms, ToyModel's fc; marked `grad_is_partial`) saw 1/TP of the
    rows on each rank, so their gradients are partial sums, summed over the tensor-parallel
    group (Megatron's `_allreduce_layernorm_grads`);
  * (pipeline parallelism, the next chapter: the tied embedding's copies on the first and last
    stages, summed over the embedding group, Megatron's `_allreduce_embedding_grads`.)

The loss the ranks report is finished alongside, where the model says it is a partial sum
(`model.loss_is_partial`: ToyModel's under sequence parallelism).
"""

import torch

import communication as comm
import parallel_state as ps
from sequence_parallel import allreduce_sequence_parallel_grads


def finalize_model_grads(model, params, loss: torch.Tensor) -> torch.Tensor:
    """Finish every gradient in `params` (under bf16 the fp32 main parameters, which hold them)
    and the loss; returns the loss every rank reports."""
    if ps.get_data_parallel_world_size() > 1:  # replicas saw different rows: average them
        return average_over_data_parallel_replicas(params, loss, model.loss_is_partial)
    if model.loss_is_partial or any(getattr(p, "grad_is_partial", False) for p in params):
        return allreduce_sequence_parallel_grads(params, loss, model.loss_is_partial)
    return loss.detach()


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
