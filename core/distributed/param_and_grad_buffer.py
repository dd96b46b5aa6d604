"""The data-parallel gradient average, bucketed and launched during backward: Megatron's
--overlap-grad-reduce (megatron/core/distributed/distributed_data_parallel.py, its backward
post-hooks, and param_and_grad_buffer.py, its bucket groups' start_grad_sync and
finish_grad_sync; PyTorch's DDP does the same, Li et al. 2020, Sec. 3.2.3).

Without it the average waits for the whole backward (finalize_model_grads.py), and the step
waits for the average. With it the parameters are cut into buckets of about --ddp_bucket_size
elements, in the reverse order of the model's parameters (backward meets the last layers
first), and each bucket's all-reduce starts, asynchronously, the moment backward has finished
the last gradient in it; backward goes on computing the earlier layers while the bucket is on
the wire. finalize_model_grads waits for them all: what is still exposed is the last bucket's
reduction (nothing computes after it) and whatever did not fit under the compute.

    backward  | layer 3 | layer 2 | layer 1 | layer 0 |
    buckets              [ b0: 3 ]  [ b1: 2 ]  [ b2: 1, 0 ] -> exposed

A gradient is complete when its parameter has been accumulated once per micro-batch (the
accumulate-grad hook of each micro-batch's backward: Megatron launches on the last
micro-batch only, no_sync on the others; here the count says which one is the last). Each
bucket's sums are the non-overlapped ones, on fewer elements: the split weights' gradients
over the data- (and context-) parallel group, the replicated ones over the whole stage
(finalize_model_grads.average_replicated: one communicator, so tensor-parallel ranks get the
same bits), divided by the data-parallel size after the wait. An element sums the same
replicas' values, so with two replicas (a + b) the result is the same bits; with more, the
ring's order may differ by an ulp.

Not Megatron's: no contiguous gradient buffer (each bucket's gradients are laid end to end when
it launches, by the wire); the hooks on the parameters the optimizer sees the gradients of
(bf16: after mixed_precision.py's hook has moved the gradient to the fp32 main parameter);
gloo's background thread, not a CUDA stream, moves the bytes.
"""

from core import parallel_state as ps
from core.distributed.finalize_model_grads import (
    _average_over_data_parallel,
    _average_replicated,
    by_kind,
    from_tensor_rank_0,
)


class GradSyncError(RuntimeError):
    """A bucket launched twice, or never, in one step: a gradient the hooks did not see as the
    schedule ran it (a bug, not a user's mistake)."""


def buckets_of(params, bucket_size):
    """Lists of parameters, the last ones first, each closed once it holds `bucket_size` elements
    or more (Megatron's rule; its default, 40M elements, makes one bucket here). Parameters
    without gradients are left out, as Megatron's DDP leaves them."""
    buckets, current, size = [], [], 0
    for param in reversed([p for p in params if p.requires_grad]):
        current.append(param)
        size += param.numel()
        if size >= bucket_size:
            buckets.append(current)
            current, size = [], 0
    return buckets + ([current] if current else [])


class BucketGroup:
    """The buckets of one model's parameters, their hooks, and their launches (Megatron's
    _ParamAndGradBucketGroup: register_grad_ready, start_grad_sync, finish_grad_sync)."""

    def __init__(self, params, grads_of, bucket_size, num_microbatches):
        """`params`: the model's, in order; `grads_of(param)`: the tensor its gradient ends in
        (its .grad, or its fp32 main parameter's under bf16), read when the bucket launches."""
        self.grads_of, self.num_microbatches = grads_of, num_microbatches
        self.buckets = buckets_of(params, bucket_size)
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
            self.waits[i] = start_grad_sync([self.grads_of(p) for p in self.buckets[i]],
                                            self.buckets[i])

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


def start_grad_sync(grads, params):
    """Launch one bucket's averages (finalize_model_grads.average_over_data_parallel_replicas's
    two sums, asynchronously); returns the function that waits and divides."""
    kinds = by_kind(params, grads)
    split, rest = kinds["split"], from_tensor_rank_0(kinds["whole"]) + kinds["partial"]
    replicas = ps.get_data_parallel_group(with_context_parallel=True)
    d, waits = replicas.size(), []
    one = lambda tensors: tensors[0] if len(tensors) == 1 else tensors  # (one: no copy, in place)
    if split:
        waits.append(_average_over_data_parallel(one(split), replicas, async_op=True))
    if rest:
        waits.append(_average_replicated(one(rest), ps.get_tensor_and_data_parallel_group(), d,
                                         async_op=True))

    def finish():
        for wait in waits:
            wait()
        for g in split + rest:
            g.div_(d)
    return finish


def grads_of(optimizer):
    """param -> the tensor its gradient ends in for `optimizer`'s step: its own .grad, or under
    bf16 its fp32 main parameter's (mixed_precision.py), read at launch."""
    main = getattr(optimizer, "main", None)
    if main is None:
        return lambda p: p.grad
    mains = dict(zip(map(id, optimizer.model.parameters()), main.parameters()))
    return lambda p: mains[id(p)].grad
