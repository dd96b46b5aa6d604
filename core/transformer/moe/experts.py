"""The experts: E MLPs, each run on the tokens routed to it (Megatron-core's
megatron/core/transformer/moe/experts.py, SequentialMLP: one expert after the other; its
GroupedMLP runs them as one grouped GEMM, a kernel this repo does not have). An expert is the
model's own MLP (transformer.py hands in the toy model's, model.py), built by the caller as
Megatron builds its experts from the layer's spec.

Expert tensor parallelism (--expert_tensor_parallel_size ETP) splits each expert's weights as
Megatron-LM splits the MLP (Sec. 3, Fig. 3a): fc1 by its rows (the hidden units), fc2 by its
columns, each rank keeping 1/ETP of the hidden units. Fed every token of its expert-tensor-parallel
group (the token dispatcher gathers them), a rank's expert returns its part of each output, a
partial sum the dispatcher's reduce-scatter adds up: no f and g inside the expert."""

import torch
import torch.nn as nn


class SequentialMLP(nn.Module):
    """`local_experts`: this rank's experts, named by their number among all `num_experts`
    (expert parallelism's rank r holds `local` = r E/EP ... (r+1) E/EP - 1; serial all), so that
    every rank's parameters carry the serial model's names; under expert tensor parallelism each
    is `etp_rank`'s 1/`etp` of the expert (shard_expert). forward(permuted tokens, laid out
    expert by expert as moe_utils.permute lays them; tokens_per_expert) -> their outputs, in the
    same rows."""

    def __init__(self, num_experts, make_expert, local=None, etp=1, etp_rank=0):
        super().__init__()
        local = range(num_experts) if local is None else local
        # Every expert drawn, in order, then this rank's kept: each has serial's initial weights.
        experts = [make_expert() for _ in range(num_experts)]
        self.local_experts = nn.ModuleDict({str(i): shard_expert(experts[i], etp, etp_rank)
                                            for i in local})
        for p in self.parameters():  # Megatron's mark: summed over the expert-data-parallel
            p.allreduce = False       # group, not averaged over the data-parallel one

    def forward(self, permuted_tokens, tokens_per_expert):
        chunks = permuted_tokens.split(tokens_per_expert.tolist())
        return torch.cat([expert(chunk) for expert, chunk in
                          zip(self.local_experts.values(), chunks)])


@torch.no_grad()
def shard_expert(expert, etp, rank):
    """`expert` (the toy MLP: fc1 [F, H], ReLU, fc2 [H, F], no biases) cut to `rank`'s 1/`etp`
    of its F hidden units, in place: fc1's rows and fc2's columns, marked as tensor-parallel
    shards (their dimension, for checkpoints and the clipping norm). At `etp` 1, as it is."""
    if etp == 1:
        return expert
    for linear, dim in ((expert.fc1, 0), (expert.fc2, 1)):
        linear.weight = nn.Parameter(linear.weight.chunk(etp, dim)[rank].clone())
        linear.weight.tensor_model_parallel, linear.weight.partition_dim = True, dim
    return expert
