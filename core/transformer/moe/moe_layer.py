"""The routed MLP: router, experts, and the tokens taken to their experts and back
(Megatron-core's megatron/core/transformer/moe/moe_layer.py, MoELayer).

    tokens [T, hidden] -> router: probs, routing_map [T, E]
                       -> permute: each token once per expert, expert by expert
                       -> experts: expert i on its rows
                       -> unpermute: back in token order, each token's experts weighted by probs

On one device (what serial runs) the tokens are permuted in place; Megatron's token dispatchers
move them to the ranks that hold their experts (the all-to-all of expert parallelism), which is
to come (issue 40).
"""

import torch.nn as nn

from core.transformer.moe.experts import SequentialMLP
from core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, permute, unpermute
from core.transformer.moe.router import TopKRouter


class MoELayer(nn.Module):
    """forward(hidden [seq, batch, width]) -> [seq, batch, width]; after it, `router.losses`
    holds this forward's auxiliary losses, and `tokens_per_expert` its routed counts."""

    def __init__(self, width, num_experts, topk, make_expert, aux_loss_coeff=0.0,
                 z_loss_coeff=None, capacity_factor=None, dtype=None):
        """`make_expert()`: one expert, a module of [tokens, width] -> [tokens, width]."""
        super().__init__()
        self.router = TopKRouter(width, num_experts, topk, aux_loss_coeff, z_loss_coeff,
                                 capacity_factor, dtype)
        self.experts = SequentialMLP(num_experts, make_expert)
        self.tokens_per_expert = None

    def forward(self, hidden):
        tokens = hidden.reshape(-1, hidden.shape[-1])
        probs, routing_map = self.router(tokens)
        self.tokens_per_expert = routing_map.sum(0)
        permuted, sorted_indices = permute(tokens, routing_map)
        expert_output = self.experts(permuted, self.tokens_per_expert)
        output = unpermute(expert_output, sorted_indices, tokens.shape, probs, routing_map)
        if self.router.losses:  # their gradient, in backward (their value not in the loss)
            output = MoEAuxLossAutoScaler.apply(output, sum(self.router.losses.values()))
        return output.view_as(hidden)
