"""Loading the data set and feeding batches, serially or to a tensor-parallel group.

Batches are taken in order, batch after batch, epoch after epoch, with no
shuffle; a last partial batch is dropped, so every step sees `batch_size` rows.

In a tensor-parallel run every rank of a group must see the same batch. As in
Megatron (tensor_parallel/data.py:broadcast_data), only tensor-parallel rank 0
reads the data; it broadcasts each batch to the rest of its group.
"""

import os

import numpy as np
import torch

import parallel_state as ps


class DataError(ValueError):
    """A problem with the data files; the message says how to fix it."""


def load_split(data_dir, split):
    """(X, y) numpy arrays of the 'train' or 'valid' split, as files, unchecked."""
    command = f"python prepare_data.py --data_dir {data_dir}"
    arrays = []
    for name in (f"x{split}.npy", f"y{split}.npy"):
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise DataError(f"{path} not found; create the data with: {command}")
        try:
            arrays.append(np.load(path, allow_pickle=False))
        except (ValueError, OSError, EOFError) as e:  # not .npy, truncated, or pickled objects
            raise DataError(f"{path} is not a readable .npy array ({e}); recreate the data with: {command}") from None
    return tuple(arrays)


def check_split(X, y, split, input_size, min_rows, data_dir):
    """The checks that make a bad file an error here rather than a crash deep in torch."""
    remedy = f"recreate it with: python prepare_data.py --data_dir {data_dir}"
    if X.ndim != 2 or X.shape[1] != input_size:
        raise DataError(f"{split} inputs have shape {list(X.shape)} but --input_size is {input_size}; "
                        f"pass --input_size {X.shape[-1]} or recreate the data with prepare_data.py --input_size")
    if y.ndim != 1 or len(X) != len(y):
        raise DataError(f"the {split} set has {len(X)} inputs but targets of shape {list(y.shape)}; {remedy}")
    for name, a in (("inputs", X), ("targets", y)):
        if a.dtype.kind not in "fiu":
            raise DataError(f"{split} {name} have dtype {a.dtype}, not numbers; {remedy}")
        if not np.isfinite(a).all():
            raise DataError(f"{split} {name} contain {np.count_nonzero(~np.isfinite(a))} NaN or infinite values; "
                            f"{remedy}")
    if len(X) < min_rows:
        raise DataError(f"the {split} set has {len(X)} samples, fewer than {min_rows}"
                        f"{' (one batch): lower --batch_size' if split == 'train' else ''} or make more data "
                        f"with prepare_data.py --num_samples")


def load_dataset(data_dir, input_size, batch_size):
    """((X, y) train, (X, y) valid), checked: right shapes, finite numbers, at least one batch."""
    train, valid = load_split(data_dir, "train"), load_split(data_dir, "valid")
    check_split(*train, "train", input_size, batch_size, data_dir)
    check_split(*valid, "valid", input_size, 1, data_dir)
    return train, valid


def iterate_batches(X, y, batch_size, start_step=0):
    """Endless (inputs, targets) in order from batch `start_step` on (for resuming);
    the partial batch at the end of an epoch is dropped."""
    num_batches = len(X) // batch_size
    if num_batches == 0:
        raise DataError(f"{len(X)} training samples are fewer than one batch of {batch_size}")
    step = start_step
    while True:
        start = (step % num_batches) * batch_size
        yield X[start:start + batch_size], y[start:start + batch_size]
        step += 1


def to_tensors(inputs, targets, dtype, device):
    return (torch.as_tensor(inputs).to(device=device, dtype=dtype),
            torch.as_tensor(targets).to(device=device, dtype=dtype))


def broadcast_batch(batch, num_rows, input_size, dtype):
    """Tensor-parallel rank 0's (inputs, targets) on every rank of its group.

    Rank 0 passes its numpy batch; the others pass None. Inputs and targets
    travel as one (rows, input_size + 1) tensor: one broadcast, not two.
    """
    device = ps.get_device()
    if ps.get_tensor_model_parallel_rank() == 0:
        inputs, targets = to_tensors(*batch, dtype, device)
        packed = torch.cat([inputs, targets[:, None]], dim=1)
    else:
        packed = torch.empty(num_rows, input_size + 1, dtype=dtype, device=device)
    ps.broadcast(packed)
    return packed[:, :-1], packed[:, -1]


def broadcast_batches(train_data, batch_size, input_size, dtype, start_step=0, share=(0, 1)):
    """Endless batches for a tensor-parallel group: rank 0 walks (X, y) in order, all receive.

    share = (data-parallel rank, size): the group is one data-parallel replica and
    gets its contiguous rows of every global batch of `batch_size`.
    """
    dp_rank, dp_size = share
    rows = batch_size // dp_size
    mine = slice(dp_rank * rows, (dp_rank + 1) * rows)
    source = iterate_batches(*train_data, batch_size, start_step) if train_data is not None else None
    while True:
        batch = tuple(a[mine] for a in next(source)) if source else None
        yield broadcast_batch(batch, rows, input_size, dtype)


def broadcast_split(arrays, input_size, dtype):
    """A whole split (e.g. the validation set) on every rank of the group, sent once.

    Rank 0 passes (X, y); the others pass None and learn the row count first.
    """
    rank0 = ps.get_tensor_model_parallel_rank() == 0
    num_rows = torch.tensor([len(arrays[0]) if rank0 else 0], device=ps.get_device())
    ps.broadcast(num_rows)
    return broadcast_batch(arrays, int(num_rows.item()), input_size, dtype)
