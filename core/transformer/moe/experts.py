"""The experts: E MLPs, each run on the tokens routed to it (Megatron-core's
megatron/core/transformer/moe/experts.py, SequentialMLP: one expert after the other; its
GroupedMLP runs them as one grouped GEMM, a kernel this repo does not have). An expert is the
model's own MLP (transformer.py hands in the toy model's, model.py), built by the caller as
Megatron builds its experts from the layer's spec."""

import torch
import torch.nn as nn


class SequentialMLP(nn.Module):
    """`local_experts`: `num_experts` of make_expert(). forward(permuted tokens, laid out expert
    by expert as moe_utils.permute lays them; tokens_per_expert) -> their outputs, in the same
    rows."""

    def __init__(self, num_experts, make_expert):
        super().__init__()
        self.local_experts = nn.ModuleList(make_expert() for _ in range(num_experts))

    def forward(self, permuted_tokens, tokens_per_expert):
        chunks = permuted_tokens.split(tokens_per_expert.tolist())
        return torch.cat([expert(chunk) for expert, chunk in zip(self.local_experts, chunks)])
