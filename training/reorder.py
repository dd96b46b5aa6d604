"""The same model with its floating-point sums in another order: a run that differs from the
plain serial one by round-off alone, to measure that round-off with (train.py --reorder_seed K,
compare_runs.py --noise, docs/precision.md).

Tensor parallelism changes the order of a few sums: fc2's over the hidden units becomes p
partial sums, one per rank, added by g; the attention's output projection's over the heads
likewise; and in backward the input gradients of fc1 and of query/key/value, added by f. This
does the same kind of thing to the serial model, with no communication at all:

  * the hidden units of every MLP, and the heads of every attention, are permuted by seed K
    (fc1's rows and fc2's columns; the query/key/value rows and the output projection's
    columns, head by head), which changes nothing in exact arithmetic;
  * fc2 and the output projection add their products in two partial sums, each rounded to the
    model's dtype, then added. In bf16 this matters most: a GEMM accumulates in fp32 and
    rounds once, so a permutation alone changes almost no bf16 result (measured: the default
    toy run's curve stayed bitwise equal for all 200 iterations), while tensor parallelism
    rounds each rank's partial sum to bf16 before g adds them;
  * in backward, likewise the input gradients of fc1 and of the query/key/value projection,
    sums over their outputs that f's all-reduce adds from one partial sum per rank.
    (The tied output layer's input gradient, a sum over the vocabulary that TP splits too, is
    not split here: docs/precision.md says why.)

train.py also takes each batch of a reordered run as two micro-batches and adds their
gradients, the reordering data parallelism does to every gradient's sum over the batch (and
sequence parallelism to the LayerNorms'). Initial weights and data are bit for bit those of the
plain run; model.pt is written back in the plain order. Dropout on the attention
probabilities would fall on other heads (not round-off: arguments.py refuses it).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import MLP
from transformer import SelfAttention


class SplitSumLinear(nn.Linear):
    """nn.Linear whose sum over its inputs is two partial sums, each rounded to the dtype, then
    added: the round-off g adds to a row-parallel layer's output."""

    def forward(self, input_):
        first, *rest = (F.linear(x, w) for x, w in zip(input_.chunk(2, dim=-1),
                                                        self.weight.chunk(2, dim=-1)))
        output = first + rest[0] if rest else first  # one input: nothing to split
        return output if self.bias is None else output + self.bias


class SplitInputGradLinear(nn.Linear):
    """nn.Linear computed as two halves of its outputs, each from the whole input. Forward is
    the same sums; in backward autograd adds the two halves' input gradients, each rounded to
    the dtype: the round-off f's all-reduce adds to a column-parallel layer's input gradient."""

    def forward(self, input_):
        biases = (None, None) if self.bias is None else self.bias.chunk(2)
        halves = [F.linear(input_, w, b) for w, b in zip(self.weight.chunk(2), biases)]
        return torch.cat(halves, dim=-1)

def reorder_sums(model: nn.Module, seed) -> callable:
    """Reorder `model`'s sums in place (nothing when seed is None); returns the function that
    puts a state_dict of it back in the plain order."""
    if seed is None:
        return lambda state_dict: state_dict
    generator = torch.Generator().manual_seed(seed)
    order = {}  # parameter name -> (dim, permutation applied along it)
    for name, module in model.named_modules():
        if isinstance(module, MLP):
            units = torch.randperm(module.fc1.out_features, generator=generator)
            order[f"{name}.fc1.weight"], order[f"{name}.fc2.weight"] = (0, units), (1, units)
            module.fc1.__class__, module.fc2.__class__ = SplitInputGradLinear, SplitSumLinear
        elif isinstance(module, SelfAttention):
            heads = torch.randperm(module.heads_per_rank, generator=generator)
            d = module.head_dim
            rows = torch.cat([torch.arange(h * 3 * d, (h + 1) * 3 * d) for h in heads.tolist()])
            columns = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads.tolist()])
            qkv = f"{name}.query_key_value"
            order[f"{qkv}.weight"], order[f"{qkv}.bias"] = (0, rows), (0, rows)
            order[f"{name}.dense.weight"] = (1, columns)
            module.query_key_value.__class__ = SplitInputGradLinear
            module.dense.__class__ = SplitSumLinear
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (dim, index) in order.items():
            params[name].copy_(params[name].index_select(dim, index.to(params[name].device)))

    def unpermuted(state_dict):
        state = dict(state_dict)
        for name, (dim, index) in order.items():
            state[name] = state[name].index_select(dim, torch.argsort(index))
        return state
    return unpermuted
