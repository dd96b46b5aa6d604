"""The experts: E of the toy model's MLP (model.py), each run on the tokens routed to it
(Megatron-core's megatron/core/transformer/moe/experts.py, SequentialMLP: one expert after the
other; its GroupedMLP runs them as one grouped GEMM, a kernel this repo does not have)."""

import torch
import torch.nn as nn

from model import MLP


class SequentialMLP(nn.Module):
    """`local_experts`: E MLPs of input -> hidden -> input. forward(permuted tokens, laid out
    expert by expert as moe_utils.permute lays them; tokens_per_expert) -> their outputs, in the
    same rows."""

    def __init__(self, num_experts, hidden_size, ffn_hidden_size, dtype=None):
        super().__init__()
        self.local_experts = nn.ModuleList(MLP(hidden_size, ffn_hidden_size, dtype=dtype)
                                           for _ in range(num_experts))

    def forward(self, permuted_tokens, tokens_per_expert):
        chunks = permuted_tokens.split(tokens_per_expert.tolist())
        return torch.cat([expert(chunk) for expert, chunk in zip(self.local_experts, chunks)])
