"""Merge a checkpoint's tensor-parallel shards into one serial ToyModel state_dict.

    python merge_checkpoint.py checkpoints --out merged.pt        # the newest iteration
    python merge_checkpoint.py checkpoints --iteration 100 --out merged.pt

The result has the serial keys (mlp.fc1.weight, mlp.fc2.weight, fc.weight) and
loads with `train.py --init_from merged.pt`, or `parallel_train.py --init_from`
at any tensor-parallel size: merge, then reshard (e.g. TP=2 -> TP=4).
"""

import argparse
import os
import sys

import torch

from checkpointing import CheckpointError, latest_iteration, load_shards
from metrics import atomic_write


def merge(shards):
    """Concatenate each split parameter's shards along its partition dimension; take replicated
    ones once."""
    merged = {}
    for name, dim in shards[0]["partition_dims"].items():
        parts = [shard["model"][name] for shard in shards]
        merged[name] = parts[0].clone() if dim is None else torch.cat(parts, dim=dim)
    for name, vocab_size in shards[0].get("vocab_sizes", {}).items():
        merged[name] = merged[name][:vocab_size].clone()  # without the rows padded for TP
    return merged


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", help="the --save directory of a run")
    p.add_argument("--iteration", type=int, default=None,
                   help="default: the newest (the tracker's)")
    p.add_argument("--out", required=True, help="where to write the serial state_dict (.pt)")
    args = p.parse_args(argv)
    try:
        iteration = args.iteration
        if iteration is None:
            iteration = latest_iteration(args.directory)
        if iteration is None:
            raise CheckpointError(f"no checkpoint in {args.directory} (no "
                                  "latest_checkpointed_iteration.txt)")
        shards = load_shards(args.directory, iteration)
        if len(shards) != shards[0]["sizes"]["tensor_model_parallel_size"]:
            raise CheckpointError(f"{args.directory} iteration {iteration} has {len(shards)} "
                                  "shards, but was saved with tensor-parallel size "
                                  f"{shards[0]['sizes']['tensor_model_parallel_size']}")
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    state = merge(shards)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write(args.out, lambda f: torch.save(state, f))
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in state.items())
    print(f"merged {len(shards)} shards of iteration {iteration} into {args.out}: {shapes}")


if __name__ == "__main__":
    main()
