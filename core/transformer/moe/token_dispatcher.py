"""Expert parallelism: the tokens taken to the ranks that hold their experts, and back
(Megatron-core's megatron/core/transformer/moe/token_dispatcher.py, its expert tensor-parallel
size 1).

With --expert_model_parallel_size EP each rank of an expert-model-parallel group holds E/EP of
a layer's experts (rank r: experts r E/EP ... (r+1) E/EP - 1) and routes its own tokens; a
token's hidden state must reach the rank of each expert it is routed to, and the expert's
output come back. Two ways, as Megatron's --moe-token-dispatcher-type:

  alltoall   each rank sends each other rank exactly the tokens routed to its experts. The
             sizes differ from step to step, so the per-expert counts go first (an all-gather
             of E integers), then the tokens (an all-to-all with those split sizes), and the
             reverse all-to-all brings the outputs back (Megatron's MoEAlltoAllTokenDispatcher).
  allgather  every rank gathers every rank's tokens and keeps those its experts take; the
             outputs, weighted, are summed back to their ranks by a reduce-scatter
             (MoEAllGatherTokenDispatcher). EP x more bytes, no counts: simple, for small EP.

Both start and end in moe_utils.permute / unpermute, which lay a rank's tokens out expert by
expert and put the outputs back in token order. docs/moe.md walks through a small example
(`python -m core.transformer.moe.token_dispatcher`, worked_example below).
"""

from fractions import Fraction

import torch
import torch.distributed as dist

from core import wire
from core.transformer.moe.moe_utils import permute, unpermute
from core.utils import dist_all_gather_func, dist_reduce_scatter_func

ALL_TO_ALL = lambda p: Fraction(p - 1, p)  # with balanced routing, all but this rank's own 1/p


@wire.collective("moe_all_to_all", ALL_TO_ALL, agree=wire.check_splits)
def _all_to_all(tensor, group, output_splits, input_splits):
    """Rows input_splits[j] of `tensor` to rank j of `group`; output_splits[j] rows from it."""
    output = tensor.new_empty((sum(output_splits), *tensor.shape[1:]))
    dist.all_to_all_single(output, tensor, output_splits, input_splits, group=group)
    return output


@wire.collective("moe_counts_all_gather", wire.ALL_GATHER)
def _gather_counts(counts, group):
    """Every rank's tokens per expert, [ranks, experts] (the split sizes, before the tokens)."""
    output = counts.new_empty(group.size() * counts.numel())
    dist_all_gather_func(output, counts, group=group)
    return output.view(group.size(), -1)


@wire.collective("moe_all_gather", wire.ALL_GATHER)
def _all_gather(tensor, group):
    output = tensor.new_empty((group.size() * tensor.shape[0], *tensor.shape[1:]))
    dist_all_gather_func(output, tensor, group=group)
    return output


@wire.collective("moe_reduce_scatter", wire.REDUCE_SCATTER, summed=True)
def _reduce_scatter(tensor, group):
    output = tensor.new_empty((tensor.shape[0] // group.size(), *tensor.shape[1:]))
    dist_reduce_scatter_func(output, tensor, group=group)
    return output


class _AllToAll(torch.autograd.Function):
    """The tokens out by their split sizes; in backward their gradients back, the splits
    swapped."""

    @staticmethod
    def forward(ctx, tokens, group, output_splits, input_splits):
        ctx.group, ctx.splits = group, (output_splits, input_splits)
        return _all_to_all(tokens.contiguous(), group, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        grad = _all_to_all(grad.contiguous(), ctx.group, input_splits, output_splits)
        return grad, None, None, None


class _GatherTokens(torch.autograd.Function):
    """Every rank's rows, in rank order; in backward each rank's gradient rows summed back."""

    @staticmethod
    def forward(ctx, tokens, group):
        ctx.group = group
        return _all_gather(tokens.contiguous(), group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad.contiguous(), ctx.group), None


class _ReduceScatterTokens(torch.autograd.Function):
    """The ranks' rows summed, each rank keeping its own; in backward the gradients gathered."""

    @staticmethod
    def forward(ctx, tokens, group):
        ctx.group = group
        return _reduce_scatter(tokens.contiguous(), group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad.contiguous(), ctx.group), None


def sort_chunks_by_idxs(tokens, split_sizes, order):
    """The chunks of `tokens` (rows, `split_sizes` each) put in `order` (Megatron's)."""
    chunks = tokens.split(split_sizes.tolist())
    return torch.cat([chunks[i] for i in order])


class _Dispatcher:
    def __init__(self, num_experts, group):
        self.num_experts, self.group, self.ep = num_experts, group, group.size()

    def __deepcopy__(self, memo):  # a copy of the model (bf16's fp32 main model): the same group
        return type(self)(self.num_experts, self.group)


class MoEAlltoAllTokenDispatcher(_Dispatcher):
    """alltoall: token_permutation(tokens [T, hidden], probs, routing_map [T, E]) -> (the tokens
    this rank's experts take, expert by expert; tokens per local expert); token_unpermutation(
    their outputs) -> [T, hidden], this rank's tokens' outputs, weighted by their probs."""

    def __init__(self, num_experts, group):
        super().__init__(num_experts, group)
        rank = group.rank()
        self.num_local_experts = num_experts // self.ep
        self.local_experts = slice(rank * self.num_local_experts,
                                   (rank + 1) * self.num_local_experts)

    def token_permutation(self, tokens, probs, routing_map):
        self.probs, self.routing_map, self.shape = probs, routing_map, tokens.shape
        # 1. The counts first: counts[j, e], the tokens rank j sends expert e.
        counts = _gather_counts(routing_map.sum(0), self.group)
        mine = counts[self.group.rank()].view(self.ep, self.num_local_experts)
        self.input_splits = mine.sum(1).tolist()  # to each rank: its experts' share of mine
        local = counts[:, self.local_experts]  # [ranks, local experts]: what comes here
        self.output_splits = local.sum(1).tolist()
        self.received = local.reshape(-1)  # the chunks as they arrive: rank by rank
        wire.tally("moe_rows_sent", sum(self.input_splits))  # (the communication table's formula)
        wire.tally("moe_rows_received", sum(self.output_splits))
        # 2. This rank's tokens expert by expert (so rank by rank), then to their ranks.
        permuted, self.sorted_indices = permute(tokens, routing_map)
        arrived = _AllToAll.apply(permuted, self.group, self.output_splits, self.input_splits)
        # 3. [rank][local expert] -> [local expert][rank]: each local expert's tokens together.
        n, ep = self.num_local_experts, self.ep
        by_expert = [r * n + e for e in range(n) for r in range(ep)]
        return sort_chunks_by_idxs(arrived, self.received, by_expert), local.sum(0)

    def token_unpermutation(self, expert_output):
        n, ep = self.num_local_experts, self.ep
        by_rank = [e * ep + r for r in range(ep) for e in range(n)]
        sizes = self.received.view(ep, n).T.reshape(-1)  # the chunks in expert-major order
        back = sort_chunks_by_idxs(expert_output, sizes, by_rank)
        returned = _AllToAll.apply(back, self.group, self.input_splits, self.output_splits)
        return unpermute(returned, self.sorted_indices, self.shape, self.probs, self.routing_map)


class MoEAllGatherTokenDispatcher(_Dispatcher):
    """allgather: the same interface as MoEAlltoAllTokenDispatcher's."""

    def __init__(self, num_experts, group):
        super().__init__(num_experts, group)
        rank, n = group.rank(), num_experts // self.ep
        self.local_experts = slice(rank * n, (rank + 1) * n)

    def token_permutation(self, tokens, probs, routing_map):
        # Every rank's tokens, probabilities (with their gradients) and routing, in rank order.
        gathered = _GatherTokens.apply(tokens, self.group)
        probs = _GatherTokens.apply(probs, self.group)
        routing_map = _all_gather(routing_map.contiguous(), self.group)
        self.probs = probs[:, self.local_experts]
        self.routing_map = routing_map[:, self.local_experts]  # the tokens for this rank's experts
        self.shape = gathered.shape
        permuted, self.sorted_indices = permute(gathered, self.routing_map)
        return permuted, self.routing_map.sum(0)

    def token_unpermutation(self, expert_output):
        # Every gathered token's outputs from this rank's experts, weighted; summed over the
        # ranks (each token's other experts' are on the others), each rank keeping its own.
        output = unpermute(expert_output, self.sorted_indices, self.shape, self.probs,
                           self.routing_map)
        return _ReduceScatterTokens.apply(output, self.group)


DISPATCHERS = {"alltoall": MoEAlltoAllTokenDispatcher, "allgather": MoEAllGatherTokenDispatcher}
