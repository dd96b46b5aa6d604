"""Which tokens a context-parallel rank holds: Megatron's get_batch_on_this_cp_rank
(megatron/core/utils.py), as positions and as a tensor's slice.

Under a causal mask, token i attends i + 1 keys, so a plain split (rank r keeps chunk r of C)
gives the last rank C times the work of the first. Megatron cuts the sequence into 2C chunks
and rank r keeps chunks r and 2C - 1 - r: a short row and a long row, the same work on every
rank. C = 2, 8 tokens:

    chunks     0 1 | 2 3 | 4 5 | 6 7
    plain      rank 0: 0 1 2 3            rank 1: 4 5 6 7
    balanced   rank 0: 0 1 . . . . 6 7    rank 1: 2 3 4 5

Every rank can compute every rank's positions without communication; the attention
(attention.py) takes them as a (C, s / C) table, row r rank r's (get_positions_on_every_cp_rank).
"""

import torch

from core import parallel_state as ps
from core.utils import flag_off


def _check(seq_length: int, cp_size: int, load_balanced: bool) -> None:
    chunks = 2 * cp_size if load_balanced else cp_size
    if seq_length % chunks:
        how = "2 x --context_parallel_size" if load_balanced else "--context_parallel_size"
        raise ValueError(f"--seq_length {seq_length} is not divisible by {chunks}, the "
                         f"{'2 x ' if load_balanced else ''}{cp_size} chunks of the "
                         f"{'load-balanced' if load_balanced else 'plain'} context-parallel "
                         f"split; choose a --seq_length divisible by {how}")


def get_positions_on_this_cp_rank(seq_length: int, cp_size: int, cp_rank: int,
                                  load_balanced: bool = True) -> torch.Tensor:
    """The global positions of rank `cp_rank`'s tokens, in the order it holds them (a
    LongTensor of seq_length / cp_size): chunks r and 2C - 1 - r of 2C, or chunk r of C."""
    _check(seq_length, cp_size, load_balanced)
    if not load_balanced:
        size = seq_length // cp_size
        return torch.arange(cp_rank * size, (cp_rank + 1) * size)
    chunk = seq_length // (2 * cp_size)
    first, second = cp_rank, 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk),
                      torch.arange(second * chunk, (second + 1) * chunk)])


def get_positions_on_every_cp_rank(seq_length: int, cp_size: int,
                                   load_balanced: bool = True) -> torch.Tensor:
    """(cp_size, seq_length / cp_size): row r, rank r's positions; what attention.py takes."""
    return torch.stack([get_positions_on_this_cp_rank(seq_length, cp_size, r, load_balanced)
                        for r in range(cp_size)])


def get_batch_on_this_cp_rank(tensor: torch.Tensor, seq_dim: int, cp_size: int, cp_rank: int,
                              load_balanced: bool = True) -> torch.Tensor:
    """This rank's part of `tensor` along `seq_dim` (Megatron: the batch's tokens, labels, loss
    mask and position ids, each cut the same way)."""
    positions = get_positions_on_this_cp_rank(tensor.shape[seq_dim], cp_size, cp_rank,
                                              load_balanced)
    return tensor.index_select(seq_dim, positions.to(tensor.device))


def context_parallel_disabled(model):
    """Run forward-only passes (validation) on whole sequences, every rank alone: they save
    nothing for backward, and the loss is the same (as sequence_parallel_disabled)."""
    return flag_off(model, "context_parallel")


def context_parallel_setup(seq_length: int, cp_comm_type: str = "p2p", load_balanced: bool = True):
    """What the transformer's blocks need (transformer.py's `context_parallel`): every context
    rank's positions, (C, s / C), and the attention's variant; None with no context ranks."""
    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return None
    return get_positions_on_every_cp_rank(seq_length, cp, load_balanced), cp_comm_type
