"""The process groups: which ranks split a layer, which hold replicas (Megatron-LM, App. B.1,
Fig. 8), and which hold the stages of one pipeline (Narayanan et al., 2021, Sec. 3).

Megatron-LM keeps its process groups in module-level globals behind small getters
(megatron/core/parallel_state.py); so do we. What moves over the groups, counted and held to
NCCL's rules, is core/wire.py's.
"""

import torch.distributed as dist

_TENSOR_MODEL_PARALLEL_GROUP = None
_CONTEXT_PARALLEL_GROUP = None  # the ranks that share one sequence, each holding 1/C of it
_DATA_PARALLEL_GROUP = None
_DATA_PARALLEL_GROUP_WITH_CP = None  # the replicas and their context ranks: gradients averaged
_TENSOR_AND_DATA_PARALLEL_GROUP = None  # the ranks of one pipeline stage
_PIPELINE_MODEL_PARALLEL_GROUP = None
_PIPELINE_GLOBAL_RANKS = None  # this rank's pipeline, stage by stage
_EMBEDDING_GROUP = None  # the first and the last stage: the tied word embeddings' two copies
_TENSOR_AND_CONTEXT_PARALLEL_GROUP = None  # a micro-batch's sequences: the ranks that split them
_EXPERT_MODEL_PARALLEL_GROUP = None  # the ranks that hold the experts of one MoE layer between them
_EXPERT_DATA_PARALLEL_GROUP = None  # the ranks that hold the same experts: their gradients summed
_EXPERT_TENSOR_PARALLEL_GROUP = None  # the ranks that split each expert's weights (Megatron's ETP)
_EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP = None  # both: a layer's experts, every shard once
_VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = None  # the model chunk running now (interleaved 1F1B)
_VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = None


class UserError(Exception):
    """A mistake the user can fix (a flag, a file, a size): the scripts say it in one line and exit
    with status 2 (training/operations.run_cli). Every such error derives from this one class,
    here at the bottom of the imports, so the CLI catches it without importing what raises it."""


class ParallelConfigError(UserError, ValueError):
    """A user error in the parallel set-up; the message says what to do."""


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1,
                              virtual_pipeline_model_parallel_size=None,
                              context_parallel_size: int = 1,
                              expert_model_parallel_size: int = 1,
                              expert_tensor_parallel_size: int = 1) -> None:
    """Split the world (DP x PP x CP x TP ranks) into tensor-, context-, data-, pipeline- (and
    expert-) parallel groups, in Megatron's rank order: TP fastest, then CP, DP, PP.

    Tensor-parallel groups are runs of consecutive ranks, as in Megatron: with 8 ranks, TP 2 and
    PP 2 they are [0, 1], [2, 3], [4, 5], [6, 7]. Consecutive ranks share a node, and the
    tensor-parallel all-reduces are the most frequent: they get the fastest links.
    Data-parallel groups hold the ranks of one stage with the same tensor-parallel rank ([0, 2],
    [1, 3], [4, 6], [5, 7]): each holds the same shard of a different replica, so their
    gradients can be averaged element-wise. Pipeline groups hold one rank of each stage ([0, 4],
    [1, 5], [2, 6], [3, 7]): stage s sends its activations to stage s + 1, point to point, the
    least frequent and smallest traffic, over the slowest links (Sec. 3.2). The embedding group
    is each pipeline's first and last stage. Context: group_ranks; experts: expert_group_ranks."""
    global _TENSOR_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_GROUP
    global _CONTEXT_PARALLEL_GROUP, _DATA_PARALLEL_GROUP_WITH_CP
    global _TENSOR_AND_DATA_PARALLEL_GROUP, _PIPELINE_GLOBAL_RANKS, _EMBEDDING_GROUP
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK, _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    expert = expert_model_parallel_size, expert_tensor_parallel_size
    groups = group_ranks(dist.get_world_size(), tp, pp, cp, *expert)
    _TENSOR_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP = (_create(groups[kind])[0]
                                                          for kind in ("tensor", "data"))
    _CONTEXT_PARALLEL_GROUP = _create(groups["context"])[0] if cp > 1 else None
    _DATA_PARALLEL_GROUP_WITH_CP = _create(groups["data_with_context"])[0] if cp > 1 else \
        _DATA_PARALLEL_GROUP
    if pp == 1:  # one stage, the world: nothing to create (a pipeline of one sends nothing)
        _TENSOR_AND_DATA_PARALLEL_GROUP = dist.group.WORLD
        _PIPELINE_GLOBAL_RANKS = [dist.get_rank()]
    else:
        _TENSOR_AND_DATA_PARALLEL_GROUP, _ = _create(groups["stage"])
        _PIPELINE_MODEL_PARALLEL_GROUP, _PIPELINE_GLOBAL_RANKS = _create(groups["pipeline"])
        _EMBEDDING_GROUP, _ = _create(groups["embedding"])
    _create_moe_groups(groups, tp, cp, *expert)
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = virtual_pipeline_model_parallel_size
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = 0 if virtual_pipeline_model_parallel_size else None


def _create_moe_groups(groups, tp, cp, ep, etp):
    """The groups a MoE layer uses (group_ranks, expert_group_ranks), created only where a run
    uses them (each new_group is a communicator to set up; the expert tensor-parallel group is
    the tensor-parallel one, its size 1 or TP)."""
    global _TENSOR_AND_CONTEXT_PARALLEL_GROUP, _EXPERT_MODEL_PARALLEL_GROUP
    global _EXPERT_DATA_PARALLEL_GROUP, _EXPERT_TENSOR_PARALLEL_GROUP
    global _EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP
    _TENSOR_AND_CONTEXT_PARALLEL_GROUP = (
        _create(groups["tensor_and_context"])[0] if tp > 1 and cp > 1 else
        _CONTEXT_PARALLEL_GROUP if cp > 1 else _TENSOR_MODEL_PARALLEL_GROUP)
    _EXPERT_TENSOR_PARALLEL_GROUP = _TENSOR_MODEL_PARALLEL_GROUP if etp > 1 else None
    _EXPERT_MODEL_PARALLEL_GROUP = _create(groups["expert_model"])[0] if ep > 1 else None
    _EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP = (
        _create(groups["expert_tensor_and_model"])[0] if ep > 1 and etp > 1 else
        _EXPERT_MODEL_PARALLEL_GROUP or _EXPERT_TENSOR_PARALLEL_GROUP)
    # Every rank of the stage holds every expert (EP 1, ETP 1): their gradients summed over it.
    _EXPERT_DATA_PARALLEL_GROUP = _create(groups["expert_data"])[0] if ep * etp > 1 else \
        _TENSOR_AND_DATA_PARALLEL_GROUP


def group_ranks(world_size: int, tp: int, pp: int, cp: int = 1, ep: int = 1,
                etp: int = 1) -> dict:
    """The ranks of every group, by kind: lists of global ranks, in Megatron's order (TP fastest,
    then CP, then DP, then PP; initialize_model_parallel's docstring draws them for 8 ranks).

    Context parallelism (core/context_parallel/) puts C ranks on one sequence, each holding 1/C
    of its tokens: its groups are TP apart ([0, 2], [1, 3] at TP 2, CP 2). A replica is then C
    ranks wide, each of them saw other tokens, and the gradients are averaged over the data- and
    context-parallel ranks together (`data_with_context`: Megatron's
    get_data_parallel_group(with_context_parallel=True)). Expert parallelism's groups:
    expert_group_ranks."""
    if world_size % (tp * pp * cp) != 0:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by --tensor_model_parallel_size {tp} x "
            f"--pipeline_model_parallel_size {pp} x --context_parallel_size {cp}; launch a "
            f"multiple of {tp * pp * cp} ranks with torchrun --nproc_per_node")
    stage_size = world_size // pp  # the ranks of one pipeline stage
    dp = stage_size // (tp * cp)
    pipelines = [list(range(first, world_size, stage_size)) for first in range(stage_size)]

    def in_stage(stage, start, step):  # a stage's ranks from its `start`-th, `step` apart
        return list(range(stage * stage_size + start, (stage + 1) * stage_size, step))
    return dict(
        tensor=[list(range(start, start + tp)) for start in range(0, world_size, tp)],
        context=[in_stage(s, d * tp * cp + t, tp)[:cp]
                 for s in range(pp) for d in range(dp) for t in range(tp)],
        data=[in_stage(s, c * tp + t, tp * cp) for s in range(pp) for t in range(tp)
              for c in range(cp)],
        data_with_context=[in_stage(s, t, tp) for s in range(pp) for t in range(tp)],
        stage=[list(range(stage * stage_size, (stage + 1) * stage_size)) for stage in range(pp)],
        tensor_and_context=[in_stage(s, d * tp * cp, 1)[:tp * cp] for s in range(pp)
                            for d in range(dp)],
        **expert_group_ranks(stage_size, pp, ep, etp),
        pipeline=pipelines,
        embedding=[sorted({ranks[0], ranks[-1]}) for ranks in pipelines])


def expert_group_ranks(stage_size: int, pp: int, ep: int, etp: int = 1) -> dict:
    """Expert parallelism's groups (core/transformer/moe/), carved out of each pipeline stage's
    ranks anew, in Megatron's expert order "tp-ep-dp-pp" (tp: the expert tensor-parallel size
    `etp`; context parallelism folded into the data-parallel ranks): each expert's weights split
    over `etp` consecutive ranks (`expert_tensor`), a layer's E experts spread over `ep` ranks
    etp apart (`expert_model`: [0, 1], [2, 3] at EP 2, ETP 1; [0, 2], [1, 3] at EP 2, ETP 2), the
    etp x ep of them together holding each shard of each expert once (`expert_tensor_and_model`),
    and the ranks that hold the same shards (`expert_data`) sum their gradients. Every rank of a
    stage routes other tokens (sequence parallelism splits a sequence over the TP ranks), so an
    EP group may cross the TP, CP and DP groups alike. (`tensor_and_context`, group_ranks': the
    ranks of one micro-batch's sequences, over which the router counts the tokens per expert,
    Megatron's tp_cp group.)"""
    if stage_size % (ep * etp) != 0:
        raise ParallelConfigError(
            f"--expert_model_parallel_size {ep} x --expert_tensor_parallel_size {etp} does not "
            f"divide the {stage_size} ranks of a pipeline stage (tensor x context x data "
            f"parallel); choose sizes whose product divides {stage_size}")
    blocks = [f + b for f in range(0, pp * stage_size, stage_size)
              for b in range(0, stage_size, ep * etp)]  # each block: etp x ep ranks
    return dict(
        expert_tensor=[list(range(b + e * etp, b + (e + 1) * etp)) for b in blocks
                       for e in range(ep)],
        expert_model=[list(range(b + t, b + ep * etp, etp)) for b in blocks for t in range(etp)],
        expert_tensor_and_model=[list(range(b, b + ep * etp)) for b in blocks],
        expert_data=[list(range(f + i, f + stage_size, ep * etp))
                     for f in range(0, pp * stage_size, stage_size) for i in range(ep * etp)])


def _create(groups):
    """Create every group of a kind (every rank must, in the same order); (this rank's group,
    its ranks)."""
    found = None, None
    for ranks in groups:
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            found = group, ranks
    return found


def model_parallel_is_initialized() -> bool:
    return _TENSOR_MODEL_PARALLEL_GROUP is not None


def get_tensor_model_parallel_group():
    assert _TENSOR_MODEL_PARALLEL_GROUP is not None, \
        "call initialize_model_parallel() before building parallel layers"
    return _TENSOR_MODEL_PARALLEL_GROUP


def get_tensor_model_parallel_world_size() -> int:
    return dist.get_world_size(group=get_tensor_model_parallel_group())


def get_tensor_model_parallel_rank() -> int:
    return dist.get_rank(group=get_tensor_model_parallel_group())


def get_data_parallel_group(with_context_parallel: bool = False):
    """The replicas of this rank's shard; with_context_parallel: and their context ranks, over
    which gradients are averaged (each saw other tokens of other rows)."""
    assert _DATA_PARALLEL_GROUP is not None, "call initialize_model_parallel() first"
    return _DATA_PARALLEL_GROUP_WITH_CP if with_context_parallel else _DATA_PARALLEL_GROUP


def get_context_parallel_group():
    """The ranks that hold the other tokens of this rank's sequences (None without context
    parallelism: callers ask get_context_parallel_world_size first)."""
    assert _DATA_PARALLEL_GROUP is not None, "call initialize_model_parallel() first"
    return _CONTEXT_PARALLEL_GROUP


def get_context_parallel_world_size() -> int:
    group = get_context_parallel_group()
    return 1 if group is None else dist.get_world_size(group=group)


def get_context_parallel_rank() -> int:
    group = get_context_parallel_group()
    return 0 if group is None else dist.get_rank(group=group)


def get_tensor_and_context_parallel_group():
    """The ranks that split this rank's micro-batch's sequences (TP under sequence parallelism,
    CP): the router's token counts are summed over them (Megatron's tp_cp group)."""
    assert _TENSOR_AND_CONTEXT_PARALLEL_GROUP is not None, "call initialize_model_parallel() first"
    return _TENSOR_AND_CONTEXT_PARALLEL_GROUP


def get_expert_model_parallel_group():
    """The ranks over which a MoE layer's experts are spread (None at EP 1: callers ask
    get_expert_model_parallel_world_size first)."""
    return _EXPERT_MODEL_PARALLEL_GROUP


def get_expert_model_parallel_world_size() -> int:
    group = get_expert_model_parallel_group()
    return 1 if group is None else dist.get_world_size(group=group)


def get_expert_model_parallel_rank() -> int:
    group = get_expert_model_parallel_group()
    return 0 if group is None else dist.get_rank(group=group)


def get_expert_tensor_parallel_group():
    """The ranks that split each expert's weights (None at expert tensor-parallel size 1)."""
    return _EXPERT_TENSOR_PARALLEL_GROUP


def get_expert_tensor_parallel_world_size() -> int:
    group = get_expert_tensor_parallel_group()
    return 1 if group is None else dist.get_world_size(group=group)


def get_expert_tensor_and_model_parallel_group():
    """The expert tensor- and model-parallel ranks together: every shard of every expert of a
    layer once (None when both sizes are 1)."""
    return _EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP


def get_expert_data_parallel_group():
    """The ranks holding this rank's experts, each having run them on other tokens: their
    gradients are summed over it (finalize_model_grads.py), not over the data-parallel group."""
    assert _EXPERT_DATA_PARALLEL_GROUP is not None, "call initialize_model_parallel() first"
    return _EXPERT_DATA_PARALLEL_GROUP


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    return dist.get_world_size(group=get_data_parallel_group(with_context_parallel))


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    return dist.get_rank(group=get_data_parallel_group(with_context_parallel))


def get_tensor_and_data_parallel_group():
    """The ranks of this rank's pipeline stage (every rank, without pipeline parallelism)."""
    assert _TENSOR_AND_DATA_PARALLEL_GROUP is not None, "call initialize_model_parallel() first"
    return _TENSOR_AND_DATA_PARALLEL_GROUP


def get_pipeline_model_parallel_group():
    assert _PIPELINE_MODEL_PARALLEL_GROUP is not None, "call initialize_model_parallel() first"
    return _PIPELINE_MODEL_PARALLEL_GROUP


def get_pipeline_model_parallel_world_size() -> int:
    assert _PIPELINE_GLOBAL_RANKS is not None, "call initialize_model_parallel() first"
    return len(_PIPELINE_GLOBAL_RANKS)


def get_pipeline_model_parallel_rank() -> int:
    return _PIPELINE_GLOBAL_RANKS.index(dist.get_rank())


def get_pipeline_model_parallel_next_rank() -> int:  # global ranks; the last stage's next is 0
    return _PIPELINE_GLOBAL_RANKS[(get_pipeline_model_parallel_rank() + 1) %
                                  len(_PIPELINE_GLOBAL_RANKS)]


def get_pipeline_model_parallel_prev_rank() -> int:
    return _PIPELINE_GLOBAL_RANKS[get_pipeline_model_parallel_rank() - 1]


def get_pipeline_model_parallel_last_rank() -> int:  # where the loss is computed
    return _PIPELINE_GLOBAL_RANKS[-1]


def get_embedding_group():
    assert _EMBEDDING_GROUP is not None, "call initialize_model_parallel() first"
    return _EMBEDDING_GROUP


def get_virtual_pipeline_model_parallel_world_size():
    return _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE


def get_virtual_pipeline_model_parallel_rank():
    return _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK


def set_virtual_pipeline_model_parallel_rank(rank) -> None:
    """The model chunk the interleaved schedule runs now (schedules.py)."""
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = rank


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """This rank holds the model's first layers (with interleaving: and runs its first chunk)."""
    if not ignore_virtual and get_virtual_pipeline_model_parallel_rank() not in (None, 0):
        return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """This rank holds the model's last layers and the loss (with interleaving: runs its last
    chunk)."""
    chunks = get_virtual_pipeline_model_parallel_world_size()
    if not ignore_virtual and chunks and get_virtual_pipeline_model_parallel_rank() != chunks - 1:
        return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def destroy_model_parallel(barrier: bool = True) -> None:
    """Leave the job. The barrier matters: with gloo, a rank that tears down while its peer is
    still in a collective can abort the peer ("terminate called without an active exception").
    Skip it only when peers may never reach it."""
    global _TENSOR_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_GROUP
    global _TENSOR_AND_DATA_PARALLEL_GROUP, _PIPELINE_GLOBAL_RANKS, _EMBEDDING_GROUP
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK, _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    global _CONTEXT_PARALLEL_GROUP, _DATA_PARALLEL_GROUP_WITH_CP
    global _TENSOR_AND_CONTEXT_PARALLEL_GROUP, _EXPERT_MODEL_PARALLEL_GROUP
    global _EXPERT_DATA_PARALLEL_GROUP, _EXPERT_TENSOR_PARALLEL_GROUP
    global _EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    _TENSOR_MODEL_PARALLEL_GROUP = _DATA_PARALLEL_GROUP = _PIPELINE_MODEL_PARALLEL_GROUP = None
    _TENSOR_AND_DATA_PARALLEL_GROUP = _PIPELINE_GLOBAL_RANKS = _EMBEDDING_GROUP = None
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = None
    _CONTEXT_PARALLEL_GROUP = _DATA_PARALLEL_GROUP_WITH_CP = None
    _TENSOR_AND_CONTEXT_PARALLEL_GROUP = _EXPERT_MODEL_PARALLEL_GROUP = None
    _EXPERT_DATA_PARALLEL_GROUP = _EXPERT_TENSOR_PARALLEL_GROUP = None
    _EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP = None
