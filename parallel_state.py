"""The process groups: which ranks split a layer and which hold replicas (Megatron-LM, App. B.1,
Fig. 8).

Megatron-LM keeps its process groups in module-level globals behind small getters
(megatron/core/parallel_state.py); so do we. What moves over the groups, counted and held to
NCCL's rules, is communication.py's.
"""

import torch.distributed as dist

_TENSOR_MODEL_PARALLEL_GROUP = None
_DATA_PARALLEL_GROUP = None


class UserError(Exception):
    """A mistake the user can fix (a flag, a file, a size): the scripts say it in one line and exit
    with status 2 (training/operations.run_cli). Every such error derives from this one class,
    here at the bottom of the imports, so the CLI catches it without importing what raises it."""


class ParallelConfigError(UserError, ValueError):
    """A user error in the parallel set-up; the message says what to do."""


def initialize_model_parallel(tensor_model_parallel_size: int = 1) -> None:
    """Split the world (DP x TP ranks) into tensor- and data-parallel groups.

    Tensor-parallel groups are runs of consecutive ranks, as in Megatron: with
    6 ranks and TP 2 they are [0, 1], [2, 3], [4, 5]. Consecutive ranks share a
    node, and the tensor-parallel all-reduces are the most frequent, so they
    get the fastest links. Data-parallel groups hold the ranks with the same
    tensor-parallel rank ([0, 2, 4], [1, 3, 5]): each holds the same shard of
    a different replica, so their gradients can be averaged element-wise.
    """
    global _TENSOR_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP
    world_size, tp = dist.get_world_size(), tensor_model_parallel_size
    if world_size % tp != 0:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by --tensor_model_parallel_size "
            f"{tp}; launch a multiple of it with torchrun --nproc_per_node")
    rank = dist.get_rank()
    for start in range(0, world_size, tp):  # every rank must create every group
        ranks = list(range(start, start + tp))
        group = dist.new_group(ranks)
        if rank in ranks:
            _TENSOR_MODEL_PARALLEL_GROUP = group
    for tp_rank in range(tp):
        ranks = list(range(tp_rank, world_size, tp))
        group = dist.new_group(ranks)
        if rank in ranks:
            _DATA_PARALLEL_GROUP = group


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


def get_data_parallel_group():
    assert _DATA_PARALLEL_GROUP is not None, "call initialize_model_parallel() first"
    return _DATA_PARALLEL_GROUP


def get_data_parallel_world_size() -> int:
    return dist.get_world_size(group=get_data_parallel_group())


def get_data_parallel_rank() -> int:
    return dist.get_rank(group=get_data_parallel_group())


def destroy_model_parallel(barrier: bool = True) -> None:
    """Leave the job.

    The barrier matters: with gloo, a rank that tears down while its peer is
    still in a collective can abort the peer ("terminate called without an
    active exception"). Skip it only when peers may never reach it.
    """
    global _TENSOR_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    _TENSOR_MODEL_PARALLEL_GROUP = _DATA_PARALLEL_GROUP = None
