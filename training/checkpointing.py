"""Sharded checkpoints in Megatron-LM's layout, and resuming from them.

    DIR/latest_checkpointed_iteration.txt           "200": the newest complete checkpoint
    DIR/iter_0000200/mp_rank_00/model_optim_rng.pt  tensor-parallel rank 0's shard
    DIR/iter_0000200/mp_rank_01/model_optim_rng.pt  ...
    DIR/iter_0000200/mp_rank_00_001/...             with a pipeline: TP rank 0 of stage 1

A pipeline stage's shard holds its chunks' parameters under the whole model's names (its
blocks' numbers among them), its optimizer state in the order of those parameters.
Under --use_distributed_optimizer each data-parallel replica also writes its shard of the main
parameters and of the optimizer's state beside the shard, as Megatron's sharded format does
(its older one gathers them into one distrib_optim.pt per model-parallel rank):

    DIR/iter_0000200/mp_rank_00/distrib_optim_000.pt    data-parallel rank 0's shard
    DIR/iter_0000200/mp_rank_00/distrib_optim_001.pt    ...

and a reader puts them back together into the plain optimizer's form (whole tensors per
parameter), so every resharding below, and a plain run, reads them as any other checkpoint.

Each shard holds that rank's slice of the model, its optimizer state (the
momentum buffers, and each parameter group's hyperparameters: with --weight_decay
the weights' decay and the biases' and norms' none, which a resume keeps and
checks against its flag), the iteration, the sizes it was saved with, the RNG state
and which dimension each parameter is split along (for merge_checkpoint.py).
Data-parallel replicas hold identical shards, so only data-parallel rank 0
writes. Every file is written to a temporary name and renamed, and the
tracker is written last, after every shard is on disk: a crash mid-save
leaves the previous checkpoint as the latest, never a half-written one.

A checkpoint resumes at any tensor-parallel, pipeline-parallel and
data-parallel size: a rank whose size differs from the saved one reads the
saved shards that overlap its slice and cuts its part, momentum included
(reshard.py); at another pipeline size, every saved stage's shards are read as
one, by the parameters' names, and each rank keeps its stage's.

At the end, the serial form of a model (one full state_dict, as model.pt and
--init_from hold it): loaded into any tensor-parallel size, and gathered back.
"""

import hashlib
import os
import re
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from core import parallel_state as ps
from core import wire
from core.optimizer import in_group
from core.optimizer.distrib_optimizer import DistributedOptimizer, unshard_state
from core.parallel_state import UserError
from core.tensor_parallel.random import (
    default_generator_states,
    get_rng_tracker,
    seed_tensor_parallel_stream,
    set_default_generator_states,
)
from training.metrics import atomic_write
from training.reshard import reshard

TRACKER = "latest_checkpointed_iteration.txt"
SIZES = ("tensor_model_parallel_size", "input_size", "hidden_size", "dtype",
         "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
         "context_parallel_size", "expert_tensor_parallel_size")
# In checkpoints from before them:
ABSENT = dict(model="toy", pipeline_model_parallel_size=1, context_parallel_size=1,
              expert_tensor_parallel_size=1, num_experts=None, moe_ffn_hidden_size=None,
              moe_layer_freq=1)
RESHARDABLE = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
               "virtual_pipeline_model_parallel_size",
               "context_parallel_size")  # the rest change the model: must match
TRANSFORMER_SIZES = ("model", "vocab_size", "seq_length", "num_attention_heads", "num_layers",
                     "num_experts", "moe_ffn_hidden_size", "moe_layer_freq")


def sizes(args):
    """What a checkpoint must match to be resumed: the model's sizes and the split."""
    keys = SIZES + (TRANSFORMER_SIZES if args.model == "transformer" else ())
    return {k: getattr(args, k, ABSENT.get(k)) for k in keys}


def identity(args):
    """Whose a checkpoint is, in every shard: the model (and sizes, beside it), the seed, the data
    (a fingerprint of its arrays) and the run (an id drawn when it started, kept when resumed)."""
    return dict(model=args.model, seed=args.seed, data=args.data_fingerprint, run=args.run_id)


def set_identity(args, *data):
    """args.data_fingerprint and args.run_id, before any checkpoint is read or written: a new
    run's id is drawn by rank 0 and shared (resuming replaces it with the checkpoint's)."""
    args.data_fingerprint = data_fingerprint(*data)  # in config.json too: whose data a run had
    args.run_id = None
    if args.save:  # every rank has the same flags, so every rank takes part
        drawn = torch.zeros(1, dtype=torch.int64, device=wire.get_device())
        if dist.get_rank() == 0:
            drawn[0] = int.from_bytes(os.urandom(6), "big")
        wire.all_reduce(drawn, dist.group.WORLD)
        args.run_id = f"{int(drawn[0]):012x}"


def data_fingerprint(*arrays):
    """A short hash of the training data, the same on every node that has the same files."""
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(str((a.dtype, a.shape)).encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:16]


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed by this run; the message says why."""


def shard_path(directory, iteration, tp_rank, pp_rank=None):
    """Megatron's: mp_rank_TT, or mp_rank_TT_PPP for stage PPP of a pipeline."""
    stage = "" if pp_rank is None else f"_{pp_rank:03d}"
    return os.path.join(directory, f"iter_{iteration:07d}", f"mp_rank_{tp_rank:02d}{stage}",
                        "model_optim_rng.pt")


def distrib_optim_path(shard, dp_rank):
    """A replica's shard of the distributed optimizer, beside the shard `shard`'s path."""
    return os.path.join(os.path.dirname(shard), f"distrib_optim_{dp_rank:03d}.pt")


def this_stage():
    """This rank's pipeline stage, for its shards' names; None without a pipeline."""
    return ps.get_pipeline_model_parallel_rank() \
        if ps.get_pipeline_model_parallel_world_size() > 1 else None


def chunks_of(model):
    """The modules a shard holds: a pipeline stage's chunks, or the one model."""
    return list(model) if isinstance(model, nn.ModuleList) else [model]


def named_parameters(model):
    """(name, parameter) of every chunk, under the whole model's names, in the optimizer's order."""
    return [item for chunk in chunks_of(model) for item in chunk.named_parameters()]


def save_checkpoint(directory, iteration, model, optimizer, args):
    path = shard_path(directory, iteration, ps.get_tensor_model_parallel_rank(), this_stage())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    distributed = isinstance(optimizer, DistributedOptimizer)
    trackers = context_parallel_trackers()
    params, optimizer_state = named_parameters(model), None
    if ps.get_expert_model_parallel_world_size() > 1:  # (every rank)
        params, optimizer_state = with_every_expert(params, optimizer.state_dict())
    if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
        state = dict(
            iteration=iteration,
            model={name: p.detach() for name, p in params},
            optimizer=optimizer_state or optimizer.state_dict(),
            sizes=sizes(args),
            identity=identity(args),
            partition_dims={n: getattr(p, "partition_dim", None) for n, p in params},
            # Vocabularies padded for TP: merging keeps the first vocab_size rows.
            vocab_sizes={n: p.vocab_size for n, p in params if hasattr(p, "vocab_size")},
            # The default generators (the GPU's too, where the run is on one: dropout outside
            # the split regions draws from it) and dropout's own stream, as Megatron saves them.
            rng=dict(zip(("torch", "cuda"),
                         default_generator_states(wire.get_device().type == "cuda")),
                     tracker=dict(get_rng_tracker().states)),
        )
        if trackers:  # each context rank's streams: its tokens' dropout masks
            state["rng"]["context_parallel_trackers"] = trackers
        if distributed:  # the state is in the replicas' files
            state["distributed_optimizer"] = dict(
                data_parallel_size=ps.get_data_parallel_world_size(with_context_parallel=True))
        atomic_write(path, lambda f: torch.save(state, f))
    if distributed:  # (its shards are over the replicas and their context ranks)
        rank = ps.get_data_parallel_rank(with_context_parallel=True)
        shard = dict(iteration=iteration, data_parallel_rank=rank, identity=identity(args),
                     data_parallel_size=ps.get_data_parallel_world_size(with_context_parallel=True),
                     shard=with_peers_expert_pieces(optimizer.sharded_state_dict()))
        atomic_write(distrib_optim_path(path, rank), lambda f: torch.save(shard, f))
    dist.barrier()  # every shard is on disk before the tracker points at it
    if dist.get_rank() == 0:
        atomic_write(os.path.join(directory, TRACKER), lambda f: f.write(f"{iteration}\n".encode()))


def with_every_expert(params, optimizer_state):
    """Expert parallelism: (name, parameter) and the optimizer's state_dict of this rank's part of
    the model, with the experts of every rank of its expert-model-parallel group added (each
    holds other experts): a shard then holds every expert, as the serial model does, and resumes
    at any expert-parallel size (load_checkpoint keeps a rank's own)."""
    state = optimizer_state["state"]
    mine = {name: (p.detach().cpu(), state.get(i), getattr(p, "partition_dim", None))
            for i, (name, p) in enumerate(params) if not getattr(p, "allreduce", True)}
    everyone = [None] * ps.get_expert_model_parallel_world_size()
    dist.all_gather_object(everyone, mine, group=ps.get_expert_model_parallel_group())
    for part in everyone:  # an expert's shard keeps its dimension (expert tensor parallelism)
        for tensor, _, dim in part.values():
            tensor.partition_dim = dim
    merged = with_experts_of({name: (p, state.get(i)) for i, (name, p) in enumerate(params)},
                             [{n: v[:2] for n, v in part.items()} for part in everyone])
    names = list(merged)
    groups = groups_over(optimizer_state["param_groups"], [merged[n][0] for n in names])
    return [(name, merged[name][0]) for name in names], dict(
        state={i: merged[n][1] for i, n in enumerate(names) if merged[n][1]}, param_groups=groups)


def with_peers_expert_pieces(shard):
    """The distributed optimizer's `shard` of this rank, with its tensor-parallel peers' pieces of
    whole experts added (expert tensor-parallel size 1): those are sharded over the
    expert-data-parallel group, which crosses the tensor-parallel ranks, while the replicas'
    files are written per tensor-parallel rank. So each TP rank's files hold every piece once
    (a name may then hold several pieces: a list)."""
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or ps.get_expert_tensor_parallel_world_size() > 1:
        return shard
    mine = {name: piece for name, piece in shard.items() if "local_experts." in name}
    everyone = [None] * tp
    dist.all_gather_object(everyone, mine, group=ps.get_tensor_model_parallel_group())
    for rank, part in enumerate(everyone):
        if rank != ps.get_tensor_model_parallel_rank():
            for name, piece in part.items():
                held = shard.get(name, [])
                shard[name] = (held if isinstance(held, list) else [held]) + [piece]
    return shard


def with_experts_of(state, everyone):
    """`state` ({name: value}, serial order) with each MoE layer's experts replaced by those of
    `everyone` ([{name: value} of each expert-parallel rank's experts], in rank order): serial's
    names, in serial's order."""
    merged = {}
    for name, value in state.items():
        layer = name.split("local_experts.")[0] + "local_experts." \
            if "local_experts." in name else None
        if layer is None:
            merged[name] = value
        elif not any(n.startswith(layer) for n in merged):  # the layer's first: all its experts
            merged.update((n, v) for part in everyone for n, v in part.items()
                          if n.startswith(layer))
    return merged


def context_parallel_trackers():
    """Every context rank's dropout streams, gathered to each (the shard's writer keeps them);
    None without context parallelism. Its other state is the same on every context rank."""
    if ps.get_context_parallel_world_size() == 1:
        return None
    trackers = [None] * ps.get_context_parallel_world_size()
    dist.all_gather_object(trackers, dict(get_rng_tracker().states),
                           group=ps.get_context_parallel_group())
    return trackers


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


def untracked_iterations(directory):
    """The iterations of the iter_* folders in `directory` when its tracker is missing (deleted, or
    lost with a copy): [] when there is a tracker or no such folder."""
    if not os.path.isdir(directory) or os.path.exists(os.path.join(directory, TRACKER)):
        return []
    return sorted(int(d[len("iter_"):]) for d in os.listdir(directory)
                  if re.fullmatch(r"iter_\d{7}", d) and os.path.isdir(os.path.join(directory, d)))


def missing_tracker(directory, flag):
    """The one line for a checkpoint folder whose tracker is gone, given to --load or --save (or
    merge_checkpoint.py), or None when it has one or no iter_* folder."""
    iterations = untracked_iterations(directory)
    if not iterations:
        return None
    tracker = os.path.join(directory, TRACKER)
    folders = ", ".join(f"iter_{i:07d}" for i in iterations) if len(iterations) <= 3 else (
        f"iter_{iterations[0]:07d} ... iter_{iterations[-1]:07d}, {len(iterations)} of them")
    found = f"{flag} {directory} holds checkpoint folders ({folders}) but no {TRACKER}"
    write = f"echo {iterations[-1]} > {tracker}"
    if flag == "--save":
        return (f"{found}, so this run would overwrite them; to go on with that run, write its "
                f"newest complete iteration into the tracker ({write}) and add --load "
                f"{directory}; or name a new directory")
    if flag == "--load":
        return (f"{found}, the file that names the newest complete one: write it ({write}) to "
                "resume from there, or name another directory")
    return f"{found}: name one with --iteration N, or write the tracker ({write})"


def saved_stages(where):
    """The pipeline size a checkpoint's iteration directory was saved with (1: no pipeline),
    from its shards' names: a pipeline's (mp_rank_TT_PPP) are at least 2 stages, though the
    last stage's folders be gone (check_stages then names them)."""
    stages = {int(m.group(1) or -1) for d in os.listdir(where)
              if (m := re.fullmatch(r"mp_rank_\d\d(?:_(\d\d\d))?", d))}
    return max(max(stages) + 1, 2) if stages and min(stages) >= 0 else 1


def check_stage_folders(directory, iteration, stages):
    """Every stage's first shard is there (checked alike on every rank, before any reads its own
    stage: the first missing named, by all; none says "resuming" before a peer fails)."""
    for stage in range(stages) if stages > 1 else ():
        first = shard_path(directory, iteration, 0, stage)
        if not os.path.isfile(first):
            missing = first if os.path.isdir(os.path.dirname(first)) else os.path.dirname(first)
            raise CheckpointError(f"{directory} names iteration {iteration}, but {missing} is "
                                  "missing (an incomplete checkpoint)")


def check_stages(directory, iteration, stages, shard):
    """The pipeline size `shard` was saved with against the `stages` whose folders are there:
    the first stage folder missing is named."""
    saved = shard["sizes"].get("pipeline_model_parallel_size", 1)
    if saved > stages:
        missing = os.path.dirname(shard_path(directory, iteration, 0, stages))
        raise CheckpointError(f"{directory} names iteration {iteration}, but {missing} is missing "
                              f"(an incomplete checkpoint of {saved} pipeline stages)")


def shard_reader(directory, iteration, pp_rank=None):
    """(read, saved_tp): read(tp_rank) gives that saved shard (of stage pp_rank, with a pipeline),
    read once and checked to belong to this checkpoint; saved_tp is the tensor-parallel size it
    was saved at, from the first shard this node sees (on several nodes without a shared disk,
    each sees its own)."""
    where = os.path.join(directory, f"iter_{iteration:07d}")
    if not os.path.isdir(where):
        saved = sorted(int(d[len("iter_"):]) for d in os.listdir(directory)
                       if re.fullmatch(r"iter_\d{7}", d))
        named = (f"{os.path.join(directory, TRACKER)} names" if iteration == latest_iteration(
            directory) else "asked for")
        raise CheckpointError(f"{named} iteration {iteration}, but {where} is missing (saved "
                              f"there: {', '.join(map(str, saved)) or 'none'})")
    stage = "" if pp_rank is None else f"_{pp_rank:03d}"
    seen = sorted(int(d[len("mp_rank_"):len("mp_rank_") + 2]) for d in os.listdir(where)
                  if re.fullmatch(rf"mp_rank_\d\d{stage}", d))
    seen = [r for r in seen if os.path.isfile(shard_path(directory, iteration, r, pp_rank))]
    if not seen:  # the folder of TP rank 0 (of this stage), or its file, is missing
        first = shard_path(directory, iteration, 0, pp_rank)
        missing = first if os.path.isdir(os.path.dirname(first)) else os.path.dirname(first)
        raise CheckpointError(f"{directory} names iteration {iteration}, but {missing} is "
                              "missing (an incomplete checkpoint)")
    cache = {}

    def read(tp_rank):
        if tp_rank in cache:
            return cache[tp_rank]
        path = shard_path(directory, iteration, tp_rank, pp_rank)
        shard = _load(path, directory, iteration)
        if not isinstance(shard, dict) or not {"iteration", "model", "optimizer",
                                                "sizes"} <= shard.keys():
            raise CheckpointError(f"{path} is not a checkpoint shard written by parallel_train.py "
                                  "(no iteration, model, optimizer and sizes in it)")
        if shard["iteration"] != iteration:
            raise CheckpointError(f"{path} holds iteration {shard['iteration']}, not "
                                  f"{iteration}: shards of two checkpoints are mixed")
        was = shard["sizes"]["tensor_model_parallel_size"]
        if cache:  # the first shard read (seen[0]) is the reference
            first, first_path = cache[seen[0]], shard_path(directory, iteration, seen[0], pp_rank)
            if was != saved_tp:
                raise CheckpointError(f"{path} was saved at tensor-parallel size {was}, "
                                      f"{first_path} at {saved_tp}: shards of two checkpoints "
                                      "are mixed")
            for key in ("sizes", "identity"):
                mine, theirs = shard.get(key, {}), first.get(key, {})
                for field in sorted(set(mine) | set(theirs)):
                    if field != "tensor_model_parallel_size" and mine.get(field) != \
                            theirs.get(field):
                        raise CheckpointError(
                            f"{path} belongs to another run than {first_path} ({field} "
                            f"{mine.get(field)} vs {theirs.get(field)}): shards of two "
                            "checkpoints are mixed")
        if "distributed_optimizer" in shard:
            shard = with_optimizer_shards(shard, path, directory)
        elif os.path.isfile(distrib_optim_path(path, 0)):  # a replica's file beside a plain shard
            beside = _load(distrib_optim_path(path, 0), directory, iteration)
            if not isinstance(beside, dict) or beside.get("identity") != shard.get("identity"):
                raise CheckpointError(f"{path} belongs to another run than "
                                      f"{distrib_optim_path(path, 0)} beside it (it was saved "
                                      "without --use_distributed_optimizer): shards of two "
                                      "checkpoints are mixed")
        cache[tp_rank] = shard
        return shard

    saved_tp = read(seen[0])["sizes"]["tensor_model_parallel_size"]
    return read, saved_tp


def _load(path, directory, iteration):
    """A checkpoint file, read on the CPU; a missing or unreadable one is a CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} names iteration {iteration}, but {path} is "
                              "missing (an incomplete checkpoint)")
    try:
        with warnings.catch_warnings():  # torch's notes on old pickle protocols: not ours
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a checkpoint at all
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}); it is truncated "
                              "or not a checkpoint shard") from None


def with_optimizer_shards(shard, path, directory):
    """A shard saved under --use_distributed_optimizer as the plain optimizer's shard: its
    replicas' files put together, the main parameters (fp32 under bf16) in `model`, each
    parameter's whole state in `optimizer`."""
    iteration, d = shard["iteration"], shard["distributed_optimizer"]["data_parallel_size"]
    files = [_load(distrib_optim_path(path, r), directory, iteration) for r in range(d)]
    mine = shard.get("identity") or {}
    whose = lambda f: (f.get("iteration"), f.get("data_parallel_rank"), f.get(
        "data_parallel_size"), f.get("identity")) if isinstance(f, dict) else ()
    wrong = [r for r, f in enumerate(files) if whose(f) != (iteration, r, d, mine)]
    theirs = files[0].get("identity") if isinstance(files[0], dict) else None
    if len(wrong) == d and theirs is not None and all(
            whose(f) == (iteration, r, d, theirs) for r, f in enumerate(files)):
        # The replicas' files agree with each other, not with the shard: the shard is the odd one
        # (with one replica's file, either may be).
        field = next((k for k in sorted(set(theirs) | set(mine))
                      if theirs.get(k) != mine.get(k)), "identity")
        odd = path if d > 1 else f"{path} (or {distrib_optim_path(path, 0)})"
        raise CheckpointError(f"{odd} belongs to another run than the distrib_optim_*.pt beside "
                              f"it ({field} {mine.get(field)} vs {theirs.get(field)}): shards "
                              "of two checkpoints are mixed")
    if wrong:  # each of this write: the iteration, the run, the size
        raise CheckpointError(f"{distrib_optim_path(path, wrong[0])} is not data-parallel rank "
                              f"{wrong[0]}'s shard of iteration {iteration}: shards of two "
                              "checkpoints are mixed")
    names = list(shard["partition_dims"])  # in the optimizer's order
    try:
        params, states = unshard_state([f["shard"] for f in files],
                                       {name: shard["model"][name].shape for name in names})
    except ValueError as e:
        raise CheckpointError(f"{os.path.dirname(path)}: {e}") from None
    state = {i: states[name] for i, name in enumerate(names) if states[name]}
    return dict(shard, model=params, optimizer=dict(shard["optimizer"], state=state))


def load_shards(directory, iteration, pp_rank=None):
    """Every tensor-parallel shard of one iteration (of stage pp_rank), in rank order."""
    read, saved_tp = shard_reader(directory, iteration, pp_rank)
    return [read(tp_rank) for tp_rank in range(saved_tp)]


def load_stages(directory, iteration):
    """[the tensor-parallel shards of each pipeline stage], stage by stage (one, without a
    pipeline): what merge_checkpoint.py merges."""
    where = os.path.join(directory, f"iter_{iteration:07d}")
    stages = saved_stages(where) if os.path.isdir(where) else 1
    loaded = [load_shards(directory, iteration, s if stages > 1 else None) for s in range(stages)]
    check_stages(directory, iteration, stages, loaded[0][0])
    return loaded


def load_checkpoint(directory, model, optimizer, args):
    """Restore this rank's shard of the newest checkpoint in `directory`, at any size: read as
    saved, or cut from the saved shards that overlap it when the tensor-parallel size changed.

    Returns its iteration, or 0 when there is none yet.
    """
    iteration = latest_iteration(directory)
    if iteration is None and (message := missing_tracker(directory, "--load")):
        raise CheckpointError(message)  # (the flags' checks said it already, unless it just went)
    if iteration is None:
        if dist.get_rank() == 0:
            print(f"note: no checkpoint in {directory} yet; starting from iteration 0")
        return 0
    if iteration >= args.num_iterations:
        raise CheckpointError(f"{directory} is at iteration {iteration} and --num_iterations is "
                              f"{args.num_iterations}: nothing to train; raise --num_iterations")
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    where = os.path.join(directory, f"iter_{iteration:07d}")
    stages = saved_stages(where) if os.path.isdir(where) else 1
    check_stage_folders(directory, iteration, stages)
    restaged = stages != ps.get_pipeline_model_parallel_world_size()
    if not restaged:  # the same stages; each holds other blocks if the chunks differ
        read, saved_tp = shard_reader(directory, iteration, this_stage())
        chunks = read(tp_rank * saved_tp // tp)["sizes"].get("virtual_pipeline_model_parallel_size")
        restaged = chunks != args.virtual_pipeline_model_parallel_size
    if restaged:  # every saved stage's shards, read as one whole-model shard per TP rank
        read, saved_tp = whole_model_reader(directory, iteration, stages)
    saved = read(tp_rank * saved_tp // tp)  # the first shard this rank needs
    check_stages(directory, iteration, stages, saved)
    for key, value in sizes(args).items():
        was = saved["sizes"].get(key, ABSENT.get(key))
        if was != value and key == "dtype":
            raise CheckpointError(f"{directory} (iteration {iteration}) was saved by a --dtype "
                                  f"{was} run, this one is --dtype {value}; resume it with "
                                  f"--dtype {was}")
        if was != value and key not in RESHARDABLE:
            # Only the heads leave the weights' shapes as they were: another size's weights
            # would not load into this model, by --init_from either.
            fix = ("or merge it with merge_checkpoint.py and start a new run from it with "
                   "--init_from" if key in ("num_attention_heads", "expert_tensor_parallel_size")
                   else "its weights have that shape")
            raise CheckpointError(
                f"{directory} (iteration {iteration}) was saved with {key.replace('_', ' ')} "
                f"{was}, this run has {value}; resume with --{key} {was} ({fix})")
    saved_identity = saved.get("identity", {})  # (checkpoints before identities had none)
    for field, what in (("model", "model"), ("seed", "--seed"), ("data", "data set")):
        if field in saved_identity and saved_identity[field] != identity(args)[field]:
            raise CheckpointError(
                f"{directory} (iteration {iteration}) was saved by a run with another {what} "
                f"({saved_identity[field]}, this run has {identity(args)[field]}); resume with "
                "the run's own flags and data")
    kind = saved_optimizer(saved)  # its state is the other's: momentum, or Adam's moments
    if kind is not None and kind != args.optimizer:
        raise CheckpointError(f"{directory} (iteration {iteration}) was saved by a run with "
                              f"--optimizer {kind}, this one has {args.optimizer}; resume with "
                              f"--optimizer {kind} (its state is {STATE_OF[kind]}), or start a "
                              f"new run from its weights: merge_checkpoint.py {directory} --out "
                              "merged.pt, then --init_from merged.pt")
    if saved_weight_decay(saved) != args.weight_decay:  # each group its own, as it was saved
        decay = saved_weight_decay(saved)
        raise CheckpointError(f"{directory} (iteration {iteration}) was saved by a run with "
                              f"--weight_decay {decay:g}, this one has {args.weight_decay:g}; "
                              f"resume with --weight_decay {decay:g}")
    args.run_id = saved_identity.get("run", args.run_id)  # the run goes on under its own id
    state = saved if saved_tp == tp else reshard(read, saved_tp, tp, tp_rank)
    if restaged or ps.get_expert_model_parallel_world_size() > 1:  # (a shard holds every
        state = this_stages_part(state, [name for name, _ in named_parameters(model)])  # expert)
    for chunk in chunks_of(model):  # each chunk its parameters, under the whole model's names
        chunk.load_state_dict({name: state["model"][name] for name in chunk.state_dict()})
    groups, changed = resumed_hyperparameters(state["optimizer"]["param_groups"], args)
    state = dict(state, optimizer=dict(state["optimizer"], param_groups=groups))
    if isinstance(optimizer, DistributedOptimizer):  # its pieces of the main parameters too
        optimizer.load_state_dict(state["optimizer"], state["model"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    on_cuda = wire.get_device().type == "cuda"
    set_default_generator_states((state["rng"]["torch"],
                                  state["rng"].get("cuda") if on_cuda else None))
    tracker = state["rng"].get("tracker", {})  # (none where the TP split changed: reshard.py)
    cp = ps.get_context_parallel_world_size()
    saved_cp = saved["sizes"].get("context_parallel_size", 1)
    if saved_cp != cp:
        tracker = {}  # the streams of another split of the tokens: new ones
    elif cp > 1 and tracker:  # this context rank's own
        tracker = state["rng"]["context_parallel_trackers"][ps.get_context_parallel_rank()]
    if tracker and all((cuda is not None) == on_cuda for _, cuda in tracker.values()):
        get_rng_tracker().states.update(tracker)  # dropout's own streams
    else:  # this rank's stream belonged to another split, or another device: a new one, that
        seed_tensor_parallel_stream(args.seed + iteration)  # repeats no mask
    if dist.get_rank() == 0:
        resharded = f", resharded from tensor-parallel size {saved_tp} to {tp}"
        pp = ps.get_pipeline_model_parallel_world_size()
        was, now = (saved["sizes"].get("virtual_pipeline_model_parallel_size") or 1,
                    args.virtual_pipeline_model_parallel_size or 1)
        rechunked = f", from {was} to {now} model chunks per stage (virtual pipeline size)"
        print(f"resuming from {directory} at iteration {iteration}"
              f"{resharded if saved_tp != tp else ''}"
              f"{f', from {stages} pipeline stage(s) to {pp}' if stages != pp else ''}"
              f"{optimizer_change(saved, optimizer)}{rechunked if was != now else ''}"
              f"{f', from context-parallel size {saved_cp} to {cp}' if saved_cp != cp else ''}"
              f"{''.join(f'; {line}' for line in changed)}")
    return iteration


STATE_OF = dict(sgd="SGD's momentum buffers", adam="Adam's two moments and step count")
# The hyperparameters a resume reads from its flags or keeps from the checkpoint: (the flag, how
# a parameter group holds it, and sets it), per optimizer.
HYPERPARAMETERS = dict(
    sgd=(("init_lr", lambda g: g["lr"], lambda g, v: dict(g, lr=v)),
         ("momentum", lambda g: g["momentum"], lambda g, v: dict(g, momentum=v))),
    adam=(("init_lr", lambda g: g["lr"], lambda g, v: dict(g, lr=v)),
          ("adam_beta1", lambda g: g["betas"][0],
           lambda g, v: dict(g, betas=(v, g["betas"][1]))),
          ("adam_beta2", lambda g: g["betas"][1],
           lambda g, v: dict(g, betas=(g["betas"][0], v))),
          ("adam_eps", lambda g: g["eps"], lambda g, v: dict(g, eps=v))))


def saved_optimizer(shard):
    """The --optimizer a shard was saved with, from its groups' hyperparameters (None: unknown)."""
    groups = shard["optimizer"]["param_groups"]
    return ("adam" if "betas" in groups[0] else "sgd" if "momentum" in groups[0] else None) \
        if groups else None


def resumed_hyperparameters(groups, args):
    """(the saved parameter groups with the run's hyperparameters, what changed in words). A flag
    given on the command line wins, as Megatron's --override-opt_param-scheduler: the resumed
    run steps with it; one left out keeps the checkpoint's value, and args takes it (so that
    config.json records what the run uses)."""
    given, changed = getattr(args, "given_flags", ()), []
    for flag, get, put in HYPERPARAMETERS.get(args.optimizer, ()):
        if not groups or any(get(g) != get(groups[0]) for g in groups):
            continue  # (a checkpoint of other groups than this repo's: left as saved)
        saved, now = get(groups[0]), getattr(args, flag)
        if saved == now:
            continue
        if f"--{flag}" in given:
            groups = [put(g, now) for g in groups]
            changed.append(f"--{flag} {now:g} replaces the checkpoint's {saved:g}")
        else:
            setattr(args, flag, saved)
            changed.append(f"--{flag} {saved:g} kept from the checkpoint (not given; give it to "
                           "change it)")
    return groups, changed


def optimizer_change(saved, optimizer):
    """What resuming did to the distributed optimizer's shards, for the line that says so."""
    was = saved.get("distributed_optimizer", {}).get("data_parallel_size")
    now = ps.get_data_parallel_world_size(with_context_parallel=True) \
        if isinstance(optimizer, DistributedOptimizer) else None
    if was == now:
        return ""
    source = f"{was} data-parallel replicas" if was else "the plain optimizer"
    return f", the optimizer's shards from {source} to {now or 'the plain optimizer'}"


def whole_model_reader(directory, iteration, stages):
    """(read, saved_tp) as shard_reader's, but read(tp_rank) is tensor-parallel rank tp_rank's
    shard of the whole model: every saved pipeline stage's parameters and momentum buffers, by
    name, in stage order (the tied embeddings' second copy, equal to the first, dropped)."""
    readers = [shard_reader(directory, iteration, s if stages > 1 else None)
               for s in range(stages)]
    saved_tp = readers[0][1]
    cache = {}

    def read(tp_rank):
        if tp_rank not in cache:
            cache[tp_rank] = _whole(read_stage(tp_rank) for read_stage, _ in readers)
        return cache[tp_rank]
    return read, saved_tp


def _whole(shards):
    shards = list(shards)
    model, dims, vocab, state = {}, {}, {}, {}
    for shard in shards:
        for i, name in enumerate(shard["partition_dims"]):
            if name in model:
                continue
            model[name], dims[name] = shard["model"][name], shard["partition_dims"][name]
            if name in shard.get("vocab_sizes", {}):
                vocab[name] = shard["vocab_sizes"][name]
            if shard["optimizer"]["state"].get(i):  # momentum, or Adam's moments and step
                state[len(dims) - 1] = shard["optimizer"]["state"][i]
    first = shards[0]
    groups = groups_over(first["optimizer"]["param_groups"], [model[name] for name in dims])
    return dict(first, model=model, partition_dims=dims, vocab_sizes=vocab,
                optimizer=dict(state=state, param_groups=groups),
                rng={k: v for k, v in first["rng"].items() if k != "tracker"})


def this_stages_part(state, names):
    """A whole-model state (whole_model_reader's, cut for this TP rank) narrowed to this rank's
    parameters `names`, in its optimizer's order."""
    index = {name: i for i, name in enumerate(state["partition_dims"])}
    kept = {j: state["optimizer"]["state"][index[name]] for j, name in enumerate(names)
            if index[name] in state["optimizer"]["state"]}
    groups = groups_over(state["optimizer"]["param_groups"], [state["model"][n] for n in names])
    return dict(state, model={name: state["model"][name] for name in names},
                optimizer=dict(state=kept, param_groups=groups))


def groups_over(saved_groups, params):
    """The saved optimizer's groups (their hyperparameters: weight decay or none, lr, ...) over
    other parameters, each listing those of `params` it holds by their number there."""
    return [dict(group, params=[i for i, p in enumerate(params) if in_group(group, p)])
            for group in saved_groups]


def saved_weight_decay(shard):
    """The --weight_decay a shard was saved with: its decayed group's (0 in checkpoints from
    before the flag, whose Adam and SGD had none)."""
    return max((group.get("weight_decay", 0.0) for group in shard["optimizer"]["param_groups"]),
               default=0.0)


# ---------------------------------------------------------------------------
# Serial state dicts <-> tensor-parallel shards.

class StateDictError(UserError, ValueError):
    """A state dict that does not fit the model; the message names the keys."""


def read_state_dict(path):
    """--init_from's file: a serial state_dict (model.pt, merge_checkpoint.py's output)."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: a zip error, an unpickling error, ...
        raise StateDictError(f"--init_from {path} is not a state_dict saved with torch.save "
                             f"({type(e).__name__}); use a model.pt written by train.py") from None
    if not isinstance(state_dict, dict):
        raise StateDictError(f"--init_from {path} holds a {type(state_dict).__name__}, not a "
                             "state_dict; use a model.pt written by train.py")
    if {"iteration", "model", "optimizer"} <= state_dict.keys():
        raise StateDictError(f"--init_from {path} is one shard of a checkpoint; merge them first: "
                             "python merge_checkpoint.py DIR --out model.pt, then --init_from "
                             "model.pt")
    return state_dict


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


def gather_over_pipeline(obj):
    """Every stage's `obj` (a state_dict on the CPU), in stage order, on the first stage; None on
    the others. Without a pipeline, [obj]."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return [obj]
    group = ps.get_pipeline_model_parallel_group()
    first = dist.get_global_rank(group, 0)
    gathered = [None] * dist.get_world_size(group) if dist.get_rank() == first else None
    dist.gather_object(obj, gathered, dst=first, group=group)
    return gathered


def gather_over_experts(state):
    """`state` with every expert of its MoE layers, gathered from the expert-model-parallel
    group onto its first rank (None on the others); as it is without expert parallelism."""
    if ps.get_expert_model_parallel_world_size() == 1:
        return state
    group = ps.get_expert_model_parallel_group()
    first = dist.get_global_rank(group, 0)
    experts = {name: t for name, t in state.items() if "local_experts." in name}
    gathered = [None] * group.size() if dist.get_rank() == first else None
    dist.gather_object(experts, gathered, dst=first, group=group)
    return with_experts_of(state, gathered) if gathered else None


def gather_serial_state_dict(model: nn.Module) -> dict:
    """The full serial state_dict (on the CPU), put together from every rank's shards."""
    state = {}
    for name, param in model.named_parameters():
        dim = getattr(param, "partition_dim", None)  # None: whole on every rank (and serially)
        full = param.detach() if dim is None else wire.all_gather(
            param.detach(), ps.get_tensor_model_parallel_group(), dim=dim)
        if hasattr(param, "vocab_size"):
            full = full[:param.vocab_size]  # without the padding rows
        state[name] = full.cpu().clone()
    return state
