"""The router: which experts each token goes to, and the losses that keep it balanced
(Megatron-core's megatron/core/transformer/moe/router.py, TopKRouter).

A linear layer of the hidden state gives each token E logits; the top k become its experts
(moe_utils.topk_routing_with_score_function), weighted by the softmax over them. Computed in
fp32 from fp32 copies of the input and the weight (Megatron's --moe-router-dtype fp32; a float64
model's in float64): a bf16 model's bf16 values, routed by fp32 arithmetic. Beside the routing, the
losses the training adds: Switch's load-balancing loss (Megatron's --moe-aux-loss-coeff) and
ST-MoE's z-loss (--moe-z-loss-coeff), and with --moe-expert-capacity-factor the tokens dropped
beyond each expert's capacity.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    at_least_fp32,
    compute_routing_scores_for_aux_loss,
    switch_load_balancing_loss_func,
    topk_routing_with_score_function,
    z_loss_func,
)


class TopKRouter(nn.Module):
    """`weight` (experts, hidden), N(0, 0.02) as the model's other weights; forward(tokens
    [T, hidden]) -> (probs, routing_map), each [T, experts], and `losses`, a training forward's
    {"load_balancing_loss", "z_loss"} (as Megatron, only in training with gradients on:
    moe_layer.py injects their gradient in backward)."""

    def __init__(self, hidden_size, num_experts, topk, aux_loss_coeff=0.0, z_loss_coeff=None,
                 capacity_factor=None, dtype=None):
        super().__init__()
        self.num_experts, self.topk = num_experts, topk
        self.aux_loss_coeff, self.z_loss_coeff = aux_loss_coeff, z_loss_coeff
        self.capacity_factor = capacity_factor  # None: dropless
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)
        self.losses = {}

    def forward(self, tokens):
        logits = F.linear(at_least_fp32(tokens), at_least_fp32(self.weight))  # (docstring)
        self.losses = {}
        training = self.training and torch.is_grad_enabled()
        if self.z_loss_coeff and training:
            self.losses["z_loss"] = z_loss_func(logits, self.z_loss_coeff)
        probs, routing_map = topk_routing_with_score_function(logits, self.topk)
        if self.aux_loss_coeff and training:  # Megatron's aux_loss: this micro-batch's tokens
            aux_map, scores = compute_routing_scores_for_aux_loss(logits, self.topk)
            self.losses["load_balancing_loss"] = switch_load_balancing_loss_func(
                scores, aux_map.sum(0), tokens.shape[0], self.topk, self.num_experts,
                self.aux_loss_coeff)
        if self.capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(probs, routing_map, self.topk,
                                                             self.capacity_factor)
        return probs, routing_map
