"""The routed MLP: router, experts, and the tokens taken to their experts and back
(Megatron-core's megatron/core/transformer/moe/moe_layer.py, MoELayer).

    tokens [T, hidden] -> router: probs, routing_map [T, E]
                       -> permute: each token once per expert, expert by expert
                       -> experts: expert i on its rows
                       -> unpermute: back in token order, each token's experts weighted by probs

On one device (what serial runs, and every rank at expert-parallel size 1) the tokens are
permuted in place; under expert parallelism a token dispatcher (token_dispatcher.py) takes them to
the ranks that hold their experts and back, permute and unpermute at its two ends.
"""

import torch.nn as nn

from core import parallel_state as ps
from core.transformer.moe.experts import SequentialMLP
from core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, permute, unpermute
from core.transformer.moe.router import TopKRouter
from core.transformer.moe.token_dispatcher import DISPATCHERS


class MoELayer(nn.Module):
    """forward(hidden [seq, batch, width]) -> [seq, batch, width]; after it, `router.losses`
    holds this forward's auxiliary losses (and `router.load` the step's counts so far)."""

    def __init__(self, width, num_experts, topk, make_expert, aux_loss_coeff=0.0,
                 z_loss_coeff=None, capacity_factor=None, dtype=None, aux_loss_type="aux_loss",
                 parallel=False, dispatcher="alltoall"):
        """`make_expert()`: one expert, a module of [tokens, width] -> [tokens, width];
        `parallel`: a parallel run's layer, its experts spread over parallel_state's
        expert-model-parallel group and split over its expert-tensor-parallel group (where they
        have more than one rank), the tokens taken there by `dispatcher`, "alltoall" or
        "allgather"."""
        super().__init__()
        self.router = TopKRouter(width, num_experts, topk, aux_loss_coeff, z_loss_coeff,
                                 capacity_factor, dtype, aux_loss_type, parallel)
        etp = ps.get_expert_tensor_parallel_world_size() if parallel else 1
        self.dispatcher = None
        if parallel and ps.get_expert_model_parallel_world_size() * etp > 1:
            self.dispatcher = DISPATCHERS[dispatcher](num_experts)
        local = self.dispatcher.local_experts if self.dispatcher else slice(0, num_experts)
        self.experts = SequentialMLP(num_experts, make_expert, range(num_experts)[local], etp,
                                     ps.get_tensor_model_parallel_rank() if etp > 1 else 0)

    def forward(self, hidden):
        tokens = hidden.reshape(-1, hidden.shape[-1])
        probs, routing_map = self.router(tokens)
        if self.dispatcher is None:
            permuted, sorted_indices = permute(tokens, routing_map)
            expert_output = self.experts(permuted, routing_map.sum(0))
            output = unpermute(expert_output, sorted_indices, tokens.shape, probs, routing_map)
        else:  # to the experts' ranks and back (token_dispatcher.py)
            permuted, tokens_per_local_expert = self.dispatcher.token_permutation(
                tokens, probs, routing_map)
            expert_output = self.experts(permuted, tokens_per_local_expert)
            output = self.dispatcher.token_unpermutation(expert_output)
        if self.router.losses:  # their gradient, in backward (their value not in the loss)
            output = MoEAuxLossAutoScaler.apply(output, sum(self.router.losses.values()))
        return output.view_as(hidden)
