"""The router: which experts each token goes to, and the losses that keep it balanced
(Megatron-core's megatron/core/transformer/moe/router.py, TopKRouter).

A linear layer of the hidden state gives each token E logits; the top k become its experts
(moe_utils.topk_routing_with_score_function), weighted by the softmax over them. Computed in
fp32 from fp32 copies of the input and the weight (Megatron's --moe-router-dtype fp32; a float64
model's in float64): a bf16 model's bf16 values, routed by fp32 arithmetic. Beside the routing, the
losses the training adds: Switch's load-balancing loss (Megatron's --moe-aux-loss-coeff) and
ST-MoE's z-loss (--moe-z-loss-coeff), and with --moe-expert-capacity-factor the tokens dropped
beyond each expert's capacity.

In a parallel run each rank routes its own tokens, and the load-balancing loss must still be the
serial model's: the tokens per expert are summed over the ranks that hold the rest of the set it
balances (Megatron's aux_loss: one micro-batch, whose sequences sequence and context parallelism
split; its global_aux_loss: every micro-batch of the step so far, over the data-parallel ranks
too), and each rank adds its own tokens' probabilities (load_balancing_group says by what
factor).
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from core import parallel_state as ps
from core import wire
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
                 capacity_factor=None, dtype=None, aux_loss_type="aux_loss", parallel=False):
        """`aux_loss_type`: "aux_loss" (per micro-batch) or "global_aux_loss"; `parallel`: a
        parallel run's router (its token counts summed over parallel_state's groups)."""
        super().__init__()
        self.num_experts, self.topk, self.parallel = num_experts, topk, parallel
        self.aux_loss_coeff, self.z_loss_coeff = aux_loss_coeff, z_loss_coeff
        self.aux_loss_type = aux_loss_type
        self.capacity_factor = capacity_factor  # None: dropless
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)
        self.losses = {}
        self.reset_trackers()

    def forward(self, tokens):
        logits = F.linear(at_least_fp32(tokens), at_least_fp32(self.weight))  # (docstring)
        self.losses = {}
        training = self.training and torch.is_grad_enabled()
        if self.z_loss_coeff and training:  # the mean over the micro-batch's tokens
            _, factor = self.load_balancing_group("z_loss")
            self.losses["z_loss"] = z_loss_func(logits, self.z_loss_coeff) * factor
        probs, routing_map = topk_routing_with_score_function(logits, self.topk)
        if self.aux_loss_coeff and training:
            self.losses["load_balancing_loss"] = self.load_balancing_loss(logits)
        routed = routing_map.sum(0)
        if self.capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(probs, routing_map, self.topk,
                                                             self.capacity_factor)
        if training:  # the step's load, for metrics.csv (training/metrics.py: moe_load)
            kept = routing_map.sum(0)
            step = torch.cat([kept, (routed - kept).sum().reshape(1),
                              self.logged_loss().reshape(1)]).double()
            self.load = step if self.load is None else self.load + step
        return probs, routing_map

    def logged_loss(self):
        """This rank's share of the load-balancing loss the run logs (the serial model's, the
        sum over the ranks divided by the micro-batches): its part before the gradient's factor,
        under aux_loss over the d data-parallel ranks' micro-batches, 1/d."""
        loss = self.losses.get("load_balancing_loss")
        if loss is None:
            return torch.zeros((), device=self.weight.device)
        divisor = self.load_balancing_group(self.aux_loss_type)[1]
        if self.aux_loss_type == "aux_loss" and self.parallel:
            divisor *= ps.get_data_parallel_world_size()
        return loss.detach() / divisor

    def load_balancing_loss(self, logits):
        """Switch's loss over the set Megatron's --moe_router_load_balancing_type balances: this
        micro-batch's tokens (aux_loss), or the step's so far, every data-parallel rank's
        included (global_aux_loss: the counts summed over the micro-batches, their mean taken)."""
        aux_map, scores = compute_routing_scores_for_aux_loss(logits, self.topk)
        group, factor = self.load_balancing_group(self.aux_loss_type)
        tokens_per_expert, num_tokens = aux_map.sum(0), aux_map.shape[0]
        if group is not None:
            tokens_per_expert = _reduce_tokens_per_expert(tokens_per_expert, group)
            num_tokens *= group.size()
        if self.aux_loss_type == "global_aux_loss":
            self.global_tokens_per_expert += tokens_per_expert
            self.ga_steps += 1
            tokens_per_expert = self.global_tokens_per_expert / self.ga_steps
        return switch_load_balancing_loss_func(scores, tokens_per_expert, num_tokens, self.topk,
                                               self.num_experts, self.aux_loss_coeff) * factor

    def load_balancing_group(self, loss_type):
        """(the group over which the tokens a loss balances are spread, the factor this rank's
        part is scaled by); (None, 1) on one rank. A rank's part of a sum (its tokens'
        probabilities) reaches the router's gradient summed over the tensor-parallel ranks
        (the weight's gradient is partial under sequence parallelism) and averaged over the data-
        and context-parallel ones: the factor undoes that average. The z-loss is a mean over the
        micro-batch's tokens, each rank's over its own: 1/TP of it."""
        if not self.parallel:
            return None, 1
        cp, dp = ps.get_context_parallel_world_size(), ps.get_data_parallel_world_size()
        tp_cp = ps.get_tensor_and_context_parallel_group()
        if loss_type == "z_loss":
            return None, cp / tp_cp.size()
        if loss_type == "global_aux_loss":  # the stage's ranks: TP x CP x DP
            return ps.get_tensor_and_data_parallel_group(), cp * dp
        return (tp_cp if tp_cp.size() > 1 else None), cp

    def reset_trackers(self):
        """A new step: global_aux_loss's counts restart (Megatron resets them after each step),
        and `load`, the step's [tokens per expert..., tokens dropped, load-balancing loss] (this
        rank's; training/metrics.py's moe_load sums them). The training loops call it, through
        reset_moe_trackers, before each step."""
        self.global_tokens_per_expert, self.ga_steps = 0, 0
        self.load = None  # (on the run's device: no copy to the host in forward)


def reset_moe_trackers(model):
    """A new step for every router of `model` (TopKRouter.reset_trackers)."""
    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.reset_trackers()


@wire.collective("moe_tokens_per_expert_all_reduce", wire.ALL_REDUCE, summed=True)
def _reduce_tokens_per_expert(tokens_per_expert, group):
    """The ranks' counts summed (a new tensor: the caller's is a routing map's sum)."""
    tokens_per_expert = tokens_per_expert.clone()
    dist.all_reduce(tokens_per_expert, group=group)
    return tokens_per_expert
