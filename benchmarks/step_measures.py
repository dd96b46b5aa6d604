"""What one training step costs and holds, measured inside a worker: its time, its memory, its
collectives, and the activations it saves for backward (bench_step.py, bench_recompute.py).

Timing is by hand, step after step, rather than through torch.utils.benchmark's Timer: a step
changes the model it runs on (the optimizer steps), the ranks of a parallel step must start it
together (a barrier, untimed, before each), and the report wants every step's time for its
p10-p90 and the forward's alone, where blocked_autorange would average blocks of steps.
"""

import resource
import time

import torch
import torch.nn as nn

from core import wire
from core.distributed.finalize_model_grads import allreduce_sequence_parallel_grads


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


class Step:
    """Loss and after-backward work of one variant: plain MSE, or sequence parallelism's
    per-rank share of it with the partial sums (fc's gradient, the loss) added after backward."""

    def __init__(self, model, batch_size=None):
        # batch_size: the rows of all TP ranks, under SP
        self.model, self.batch_size = model, batch_size

    def loss(self, x, y):
        if self.batch_size is None:
            return nn.functional.mse_loss(self.model(x)[:, 0], y)
        return nn.functional.mse_loss(self.model(x)[:, 0], y, reduction="sum") / self.batch_size

    def backward(self, loss):
        loss.backward()
        if self.batch_size is not None:
            allreduce_sequence_parallel_grads(self.model.parameters(), loss)


def time_steps(step, batches, lr, steps, warmup, device, barrier=lambda: None, fused=False):
    """Seconds of each of `steps` training steps after `warmup` untimed ones."""
    optimizer = torch.optim.SGD(step.model.parameters(), lr=lr, momentum=0.9, fused=fused)
    times = []
    for i in range(warmup + steps):
        barrier()  # ranks start each step together; not timed
        seconds, _, loss = timed_step(step, optimizer, batches[i % len(batches)], device)
        if i >= warmup:
            times.append(seconds)
    if not torch.isfinite(local(loss)):
        raise RuntimeError(f"the loss is {local(loss).item()} after the timed steps: lower the "
                           "config's lr")
    return times, optimizer


def timed_step(step, optimizer, batch, device, split_forward=False):
    """(seconds of one training step, of its forward and loss alone or None, the loss). On a GPU,
    split_forward synchronizes after the loss: it costs the overlap of backward's launches."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = step.loss(*batch)
    if split_forward:
        sync()
        forward = time.perf_counter() - start
    step.backward(loss)
    optimizer.step()
    sync()
    return time.perf_counter() - start, forward if split_forward else None, loss


def memory(model, optimizer, device):
    """Bytes this rank holds in parameters, gradients and optimizer state, and its peak memory:
    resident set size on a CPU, allocated GPU memory on a GPU."""
    params = [local(p) for p in model.parameters()]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    state = [local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    on_gpu = device.type == "cuda"
    if on_gpu:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(params=nbytes(params), grads=nbytes([local(p.grad) for p in model.parameters()]),
                optimizer=nbytes(state), peak=peak, peak_kind="GPU allocated" if on_gpu else "RSS")


def count_ours(step, batch):
    """Collectives of one step, counted by parallel_state: data without and with a gradient (the
    transformer's input, tokens, has none)."""
    counts = {}
    for input_grad in (False, True) if batch[0].is_floating_point() else (False,):
        x = batch[0].clone().requires_grad_(input_grad)
        wire.reset_comm_stats()
        step.backward(step.loss(x, batch[1]))
        counts["input_grad" if input_grad else "no_input_grad"] = dict(
            calls=dict(wire.comm_calls), bytes=dict(wire.comm_bytes),
            ring_bytes=dict(wire.comm_ring_bytes))
    step.model.zero_grad(set_to_none=True)
    return counts


def count_dtensor(step, batch):
    try:
        from torch.distributed.tensor.debug import CommDebugMode
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor.debug import CommDebugMode
    with CommDebugMode() as mode:
        step.backward(step.loss(*batch))
    step.model.zero_grad(set_to_none=True)
    return {"no_input_grad": dict(calls={str(op): n for op, n in mode.get_comm_counts().items()})}


# A column-parallel layer opens a split region (its output is this rank's columns), the
# row-parallel layer after it closes it (its output is whole again, after g).
OPENS_SPLIT, CLOSES_SPLIT = ("fc1", "query_key_value"), ("fc2", "dense")



def saved_activations(step, batch):
    """Bytes of the activations one forward and loss save for backward on this rank, inside the
    split regions and outside them; parameters and repeats of one tensor not counted.

    Inside: what is saved between the output of fc1 (QKV) and the end of fc2 (dense), their
    own input included, and the loss's tensors as wide as this rank's slice of the
    vocabulary (the transformer's logits). Outside: the rest (the layers' inputs, the
    residual stream, LayerNorms, the embeddings' indices). The transformer's also per_layer:
    what its blocks save (from the first block's input to the final LayerNorm's), per block,
    recomputation's checkpoints included (Korthikanti et al., Table 2: bench_recompute.py).
    """
    model = step.model
    params = {local(p).data_ptr() for p in model.parameters()}
    embedding = getattr(model, "word_embeddings", None)
    vocab_per_rank = local(embedding.weight).shape[0] if embedding is not None else None
    seen, saved, region = set(), dict(inside=0, outside=0), ["outside"]
    hooks = [module.register_forward_hook(lambda *_, where=where: region.__setitem__(0, where))
             for name, module in model.named_modules()
             for names, where in ((OPENS_SPLIT, "inside"), (CLOSES_SPLIT, "outside"))
             if name.rsplit(".", 1)[-1] in names]
    blocks, in_blocks = getattr(model, "blocks", None), [False]
    if blocks:
        saved["per_layer"] = 0
        hooks += [module.register_forward_pre_hook(
            lambda *_, now=now: in_blocks.__setitem__(0, now))
            for module, now in ((next(iter(blocks.values())), True), (model.ln_f, False))]

    def pack(t):
        t = local(t)
        if t.data_ptr() not in params and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            logits = t.dim() > 0 and t.shape[-1] == vocab_per_rank
            where = "inside" if logits else region[0]
            saved[where] += t.numel() * t.element_size()
            if in_blocks[0]:
                saved["per_layer"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step.loss(*batch)
    for hook in hooks:
        hook.remove()
    if blocks:
        saved["per_layer"] //= len(blocks)  # the blocks are alike
    return saved
