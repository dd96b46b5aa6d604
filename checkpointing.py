"""Sharded checkpoints in Megatron-LM's layout, and resuming from them.

    DIR/latest_checkpointed_iteration.txt           "200": the newest complete checkpoint
    DIR/iter_0000200/mp_rank_00/model_optim_rng.pt  tensor-parallel rank 0's shard
    DIR/iter_0000200/mp_rank_01/model_optim_rng.pt  ...

Each shard holds that rank's slice of the model, its optimizer state (the
momentum buffers), the iteration, the sizes it was saved with, the RNG state
and which dimension each parameter is split along (for merge_checkpoint.py).
Data-parallel replicas hold identical shards, so only data-parallel rank 0
writes. Every file is written to a temporary name and renamed, and the
tracker is written last, after every shard is on disk: a crash mid-save
leaves the previous checkpoint as the latest, never a half-written one.

At the end, the serial form of a model (one full state_dict, as model.pt and
--init_from hold it): loaded into any tensor-parallel size, and gathered back.
"""

import os

import torch
import torch.distributed as dist
import torch.nn as nn

import parallel_state as ps
from metrics import atomic_write
from rng_tracker import get_rng_tracker

TRACKER = "latest_checkpointed_iteration.txt"
SIZES = ("tensor_model_parallel_size", "input_size", "hidden_size", "dtype")
TRANSFORMER_SIZES = ("model", "vocab_size", "seq_length", "num_attention_heads", "num_layers")


def sizes(args):
    """What a checkpoint must match to be resumed: the model's sizes and the split."""
    keys = SIZES + (TRANSFORMER_SIZES if args.model == "transformer" else ())
    return {k: getattr(args, k) for k in keys}


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed by this run; the message says why."""


def shard_path(directory, iteration, tp_rank):
    return os.path.join(directory, f"iter_{iteration:07d}", f"mp_rank_{tp_rank:02d}",
                        "model_optim_rng.pt")


def save_checkpoint(directory, iteration, model, optimizer, args):
    if ps.get_data_parallel_rank() == 0:
        path = shard_path(directory, iteration, ps.get_tensor_model_parallel_rank())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state = dict(
            iteration=iteration,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            sizes=sizes(args),
            partition_dims={n: getattr(p, "partition_dim", None)
                            for n, p in model.named_parameters()},
            # Vocabularies padded for TP: merging keeps the first vocab_size rows.
            vocab_sizes={n: p.vocab_size for n, p in model.named_parameters()
                         if hasattr(p, "vocab_size")},
            rng=dict(torch=torch.get_rng_state(),
                     tracker=dict(get_rng_tracker().states)),
        )
        atomic_write(path, lambda f: torch.save(state, f))
    dist.barrier()  # every shard is on disk before the tracker points at it
    if dist.get_rank() == 0:
        atomic_write(os.path.join(directory, TRACKER), lambda f: f.write(f"{iteration}\n".encode()))


def latest_iteration(directory):
    """The iteration the tracker names, or None when there is no checkpoint yet."""
    path = os.path.join(directory, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} should hold an iteration number, not {text!r}")
    return int(text)


def load_shards(directory, iteration):
    """Every tensor-parallel shard of one iteration, in rank order (for merging)."""
    shards, tp_rank = [], 0
    while os.path.isfile(shard_path(directory, iteration, tp_rank)):
        path = shard_path(directory, iteration, tp_rank)
        shards.append(torch.load(path, map_location="cpu", weights_only=True))
        tp_rank += 1
    if not shards:
        where = os.path.dirname(os.path.dirname(shard_path(directory, iteration, 0)))
        raise CheckpointError(f"no shards in {where}")
    return shards


def load_checkpoint(directory, model, optimizer, args):
    """Restore this rank's shard of the newest checkpoint in `directory`.

    Returns its iteration, or 0 when there is none yet.
    """
    iteration = latest_iteration(directory)
    if iteration is None:
        if dist.get_rank() == 0:
            print(f"note: no checkpoint in {directory} yet; starting from iteration 0")
        return 0
    path = shard_path(directory, iteration, ps.get_tensor_model_parallel_rank())
    # On several nodes, this node may not see the directory the shard went to.
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} names iteration {iteration}, but {path} is missing "
                              f"(each tensor-parallel rank reads its own shard)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key, value in sizes(args).items():
        was = state["sizes"].get(key, "toy" if key == "model" else None)
        if was != value:
            raise CheckpointError(
                f"{directory} (iteration {iteration}) was saved with {key.replace('_', ' ')} "
                f"{was}, this run has {value}; resume with the same sizes, or "
                "merge it with merge_checkpoint.py and start from that with --init_from")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    get_rng_tracker().states.update(state["rng"].get("tracker", {}))  # dropout's own streams
    if dist.get_rank() == 0:
        print(f"resuming from {directory} at iteration {iteration}")
    return iteration


# ---------------------------------------------------------------------------
# Serial state dicts <-> tensor-parallel shards.

class StateDictError(ValueError):
    """A state dict that does not fit the model; the message names the keys."""


def load_serial_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Load a serial model's state_dict, keeping this rank's slice of each split parameter.

    Works for the serial model too (nothing is split there). Missing, extra or
    wrongly shaped keys are named in the error.
    """
    params = dict(model.named_parameters())
    missing = sorted(params.keys() - state_dict.keys())
    extra = sorted(state_dict.keys() - params.keys())
    if missing or extra:
        raise StateDictError(f"state dict keys do not match the model: missing {missing}, "
                             f"unexpected {extra}")
    tp_size = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    for name, param in params.items():
        full = state_dict[name]
        dim = getattr(param, "partition_dim", None)
        expected = list(param.shape)
        if dim is not None:
            expected[dim] *= tp_size
        padded = expected[0]
        if hasattr(param, "vocab_size"):  # a vocabulary padded for TP: the serial model has none
            expected[0] = param.vocab_size
        if list(full.shape) != expected:
            raise StateDictError(f"{name} has shape {list(full.shape)}, the model needs {expected}")
        if padded != expected[0]:
            full = torch.cat([full, full.new_zeros(padded - expected[0], *full.shape[1:])])
        if dim is not None:
            full = full.chunk(tp_size, dim=dim)[ps.get_tensor_model_parallel_rank()]
        with torch.no_grad():
            param.copy_(full)


def gather_serial_state_dict(model: nn.Module) -> dict:
    """The full serial state_dict (on the CPU), put together from every rank's shards."""
    state = {}
    for name, param in model.named_parameters():
        dim = getattr(param, "partition_dim", None)
        full = param.detach() if dim is None else ps.all_gather(param.detach(), dim=dim)
        if hasattr(param, "vocab_size"):
            full = full[:param.vocab_size]  # without the padding rows
        state[name] = full.cpu().clone()
    return state
