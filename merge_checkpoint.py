"""Merge a checkpoint's tensor-parallel shards (and pipeline stages) into one serial state_dict,
or cut them for another tensor-parallel size.

    python merge_checkpoint.py checkpoints --out merged.pt        # the newest iteration
    python merge_checkpoint.py checkpoints --iteration 100 --out merged.pt
    python merge_checkpoint.py checkpoints --tensor_model_parallel_size 4 --save checkpoints_tp4

--out writes the serial keys (mlp.fc1.weight, mlp.fc2.weight, fc.weight; the
transformer's, with its unpadded vocabulary): it loads with `train.py
--init_from merged.pt`, or `parallel_train.py --init_from` at any
tensor-parallel size, as a new run. --save writes a checkpoint in the same
Megatron layout at the given tensor-parallel size, optimizer state and
iteration included: `parallel_train.py --load` continues it as the saved run
would have gone on. (`--load` also reshards by itself at load time; this is
the same cut, done offline.)
"""

import os
import sys

import torch

from training.checkpointing import (
    TRACKER,
    CheckpointError,
    latest_iteration,
    load_stages,
    missing_tracker,
    shard_path,
)
from training.metrics import atomic_write
from training.operations import ArgumentParser, check_output
from training.reshard import reshard


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


def check_divisible(sizes, tp):
    """The sizes a tensor-parallel size must divide, as parallel_train.py's flags check them."""
    if tp < 1:
        raise CheckpointError(f"--tensor_model_parallel_size must be a positive integer, got {tp}")
    if sizes["hidden_size"] % tp:
        raise CheckpointError(f"its hidden size {sizes['hidden_size']} is not divisible by "
                              f"--tensor_model_parallel_size {tp}")
    heads = sizes.get("num_attention_heads")
    if sizes.get("model") == "transformer" and heads % tp:
        raise CheckpointError(f"its {heads} attention heads are not divisible by "
                              f"--tensor_model_parallel_size {tp}")


def save_resharded(stages, iteration, tp, directory):
    """The checkpoint at tensor-parallel size tp (each pipeline stage cut alike), every shard
    written before the tracker."""
    if os.path.exists(os.path.join(directory, TRACKER)):
        raise CheckpointError(f"{directory} holds a checkpoint already; choose a new --save "
                              "directory")
    for stage, shards in enumerate(stages):
        for tp_rank in range(tp):
            # A distributed optimizer's replicas' files were put together on reading: the shard
            # written holds the whole state, as the plain optimizer's (any data-parallel size
            # resumes it, with or without --use_distributed_optimizer), and no header that would
            # send a reader to files not written here.
            state = {k: v for k, v in reshard(shards.__getitem__, len(shards), tp, tp_rank).items()
                     if k != "distributed_optimizer"}
            path = shard_path(directory, iteration, tp_rank, stage if len(stages) > 1 else None)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, lambda f: torch.save(state, f))
    atomic_write(os.path.join(directory, TRACKER), lambda f: f.write(f"{iteration}\n".encode()))


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])  # one-line errors
    p.add_argument("directory", help="the --save directory of a run")
    p.add_argument("--iteration", type=int, default=None,
                   help="default: the newest (the tracker's)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="where to write the serial state_dict (.pt)")
    out.add_argument("--save", help="a new checkpoint directory, at --tensor_model_parallel_size")
    p.add_argument("--tensor_model_parallel_size", type=int, default=None,
                   help="with --save: the tensor-parallel size to cut the checkpoint for")
    p.add_argument("--force", action="store_true", help="with --out: replace an existing file")
    args = p.parse_args(argv)
    if (args.save is None) != (args.tensor_model_parallel_size is None):
        p.error("--save and --tensor_model_parallel_size go together")
    if args.out and os.path.exists(args.out) and not args.force:
        p.error(f"--out {args.out} exists; name a new file, or pass --force to replace it")
    if args.out:
        check_output(p, "--out", args.out, ".pt")
    else:
        check_output(p, "--save", args.save, "dir")
    try:
        if os.path.isfile(args.directory):
            raise CheckpointError(f"{args.directory} is a file; name the --save directory of a "
                                  "run")
        iteration = args.iteration
        if iteration is None:
            iteration = latest_iteration(args.directory)
        if iteration is None and (message := missing_tracker(args.directory, "")):
            raise CheckpointError(message.lstrip())
        if iteration is None:
            out_dir = os.path.isfile(os.path.join(args.directory, "model.pt"))
            raise CheckpointError(f"no checkpoint in {args.directory} (no {TRACKER})" + (
                "; it is a run's --out_dir, and its model.pt is the merged model already "
                "(checkpoints go where parallel_train.py's --save points)" if out_dir else ""))
        stages = load_stages(args.directory, iteration)
        shards = stages[0]
        if args.save:
            check_divisible(shards[0]["sizes"], args.tensor_model_parallel_size)
            save_resharded(stages, iteration, args.tensor_model_parallel_size, args.save)
    except (CheckpointError, OSError) as e:
        sys.exit(f"error: {e}")
    if args.save:
        replicas = shards[0].get("distributed_optimizer", {}).get("data_parallel_size")
        print(f"cut the {len(shards)} shards of iteration {iteration} into "
              f"{args.tensor_model_parallel_size} in {args.save}, momentum included"
              + (f" (the distributed optimizer's {replicas} replicas' files put together into "
                 "each shard: it resumes at any data-parallel size, with or without "
                 "--use_distributed_optimizer)" if replicas else ""))
        return
    state = {}
    for stage in stages:  # the tied embeddings' copies are equal: the first stage's kept
        for name, tensor in merge(stage).items():
            state.setdefault(name, tensor)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write(args.out, lambda f: torch.save(state, f))
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in state.items())
    pipeline = f" x {len(stages)} pipeline stages" if len(stages) > 1 else ""
    print(f"merged {len(shards)} shards{pipeline} of iteration {iteration} into {args.out}: "
          f"{shapes}; {precision(shards[0]['sizes'].get('dtype', 'float32'), state)}")


def precision(run_dtype, state):
    """What the tensors are, in words: a bf16 run's checkpoints hold its fp32 main parameters."""
    dtype = str(next(iter(state.values())).dtype).replace("torch.", "")
    if dtype != run_dtype:
        return f"{dtype} main parameters of a {run_dtype} run"
    return f"{dtype} parameters"


if __name__ == "__main__":
    main()
