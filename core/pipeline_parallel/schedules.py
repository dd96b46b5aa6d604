"""The order in which a step's micro-batches go through the pipeline's stages (Narayanan et al.,
2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", Sec.
2.2), with the function names of Megatron-core's pipeline_parallel/schedules.py.

A batch is cut into m micro-batches; stage s runs the forward of a micro-batch when stage s - 1
has sent it the activation, and its backward when stage s + 1 has sent back that activation's
gradient (p2p_communication.py). The weights' gradients add up over the micro-batches, and the
optimizer steps once, after the last backward: the same update as without a pipeline.

  GPipe (Fig. 3): every forward, then every backward. The bubble, the time a stage waits
      at the start and the end of a step, is (p - 1) / m of the ideal time; each stage keeps the
      activations of all m micro-batches until their backward.
  1F1B, PipeDream-Flush (Fig. 4, top): after a warm-up of p - s - 1 forwards, stage s
      alternates one forward and one backward. The same bubble, but at most p micro-batches'
      activations are kept, not m.
  Interleaved 1F1B (Fig. 4, bottom): each rank holds v chunks of layers (rank r: chunks r,
      r + p, ...); a micro-batch goes round the ranks v times. The bubble is (p - 1) / (v m),
      for v times the point-to-point traffic.

Every schedule takes `forward_step_func(model_chunk, microbatch, input_tensor)`: the chunk's
forward on `input_tensor` (None on the first stage, which reads the micro-batch's data), and on
the last stage the micro-batch's loss. The losses are divided by m (the batch's mean); the last
stage returns them, the other stages an empty list. Backward runs the micro-batches in order
0, 1, ..., m - 1 on every stage, so each weight's gradient is summed in the order a serial run
that accumulates the same micro-batches sums it.
"""

import functools
import time

import torch
from torch.autograd import Variable

from core import parallel_state as ps
from core.pipeline_parallel import p2p_communication as p2p
from core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

# benchmarks/bench_pipeline.py's timeline: a list to which every forward and backward appends
# ("F" or "B", its chunk, start, end) in perf_counter seconds; None (no clock read) otherwise.
TIMELINE = None


class _Kept:
    """How many micro-batches (per chunk, under interleaving) this rank holds activations of for
    their backward: `now`, and `peak` since the last reset. A forward adds one, its backward
    frees it: the schedules' memory, in micro-batches (GPipe m, 1F1B p - s: Sec. 2.2)."""

    def __init__(self):
        self.now = self.peak = 0

    def add(self, n):
        self.now += n
        self.peak = max(self.peak, self.now)


KEPT = _Kept()


def _recorded(kind, run):
    if TIMELINE is None:
        return run()
    start = time.perf_counter()
    result = run()
    chunk = ps.get_virtual_pipeline_model_parallel_rank() or 0
    TIMELINE.append((kind, chunk, start, time.perf_counter()))
    return result


def chunk_layers(num_layers, pipeline_size, stage, virtual_size, chunk):
    """The layers chunk `chunk` of stage `stage` holds, Megatron's layout: with L = layers /
    (P V) per chunk, layers (chunk P + stage) L ... (chunk P + stage + 1) L - 1, so that a
    micro-batch goes round the stages once per chunk."""
    per_chunk = num_layers // (pipeline_size * virtual_size)
    first = (chunk * pipeline_size + stage) * per_chunk
    return range(first, first + per_chunk)


def get_forward_backward_func(pipeline_schedule="1f1b", overlap_p2p_comm=False):
    """The schedule for this job: no pipeline, GPipe, 1F1B or (with virtual stages) interleaved;
    overlap_p2p_comm posts the interleaved schedule's exchanges, waited for where used (the
    others ignore it, as Megatron's do)."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return forward_backward_no_pipelining
    if ps.get_virtual_pipeline_model_parallel_world_size():
        return functools.partial(forward_backward_pipelining_with_interleaving,
                                 overlap_p2p_comm=True) if overlap_p2p_comm \
            else forward_backward_pipelining_with_interleaving
    return {"1f1b": forward_backward_pipelining_without_interleaving,
            "gpipe": forward_backward_gpipe}[pipeline_schedule]


def forward_step(forward_step_func, model_chunk, microbatch, input_tensor, num_microbatches,
                 losses):
    """One micro-batch's forward through one chunk; on the last stage its loss / m (and the MoE
    layers' auxiliary losses' gradient scaled alike: moe_utils.MoEAuxLossAutoScaler)."""
    MoEAuxLossAutoScaler.set_loss_scale(1 / num_microbatches)
    output_tensor = _recorded("F", lambda: forward_step_func(model_chunk, microbatch, input_tensor))
    KEPT.add(1)
    if ps.is_pipeline_last_stage():
        output_tensor = output_tensor / num_microbatches
        losses.append(output_tensor.detach())
    return output_tensor


def backward_step(input_tensor, output_tensor, output_tensor_grad):
    """Backward from this chunk's output (the loss on the last stage, where output_tensor_grad is
    None) to its input; returns the input's gradient, for the previous stage."""
    _recorded("B", lambda: custom_backward(output_tensor, output_tensor_grad))
    KEPT.add(-1)
    return None if input_tensor is None else input_tensor.grad


def deallocate_output_tensor(output_tensor):
    """Megatron's: once sent, a stage's output is needed only as the root of its backward, not
    for its values (the next stage holds them, and no operation saved its own output for
    backward): its memory is freed, its graph kept. One micro-batch's activation less per
    micro-batch in flight. (The loss, a 0-dim tensor the last stage keeps, is left alone.)"""
    if output_tensor is None or output_tensor.dim() == 0:
        return
    assert output_tensor._base is None, "a view's memory is its base's: it cannot be freed"
    output_tensor.data = torch.empty((1,), device=output_tensor.device, dtype=output_tensor.dtype)


def custom_backward(output, grad_output):
    """torch.autograd.backward without its check that the gradient has the output's shape (a
    freed output has one element left): autograd's engine called directly, as Megatron does."""
    if grad_output is None:  # the loss
        return torch.autograd.backward(output)
    Variable._execution_engine.run_backward(
        tensors=(output,), grad_tensors=(grad_output,), keep_graph=False, create_graph=False,
        inputs=(), allow_unreachable=True, accumulate_grad=True)


def forward_backward_no_pipelining(forward_step_func, microbatches, model, tensor_shape, dtype):
    """One stage: each micro-batch's forward and backward, gradients accumulated."""
    losses = []
    for microbatch in microbatches:
        loss = forward_step(forward_step_func, model[0], microbatch, None, len(microbatches),
                            losses)
        backward_step(None, loss, None)
    return losses


def forward_only(forward_step_func, microbatches, model, tensor_shapes, dtype):
    """Forward only (validation): every micro-batch through every chunk, in order; the last
    stage returns the outputs (forward_step_func's, no loss taken), the others []. The
    micro-batches may differ in size: `tensor_shapes`, one each."""
    outputs = []
    for microbatch, shape in zip(microbatches, tensor_shapes):
        for chunk in range(len(model)):
            if len(model) > 1:
                ps.set_virtual_pipeline_model_parallel_rank(chunk)
            output = forward_step_func(model[chunk], microbatch, p2p.recv_forward(shape, dtype))
            if ps.is_pipeline_last_stage():
                outputs.append(output)
            else:
                p2p.send_forward(output)
    if len(model) > 1:
        ps.set_virtual_pipeline_model_parallel_rank(0)
    return outputs


def forward_backward_gpipe(forward_step_func, microbatches, model, tensor_shape, dtype):
    """GPipe: all m forwards, then all m backwards (in the same order)."""
    losses, inputs, outputs = [], [], []
    for microbatch in microbatches:
        input_tensor = p2p.recv_forward(tensor_shape, dtype)
        output_tensor = forward_step(forward_step_func, model[0], microbatch, input_tensor,
                                     len(microbatches), losses)
        p2p.send_forward(output_tensor)
        deallocate_output_tensor(output_tensor)  # not the last stage's: a 0-dim loss
        inputs.append(input_tensor)
        outputs.append(output_tensor)
    for input_tensor, output_tensor in zip(inputs, outputs):
        output_tensor_grad = p2p.recv_backward(tensor_shape, dtype)
        p2p.send_backward(backward_step(input_tensor, output_tensor, output_tensor_grad))
    return losses


def forward_backward_pipelining_without_interleaving(forward_step_func, microbatches, model,
                                                     tensor_shape, dtype):
    """1F1B (PipeDream-Flush): warm-up forwards, then one forward and one backward at a time, then
    the remaining backwards. Stage s keeps at most p - s micro-batches' activations."""
    m, losses = len(microbatches), []
    warmup = min(ps.get_pipeline_model_parallel_world_size()
                 - ps.get_pipeline_model_parallel_rank() - 1, m)
    inputs, outputs = [], []
    step = lambda i, input_tensor: forward_step(forward_step_func, model[0], microbatches[i],
                                                input_tensor, m, losses)
    for i in range(warmup):
        input_tensor = p2p.recv_forward(tensor_shape, dtype)
        output_tensor = step(i, input_tensor)
        p2p.send_forward(output_tensor)
        deallocate_output_tensor(output_tensor)  # not the last stage's: a 0-dim loss
        inputs.append(input_tensor)
        outputs.append(output_tensor)
    input_tensor = p2p.recv_forward(tensor_shape, dtype) if warmup < m else None
    for i in range(warmup, m):  # steady state: 1F1B
        output_tensor = step(i, input_tensor)
        output_tensor_grad = p2p.send_forward_recv_backward(output_tensor, tensor_shape, dtype)
        deallocate_output_tensor(output_tensor)  # not the last stage's: a 0-dim loss
        inputs.append(input_tensor)
        outputs.append(output_tensor)
        input_tensor_grad = backward_step(inputs.pop(0), outputs.pop(0), output_tensor_grad)
        if i == m - 1:
            input_tensor = None
            p2p.send_backward(input_tensor_grad)
        else:
            input_tensor = p2p.send_backward_recv_forward(input_tensor_grad, tensor_shape, dtype)
    for _ in range(warmup):  # cool-down: the warm-up's backwards
        output_tensor_grad = p2p.recv_backward(tensor_shape, dtype)
        p2p.send_backward(backward_step(inputs.pop(0), outputs.pop(0), output_tensor_grad))
    return losses


def forward_backward_pipelining_with_interleaving(forward_step_func, microbatches, model,
                                                  tensor_shape, dtype, overlap_p2p_comm=False):
    """Interleaved 1F1B: rank r holds chunks r, r + p, ..., and runs p micro-batches through one
    chunk, then through the next (Megatron's order: _Interleaved.chunk_id below, Megatron's
    get_model_chunk_id). overlap_p2p_comm: the same, its exchanges overlapped with compute."""
    schedule = _InterleavedOverlapped if overlap_p2p_comm else _Interleaved
    return schedule(forward_step_func, microbatches, model, tensor_shape, dtype).run()


class _Interleaved:
    """The interleaved schedule's state: per chunk, the inputs and outputs kept for backward and
    the output gradients received; the k-th forward (backward) of this rank is chunk
    chunk_id(k) running its next micro-batch."""

    def __init__(self, forward_step_func, microbatches, model, tensor_shape, dtype):
        assert len(microbatches) % ps.get_pipeline_model_parallel_world_size() == 0, \
            "the interleaved schedule runs micro-batches in groups of p (training/arguments.py)"
        self.step_func, self.microbatches, self.model = forward_step_func, microbatches, model
        self.shape, self.dtype = tensor_shape, dtype
        self.p, self.v, self.m = ps.get_pipeline_model_parallel_world_size(), len(model), \
            len(microbatches)
        self.inputs, self.outputs, self.output_grads = ([[] for _ in model] for _ in range(3))
        self.forwards_done, self.losses = [0] * len(model), []

    def chunk_id(self, k, forward):
        chunk = (k % (self.p * self.v)) // self.p
        return chunk if forward else self.v - chunk - 1

    def forward(self, k):
        chunk = self.chunk_id(k, forward=True)
        ps.set_virtual_pipeline_model_parallel_rank(chunk)
        if ps.is_pipeline_first_stage() and len(self.inputs[chunk]) == len(self.outputs[chunk]):
            self.inputs[chunk].append(None)  # the first chunk reads the data
        microbatch = self.microbatches[self.forwards_done[chunk]]
        self.forwards_done[chunk] += 1
        output = forward_step(self.step_func, self.model[chunk], microbatch,
                              self.inputs[chunk][-1], self.m, self.losses)
        self.outputs[chunk].append(output)
        return None if ps.is_pipeline_last_stage() else output  # the loss goes nowhere

    def backward(self, k):
        chunk = self.chunk_id(k, forward=False)
        ps.set_virtual_pipeline_model_parallel_rank(chunk)
        if ps.is_pipeline_last_stage() and not self.output_grads[chunk]:
            self.output_grads[chunk].append(None)  # the loss's own backward
        grad = backward_step(self.inputs[chunk].pop(0), self.outputs[chunk].pop(0),
                             self.output_grads[chunk].pop(0))
        return None if ps.is_pipeline_first_stage() else grad

    def run(self):
        total = self.m * self.v
        all_warmup = self.m == self.p  # Megatron's special case: no steady state
        warmup = total if all_warmup else min(
            (self.p - ps.get_pipeline_model_parallel_rank() - 1) * 2 + (self.v - 1) * self.p,
            total)
        ps.set_virtual_pipeline_model_parallel_rank(0)
        self.inputs[0].append(p2p.recv_forward(self.shape, self.dtype))
        self.warm_up(warmup, total, all_warmup)
        self.steady(warmup, total)
        self.cool_down(warmup, total, all_warmup)
        ps.set_virtual_pipeline_model_parallel_rank(0)
        return self.losses

    def recv_prev_after(self, k, total):
        """Whether the forward after the k-th takes an activation from the previous rank: every
        one does but the first rank's through chunk 0 (it reads the data) and none after the
        last (Megatron's recv_prev)."""
        next_chunk = self.chunk_id(k + 1, forward=True)
        first_rank = ps.is_pipeline_first_stage(ignore_virtual=True)
        return not (first_rank and next_chunk == 0) and k != total - 1

    def recv_next_after(self, k, total):
        """Whether the backward after the k-th takes a gradient from the next rank: every one
        does but the last rank's through chunk v - 1 (it starts from the loss) and none after
        the last (Megatron's recv_next)."""
        next_chunk = self.chunk_id(k + 1, forward=False)
        last_rank = ps.is_pipeline_last_stage(ignore_virtual=True)
        return not (last_rank and next_chunk == self.v - 1) and k != total - 1

    def warm_up(self, warmup, total, all_warmup):
        for k in range(warmup):
            output = self.forward(k)
            recv_prev = self.recv_prev_after(k, total)
            if k == warmup - 1 and not all_warmup:  # the first backward's gradient comes too
                recv_next = not ps.is_pipeline_last_stage(ignore_virtual=True)
                input_tensor, output_grad = p2p.send_forward_backward_recv_forward_backward(
                    output, None, recv_prev, recv_next, self.shape, self.dtype)
                if recv_next:
                    self.output_grads[self.v - 1].append(output_grad)
            else:
                input_tensor = p2p.send_forward_recv_forward(output, recv_prev, self.shape,
                                                             self.dtype)
            deallocate_output_tensor(output)  # None on the last stage's last chunk
            if recv_prev:
                self.inputs[self.chunk_id(k + 1, forward=True)].append(input_tensor)

    def steady(self, warmup, total):
        """One forward and one backward a step, then one exchange: it sends their output on
        and their input gradient back, and receives the input of this rank's next forward and
        the output gradient of its next backward, where a neighbour makes them
        (recv_prev_after, recv_next_after). Megatron finds the first rank's chunk from the last
        rank's side ("first stage is ahead of last stage by p - 1"): what arrives is the output
        of the last rank's forward forward_k - (p - 1), chunk get_model_chunk_id(forward_k -
        (p - 1)); it feeds the same micro-batch through the next chunk, p forwards later:
        forward forward_k + 1. The last rank's gradients, mirrored. docs/pipeline.md works it
        through for p = 2, v = 2, m = 4."""
        for k in range(total - warmup):
            forward_k, backward_k = k + warmup, k
            output = self.forward(forward_k)
            input_grad = self.backward(backward_k)
            recv_prev = self.recv_prev_after(forward_k, total)
            recv_next = self.recv_next_after(backward_k, total)
            input_tensor, output_grad = p2p.send_forward_backward_recv_forward_backward(
                output, input_grad, recv_prev, recv_next, self.shape, self.dtype)
            deallocate_output_tensor(output)
            if recv_prev:
                self.inputs[self.chunk_id(forward_k + 1, forward=True)].append(input_tensor)
            if recv_next:
                self.output_grads[self.chunk_id(backward_k + 1, forward=False)].append(output_grad)

    def cool_down(self, warmup, total, all_warmup):
        if all_warmup:  # the last chunk's first gradient, asked for as the last chunk
            ps.set_virtual_pipeline_model_parallel_rank(self.v - 1)
            self.output_grads[self.v - 1].append(p2p.recv_backward(self.shape, self.dtype))
        for k in range(total - warmup, total):
            input_grad = self.backward(k)
            recv_next = self.recv_next_after(k, total)
            output_grad = p2p.send_backward_recv_backward(input_grad, recv_next, self.shape,
                                                          self.dtype)
            if recv_next:
                self.output_grads[self.chunk_id(k + 1, forward=False)].append(output_grad)


class _InterleavedOverlapped(_Interleaved):
    """--overlap_p2p_comm (Megatron's overlap_p2p_comm): the same forwards and backwards in the
    same order; each step's exchange is split in two and posted, not waited for:
      after a forward, its output on and the next forward's input in: it travels during the
          backward;
      after a backward, its input gradient back and the next backward's output gradient in: it
          travels during the next forward.
    What an exchange receives is kept as a p2p.Pending in inputs / output_grads and waited for
    by the forward (backward) that takes it, the next one the same way. Its send is waited for
    when the next exchange the same way is posted (as Megatron waits for send_next_wait_handle
    and send_prev_wait_handle), and only then is the sent output freed: the send reads it until
    it ends. Nothing moves between operations: every number is the blocking schedule's."""

    def __init__(self, *args):
        super().__init__(*args)
        self.posted = {}  # "F" / "B": (the last exchange posted that way, the output it sends)

    def forward(self, k):
        inputs = self.inputs[self.chunk_id(k, forward=True)]
        if inputs and isinstance(inputs[-1], p2p.Pending):
            inputs[-1] = inputs[-1].wait()[0]  # this forward's input, from prev
        return super().forward(k)

    def backward(self, k):
        output_grads = self.output_grads[self.chunk_id(k, forward=False)]
        if output_grads and isinstance(output_grads[0], p2p.Pending):
            output_grads[0] = output_grads[0].wait()[1]  # its output's, from next
        return super().backward(k)

    def settle(self, way):
        """The last exchange posted this way: its send waited for, the output it sent freed."""
        pending, output = self.posted.pop(way, (None, None))
        if pending is not None:
            pending.wait_sent()
            deallocate_output_tensor(output)  # None for a gradient, or the last stage's

    def post_forward(self, output, k, total):
        """Forward k's exchange: its output on, forward k + 1's input in (recv_prev_after)."""
        self.settle("F")
        recv_prev = self.recv_prev_after(k, total)
        pending = p2p.send_forward_recv_forward(output, recv_prev, self.shape, self.dtype,
                                                overlap_p2p_comm=True)
        self.posted["F"] = pending, output
        if recv_prev:
            self.inputs[self.chunk_id(k + 1, forward=True)].append(pending)

    def post_backward(self, input_grad, k, total):
        """Backward k's exchange: its input gradient back, backward k + 1's output gradient in."""
        self.settle("B")
        recv_next = self.recv_next_after(k, total)
        pending = p2p.send_backward_recv_backward(input_grad, recv_next, self.shape, self.dtype,
                                                  overlap_p2p_comm=True)
        self.posted["B"] = pending, None
        if recv_next:
            self.output_grads[self.chunk_id(k + 1, forward=False)].append(pending)

    def warm_up(self, warmup, total, all_warmup):
        for k in range(warmup):
            self.post_forward(self.forward(k), k, total)
        # The first backward's gradient, asked for as "the exchange of backward -1" (nothing to
        # send): at the end of the warm-up as _Interleaved asks for it, and for m = p too, where
        # it asks in cool_down with nothing posted between (the same order on the wire).
        self.post_backward(None, -1, total)

    def steady(self, warmup, total):
        for k in range(total - warmup):
            self.post_forward(self.forward(k + warmup), k + warmup, total)
            self.post_backward(self.backward(k), k, total)

    def cool_down(self, warmup, total, all_warmup):
        for k in range(total - warmup, total):
            self.post_backward(self.backward(k), k, total)

    def run(self):
        losses = super().run()
        self.settle("F")
        self.settle("B")
        p2p.check_nothing_in_flight()
        return losses
