"""Loading the data set and feeding batches, serially or to a tensor-parallel group.

Batches are taken in order, batch after batch, epoch after epoch, with no
shuffle; a last partial batch is dropped, so every step sees `batch_size` rows.

In a tensor-parallel run every rank of a group must see the same batch.
Megatron's tensor-parallel rank 0 reads it and broadcasts it to the group
(tensor_parallel/data.py:broadcast_data). Here every rank reads the same small
files itself and takes the same rows: no collective per step, which at the
original size would cost as much as the step's one all-reduce. The price:
every node needs the data.
"""

import os

import numpy as np
import torch

from core.parallel_state import UserError


class DataError(UserError, ValueError):
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
            raise DataError(f"{path} is not a readable .npy array ({e}); recreate the data with: "
                            f"{command}") from None
    return tuple(arrays)


def check_split(X, y, split, input_size, min_rows, data_dir):
    """The checks that make a bad file an error here rather than a crash deep in torch."""
    remedy = f"recreate it with: python prepare_data.py --data_dir {data_dir}"
    if X.ndim != 2:
        raise DataError(f"{split} inputs have shape {list(X.shape)}, not samples x inputs; "
                        f"{remedy}")
    if X.shape[1] != input_size:
        raise DataError(f"{split} inputs have shape {list(X.shape)} but --input_size is "
                        f"{input_size}; pass --input_size {X.shape[-1]} or recreate the data with "
                        "prepare_data.py --input_size")
    if y.ndim != 1 or len(X) != len(y):
        raise DataError(f"the {split} set has {len(X)} inputs but targets of shape "
                        f"{list(y.shape)}; {remedy}")
    for name, a in (("inputs", X), ("targets", y)):
        if a.dtype.kind != "f":  # (integers would be taken for tokens)
            raise DataError(f"{split} {name} have dtype {a.dtype}, not floating-point numbers; "
                            f"{remedy}")
        if not np.isfinite(a).all():
            raise DataError(f"{split} {name} contain {np.count_nonzero(~np.isfinite(a))} NaN or "
                            f"infinite values; {remedy}")
    if len(X) < min_rows:
        lower = " (one batch): lower --batch_size or" if split == "train" else ";"
        raise DataError(f"the {split} set has {len(X)} samples, fewer than {min_rows}{lower} "
                        "make more data with prepare_data.py --num_samples")


def load_dataset(data_dir, input_size, batch_size):
    """((X, y) train, (X, y) valid), checked: right shapes, finite numbers, at least one batch."""
    train, valid = load_split(data_dir, "train"), load_split(data_dir, "valid")
    check_split(*train, "train", input_size, batch_size, data_dir)
    check_split(*valid, "valid", input_size, 1, data_dir)
    return train, valid


def load_token_dataset(data_dir, vocab_size, seq_length, batch_size):
    """(train, valid) token arrays for the toy transformer, checked: sequences of seq_length + 1
    integers in [0, vocab_size), at least one batch."""
    command = f"python prepare_data.py --model transformer --data_dir {data_dir}"
    splits, train_length = [], None
    for split, min_rows in (("train", batch_size), ("valid", 1)):
        path = os.path.join(data_dir, f"tokens_{split}.npy")
        if not os.path.isfile(path):
            raise DataError(f"{path} not found; create the data with: {command}")
        try:
            tokens = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{path} is not a readable .npy array ({e}); recreate the data with: "
                            f"{command}") from None
        if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
            raise DataError(f"{path} holds {tokens.dtype} of shape {list(tokens.shape)}, not "
                            f"sequences of tokens; recreate the data with: {command}")
        if train_length is not None and tokens.shape[1] != train_length:  # no --seq_length fits
            raise DataError(f"{path} has sequences of {tokens.shape[1] - 1} + 1 tokens and "
                            f"tokens_train.npy of {train_length - 1} + 1; recreate the data with: "
                            f"{command}")
        train_length = tokens.shape[1]
        if tokens.shape[1] != seq_length + 1:
            raise DataError(f"{path} has sequences of {tokens.shape[1] - 1} + 1 tokens but "
                            f"--seq_length is {seq_length}; pass --seq_length "
                            f"{tokens.shape[1] - 1} or recreate the data with --seq_length")
        if tokens.size and tokens.min() < 0:
            raise DataError(f"{path} has a negative token ({tokens.min()}); tokens are indices "
                            f"from 0 to --vocab_size - 1: recreate the data with: {command}")
        if tokens.size and tokens.max() >= vocab_size:
            raise DataError(f"{path} has tokens up to {tokens.max()} but --vocab_size is "
                            f"{vocab_size}; pass --vocab_size {tokens.max() + 1} or recreate the "
                            "data with --vocab_size")
        if len(tokens) < min_rows:
            raise DataError(f"the {split} set has {len(tokens)} sequences, fewer than {min_rows}; "
                            "lower --batch_size or make more data with --num_samples")
        splits.append((tokens[:, :-1], tokens[:, 1:]))  # inputs, and the next token of each
    return splits


def iterate_batches(X, y, batch_size, start_step=0, rows=slice(None)):
    """Endless (inputs, targets) in order from batch `start_step` on (for resuming);
    the partial batch at the end of an epoch is dropped. `rows`: the part of each
    batch this rank takes (its data-parallel replica's share, or fewer)."""
    num_batches = len(X) // batch_size
    if num_batches == 0:
        raise DataError(f"{len(X)} training samples are fewer than one batch of {batch_size}")
    step = start_step
    while True:
        start = (step % num_batches) * batch_size
        yield X[start:start + batch_size][rows], y[start:start + batch_size][rows]
        step += 1


def to_tensors(inputs, targets, args, device):
    """On the device; tokens as int64, real inputs in the model's dtype, real targets in the
    loss's (fp32 under bf16: the loss is computed in fp32)."""
    cast = lambda a, dtype: torch.as_tensor(a).to(device=device, dtype=dtype if a.dtype.kind ==
                                                  "f" else torch.int64)
    return cast(inputs, args.torch_dtype), cast(targets, args.main_dtype)
