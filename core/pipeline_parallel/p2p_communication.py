"""Point to point between pipeline stages (Narayanan et al., 2021, Sec. 2.2 and 3.2), with the
function names of Megatron-core's pipeline_parallel/p2p_communication.py.

In forward, stage s sends its output activations to stage s + 1; in backward, stage s + 1 sends
the gradient of those activations back. The shape is agreed in advance (`tensor_shape`,
computed by parallel_train.py from the micro-batch size, as Megatron's schedules compute it from
seq_length, micro_batch_size and hidden_size), so a receive knows what to allocate.

Everything that happens at once goes as one `batch_isend_irecv`: a stage that sends an
activation forward while it waits for a gradient from the same neighbour must not block on
either first (two blocking calls in the wrong order deadlock on NCCL). Every tensor passes
core/wire.py's rules and counters (`pipeline_send`: its bytes, once).

Under TP_CHECK_COLLECTIVES=1 (the test suite) each tensor is announced before it is sent: a
header with its number in this direction, kind, dtype and shape travels first, and the receiver
checks it against what it expects. A send and a receive that do not pair in order, shape and
dtype fail in one line (PipelineP2PError), where NCCL would hang or read garbage; there every
rank also records its sends and receives in order in `p2p_log`.

At p = 2 the next and the previous stage are one rank: an exchange may then hold two sends to
it and two receives from it, and they pair because every exchange lists the activation before
the gradient, on both sides (_communicate).

With overlap_p2p_comm (the interleaved schedule's; Megatron's, on by default there) the
schedule keeps the Pending that _communicate returns under _posted() and calls its wait() where
it uses the tensor. Its exchanges then go one way each, in every step the forward's (an
activation on, one in) before the backward's (a gradient back, one in). At p = 2 they still
pair: a rank sends its neighbour the same tensors in the same order as without the option (in
a step the activation before the gradient, as _communicate lists them), the neighbour receives
them in that order, and as an exchange now sends a rank at most one tensor and receives at most
one from it, each header travels right before its own tensor on both sides (header, tensor,
header, tensor, where one joint exchange sent both headers first).
"""

from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist

from core import parallel_state as ps
from core import wire

# Under TP_CHECK_COLLECTIVES: ("send" | "recv", peer, "activation" | "gradient", shape, dtype).
p2p_log = []
_numbered = Counter()  # (send | recv, peer, kind): tensors so far, for the headers


class PipelineP2PError(wire.CollectiveRuleError):
    """A send and its receive do not pair (order, shape or dtype): a bug in a schedule."""


def _communicate(tensor_send_next, tensor_send_prev, recv_prev, recv_next, tensor_shape, dtype):
    """One exchange with the neighbour stages: send an activation to the next stage and/or a
    gradient to the previous one, receive an activation from the previous stage and/or a
    gradient from the next one, all in one batch. Returns (from prev, from next); under
    _posted() (overlap_p2p_comm) the batch is not waited for, and each is its Pending."""
    next_rank = ps.get_pipeline_model_parallel_next_rank()  # global ranks, in the pipeline group
    group = ps.get_pipeline_model_parallel_group()
    prev_rank = ps.get_pipeline_model_parallel_prev_rank()
    sends = [(t, peer, kind) for t, peer, kind in ((tensor_send_next, next_rank, "activation"),
                                                   (tensor_send_prev, prev_rank, "gradient"))
             if t is not None]
    recvs = [(peer, kind) for wanted, peer, kind in ((recv_prev, prev_rank, "activation"),
                                                     (recv_next, next_rank, "gradient"))
             if wanted]
    if wire.CHECK_COLLECTIVES and (sends or recvs):
        _announce(sends, recvs, tensor_shape, dtype)  # blocking: the check, before the tensors
    ops, received = [], {}
    for tensor, peer, kind in sends:
        if wire.CHECK_COLLECTIVES:
            p2p_log.append(("send", peer, kind, tuple(tensor.shape), tensor.dtype))
        ops.append(dist.P2POp(dist.isend, wire.point_to_point_wire("pipeline_send", tensor), peer,
                              group))
    for peer, kind in recvs:
        if wire.CHECK_COLLECTIVES:
            p2p_log.append(("recv", peer, kind, tuple(tensor_shape), dtype))
        received[kind] = wire.wire_buffer(tensor_shape, dtype)
        ops.append(dist.P2POp(dist.irecv, received[kind], peer, group))
    pending = Pending(dist.batch_isend_irecv(ops) if ops else [], len(sends), received)
    if not _wait_on_reqs:
        return pending, pending
    pending.wait_sent()
    return pending.wait()


_wait_on_reqs = True  # Megatron's _communicate(wait_on_reqs=...); False only inside _posted()


@contextmanager
def _posted(overlap_p2p_comm):
    """With overlap_p2p_comm, _communicate's batch posted and not waited for. (A setting, not a
    seventh parameter: scripts/print_schedule.py stands in for _communicate's six.)"""
    global _wait_on_reqs
    _wait_on_reqs = not overlap_p2p_comm
    try:
        yield
    finally:
        _wait_on_reqs = True


_in_flight = set()  # the Pendings not yet waited for (check_nothing_in_flight)


class Pending:
    """An exchange posted and not yet waited for: its batch's requests and the buffers it
    receives into. wait() waits for the receives, once, and returns (from prev, from next), as
    _communicate does; wait_sent() waits for the sends, after which their tensors may be freed.
    (Megatron's _communicate returns the tensors and the requests apart; here a received tensor
    cannot be had without its wait.)"""

    def __init__(self, requests, sends, received):
        # gloo gives a request per op, the sends first (as _communicate lists them); NCCL one
        # for the whole batch, which each of the two waits then waits for, sends and all.
        split = len(requests) == sends + len(received)
        self.sends, self.recvs = (requests[:sends], requests[sends:]) if split else (requests,) * 2
        self.received, self.arrived = received, None
        self.what = ", ".join([f"a receive ({kind})" for kind in received] or ["a send"])
        if requests:
            _in_flight.add(self)

    def wait(self):
        if self.arrived is None:
            for request in self.recvs:
                request.wait()
            arrived = {kind: t.to(wire.get_device()) for kind, t in self.received.items()}
            if "activation" in arrived:  # the input of this stage's forward: backward needs
                arrived["activation"].requires_grad_()  # its gradient
            self.arrived, self.recvs = (arrived.get("activation"), arrived.get("gradient")), []
            self._done_if_waited()
        return self.arrived

    def wait_sent(self):
        for request in self.sends:
            request.wait()
        self.sends = []
        self._done_if_waited()

    def _done_if_waited(self):
        if not self.sends and not self.recvs:
            _in_flight.discard(self)


def check_nothing_in_flight():
    """At the end of a schedule that did not wait at once (overlap_p2p_comm): every receive and
    every send was waited for. One that was not is a tensor nobody used, or a send whose tensor
    could be freed while it is read: a bug in the schedule."""
    if _in_flight:
        left = sorted(p.what for p in _in_flight)
        _in_flight.clear()
        raise PipelineP2PError(
            f"pipeline: rank {dist.get_rank()}: {len(left)} exchange(s) posted and never waited "
            f"for when the schedule ended ({'; '.join(left)}): with overlap_p2p_comm a receive "
            "is waited for where its tensor is used, a send before the next one the same way")


KINDS = ("activation", "gradient")


def _announce(sends, recvs, tensor_shape, dtype):
    """TP_CHECK_COLLECTIVES: a header per tensor, sent and checked before the tensors."""
    def header(n, kind, t_dtype, shape):  # uncounted: the check's, not the training's
        values = [n, KINDS.index(kind), wire.NCCL_DTYPES.index(t_dtype), len(shape), *shape]
        return wire.wire_buffer((12,), torch.int64).copy_(
            torch.tensor(values + [-1] * (12 - len(values))))
    ops, expected, headers = [], [], []
    group = ps.get_pipeline_model_parallel_group()
    for tensor, peer, kind in sends:
        _numbered["send", peer, kind] += 1
        h = header(_numbered["send", peer, kind], kind, tensor.dtype, tuple(tensor.shape))
        ops.append(dist.P2POp(dist.isend, h, peer, group))
    for peer, kind in recvs:
        _numbered["recv", peer, kind] += 1
        expected.append((peer, header(_numbered["recv", peer, kind], kind, dtype,
                                      tuple(tensor_shape)).cpu()))
        headers.append(wire.wire_buffer((12,), torch.int64))
        ops.append(dist.P2POp(dist.irecv, headers[-1], peer, group))
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    for (peer, mine), theirs in zip(expected, headers):
        if not torch.equal(theirs.cpu(), mine):
            raise PipelineP2PError(
                f"pipeline: rank {dist.get_rank()} expected from rank {peer} {_said(mine)}, but "
                f"rank {peer} sent {_said(theirs.cpu())}: the schedule's sends and receives do "
                "not pair (on NCCL this hangs)")


def _said(header):
    n, kind, dtype, ndim = header[:4].tolist()
    shape = tuple(header[4:4 + ndim].tolist())
    return f"{KINDS[kind]} #{n}, {wire.NCCL_DTYPES[dtype]} {shape}"


# Megatron's names. On the first stage nothing comes from before it, on the last nothing goes
# after it: those calls do nothing and return None.

def recv_forward(tensor_shape, dtype):
    if ps.is_pipeline_first_stage():
        return None
    return _communicate(None, None, True, False, tensor_shape, dtype)[0]


def recv_backward(tensor_shape, dtype):
    if ps.is_pipeline_last_stage():
        return None
    return _communicate(None, None, False, True, tensor_shape, dtype)[1]


def send_forward(output_tensor):
    if not ps.is_pipeline_last_stage():
        _communicate(output_tensor, None, False, False, None, None)


def send_backward(input_tensor_grad):
    if not ps.is_pipeline_first_stage():
        _communicate(None, input_tensor_grad, False, False, None, None)


def send_forward_recv_backward(output_tensor, tensor_shape, dtype):
    if ps.is_pipeline_last_stage():
        return None
    return _communicate(output_tensor, None, False, True, tensor_shape, dtype)[1]


def send_backward_recv_forward(input_tensor_grad, tensor_shape, dtype):
    if ps.is_pipeline_first_stage():
        return None
    return _communicate(None, input_tensor_grad, True, False, tensor_shape, dtype)[0]


def send_forward_recv_forward(output_tensor, recv_prev, tensor_shape, dtype,
                              overlap_p2p_comm=False):
    """Interleaved schedule: this chunk's output on, the next chunk's input in. With
    overlap_p2p_comm posted, not waited for: the Pending, whose wait()[0] is the input."""
    with _posted(overlap_p2p_comm):
        return _communicate(output_tensor, None, recv_prev, False, tensor_shape, dtype)[0]


def send_backward_recv_backward(input_tensor_grad, recv_next, tensor_shape, dtype,
                                overlap_p2p_comm=False):
    """This chunk's input gradient back, the next backward's output gradient in (with
    overlap_p2p_comm the Pending, whose wait()[1] it is)."""
    with _posted(overlap_p2p_comm):
        return _communicate(None, input_tensor_grad, False, recv_next, tensor_shape, dtype)[1]


def send_forward_backward_recv_forward_backward(output_tensor, input_tensor_grad, recv_prev,
                                                recv_next, tensor_shape, dtype):
    return _communicate(output_tensor, input_tensor_grad, recv_prev, recv_next, tensor_shape,
                        dtype)
