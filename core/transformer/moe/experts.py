"""The experts: E MLPs, each run on the tokens routed to it (Megatron-core's
megatron/core/transformer/moe/experts.py, SequentialMLP: one expert after the other; its
GroupedMLP runs them as one grouped GEMM, a kernel this repo does not have). An expert is the
model's own MLP (transformer.py hands in the toy model's, model.py), built by the caller as
Megatron builds its experts from the layer's spec."""

import torch
import torch.nn as nn


class SequentialMLP(nn.Module):
    """`local_experts`: this rank's experts, named by their number among all `num_experts`
    (expert parallelism's rank r holds `local` = r E/EP ... (r+1) E/EP - 1; serial all), so that
    every rank's parameters carry the serial model's names. forward(permuted tokens, laid out
    expert by expert as moe_utils.permute lays them; tokens_per_expert) -> their outputs, in the
    same rows."""

    def __init__(self, num_experts, make_expert, local=None):
        super().__init__()
        local = range(num_experts) if local is None else local
        # Every expert drawn, in order, then this rank's kept: each has serial's initial weights.
        experts = [make_expert() for _ in range(num_experts)]
        self.local_experts = nn.ModuleDict({str(i): experts[i] for i in local})
        for p in self.parameters():  # Megatron's mark: summed over the expert-data-parallel
            p.allreduce = False       # group, not averaged over the data-parallel one

    def forward(self, permuted_tokens, tokens_per_expert):
        chunks = permuted_tokens.split(tokens_per_expert.tolist())
        return torch.cat([expert(chunk) for expert, chunk in
                          zip(self.local_experts.values(), chunks)])
