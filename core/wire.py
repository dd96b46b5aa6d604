"""The wire: around every collective this repo issues, NCCL's rules checked, the call counted,
the tensor staged. Not Megatron's, and off the reading path: Megatron calls torch.distributed and
trusts NCCL to refuse; here the same code runs on CPUs over gloo, which refuses less.

A function that makes one torch.distributed call on a tensor is written as the paper's operation,
the call in plain sight, and marked with `@collective(name, ring_share)`:

    @wire.collective("all_reduce", wire.ALL_REDUCE, summed=True)
    def _reduce(input_, group):
        dist.all_reduce(input_, group=group)
        return input_

Around the call, and in the same order for every collective, the wire does three things:

  check   NCCL's rules on every backend (the run's device, a contiguous tensor, a dtype NCCL
          reduces; under TP_CHECK_COLLECTIVES=1 the same shape and dtype on every rank), so a
          CPU run finds what a GPU run would refuse,
  count   its calls and bytes under `name` (what the tests and the benchmark hold to the
          papers' counts),
  stage   the tensor the backend moves: a host copy when gloo carries CUDA tensors, an fp32
          copy of a bf16 tensor to be summed under --tp_reduce_dtype float32; a list of tensors
          laid end to end in one buffer (one collective: for small tensors the latency, not the
          bytes, dominates). The result comes back to the caller's device and dtype, into the
          caller's tensors when the function worked in place.

Which backend and device the job uses is decided once, before this module is asked for
anything, by training/initialize.py; the layers never ask which backend runs.
"""

import functools
import os
from collections import Counter
from fractions import Fraction

import torch
import torch.distributed as dist

from core.utils import dist_all_gather_func

_DEVICE = None
_STAGE_THROUGH_HOST = False  # gloo with CUDA tensors: collectives run on host copies
_REDUCE_IN_FP32 = False  # --tp_reduce_dtype float32: bf16 tensors are summed as fp32 copies

# comm_calls["all_reduce"] = number of calls; comm_bytes[...] = bytes each rank contributed;
# comm_ring_bytes[...] = bytes each rank sends when the collective runs as a ring (see _count).
comm_calls = Counter()
comm_bytes = Counter()
comm_ring_bytes = Counter()
comm_tallies = Counter()  # what a formula needs beside the bytes (the rows an all-to-all routed)


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
    """Sum bf16 tensors in fp32 (twice the bytes on the wire) in every collective marked
    summed=True; off: in bf16, as Megatron does. Only the tensor-parallel sums carry bf16: the
    others sum fp32 main gradients, fp32 losses and norms, or integers. See docs/precision.md."""
    global _REDUCE_IN_FP32
    _REDUCE_IN_FP32 = enabled


def get_device() -> torch.device:
    """The run's device (the CPU until training/initialize.py sets it)."""
    return _DEVICE if _DEVICE is not None else torch.device("cpu")


def device_is_set() -> bool:
    return _DEVICE is not None


# ---------------------------------------------------------------------------
# Checked, counted, then staged: over the tensor-parallel group unless they say otherwise.

def _to_wire(op: str, tensor: torch.Tensor, ring_share, group, summed: bool = False,
             agree=None):
    """check -> count -> stage, the one order of every collective (a tensor refused is not
    counted); returns what the backend moves. `ring_share(p)`: the share of its bytes each of the
    group's p ranks sends in a ring (_count); `group`: the collective's; `summed`: the collective
    adds the ranks' tensors (so --tp_reduce_dtype float32 widens a bf16 one); `agree()`: what
    the ranks must agree on, checked in place of the same shape (an all-to-all's split sizes)."""
    _check(op, tensor, group, agree)
    p = dist.get_world_size(group)
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
    comm_tallies.clear()


def tally(name: str, n: int) -> None:
    """Count `n` under `name` beside the collectives (comm_tallies): what the communication
    table's formula reads that the bytes do not say (expert parallelism's routed rows)."""
    comm_tallies[name] += n


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


def _check(op: str, tensor: torch.Tensor, group, agree=None) -> None:
    """NCCL's rules, on every backend, so that a CPU run finds what a GPU run would refuse."""
    _check_rules(op, tensor)
    if group is None:  # torch would take the world: name the group, as Megatron's calls do
        raise CollectiveRuleError(f"{op}: no process group given")
    if CHECK_COLLECTIVES:
        agree() if agree is not None else _check_same_on_every_rank(op, tensor, group)


def check_splits(op, tensor, group, output_splits, input_splits):
    """An all-to-all with split sizes (expert parallelism's): this rank's rows are the ones it
    sends, and under TP_CHECK_COLLECTIVES every rank receives from rank j what rank j sends it.
    Split sizes the ranks disagree on hang NCCL (and gloo moves the wrong rows); here they fail."""
    if tensor.shape[0] != sum(input_splits):
        raise CollectiveRuleError(f"{op}: {tensor.shape[0]} rows to send, but the input split "
                                  f"sizes {list(input_splits)} add up to {sum(input_splits)}")
    if not CHECK_COLLECTIVES:
        return
    mine = _on_wire(torch.tensor([list(input_splits), list(output_splits)],
                                 dtype=torch.int64, device=get_device()))
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    for i, j in ((i, j) for i in range(len(everyone)) for j in range(len(everyone))):
        if everyone[i][0, j] != everyone[j][1, i]:  # every rank checks every pair: all raise
            raise CollectiveRuleError(
                f"{op}: split sizes the ranks disagree on (NCCL would hang): rank {i} of the "
                f"group sends rank {j} {int(everyone[i][0, j])} rows, which expects "
                f"{int(everyone[j][1, i])}")


def _check_rules(op: str, tensor: torch.Tensor) -> None:
    """The rules one rank can check alone: the run's device, contiguous, a dtype NCCL takes."""
    def broken(rule):
        return CollectiveRuleError(f"{op}: {rule}; got a {tensor.dtype} tensor of shape "
                                   f"{tuple(tensor.shape)}, strides {tensor.stride()}")
    if _DEVICE is not None and tensor.device != _DEVICE:
        raise DeviceMismatchError(f"{op} was given a tensor on {tensor.device}, but this run's "
                                  f"collectives use {_DEVICE}; move it with "
                                  ".to(wire.get_device())")
    if not tensor.is_contiguous():  # a stride check, no copy
        raise broken("NCCL needs a contiguous tensor (gloo would reduce its raw storage); make "
                     "it .contiguous() first")
    if tensor.dtype not in NCCL_DTYPES:
        raise broken(f"NCCL does not reduce {tensor.dtype}")


def _check_same_on_every_rank(op, tensor, group):
    """TP_CHECK_COLLECTIVES: every rank of the group hands `op` the same shape and dtype."""
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
    """check -> count -> stage for one send between pipeline stages (the pipeline's
    p2p_communication.py, which checks that sends and receives pair): its bytes counted once, a
    send being no ring."""
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


def _empty_on_wire(out: torch.Tensor, summed: bool) -> torch.Tensor:
    """An output buffer where the backend writes it: `out` itself, or an empty one in the wire
    dtype, on the host when gloo carries CUDA tensors (its contents are overwritten)."""
    dtype = _wire_dtype(out, summed)
    return out if dtype == out.dtype and not _STAGE_THROUGH_HOST else wire_buffer(out.shape, dtype)


def _on_wire(tensor: torch.Tensor, summed: bool = False) -> torch.Tensor:
    """The tensor the backend moves: in its wire dtype (_wire_dtype), and a host copy when gloo
    carries CUDA tensors (as gloo's own CUDA path does); else the tensor itself."""
    tensor = tensor.to(_wire_dtype(tensor, summed))
    return tensor.cpu() if _STAGE_THROUGH_HOST else tensor


COLLECTIVES = {}  # "module.function": every function marked @collective, for the tests


def collective(name: str, ring_share, summed: bool = False, agree=None):
    """Put the wire around `fn(tensor, group, ...)`, a function that makes one torch.distributed
    call on `tensor` over `group` and returns its result (or, called with async_op=True, the
    result and torch's work handle): checked, counted under `name`, staged (module docstring).

    A function that works in place returns the tensor it was given, itself (not a view): the wire
    then copies it back into the caller's where it staged a copy. `tensor` may be a list of
    tensors: `fn` then gets them laid end to end in one buffer, sums in place, and the result
    comes back into them. An output buffer given as `out=` is checked and overwritten (staged as
    an empty buffer where the backend moves it), and returned. With async_op=True the call
    returns at once a function that waits and returns the result (under TP_CHECK_COLLECTIVES one
    that runs it then: _deferred); `then(result)`, if given, runs as the result lands
    (_off_wire). `ring_share(p)`: the share of its bytes each of p ranks sends when the
    collective runs as a ring (_count); `summed`: the collective adds the ranks' tensors;
    `agree(name, tensor, group, *args)`: what the ranks must agree on, checked in place of the
    same shape (check_splits: an all-to-all's split sizes).
    """
    def wrap(fn):
        @functools.wraps(fn)
        def call(tensor, group, *args, async_op=False, out=None, then=None, **kwargs):
            given = tensor
            if isinstance(tensor, (list, tuple)):
                tensor = torch.cat([t.reshape(-1) for t in given])
            check = (lambda: agree(name, tensor, group, *args)) if agree else None
            staged = _to_wire(name, tensor, ring_share, group, summed, check)
            if out is not None:
                _check_rules(name, out)
                given, tensor, kwargs["out"] = out, out, _empty_on_wire(out, summed)

            def run(input_, async_op):
                if async_op:
                    output, work = fn(input_, group, *args, async_op=True, **kwargs)
                else:
                    output, work = fn(input_, group, *args, **kwargs), None
                result = input_ if out is None else kwargs["out"]
                _check_in_place(name, given, result, output)
                return _off_wire(given, tensor, result, output, work, async_op, then)
            if async_op and CHECK_COLLECTIVES:  # the strictest timing torch allows (_deferred)
                return _deferred(run, staged)
            return run(staged, async_op)
        COLLECTIVES[f"{fn.__module__}.{fn.__qualname__}"] = call
        return call
    return wrap


def _deferred(run, staged):
    """Under TP_CHECK_COLLECTIVES an asynchronous collective reads its input when it is launched
    and writes its result only when it is waited for, every time (a backend may do either at any
    moment between the two). Code that reads a result before its wait then reads the old values,
    and a gradient that lands after its bucket's launch is left out, on every run, not by the
    luck of the wire's timing (docs/overlap.md). The collective runs at the wait: every rank
    waits in the same order, so the ranks still issue their collectives alike."""
    snapshot = staged.clone()
    return lambda: run(snapshot, True)()  # (launched and waited for at once)


def _check_in_place(name, given, staged, output):
    """A function given a list must sum in place, and one that works in place must return its
    tensor itself: a view of it (or a new tensor for a list) would come back wrong, and only
    where the wire staged a copy (gloo carrying CUDA tensors), far from any CPU test."""
    if output is staged:
        return
    aliased = output.numel() and staged.numel() and \
        output.untyped_storage().data_ptr() == staged.untyped_storage().data_ptr()
    if isinstance(given, (list, tuple)) or aliased:
        raise CollectiveRuleError(f"{name}: a collective that works in place must return the "
                                  "tensor it was given, itself (wire.collective)")


def _off_wire(given, tensor, staged, output, work, async_op, then=None):
    """The result where the caller wants it (collective): into `tensor` when the function worked
    in place on `staged`, else in `tensor`'s device and dtype; into `given`, a list, from `tensor`
    its flat copy; then `then(result)`, if given (the caller's division of a sum). With async_op
    all of it runs on the backend's thread the moment the bytes arrive (the work's future's
    callback), not at the wait, which only waits: the copies and the division are hidden behind
    whatever the caller computes meanwhile, as the collective is."""
    def land(_arrived=None):
        if output is not staged:  # a new tensor: to the caller's device and dtype
            result = output.to(tensor.device, tensor.dtype)
        elif staged is not tensor:  # in place on the wire's copy: back into the caller's
            result = tensor.copy_(staged)
        else:  # in place on the caller's own tensor
            result = tensor
        if isinstance(given, (list, tuple)):
            offset = 0
            for t in given:
                t.copy_(result[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
            result = given
        if then is not None:
            then(result)
        return result
    if not async_op:
        return land()
    try:
        return work.get_future().then(land).wait
    except RuntimeError:  # gloo's reduce-scatter has no future ("not implemented": sequence
        def wait_and_land():  # parallelism's overlapped one): it lands at the wait
            work.wait()
            return land()
        return wait_and_land


# For training/ and benchmarks/ (the runs' own checks and measurements, off the reading path):
# a sum and a gather over any group. The paper's operations have theirs beside them.

@collective("all_reduce", ALL_REDUCE, summed=True)
def all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or `op`) `tensor` over `group`, in place."""
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


@collective("all_gather", ALL_GATHER)
def all_gather(tensor: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Every rank's `tensor` concatenated along `dim`, in rank order (one buffer, the first
    dimension, rearranged after)."""
    output = tensor.new_empty((group.size() * tensor.shape[0], *tensor.shape[1:]))
    dist_all_gather_func(output, tensor, group=group)
    return output if dim % tensor.dim() == 0 else torch.cat(output.chunk(group.size()), dim=dim)
