"""The gradients' buckets and their collectives, launched during backward: Megatron's
--overlap-grad-reduce and --overlap-param-gather (megatron/core/distributed/
distributed_data_parallel.py, its backward post-hooks and forward pre-hooks, and
param_and_grad_buffer.py, its buffers and bucket groups; PyTorch's DDP does the same, Li et al.
2020, Sec. 3.2.3).

Without the overlap the data-parallel sum waits for the whole backward (finalize_model_grads.py),
and the step waits for the sum. With it the parameters are cut into buckets of about
--ddp_bucket_size elements, in the reverse order of the model's parameters (backward meets the
last layers first), and each bucket's collective starts, asynchronously, the moment backward has
finished the last gradient in it; backward goes on computing the earlier layers while the bucket
is on the wire. finalize_model_grads waits for them all: what is still exposed is the last
bucket's (nothing computes after it) and whatever did not fit under the compute.

    backward  | layer 3 | layer 2 | layer 1 | layer 0 |
    buckets              [ b0: 3 ]  [ b1: 2 ]  [ b2: 1, 0 ] -> exposed

The collective is the plain optimizer's all-reduce (finalize_model_grads.start_grad_sync) or,
under the distributed optimizer, the reduce-scatter of the bucket's part of the gradient buffer
(ParamAndGradBuffer below: each bucket padded to a multiple of d and cut in d shards of its own,
as Megatron's). The distributed optimizer's all-gather of the updated parameters, bucket by
bucket, is launched after the step and waited for by the forward pre-hook of the first module
that needs it (distrib_optimizer.py).

A gradient is complete when its parameter has been accumulated once per micro-batch (the
accumulate-grad hook of each micro-batch's backward: Megatron launches on the last micro-batch
only, no_sync on the others; here the count says which one is the last).

Not Megatron's: the plain optimizer's gradients are not views of one buffer (each bucket's are
laid end to end when it launches, by the wire); the hooks are on the parameters the optimizer
sees the gradients of (bf16: after mixed_precision.py's hook has moved the gradient to the fp32
main parameter); gloo's background thread, not a CUDA stream, moves the bytes.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist

from core import parallel_state as ps
from core import wire
from core.utils import dist_all_gather_func, dist_reduce_scatter_func


class GradSyncError(RuntimeError):
    """A bucket launched twice, or never, in one step: a gradient the hooks did not see as the
    schedule ran it (a bug, not a user's mistake)."""


def buckets_of(params, bucket_size):
    """Lists of parameters, the last ones first, each closed once it holds `bucket_size` elements
    or more (Megatron's rule; its default, 40M elements, makes one bucket here). Parameters
    without gradients are left out, as Megatron's DDP leaves them. A pipeline's tied word
    embeddings get a bucket of their own, as in Megatron: the same shards on the first stage and
    the last, so that their sum over the two may come after the reduce-scatter."""
    buckets, current, size = [], [], 0
    for param in reversed([p for p in params if p.requires_grad]):
        if getattr(param, "shared_embedding", False):
            buckets += [current] if current else []
            buckets.append([param])
            current, size = [], 0
            continue
        current.append(param)
        size += param.numel()
        if size >= bucket_size:
            buckets.append(current)
            current, size = [], 0
    return buckets + ([current] if current else [])


class BucketGroup:
    """The buckets of one model's parameters, their hooks, and their launches (Megatron's
    _ParamAndGradBucketGroup: register_grad_ready, start_grad_sync, finish_grad_sync).
    `launch(i)` starts bucket i's collective and returns the function that waits for it."""

    def __init__(self, buckets, launch, num_microbatches):
        self.buckets, self.launch, self.num_microbatches = buckets, launch, num_microbatches
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.seen = [0] * len(self.buckets)  # gradients accumulated this step, per bucket
        self.waits = [None] * len(self.buckets)
        self.hooks = [p.register_post_accumulate_grad_hook(self.register_grad_ready)
                      for bucket in self.buckets for p in bucket]

    def register_grad_ready(self, param):
        i = self.bucket_of[id(param)]
        self.seen[i] += 1
        full = len(self.buckets[i]) * self.num_microbatches
        if self.seen[i] > full:
            raise GradSyncError(f"bucket {i}: {self.seen[i]} gradients where {full} were "
                                "expected; launched twice")
        if self.seen[i] == full:  # its last gradient of the last micro-batch: on the wire
            self.waits[i] = self.launch(i)

    def finish_grad_sync(self):
        """Wait for every bucket (the average lands in the gradients); then the next step."""
        never = [i for i, wait in enumerate(self.waits) if wait is None]
        if never:
            raise GradSyncError(f"buckets {never} were never launched: "
                                f"{[self.seen[i] for i in never]} gradients seen of "
                                f"{[len(self.buckets[i]) * self.num_microbatches for i in never]}")
        for wait in self.waits:
            wait()
        self.seen, self.waits = [0] * len(self.buckets), [None] * len(self.buckets)

    def remove_hooks(self):
        for hook in self.hooks:
            hook.remove()


def grads_of(optimizer):
    """param -> the tensor its gradient ends in for `optimizer`'s step: its own .grad, or under
    bf16 its fp32 main parameter's (mixed_precision.py), read at launch."""
    main = getattr(optimizer, "main", None)
    if main is None:
        return lambda p: p.grad
    mains = dict(zip(map(id, optimizer.model.parameters()), main.parameters()))
    return lambda p: mains[id(p)].grad


class Bucket(NamedTuple):
    """A bucket of a ParamAndGradBuffer: its parameters, where it starts in the buffers, its
    elements, and the size of each rank's shard of it (its padded length / d)."""
    params: list
    start: int
    numel: int
    shard_size: int

    def shard(self, rank):
        """[first, last) of the buffers: `rank`'s shard of this bucket."""
        first = self.start + rank * self.shard_size
        return first, first + self.shard_size


class ParamAndGradBuffer:
    """One dtype's parameters of one model chunk, laid end to end in two flat buffers: the
    parameters' (the model's parameters become views of it, so the all-gather lands in the model)
    and their gradients' (param.main_grad are views of it), in buckets, each padded to a multiple
    of the data-parallel size d and cut in d shards (Megatron's _ParamAndGradBuffer).

    `bucket_size` None: one bucket, the parameters in the model's order (the distributed
    optimizer without the overlap); else buckets_of's, backward's order. Megatron always orders
    them as backward meets them, starts each parameter at a multiple of 64 elements and pads each
    bucket to a multiple of lcm(d, 128): its shards fall elsewhere, the numbers are the same
    (docs/distributed-optimizer.md).
    """

    def __init__(self, params, grad_dtype, bucket_size=None, expert=False):
        # The replicas and their context-parallel ranks (Megatron's with_context_parallel=True):
        # every rank of them reduces the same gradients. `expert`: a MoE layer's experts', summed
        # over the ranks that hold them (the expert-data-parallel group), divided by the same
        # number, the replicas' (finalize_model_grads.allreduce_expert_grads says why).
        self.group = ps.get_expert_data_parallel_group() if expert else \
            ps.get_data_parallel_group(with_context_parallel=True)
        self.divisor = ps.get_data_parallel_world_size(with_context_parallel=True)
        d, self.rank = self.group.size(), self.group.rank()
        groups = [list(params)] if bucket_size is None else buckets_of(params, bucket_size)
        self.buckets, start = [], 0
        for bucket in groups:
            numel = sum(p.numel() for p in bucket)
            self.buckets.append(Bucket(bucket, start, numel, -(-numel // d)))
            start += d * self.buckets[-1].shard_size
        self.numel = sum(bucket.numel for bucket in self.buckets)
        device = params[0].device
        self.param_data = torch.zeros(start, dtype=params[0].dtype, device=device)
        self.grad_data = torch.zeros(start, dtype=grad_dtype, device=device)
        self.ranges = []  # (param, where it starts in the buffer, its bucket)
        for bucket in self.buckets:
            at = bucket.start
            for param in bucket.params:
                view = lambda buffer: buffer[at:at + param.numel()].view_as(param)
                view(self.param_data).copy_(param.data)
                param.data = view(self.param_data)
                param.main_grad = view(self.grad_data)
                self.ranges.append((param, at, bucket))
                at += param.numel()

    def pieces(self):
        """(param, lo, hi, at): the elements [lo, hi) of each parameter (flattened) in this
        rank's shards, at [at, at + hi - lo) of the buffers; a parameter straddling two shards is
        a piece on each rank."""
        for param, start, bucket in self.ranges:
            first, last = bucket.shard(self.rank)
            at, end = max(first, start), min(last, start + param.numel())
            if at < end:
                yield param, at - start, end - start, at

    def shard_of(self, buffer, bucket):
        return buffer[slice(*bucket.shard(self.rank))]

    def bucket_data(self, buffer, bucket):
        """`bucket`'s elements of `buffer`, its padding included: what its collectives move."""
        return buffer[bucket.start:bucket.start + self.group.size() * bucket.shard_size]

    def start_grad_sync(self, i, async_op=True):
        """Launch bucket i's reduce-scatter; returns the function that waits for it, leaving
        this rank's shard of the bucket's gradients the average over the replicas (async_op
        False: done when it returns)."""
        bucket = self.buckets[i]
        shard = self.shard_of(self.grad_data, bucket)
        # The average, as the plain all-reduce takes it: the sum divided after (as it lands, on
        # the backend's thread: wire._off_wire), where Megatron scales before
        # (gradient_scaling_factor); the same as the plain optimizer, bit for bit (Megatron's
        # rounds each share first: the same bits when d is a power of two).
        return _reduce_scatter(self.bucket_data(self.grad_data, bucket), self.group,
                               async_op=async_op,
                               then=lambda _: shard.div_(self.divisor))

    def start_param_sync(self, i):
        """Launch bucket i's all-gather of every rank's updated shard of the parameters, into
        every rank's parameter buffer; returns the function that waits for it."""
        bucket = self.buckets[i]
        return _all_gather(self.shard_of(self.param_data, bucket), self.group,
                           out=self.bucket_data(self.param_data, bucket), async_op=True)

    def reduce_scatter_grads(self):
        """Each rank gets the average over the replicas of its shards of the gradients."""
        for i in range(len(self.buckets)):
            self.start_grad_sync(i, async_op=False)

    def all_gather_params(self):
        """Every rank's updated shards of the parameters, into every rank's parameter buffer."""
        for i in range(len(self.buckets)):
            self.start_param_sync(i)()


@wire.collective("dp_reduce_scatter", wire.REDUCE_SCATTER, summed=True)
def _reduce_scatter(buffer, group, async_op=False):
    """`buffer` summed over the data-parallel group, in place: this rank's shard of it (its
    r-th 1/d) holds the sum after, as Megatron reduces; the rest is left to the backend. With
    async_op torch's handle.

    NCCL reduce-scatters in place (the output its own part of the input). gloo has no
    reduce-scatter of its own: torch's copies the buffer, all-reduces the copy and gives the
    shard; synchronously that is what runs here, into a new shard (gloo does not promise an
    output aliasing its input), copied in. Overlapped it would copy on backward's thread at each
    launch and return a handle without a future (docs/overlap.md measures it), so there the
    buffer is all-reduced in place: the bytes gloo moves either way, landing by a future. The
    wire counts a ring reduce-scatter's bytes, what NCCL sends."""
    mine = buffer.chunk(group.size())[dist.get_rank(group)]
    if dist.get_backend(group) != "gloo":
        work = dist_reduce_scatter_func(mine, buffer, group=group, async_op=async_op)
    elif async_op:
        work = dist.all_reduce(buffer, group=group, async_op=True)
    else:
        shard = buffer.new_empty(mine.shape)
        dist_reduce_scatter_func(shard, buffer, group=group)
        mine.copy_(shard)
    return (buffer, work) if async_op else buffer


@wire.collective("dp_all_gather", wire.ALL_GATHER)
def _all_gather(shard, group, out, async_op=False):
    """Every rank's `shard` into `out`, in place: `shard` is this rank's part of `out` (NCCL
    gathers in place when the input is the output's own part); with async_op torch's handle."""
    work = dist_all_gather_func(out, shard, group=group, async_op=async_op)
    return (out, work) if async_op else out
