"""The wire: every collective this repo issues, counted and held to NCCL's rules.

The layers call f and g (mappings.py), which call `all_reduce`, `all_gather` and
`reduce_scatter` here; what parallelism adds after backward (finalize_model_grads.py) calls
the coalesced sums at the bottom. Each collective does the same three things in the same order
(`_to_wire`):

  check   NCCL's rules on every backend (the run's device, a contiguous tensor, a dtype NCCL
          reduces; under TP_CHECK_COLLECTIVES=1 the same shape and dtype on every rank), so a
          CPU run finds what a GPU run would refuse,
  count   its calls and bytes (what the tests and the benchmark hold to the papers' counts),
  stage   the tensor the backend moves: a host copy when gloo carries CUDA tensors, an fp32
          copy of a bf16 tensor to be summed under --tp_reduce_dtype float32.

Which backend and device the job uses is decided once, before this module is asked for
anything, by training/initialize.py; the layers never ask which backend runs. The groups are
parallel_state.py's.
"""

import os
from collections import Counter
from fractions import Fraction

import torch
import torch.distributed as dist

from parallel_state import (
    get_data_parallel_group,
    get_data_parallel_world_size,
    get_embedding_group,
    get_pipeline_model_parallel_group,
    get_pipeline_model_parallel_last_rank,
    get_pipeline_model_parallel_world_size,
    get_tensor_and_data_parallel_group,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)

_DEVICE = None
_STAGE_THROUGH_HOST = False  # gloo with CUDA tensors: collectives run on host copies
_REDUCE_IN_FP32 = False  # --tp_reduce_dtype float32: bf16 tensors are summed as fp32 copies

# comm_calls["all_reduce"] = number of calls; comm_bytes[...] = bytes each rank contributed;
# comm_ring_bytes[...] = bytes each rank sends when the collective runs as a ring (see _count).
comm_calls = Counter()
comm_bytes = Counter()
comm_ring_bytes = Counter()


class CollectiveRuleError(RuntimeError):
    """A tensor handed to a collective breaks a rule NCCL enforces, or one it does not check and
    then hangs or corrupts on (a bug in the caller); checked on every backend (_check)."""


class DeviceMismatchError(CollectiveRuleError):
    """A tensor handed to a collective is not on the run's device."""


def set_device(device: torch.device, stage_through_host: bool = False) -> None:
    """Where this rank's tensors live, for every collective's device rule; with
    `stage_through_host` (gloo carrying CUDA tensors) collectives run on host copies. Called once,
    by training/initialize.py, which chooses them for the whole job."""
    global _DEVICE, _STAGE_THROUGH_HOST
    _DEVICE, _STAGE_THROUGH_HOST = device, stage_through_host


def set_reduce_in_fp32(enabled: bool) -> None:
    """Sum bf16 tensors in fp32 in the tensor-parallel all-reduces and reduce-scatters (twice the
    bytes on the wire); off: in bf16, as Megatron does. See docs/precision.md."""
    global _REDUCE_IN_FP32
    _REDUCE_IN_FP32 = enabled


def get_device() -> torch.device:
    """The run's device (the CPU until training/initialize.py sets it)."""
    return _DEVICE if _DEVICE is not None else torch.device("cpu")


def device_is_set() -> bool:
    return _DEVICE is not None


# ---------------------------------------------------------------------------
# Checked, counted, then staged: over the tensor-parallel group unless they say otherwise.

def _to_wire(op: str, tensor: torch.Tensor, ring_share, group=None,
             summed: bool = False) -> torch.Tensor:
    """check -> count -> stage, the one order of every collective (a tensor refused is not
    counted); returns what the backend moves. `ring_share(p)`: the share of its bytes each of the
    group's p ranks sends in a ring (_count); `group`: the collective's (default: the
    tensor-parallel group); `summed`: the collective adds the ranks' tensors (so
    --tp_reduce_dtype float32 widens a bf16 one)."""
    _check(op, tensor, group)
    p = dist.get_world_size(group or get_tensor_model_parallel_group())
    _count(op, _wire_dtype(tensor, summed), tensor.numel(), ring_share(p))
    return _on_wire(tensor, summed)


ALL_REDUCE = lambda p: Fraction(2 * (p - 1), p)  # a reduce-scatter, then an all-gather
ALL_GATHER = lambda p: Fraction(p - 1)  # of each rank's 1/p, its p - 1 others'
REDUCE_SCATTER = lambda p: Fraction(p - 1, p)


def _count(op: str, dtype: torch.dtype, numel: int, ring_share: Fraction) -> None:
    """Count one call of `op` on `numel` elements of `dtype` on the wire, this rank's
    contribution.

    `ring_share` x its bytes is what each rank sends when the collective runs as a
    ring of p ranks (NCCL's ring algorithm, bandwidth-optimal): the data moves in
    chunks of 1/p, one chunk per rank per step. A reduce-scatter of N bytes takes
    p - 1 steps, (p-1)/p N; an all-gather of N/p bytes per rank sends (p - 1) of
    them, also (p-1)/p N; an all-reduce is the two, 2(p-1)/p N (Korthikanti et al.,
    2022, Sec. 4.2.2: why sequence parallelism's pair costs what one all-reduce does).
    """
    nbytes = numel * dtype.itemsize
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


# What NCCL reduces and moves (ncclDataType_t; bool as uint8). gloo takes more: int16, the
# unsigned types, complex; a run that uses them would work on CPU and fail on GPUs.
NCCL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8,
               torch.uint8, torch.int32, torch.int64, torch.bool)
# Under TP_CHECK_COLLECTIVES=1 every collective first checks that each rank of its group hands it
# a tensor of the same shape and dtype: one more small all-gather per collective, so off by
# default (the test suite turns it on). NCCL does not check this: it hangs or reads past the end.
CHECK_COLLECTIVES = os.environ.get("TP_CHECK_COLLECTIVES", "0") == "1"


def _check(op: str, tensor: torch.Tensor, group=None) -> None:
    """NCCL's rules, on every backend, so that a CPU run finds what a GPU run would refuse.
    `group`: the collective's (default: the tensor-parallel group)."""
    _check_rules(op, tensor)
    if CHECK_COLLECTIVES:
        _check_same_on_every_rank(op, tensor, group)


def _check_rules(op: str, tensor: torch.Tensor) -> None:
    """The rules one rank can check alone: the run's device, contiguous, a dtype NCCL takes."""
    def broken(rule):
        return CollectiveRuleError(f"{op}: {rule}; got a {tensor.dtype} tensor of shape "
                                   f"{tuple(tensor.shape)}, strides {tensor.stride()}")
    if _DEVICE is not None and tensor.device != _DEVICE:
        raise DeviceMismatchError(f"{op} was given a tensor on {tensor.device}, but this run's "
                                  f"collectives use {_DEVICE}; move it with "
                                  ".to(communication.get_device())")
    if not tensor.is_contiguous():  # a stride check, no copy
        raise broken("NCCL needs a contiguous tensor (gloo would reduce its raw storage); make "
                     "it .contiguous() first")
    if tensor.dtype not in NCCL_DTYPES:
        raise broken(f"NCCL does not reduce {tensor.dtype}")


def _check_same_on_every_rank(op, tensor, group):
    """TP_CHECK_COLLECTIVES: every rank of the group hands `op` the same shape and dtype."""
    group = group or get_tensor_model_parallel_group()
    if tensor.dim() > 8:  # the check's own all-gather has room for 8 (ours have at most 3)
        raise CollectiveRuleError(f"{op}: TP_CHECK_COLLECTIVES checks tensors of up to 8 "
                                  f"dimensions, got {tensor.dim()}")
    mine = [NCCL_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
    mine = _on_wire(torch.tensor(mine + [-1] * (10 - len(mine)), dtype=torch.int64,
                                 device=get_device()))
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    for rank, theirs in enumerate(everyone):
        if not torch.equal(theirs, mine):
            dtype, ndim = NCCL_DTYPES[int(theirs[0])], int(theirs[1])
            raise CollectiveRuleError(
                f"{op}: every rank must hand it the same shape and dtype, but this rank has "
                f"{tensor.dtype} {tuple(tensor.shape)} and rank {rank} of the group has {dtype} "
                f"{tuple(theirs[2:2 + ndim].tolist())}")


def point_to_point_wire(op: str, tensor: torch.Tensor) -> torch.Tensor:
    """check -> count -> stage for one send between pipeline stages (p2p_communication.py, which
    checks that sends and receives pair): its bytes counted once, a send being no ring."""
    _check_rules(op, tensor)
    _count(op, tensor.dtype, tensor.numel(), Fraction(1))
    return _on_wire(tensor)


def wire_buffer(shape, dtype) -> torch.Tensor:
    """An empty tensor where the backend moves it: on the run's device, or the host when gloo
    carries CUDA tensors (a receive then moves it with .to(get_device()))."""
    return torch.empty(shape, dtype=dtype, device="cpu" if _STAGE_THROUGH_HOST else get_device())


def _wire_dtype(tensor: torch.Tensor, summed: bool) -> torch.dtype:
    """fp32 for a bf16 tensor to be `summed` under set_reduce_in_fp32, else the tensor's own."""
    if summed and _REDUCE_IN_FP32 and tensor.dtype == torch.bfloat16:
        return torch.float32
    return tensor.dtype


def _on_wire(tensor: torch.Tensor, summed: bool = False) -> torch.Tensor:
    """The tensor the backend moves: in its wire dtype (_wire_dtype), and a host copy when gloo
    carries CUDA tensors (as gloo's own CUDA path does); else the tensor itself."""
    tensor = tensor.to(_wire_dtype(tensor, summed))
    return tensor.cpu() if _STAGE_THROUGH_HOST else tensor


def _finish(work, result, async_op):
    """Wait for `work` (None for a collective that ran synchronously), then return result().
    With async_op, returns a function that does."""
    def finish():
        if work is not None:
            work.wait()
        return result()
    return finish if async_op else finish()


# Torch 2.13 renamed the one-buffer collectives; older torches have only the old names.
def _all_gather_one_buffer(output, input_, group, async_op):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input_, group=group, async_op=async_op)


def _reduce_scatter_one_buffer(output, input_, group, async_op):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input_, group=group, async_op=async_op)


def all_reduce(tensor: torch.Tensor, async_op: bool = False, group=None, op: str = "sum"):
    """Sum (op="max": take the maximum of) `tensor` in place over the tensor-parallel group
    (or `group`) and return it.

    With async_op, returns at once a function that waits and returns it.
    """
    wire = _to_wire("all_reduce", tensor, ALL_REDUCE, group, summed=op == "sum")
    group = group or get_tensor_model_parallel_group()
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    work = dist.all_reduce(wire, op=reduce_op, group=group, async_op=async_op)
    return _finish(work, lambda: tensor if wire is tensor else tensor.copy_(wire), async_op)


def all_gather(tensor: torch.Tensor, dim: int, async_op: bool = False):
    """Concatenate every rank's `tensor` along `dim`, in rank order.

    One collective into one buffer along the first dimension (Megatron's
    all_gather_into_tensor); another `dim` is rearranged after, as Megatron's
    `_gather_along_last_dim`. With async_op, returns at once a function that
    waits and returns the result.
    """
    tensor = tensor.contiguous()  # the one-buffer collective's input is a copy anyway
    wire = _to_wire("all_gather", tensor, ALL_GATHER)
    p = get_tensor_model_parallel_world_size()
    output = wire.new_empty((p * tensor.shape[0], *tensor.shape[1:]))
    work = _all_gather_one_buffer(output, wire, get_tensor_model_parallel_group(), async_op)

    def result():
        out = output.to(tensor.device)
        return out if dim % tensor.dim() == 0 else torch.cat(out.chunk(p), dim=dim)
    return _finish(work, result, async_op)


def reduce_scatter(tensor: torch.Tensor, async_op: bool = False):
    """Sum every rank's `tensor` and keep this rank's chunk of the sum along the first
    dimension (the rows, sequence parallelism's split; Megatron's
    `_reduce_scatter_along_first_dim`).

    With async_op, returns at once a function that waits and returns the result.
    """
    tensor = tensor.contiguous()
    wire = _to_wire("reduce_scatter", tensor, REDUCE_SCATTER, summed=True)
    p = get_tensor_model_parallel_world_size()
    output = wire.new_empty((tensor.shape[0] // p, *tensor.shape[1:]))
    work = _reduce_scatter_one_buffer(output, wire, get_tensor_model_parallel_group(), async_op)
    return _finish(work, lambda: output.to(tensor.device, tensor.dtype), async_op)


def _all_reduce_coalesced(tensors, group, name, divide_by=1):
    """Sum `tensors` in place over `group` (then divide), as one flat buffer in one all-reduce:
    for small tensors the latency of a collective, not its bytes, dominates on every backend.

    It honours --tp_reduce_dtype like the others, though under bf16 nothing it sums is bf16:
    the gradients are the fp32 main parameters' (training/mixed_precision.py), the loss and the
    squared norm fp32."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    wire = _to_wire(name, flat, ALL_REDUCE, group, summed=True)
    dist.all_reduce(wire, group=group)
    if divide_by != 1:
        wire /= divide_by
    offset = 0
    for t in tensors:
        t.copy_(wire[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def average_over_data_parallel(tensors) -> None:
    """Average `tensors` in place over the data-parallel group, in one all-reduce."""
    _all_reduce_coalesced(tensors, get_data_parallel_group(), "dp_all_reduce",
                          get_data_parallel_world_size())


def sum_over_all_ranks(tensors, name) -> None:
    """Sum `tensors` in place over every rank (the clipping norm's squares of the distributed
    optimizer's shards), in one all-reduce counted under `name`."""
    _all_reduce_coalesced(tensors, dist.group.WORLD, name)


def reduce_scatter_over_data_parallel(buffer: torch.Tensor, shard: torch.Tensor) -> None:
    """The distributed optimizer's gradients: `buffer` summed over the data-parallel group, and
    this rank's part of the sum written into `shard`, its view of `buffer` (Megatron reduces in
    place; here into a new tensor, then copied: gloo does not promise an aliased output)."""
    group = get_data_parallel_group()
    wire = _to_wire("dp_reduce_scatter", buffer, REDUCE_SCATTER, group, summed=True)
    output = wire.new_empty(shard.numel())
    _reduce_scatter_one_buffer(output, wire, group, async_op=False)
    shard.copy_(output)


def all_gather_over_data_parallel(buffer: torch.Tensor, shard: torch.Tensor) -> None:
    """The distributed optimizer's parameters: every rank's `shard` (its view of `buffer`, the
    part it updated) into every rank's `buffer`, in place where the backend moves the buffer
    itself (its input then is its own part of the output, as NCCL allows)."""
    group = get_data_parallel_group()
    wire = _to_wire("dp_all_gather", shard, ALL_GATHER, group)
    output = buffer if wire is shard else wire.new_empty(buffer.numel())
    _all_gather_one_buffer(output, wire, group, async_op=False)
    if output is not buffer:
        buffer.copy_(output)


def sum_over_tensor_parallel(tensors, name="all_reduce") -> None:
    """Sum `tensors` in place over the tensor-parallel group, in one all-reduce
    (sequence parallelism's partial gradients of replicated weights and the loss; the squared
    gradient norm), counted under `name`."""
    _all_reduce_coalesced(tensors, get_tensor_model_parallel_group(), name)


def sum_over_pipeline(tensors, name) -> None:
    """Sum `tensors` in place over the pipeline group (the clipping norm's squares of every
    stage's layers), in one all-reduce counted under `name`."""
    _all_reduce_coalesced(tensors, get_pipeline_model_parallel_group(), name)


def sum_over_embedding_group(tensors) -> None:
    """Sum `tensors` in place over the embedding group: the tied word embeddings' gradients on
    the pipeline's first and last stages (finalize_model_grads.py)."""
    _all_reduce_coalesced(tensors, get_embedding_group(), "embedding_all_reduce")


def broadcast_from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    """The pipeline's last stage's `tensor` (the loss) on every stage; as is without one."""
    if get_pipeline_model_parallel_world_size() == 1:
        return tensor
    group = get_pipeline_model_parallel_group()
    wire = _to_wire("pipeline_loss_broadcast", tensor.contiguous(), lambda p: Fraction(1), group)
    dist.broadcast(wire, src=get_pipeline_model_parallel_last_rank(), group=group)
    return wire.to(tensor.device)


def gather_over_pipeline(obj):
    """Every stage's `obj` (a state_dict on the CPU), in stage order, on the first stage; None on
    the others. Without a pipeline, [obj]."""
    if get_pipeline_model_parallel_world_size() == 1:
        return [obj]
    group = get_pipeline_model_parallel_group()
    first = dist.get_global_rank(group, 0)
    gathered = [None] * dist.get_world_size(group) if dist.get_rank() == first else None
    dist.gather_object(obj, gathered, dst=first, group=group)
    return gathered


def average_replicated(whole, partial=()) -> None:
    """Average over data-parallel replicas, in one all-reduce over *all* ranks of the pipeline stage
    (every rank, without pipeline parallelism), tensors that every
    tensor-parallel rank holds: `whole` (fc's gradient, the loss) or, under sequence parallelism,
    as a partial sum over its own rows (`partial`: the sum over the group is the whole).

    Why not the data-parallel groups ([0, 2, 4] and [1, 3, 5] at TP 2): those are separate
    communicators, and nothing promises that they add in the same order (NCCL picks rings and
    trees per communicator), so fc could drift apart by an ulp between tensor-parallel ranks.
    One all-reduce over one communicator gives every rank the same bits. To make its sum the
    data-parallel sum, only tensor-parallel rank 0 contributes the whole tensors; every rank
    adds its part of the partial ones.
    """
    whole, partial = list(whole), list(partial)
    if get_tensor_model_parallel_rank() != 0:
        for t in whole:
            t.zero_()
    _all_reduce_coalesced(whole + partial, get_tensor_and_data_parallel_group(),
                          "replicated_all_reduce", get_data_parallel_world_size())
