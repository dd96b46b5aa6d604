"""Expert parallelism: the tokens taken to the ranks that hold their experts, and back
(Megatron-core's megatron/core/transformer/moe/token_dispatcher.py).

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

With expert tensor parallelism (--expert_tensor_parallel_size ETP, experts.py) each expert's
weights are split over ETP ranks, every one of which must see all the expert's tokens: alltoall
gathers what its EP exchange brought over the ETP group and reduce-scatters the partial outputs
back (the two ranks' counts differ: done as all-to-alls of copies, gather_rows and
reduce_scatter_rows); allgather gathers over the ETP x EP ranks at once.

Both start and end in moe_utils.permute / unpermute, which lay a rank's tokens out expert by
expert and put the outputs back in token order. docs/moe.md walks through a small example
(scripts/moe_dispatch_example.py).
"""

from fractions import Fraction

import torch
import torch.distributed as dist

from core import parallel_state as ps
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


@wire.collective("moe_tp_all_to_all", ALL_TO_ALL, agree=wire.check_splits)
def _tp_all_to_all(tensor, group, output_splits, input_splits):
    """_all_to_all's, over the expert tensor-parallel group (counted apart)."""
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


class _Exchange(torch.autograd.Function):
    """A collective autograd runs through: forward `op(x)`, backward `adjoint(grad)`."""

    @staticmethod
    def forward(ctx, x, op, adjoint):
        ctx.adjoint = adjoint
        return op(x.contiguous())

    @staticmethod
    def backward(ctx, grad):
        return ctx.adjoint(grad.contiguous()), None, None


def all_to_all(tokens, group, output_splits, input_splits):
    """The tokens out by their split sizes; in backward their gradients back, the splits
    swapped."""
    return _Exchange.apply(tokens, lambda x: _all_to_all(x, group, output_splits, input_splits),
                           lambda g: _all_to_all(g, group, input_splits, output_splits))


def gather_tokens(tokens, group):
    """Every rank's rows, in rank order; in backward each rank's gradient rows summed back."""
    return _Exchange.apply(tokens, lambda x: _all_gather(x, group),
                           lambda g: _reduce_scatter(g, group))


def reduce_scatter_tokens(tokens, group):
    """The ranks' rows summed, each rank keeping its own; in backward the gradients gathered."""
    return _Exchange.apply(tokens, lambda x: _reduce_scatter(x, group),
                           lambda g: _all_gather(g, group))


def gather_rows(rows, group, sizes):
    """Every rank's rows, rank by rank, `sizes[j]` from rank j (an all-gather of unequal parts:
    an all-to-all of this rank's rows to each); in backward each rank's rows of the gradient
    summed back (reduce_scatter_rows)."""
    return _Exchange.apply(rows, lambda x: _gather_rows(x, group, sizes),
                           lambda g: _reduce_scatter_rows(g, group, sizes))


def reduce_scatter_rows(rows, group, sizes):
    """Every rank's partial sums of all the rows (`sizes[j]` of them rank j's) summed, each rank
    keeping its own; in backward the gradient's rows gathered (gather_rows)."""
    return _Exchange.apply(rows, lambda x: _reduce_scatter_rows(x, group, sizes),
                           lambda g: _gather_rows(g, group, sizes))


def _gather_rows(rows, group, sizes):
    n, mine = group.size(), rows.shape[0]
    return _tp_all_to_all(rows.repeat(n, *[1] * (rows.dim() - 1)), group, sizes, [mine] * n)


def _reduce_scatter_rows(rows, group, sizes):
    n, mine = group.size(), sizes[group.rank()]
    parts = _tp_all_to_all(rows, group, [mine] * n, sizes)
    return parts.view(n, mine, *rows.shape[1:]).sum(0)


def sort_chunks_by_idxs(tokens, split_sizes, order):
    """The chunks of `tokens` (rows, `split_sizes` each) put in `order` (Megatron's)."""
    chunks = tokens.split(split_sizes.tolist())
    return torch.cat([chunks[i] for i in order])


class _Dispatcher:
    """This rank's place: the EP ranks, the ETP ranks, its local experts (ep_rank's E/EP)."""

    def __init__(self, num_experts):
        self.num_experts = num_experts
        self.ep, self.etp = (ps.get_expert_model_parallel_world_size(),
                             ps.get_expert_tensor_parallel_world_size())
        self.num_local_experts = n = num_experts // self.ep
        rank = ps.get_expert_model_parallel_rank()
        self.local_experts = slice(rank * n, (rank + 1) * n)

    def __deepcopy__(self, memo):  # a copy of the model (bf16's fp32 main model): the same groups
        return type(self)(self.num_experts)


class MoEAlltoAllTokenDispatcher(_Dispatcher):
    """alltoall: token_permutation(tokens [T, hidden], probs, routing_map [T, E]) -> (the tokens
    this rank's experts take, expert by expert; tokens per local expert); token_unpermutation(
    their outputs) -> [T, hidden], this rank's tokens' outputs, weighted by their probs."""

    def token_permutation(self, tokens, probs, routing_map):
        self.probs, self.routing_map, self.shape = probs, routing_map, tokens.shape
        ep, etp, n = self.ep, self.etp, self.num_local_experts
        # 1. The counts first: counts[j, t, e], the tokens EP rank j, ETP rank t sends expert e.
        counts = _gather_counts(routing_map.sum(0),
                                ps.get_expert_tensor_and_model_parallel_group()).view(ep, etp, -1)
        t = ps.get_tensor_model_parallel_rank() if etp > 1 else 0
        mine = counts[ps.get_expert_model_parallel_rank(), t].view(ep, n)
        self.input_splits = mine.sum(1).tolist()  # to each EP rank: its experts' share of mine
        local = counts[:, :, self.local_experts]  # [EP ranks, ETP ranks, local experts]
        self.output_splits = local[:, t].sum(1).tolist()  # from each EP rank of my ETP rank
        self.gathered = local.sum((0, 2)).tolist()  # what each ETP rank received
        self.received = local.transpose(0, 1).reshape(-1)  # the chunks gathered: [t][j][e]
        wire.tally("moe_rows_sent", sum(self.input_splits))  # (the communication table's formula)
        wire.tally("moe_rows_received", sum(self.output_splits))
        wire.tally("moe_rows_gathered", sum(self.gathered) if etp > 1 else 0)
        # 2. This rank's tokens expert by expert (so rank by rank), then to their EP ranks, then
        # (ETP) every expert tensor-parallel rank's to each.
        permuted, self.sorted_indices = permute(tokens, routing_map)
        arrived = permuted if ep == 1 else all_to_all(
            permuted, ps.get_expert_model_parallel_group(), self.output_splits, self.input_splits)
        if etp > 1:
            arrived = gather_rows(arrived, ps.get_expert_tensor_parallel_group(), self.gathered)
        # 3. [t][j][local expert] -> [local expert][t][j]: each local expert's tokens together.
        self.by_expert = [(s * ep + j) * n + e for e in range(n) for s in range(etp)
                          for j in range(ep)]
        return sort_chunks_by_idxs(arrived, self.received, self.by_expert), local.sum((0, 1))

    def token_unpermutation(self, expert_output):
        back_order = sorted(range(len(self.by_expert)), key=self.by_expert.__getitem__)
        back = sort_chunks_by_idxs(expert_output, self.received[self.by_expert], back_order)
        if self.etp > 1:  # each ETP rank's partial outputs summed, each keeping its own rows
            back = reduce_scatter_rows(back, ps.get_expert_tensor_parallel_group(),
                                       self.gathered)
        returned = back if self.ep == 1 else all_to_all(
            back, ps.get_expert_model_parallel_group(), self.input_splits, self.output_splits)
        return unpermute(returned, self.sorted_indices, self.shape, self.probs, self.routing_map)


class MoEAllGatherTokenDispatcher(_Dispatcher):
    """allgather: the same interface as MoEAlltoAllTokenDispatcher's, over the ETP x EP ranks."""

    def token_permutation(self, tokens, probs, routing_map):
        # Every rank's tokens, probabilities (with their gradients) and routing, in rank order.
        group = ps.get_expert_tensor_and_model_parallel_group()
        gathered, probs = gather_tokens(tokens, group), gather_tokens(probs, group)
        routing_map = _all_gather(routing_map.contiguous(), group)
        self.probs = probs[:, self.local_experts]
        self.routing_map = routing_map[:, self.local_experts]  # the tokens for this rank's experts
        self.shape = gathered.shape
        permuted, self.sorted_indices = permute(gathered, self.routing_map)
        return permuted, self.routing_map.sum(0)

    def token_unpermutation(self, expert_output):
        # Every gathered token's outputs from this rank's experts (their parts, under ETP),
        # weighted; summed over the ranks (each token's other experts, and parts, are on the
        # others), each rank keeping its own.
        output = unpermute(expert_output, self.sorted_indices, self.shape, self.probs,
                           self.routing_map)
        return reduce_scatter_tokens(output, ps.get_expert_tensor_and_model_parallel_group())


DISPATCHERS = {"alltoall": MoEAlltoAllTokenDispatcher, "allgather": MoEAllGatherTokenDispatcher}
