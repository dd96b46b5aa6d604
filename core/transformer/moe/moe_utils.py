"""A mixture of experts' arithmetic, with the names of Megatron-core's
megatron/core/transformer/moe/moe_utils.py: which experts each token goes to (the router's top
k), the two losses that keep the router healthy, the capacity that drops tokens, and the
permutation that lays the tokens out expert by expert and back.

The MLP becomes E experts; a router scores each token against each expert and sends it to its
top k (Shazeer et al. 2017; GShard, Lepikhin et al. 2021; Switch, Fedus et al. 2022), the
expert outputs weighted by the scores. Everything here is per token, on a
[tokens, experts] grid:

    logits     [T, E]   the router's scores (a linear layer of the hidden state)
    probs      [T, E]   the softmax over the k chosen experts, 0 elsewhere
    routing_map[T, E]   True where a token goes to an expert: k per row

The scores are taken in fp32 at least, whatever the model's dtype (Megatron's softmax is fp32;
here the top-k too: a bf16 logit is rounded to 8 bits, ties between close experts resolved by
the rounding, not by the router); a float64 model's in float64 (Megatron's --moe-router-dtype
fp64), so that its runs agree to float64's round-off.

router.py, experts.py, token_dispatcher.py and moe_layer.py build on this file;
tests/test_moe.py checks each function.
"""

import math

import torch


def at_least_fp32(t):
    """`t` in fp32, or as it is if wider (float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def topk_routing_with_score_function(logits, topk, use_pre_softmax=False):
    """(probs, routing_map), each [tokens, experts], from the router's `logits` [tokens,
    experts], in fp32 at least: each token's top `topk` experts by logit, their probabilities
    the softmax over those k (Megatron's default), or with `use_pre_softmax` the softmax over
    all experts taken first and its top k kept as they are."""
    logits = at_least_fp32(logits)
    if use_pre_softmax:
        probs, top = torch.topk(torch.softmax(logits, dim=-1), topk, dim=1)
    else:
        scores, top = torch.topk(logits, topk, dim=1)
        probs = torch.softmax(scores, dim=-1)
    routing_probs = torch.zeros_like(logits).scatter(1, top, probs)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)
    return routing_probs, routing_map


def compute_routing_scores_for_aux_loss(logits, topk):
    """(routing_map, scores) for the load-balancing loss: the softmax over every expert (fp32+),
    and each token's top k of it, as the loss counts them."""
    scores = torch.softmax(at_least_fp32(logits), dim=-1)
    top = torch.topk(scores, topk, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, top, True), scores


def switch_load_balancing_loss_func(probs, tokens_per_expert, total_num_tokens, topk,
                                    num_experts, moe_aux_loss_coeff):
    """The load-balancing loss (Switch Transformer, Fedus et al. 2022, Sec. 2.2; here with top k):

        coeff * E * sum_i f_i * P_i,   f_i = tokens_per_expert_i / (T k),  P_i = mean_t probs_ti

    f_i, the share of the routed tokens expert i got, is not differentiable; P_i, the router's
    mean probability for it, is: the gradient pushes probability away from the crowded experts.
    Uniform routing gives coeff (f_i = P_i = 1/E). `probs`: this rank's tokens' softmax over
    every expert [tokens, E]; `tokens_per_expert` and `total_num_tokens` over the set the loss
    balances (a micro-batch, or the global batch: Megatron's aux_loss and global_aux_loss), so
    that a rank holding part of the tokens adds its part of sum_t probs_ti (the sum over ranks is
    the whole loss)."""
    aggregated_probs_per_expert = probs.sum(dim=0)
    return torch.sum(aggregated_probs_per_expert * tokens_per_expert) * (
        num_experts * moe_aux_loss_coeff / (topk * total_num_tokens * total_num_tokens))


def z_loss_func(logits, z_loss_coeff):
    """The router z-loss (ST-MoE, Zoph et al. 2022): coeff * mean_t logsumexp(logits_t)^2,
    which keeps the router's logits small (fp32: exp of a large bf16 logit loses the rest)."""
    return torch.mean(torch.square(torch.logsumexp(at_least_fp32(logits), dim=-1))) * z_loss_coeff


def get_capacity(num_tokens, num_experts, capacity_factor, min_capacity=None):
    """Tokens one expert takes at most: ceil(num_tokens / num_experts x capacity_factor), where
    num_tokens counts a token once per chosen expert (T k)."""
    capacity = math.ceil((num_tokens / num_experts) * capacity_factor)
    return max(capacity, min_capacity) if min_capacity is not None else capacity


def apply_router_token_dropping(routing_probs, routing_map, router_topk, capacity_factor,
                                drop_policy="probs"):
    """(probs, routing_map) with each expert's tokens beyond its capacity dropped
    (--moe_expert_capacity_factor; without it, dropless). An expert keeps its `capacity`
    highest-probability tokens ("probs", Megatron's default) or its first ones in token order
    ("position"); a dropped (token, expert) pair gets no output from that expert, its
    probability zero: the token's other experts, and the residual, carry it."""
    num_tokens, num_experts = routing_probs.shape
    capacity = get_capacity(num_tokens * router_topk, num_experts, capacity_factor)
    if capacity >= num_tokens:  # every token fits every expert
        return routing_probs, routing_map
    if drop_policy == "probs":
        keep = torch.topk(routing_probs, capacity, dim=0).indices
    elif drop_policy == "position":  # the first `capacity` routed tokens: their row order
        rank = torch.arange(num_tokens, 0, -1, device=routing_map.device)[:, None]
        keep = torch.topk(routing_map.long() * rank, capacity, dim=0).indices
    else:
        raise ValueError(f"drop_policy {drop_policy!r}: use 'probs' or 'position'")
    capacity_mask = torch.zeros_like(routing_map).scatter(0, keep, True)
    final_map = routing_map & capacity_mask
    return routing_probs * final_map, final_map


def permute(tokens, routing_map):
    """(permuted tokens, sorted_indices): `tokens` [T, hidden] laid out expert by expert, a
    token once for each expert it goes to, in token order within an expert; sorted_indices[j]
    is the token row j came from. Expert i's rows are the next routing_map[:, i].sum() ones."""
    num_tokens, num_experts = routing_map.shape
    expert_major = routing_map.T  # [E, T]: each expert's tokens, in token order
    token_indices = torch.arange(num_tokens, device=tokens.device).expand(num_experts, -1)
    sorted_indices = token_indices.masked_select(expert_major)
    return tokens.index_select(0, sorted_indices), sorted_indices


def unpermute(permuted_tokens, sorted_indices, restore_shape, probs, routing_map):
    """The experts' outputs back in token order, each weighted by its routing probability and
    summed over the token's experts: output_t = sum_i probs_ti expert_i(x_t). `probs` and
    `routing_map` are permute's [T, E]."""
    weights = probs.T.masked_select(routing_map.T)  # in permute's row order
    # Weighted and summed in the probabilities' dtype (fp32 under bf16), cast once at the end,
    # as Megatron's unpermute does.
    weighted = permuted_tokens * weights.unsqueeze(-1)
    output = torch.zeros(restore_shape, dtype=weighted.dtype, device=weighted.device)
    return output.index_add_(0, sorted_indices, weighted).to(permuted_tokens.dtype)


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """The auxiliary losses' gradient, injected in backward at the MoE layer's output
    (Megatron's): forward returns the output unchanged; backward gives the losses the gradient
    `main_loss_backward_scale`, the factor the main loss is scaled by (1/m under m
    micro-batches, set by the schedule's forward_step). So the losses train the router where
    they are computed, on every pipeline stage, and are not in the loss the run reports."""

    main_loss_backward_scale = 1.0

    @staticmethod
    def forward(ctx, output, aux_loss):
        ctx.save_for_backward(aux_loss)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, MoEAuxLossAutoScaler.main_loss_backward_scale)

    @staticmethod
    def set_loss_scale(scale):
        MoEAuxLossAutoScaler.main_loss_backward_scale = scale
