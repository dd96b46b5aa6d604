"""Cross-entropy over logits split along the vocabulary, without ever gathering them.

Megatron-LM (Shoeybi et al., 2019), Sec. 3, last paragraphs: the output
layer's GEMM [Y_1, Y_2] = [X E_1, X E_2] is split along the vocabulary, and
all-gathering the logits would move batch x sequence x vocabulary numbers.
Instead each rank keeps its slice and the loss is put together from three
numbers per token, each one all-reduce wide:

    m   = max_v z_v                  (all-reduce max: a shift, for exp's range)
    S   = sum_v exp(z_v - m)         (all-reduce sum)
    z_t = the target's logit         (all-reduce sum: only its owner adds it)

    loss = log S - (z_t - m)

S and z_t travel in one all-reduce. The backward needs no communication:
dloss/dz_v = softmax_v - [v == t], and each rank holds its slice of both
(Megatron's `_VocabParallelCrossEntropy`, tensor_parallel/cross_entropy.py).

A vocabulary that the tensor-parallel size does not divide is padded
(`parallel_layers.vocab_size_with_padding`); the padded entries' logits are
masked to -inf here, so they never take probability and the loss equals the
unpadded vocabulary's.
"""

import torch
import torch.distributed as dist

from core import parallel_state as ps
from core import wire


def vocab_range(per_partition, rank):
    """[first, last) of the vocabulary a rank holds (Megatron's VocabUtility)."""
    return rank * per_partition, (rank + 1) * per_partition


@wire.collective("all_reduce", wire.ALL_REDUCE)
def _all_reduce_max(tensor, group):
    """Every rank's largest logit per token, the largest of them, in place."""
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


@wire.collective("all_reduce", wire.ALL_REDUCE, summed=True)
def _all_reduce_sum(tensor, group):
    """The ranks' partial sums, summed, in place."""
    dist.all_reduce(tensor, group=group)
    return tensor


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from this rank's vocabulary slice of the logits."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, vocab_size):
        per_partition = vocab_parallel_logits.shape[-1]
        first, last = vocab_range(per_partition, ps.get_tensor_model_parallel_rank())
        logits = vocab_parallel_logits.clone()  # the caller's logits stay as they were
        if vocab_size is not None and last > vocab_size:  # padded entries never take probability
            logits[..., max(vocab_size - first, 0):] = float("-inf")

        one_rank = ps.get_tensor_model_parallel_world_size() == 1  # nothing to reduce
        logits_max = logits.max(dim=-1).values
        if not one_rank:
            _all_reduce_max(logits_max, ps.get_tensor_model_parallel_group())
        logits -= logits_max.unsqueeze(-1)

        # The target's logit lives on one rank: the others look up index 0 and add zero.
        not_here = (target < first) | (target >= last)
        local_target = (target - first).masked_fill(not_here, 0)
        predicted = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        predicted = predicted.masked_fill(not_here, 0.0)

        exp_logits = logits.exp_()
        sums = torch.stack([predicted, exp_logits.sum(dim=-1)])  # one all-reduce for both
        if not one_rank:
            _all_reduce_sum(sums, ps.get_tensor_model_parallel_group())
        predicted, sum_exp = sums[0], sums[1]

        ctx.save_for_backward(exp_logits.div_(sum_exp.unsqueeze(-1)), not_here, local_target)
        return torch.log(sum_exp) - predicted

    @staticmethod
    def backward(ctx, grad_output):
        softmax, not_here, local_target = ctx.saved_tensors
        grad = softmax.clone()
        # d loss / d z_t = softmax_t - 1, on the rank that holds the target.
        here = (~not_here).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -here.unsqueeze(-1))
        return grad * grad_output.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits, target, vocab_size=None):
    """Per-token loss (shape of `target`) from this rank's slice [..., V_pad / p] of the logits.

    vocab_size: the vocabulary before padding; logits beyond it are ignored.
    """
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, vocab_size)
