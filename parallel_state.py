"""Process groups, device choice and every collective this repo issues.

Megatron-LM keeps its process groups in module-level globals behind small
getters (megatron/core/parallel_state.py); so do we. This is also the one
place that decides the backend (nccl on GPUs, gloo on CPU) and the device
tensors live on, so the layers never ask which backend runs.

Every collective goes through `all_reduce`, `all_gather`, `reduce_scatter`,
`broadcast` or `_all_reduce_coalesced` below, which count the calls and
bytes they send: that is how the tests and the benchmark check the
communication against the paper's count.
"""

import os
import sys
from collections import Counter
from datetime import timedelta
from fractions import Fraction

import torch
import torch.distributed as dist

_TENSOR_MODEL_PARALLEL_GROUP = None
_DATA_PARALLEL_GROUP = None
_DEVICE = None

# comm_calls["all_reduce"] = number of calls; comm_bytes[...] = bytes each rank contributed;
# comm_ring_bytes[...] = bytes each rank sends when the collective runs as a ring (see _count).
comm_calls = Counter()
comm_bytes = Counter()
comm_ring_bytes = Counter()


class ParallelConfigError(ValueError):
    """A user error in the parallel set-up; the message says what to do."""


def choose_backend(backend: str, local_world_size: int) -> str:
    """'auto' means nccl when every local rank can have its own GPU, gloo otherwise."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        return "nccl" if gpus >= local_world_size else "gloo"
    if backend == "nccl" and gpus < local_world_size:
        raise ParallelConfigError(
            f"--distributed_backend nccl needs a CUDA GPU for each of the {local_world_size} "
            f"ranks on this node, found {gpus}; use --distributed_backend gloo (or auto) to run on CPU")
    return backend


def init_distributed(backend: str = "auto", timeout_minutes: float = 10.0) -> torch.device:
    """Join the torchrun job, pick backend and device. Returns the device to use."""
    global _DEVICE
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = choose_backend(backend, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if backend == "nccl":
        # One GPU per rank, chosen before the group exists so NCCL binds to it.
        _DEVICE = torch.device("cuda", local_rank)
        torch.cuda.set_device(_DEVICE)
    else:
        _DEVICE = torch.device("cpu")
    timeout = timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend=backend, store=_attempt_store(timeout), rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    return _DEVICE


def _attempt_store(timeout):
    """The job's key-value store, seen under a prefix of its own for each torchrun attempt.

    After a failure, `torchrun --max-restarts` starts the group again on the
    same store; the new ranks must not read the addresses the old ones left
    there (seen here: gloo then connects to a dead rank's port and fails).
    Under torchrun its agent hosts the store; without it, rank 0 does.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), timeout=timeout,
                          is_master=not agent_hosts_store and os.environ["RANK"] == "0")
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of this group's tensor-parallel rank 0 (the one that reads data)."""
    tp = get_tensor_model_parallel_world_size()
    return (dist.get_rank() // tp) * tp


def get_device() -> torch.device:
    return _DEVICE if _DEVICE is not None else torch.device("cpu")


def destroy_model_parallel(barrier: bool = True) -> None:
    """Leave the job.

    The barrier matters: with gloo, a rank that tears down while its peer is
    still in a collective can abort the peer ("terminate called without an
    active exception"). Skip it only when peers may never reach it.
    """
    global _TENSOR_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP, _DEVICE
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    _TENSOR_MODEL_PARALLEL_GROUP = _DATA_PARALLEL_GROUP = _DEVICE = None


def exit_now(code: int) -> None:
    """Leave at once, without tearing the process group down.

    For when peers may be gone or stuck mid-collective (a failure, Ctrl-C):
    Python's normal shutdown would destroy gloo's threads in the middle of an
    operation and abort ("terminate called without an active exception").
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------------------
# Collectives, counted: over the tensor-parallel group unless they say otherwise.

def _count(op: str, tensor: torch.Tensor, ring_share: Fraction) -> None:
    """Count one call of `op` on `tensor`, this rank's contribution.

    `ring_share` x its bytes is what each rank sends when the collective runs as a
    ring of p ranks (NCCL's ring algorithm, bandwidth-optimal): the data moves in
    chunks of 1/p, one chunk per rank per step. A reduce-scatter of N bytes takes
    p - 1 steps, (p-1)/p N; an all-gather of N/p bytes per rank sends (p - 1) of
    them, also (p-1)/p N; an all-reduce is the two, 2(p-1)/p N (Korthikanti et al.,
    2022, Sec. 4.2.2: why sequence parallelism's pair costs what one all-reduce does).
    """
    nbytes = tensor.numel() * tensor.element_size()
    comm_calls[op] += 1
    comm_bytes[op] += nbytes
    comm_ring_bytes[op] += int(nbytes * ring_share)


def reset_comm_stats() -> None:
    comm_calls.clear()
    comm_bytes.clear()
    comm_ring_bytes.clear()


def comm_stats() -> dict:
    """What was counted since reset_comm_stats(): {op: {"calls", "bytes", "ring_bytes"}}."""
    return {op: dict(calls=comm_calls[op], bytes=comm_bytes[op], ring_bytes=comm_ring_bytes[op])
            for op in sorted(comm_calls)}


def all_reduce(tensor: torch.Tensor, async_op: bool = False, group=None):
    """Sum `tensor` in place over the tensor-parallel group (or `group`)."""
    group = group or get_tensor_model_parallel_group()
    p = dist.get_world_size(group)
    _count("all_reduce", tensor, Fraction(2 * (p - 1), p))
    return dist.all_reduce(tensor, group=group, async_op=async_op)


def all_gather(tensor: torch.Tensor, dim: int, async_op: bool = False):
    """Concatenate every rank's `tensor` along `dim`, in rank order.

    One collective into one buffer along the first dimension (Megatron's
    all_gather_into_tensor); another `dim` is rearranged after, as Megatron's
    `_gather_along_last_dim`. With async_op, returns at once a function that
    waits and returns the result.
    """
    p = get_tensor_model_parallel_world_size()
    _count("all_gather", tensor, Fraction(p - 1))
    tensor = tensor.contiguous()
    output = tensor.new_empty((p * tensor.shape[0], *tensor.shape[1:]))
    work = dist.all_gather_single(output, tensor, group=get_tensor_model_parallel_group(), async_op=async_op)

    def finish():
        if async_op:
            work.wait()
        return output if dim % tensor.dim() == 0 else torch.cat(output.chunk(p), dim=dim)
    return finish if async_op else finish()


def reduce_scatter(tensor: torch.Tensor, async_op: bool = False):
    """Sum every rank's `tensor` and keep this rank's chunk of the sum along the first
    dimension (the rows, sequence parallelism's split; Megatron's `_reduce_scatter_along_first_dim`).

    With async_op, returns at once a function that waits and returns the result.
    """
    p = get_tensor_model_parallel_world_size()
    _count("reduce_scatter", tensor, Fraction(p - 1, p))
    tensor = tensor.contiguous()
    output = tensor.new_empty((tensor.shape[0] // p, *tensor.shape[1:]))
    work = dist.reduce_scatter_single(output, tensor, group=get_tensor_model_parallel_group(), async_op=async_op)

    def finish():
        if async_op:
            work.wait()
        return output
    return finish if async_op else finish()


def _all_reduce_coalesced(tensors, group, name, divide_by=1):
    """Sum `tensors` in place over `group` (then divide), as one flat buffer in one all-reduce:
    for small tensors the latency of a collective, not its bytes, dominates on every backend."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    p = dist.get_world_size(group)
    _count(name, flat, Fraction(2 * (p - 1), p))
    dist.all_reduce(flat, group=group)
    if divide_by != 1:
        flat /= divide_by
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def average_over_data_parallel(tensors) -> None:
    """Average `tensors` in place over the data-parallel group, in one all-reduce."""
    _all_reduce_coalesced(tensors, get_data_parallel_group(), "dp_all_reduce", get_data_parallel_world_size())


def sum_over_tensor_parallel(tensors) -> None:
    """Sum `tensors` in place over the tensor-parallel group, in one all-reduce
    (sequence parallelism's partial gradients of replicated weights, and the loss)."""
    _all_reduce_coalesced(tensors, get_tensor_model_parallel_group(), "all_reduce")


def broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """Send tensor-parallel rank 0's `tensor` to the rest of its group, in place."""
    p = get_tensor_model_parallel_world_size()
    _count("broadcast", tensor, Fraction(p - 1, p))  # pipelined chain: p - 1 ranks send it all; the average
    dist.broadcast(tensor, get_tensor_model_parallel_src_rank(), group=get_tensor_model_parallel_group())
    return tensor
