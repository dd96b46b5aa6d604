"""A checkpoint saved at one tensor-parallel size, cut into the shards of another.

Put end to end along its partition dimension, a split parameter is one tensor,
whatever the tensor-parallel size (a vocabulary's rows padded with zeros that no
token looks up). Rank r of TP = c holds rows [r n_c, (r+1) n_c) of it, where n_c
is the full size (padded for c) over c. Those rows lie in one or a few of the
shards saved at TP = a: the rank reads only those and cuts its part. SGD's
momentum buffer (Adam's two moments) has its parameter's shape and split, and
is cut the same way, so the resumed run takes the very steps the saved one would
have. Replicated
parameters and their buffers are the same in every shard: taken from the
first one read.

    >>> overlapping_shards(saved_rows=4, saved_tp=2, rows=2, rank=3)   # TP 2 -> 4
    range(1, 2)
    >>> overlapping_shards(saved_rows=2, saved_tp=4, rows=4, rank=1)   # TP 4 -> 2
    range(2, 4)

PyTorch's distributed checkpoint reshards at load time in the same way
(`torch.distributed.checkpoint`, by each tensor's chunks); Megatron-LM's own
checkpoints need a converter to change the tensor-parallel size.
"""

import torch

from parallel_layers import vocab_size_with_padding


def overlapping_shards(saved_rows, saved_tp, rows, rank):
    """The saved shards (saved_rows each along the split) holding any of rows
    [rank rows, (rank+1) rows); none where those are all padding past the saved end."""
    lo, hi = rank * rows, (rank + 1) * rows
    return range(min(lo // saved_rows, saved_tp), min(-(-hi // saved_rows), saved_tp))


def local_rows(full, tp, vocab):
    """Rows per rank at tensor-parallel size tp of a split dimension `full` long (unpadded);
    the flags' checks (hidden size, heads) make tp divide the others."""
    return vocab_size_with_padding(full, tp) // tp if vocab else full // tp


def cut(read, dim, saved_rows, saved_tp, rows, rank, pick, like):
    """This rank's rows of one split tensor. read(j): saved shard j; pick(shard): the tensor in
    it (a parameter or its momentum), shaped as `like` but along dim. Rows past the saved end
    (padding) are zeros."""
    shards = overlapping_shards(saved_rows, saved_tp, rows, rank)
    lo = rank * rows
    pieces = [pick(read(j)) for j in shards]
    if not pieces:  # all padding
        shape = list(like.shape)
        shape[dim] = rows
        return like.new_zeros(shape)
    joined = torch.cat(pieces, dim)
    start = lo - shards.start * saved_rows
    part = joined.narrow(dim, start, min(rows, joined.shape[dim] - start))
    if part.shape[dim] < rows:
        shape = list(part.shape)
        shape[dim] = rows - part.shape[dim]
        part = torch.cat([part, part.new_zeros(shape)], dim)
    return part.clone()


def reshard(read, saved_tp, tp, rank):
    """Tensor-parallel rank `rank`'s shard at size `tp` of a checkpoint saved at `saved_tp`:
    read(j) returns saved shard j (a dict as checkpointing.save_checkpoint writes it). The
    model, the optimizer's momentum buffers, the iteration and the sizes; the RNG's default
    stream (alike on every rank); no tracker states, those belonged to the old split."""
    first = read(rank * saved_tp // tp)  # holds the start of this rank's rows: read anyway
    dims, vocab_sizes = first["partition_dims"], first.get("vocab_sizes", {})
    names = list(dims)  # the order of model.parameters(), hence of the optimizer's indices
    model, state = {}, {}
    for i, name in enumerate(names):
        dim, saved = dims[name], first["optimizer"]["state"].get(i, {})
        # The state shaped as its parameter (SGD's momentum, Adam's two moments) is split as
        # it is; the rest (Adam's step count) is the same everywhere.
        per_element = [key for key, v in saved.items()
                       if torch.is_tensor(v) and v.shape == first["model"][name].shape]
        if saved:
            state[i] = {key: v.clone() if torch.is_tensor(v) else v for key, v in saved.items()}
        if dim is None:
            model[name] = first["model"][name].clone()
            continue
        saved_rows = first["model"][name].shape[dim]
        vocab = name in vocab_sizes
        rows = local_rows(vocab_sizes[name] if vocab else saved_rows * saved_tp, tp, vocab)
        args = (dim, saved_rows, saved_tp, rows, rank)
        model[name] = cut(read, *args, pick=lambda shard: shard["model"][name],
                          like=first["model"][name])
        for key in per_element:
            state[i][key] = cut(read, *args, like=saved[key],
                                pick=lambda shard: shard["optimizer"]["state"][i][key])
    optimizer = dict(first["optimizer"], state=state)
    sizes = dict(first["sizes"], tensor_model_parallel_size=tp)
    rng = {k: v for k, v in first["rng"].items() if k != "tracker"}  # the default generators
    return dict(first, model=model, optimizer=optimizer, sizes=sizes, rng=rng)
