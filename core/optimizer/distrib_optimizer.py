"""The distributed optimizer: the optimizer's memory split over the data-parallel replicas.

Megatron-LM's --use-distributed-optimizer (megatron/core/optimizer/distrib_optimizer.py, with
the DDP's buffers of megatron/core/distributed/param_and_grad_buffer.py): ZeRO stage 1
(Rajbhandari et al., 2020, Sec. 5.1, "P_os"). Without it every replica holds the whole
optimizer: under bf16 the fp32 main parameters and the optimizer's state beside the bf16 model,
14 bytes a parameter with SGD and momentum, 18 with Adam, where forward and backward need 6 (the
bf16 weight, its fp32 gradient). With it each of the d replicas keeps 1/d of the rest:

    bytes per parameter    plain        distributed          (Megatron's table, Adam)
    bf16 param, fp32 grad  2 + 4        2 + 4
    fp32 main param        4            4 / d
    Adam's two moments     8            8 / d      ->  18 against 6 + 12/d

One gradient buffer per dtype, the model's gradients laid end to end in it and padded to a
multiple of d, then cut in d equal shards that ignore where a parameter ends (one may straddle
two ranks, and is two pieces on two ranks):

    grad buffer   | w1 ............ | b1 | w2 ............... | b2 | pad |
    shards        | rank 0               | rank 1                       |
                                    piece ^ ^ piece: w2 straddles

and one step is:

  1. backward adds each gradient into the buffer (param.main_grad, a view of it);
  2. finish_grad_sync: a reduce-scatter over the data-parallel group, each rank keeping the sum
     of its shard only, divided by d (the first half of the all-reduce it replaces);
  3. step: the optimizer (SGD, Adam: element-wise) updates this rank's pieces of the main
     parameters with the pieces of the gradient;
  4. an all-gather over the data-parallel group of the updated parameters, into the parameter
     buffer the model's parameters are views of (the all-reduce's second half).

A reduce-scatter and an all-gather are the two halves of a ring all-reduce, (d-1)/d N bytes
each (core/wire.py's _count): the wire carries what the plain optimizer's all-reduce did (under
bf16 3/4 of it: the all-gather moves bf16 parameters, the reduce-scatter fp32 gradients).
What differs from Megatron is said where it is: the buffer's order, no buckets, the sums before
the reduce-scatter (finalize_model_grads.py), one file per replica in a checkpoint.
"""

import copy

import torch
import torch.nn as nn

from core import parallel_state as ps
from core import wire
from core.optimizer import in_group, no_weight_decay, regrouped
from core.utils import dist_all_gather_func, dist_reduce_scatter_func

# What a piece of a main parameter inherits from its model parameter: what the gradient's sums
# (finalize_model_grads.py) and the clipping norm (training/clip_grads.py) ask of a parameter.
INHERITED = ("tensor_model_parallel", "partition_dim", "grad_is_partial", "shared_embedding")


class DistributedOptimizerError(ps.UserError, ValueError):
    """A model too small to give every data-parallel rank a shard."""


class ParamAndGradBuffer:
    """One dtype's parameters of one model chunk, laid end to end in two flat buffers: the
    parameters' (the model's parameters become views of it, so the all-gather lands in the model)
    and their gradients' (param.main_grad are views of it), padded to a multiple of the
    data-parallel size d (Megatron's _ParamAndGradBuffer; it orders them as backward meets them,
    to start reducing early, starts each at a multiple of 64 elements, pads each bucket to a
    multiple of lcm(d, 128) and cuts them into buckets; here one bucket, in the model's order,
    unaligned: the shards fall elsewhere, the numbers are the same, docs/distributed-optimizer.md).
    """

    def __init__(self, params, grad_dtype):
        # The replicas and their context-parallel ranks (Megatron's with_context_parallel=True):
        # every rank of them reduces the same gradients.
        d = ps.get_data_parallel_world_size(with_context_parallel=True)
        r = ps.get_data_parallel_rank(with_context_parallel=True)
        self.numel = sum(p.numel() for p in params)
        self.shard_size = -(-self.numel // d)
        self.shard = (r * self.shard_size, (r + 1) * self.shard_size)  # this rank's, of the buffer
        device = params[0].device
        self.param_data = torch.zeros(d * self.shard_size, dtype=params[0].dtype, device=device)
        self.grad_data = torch.zeros(d * self.shard_size, dtype=grad_dtype, device=device)
        self.ranges, start = [], 0  # (param, where it starts in the buffer)
        for param in params:
            view = lambda buffer: buffer[start:start + param.numel()].view_as(param)
            view(self.param_data).copy_(param.data)
            param.data = view(self.param_data)
            param.main_grad = view(self.grad_data)
            self.ranges.append((param, start))
            start += param.numel()

    def pieces(self):
        """(param, lo, hi, at): the elements [lo, hi) of each parameter (flattened) in this
        rank's shard, at [at, at + hi - lo) of the buffers; a parameter straddling two shards is
        a piece on each rank."""
        first, last = self.shard
        for param, start in self.ranges:
            at, end = max(first, start), min(last, start + param.numel())
            if at < end:
                yield param, at - start, end - start, at

    def shard_of(self, buffer):
        return buffer[self.shard[0]:self.shard[1]]

    def reduce_scatter_grads(self):
        """Each rank gets the average over the replicas of its shard of the gradients."""
        shard = self.shard_of(self.grad_data)
        group = ps.get_data_parallel_group(with_context_parallel=True)
        shard.copy_(_reduce_scatter(self.grad_data, group))
        # The average, as the plain all-reduce takes it: the sum divided after, where Megatron
        # scales before (gradient_scaling_factor); the same as the plain optimizer, bit for bit
        # (Megatron's rounds each share first: the same bits when d is a power of two).
        shard /= group.size()

    def all_gather_params(self):
        """Every rank's updated shard of the parameters, into every rank's parameter buffer."""
        _all_gather(self.shard_of(self.param_data),
                    ps.get_data_parallel_group(with_context_parallel=True),
                    out=self.param_data)


@wire.collective("dp_reduce_scatter", wire.REDUCE_SCATTER, summed=True)
def _reduce_scatter(buffer, group):
    """`buffer` summed over the data-parallel group; returns this rank's shard of the sum, a new
    tensor (Megatron reduces in place; gloo does not promise an output aliasing its input)."""
    shard = buffer.new_empty(buffer.numel() // group.size())
    dist_reduce_scatter_func(shard, buffer, group=group)
    return shard


@wire.collective("dp_all_gather", wire.ALL_GATHER)
def _all_gather(shard, group, out):
    """Every rank's `shard` into `out`, in place: `shard` is this rank's part of `out` (NCCL
    gathers in place when the input is the output's own part)."""
    dist_all_gather_func(out, shard, group=group)
    return out


class DistributedOptimizer:
    """`make_optimizer(params)` (torch's SGD or Adam) over this rank's shard of the main
    parameters, one piece per parameter the shard touches, instead of over the whole model.

    `model`: this rank's chunks of the model (an nn.ModuleList), built in the main dtype; a bf16
    run's is cast here, its main parameters fp32 copies of the pieces (Megatron's
    shard_fp32_from_float16_groups); in float32 and float64 a piece is a view of the parameter
    buffer itself (its shard_fp32_groups), stepped in place. A piece's gradient is the same
    elements of the gradient buffer.
    """

    def __init__(self, model: nn.ModuleList, make_optimizer, dtype):
        self.model, self.mixed_precision = model, dtype == torch.bfloat16
        self.names = [name for chunk in model for name, _ in chunk.named_parameters()]
        self.params = [p for chunk in model for p in chunk.parameters()]
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.main_dtype = self.params[0].dtype  # fp32 under bf16: the gradients' and the pieces'
        values = [p.detach().reshape(-1) for p in self.params]  # in the main dtype, before the cast
        model.to(dtype)
        # One buffer per dtype per chunk, as Megatron's DDP gives each chunk its own.
        self.buffers = []
        for chunk in model:
            by_dtype = {}
            for p in chunk.parameters():
                by_dtype.setdefault(p.dtype, []).append(p)
            self.buffers += [ParamAndGradBuffer(params, self.main_dtype)
                             for params in by_dtype.values()]
        d = ps.get_data_parallel_world_size(with_context_parallel=True)
        if all((d - 1) * buffer.shard_size >= buffer.numel for buffer in self.buffers):
            raise DistributedOptimizerError(
                f"--use_distributed_optimizer: the {sum(b.numel for b in self.buffers)} "
                f"parameters of this stage leave data-parallel rank {d - 1} no shard; use fewer "
                "data-parallel ranks")
        # (main piece, its buffer, its model parameter, lo, hi, where [lo, hi) is in the buffer)
        self.pieces = []
        for buffer in self.buffers:
            for param, lo, hi, at in buffer.pieces():
                main = nn.Parameter(values[self.index[id(param)]][lo:hi].clone()
                                    if self.mixed_precision else buffer.param_data[at:at + hi - lo])
                main.grad = buffer.grad_data[at:at + hi - lo]
                for attribute in INHERITED:
                    if hasattr(param, attribute):
                        setattr(main, attribute, getattr(param, attribute))
                # Its parameter's weight decay group (a piece is 1-D, a weight's too).
                main.no_weight_decay = no_weight_decay(param)
                self.pieces.append((main, buffer, param, lo, hi, at))
        for param in self.params:
            param.register_post_accumulate_grad_hook(_accumulate_into_main_grad)
            if self.mixed_precision:  # parallel_layers.LinearWithGradAccumulation adds its fp32
                param.add_to_main_grad = param.main_grad.add_  # gradient here itself
        self.optimizer = make_optimizer([main for main, *_ in self.pieces])

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none=True):
        """Zero the gradient buffers (the views stay: the pieces' gradients are in them)."""
        for buffer in self.buffers:
            buffer.grad_data.zero_()

    def finish_grad_sync(self):
        """Each rank's shard of the gradients averaged over the replicas (Megatron's DDP
        finish_grad_sync under the distributed optimizer)."""
        for buffer in self.buffers:
            buffer.reduce_scatter_grads()

    @torch.no_grad()
    def step(self):
        self.optimizer.step()  # this rank's pieces
        if self.mixed_precision:  # the update, rounded to bf16, into the parameter buffer
            for main, buffer, param, lo, hi, at in self.pieces:
                buffer.param_data[at:at + hi - lo].copy_(main)
        for buffer in self.buffers:
            buffer.all_gather_params()

    # -- checkpoints: each replica writes its shard (training/checkpointing.py) ---------------

    def state_dict(self):
        """The hyperparameters, for model_optim_rng.pt, each group's listing its parameters by
        their number in the model (a plain optimizer's state_dict); the state is in
        sharded_state_dict()."""
        groups = [dict({k: v for k, v in group.items() if k != "params"},
                       params=[i for i, p in enumerate(self.params) if in_group(group, p)])
                  for group in self.optimizer.param_groups]
        return dict(state={}, param_groups=groups)

    def sharded_state_dict(self):
        """This rank's shard, under each parameter's name: its elements [lo, hi) of the main
        parameter and of each per-element state (momentum; Adam's moments), and the rest of its
        state (Adam's step count)."""
        shard = {}
        for main, buffer, param, lo, hi, at in self.pieces:
            state = self.optimizer.state.get(main, {})
            shard[self.names[self.index[id(param)]]] = dict(
                range=(lo, hi), param=main.detach().cpu().clone(),
                state={k: v.cpu().clone() if torch.is_tensor(v) else v for k, v in state.items()})
        return shard

    def load_state_dict(self, state_dict, main_params):
        """A plain optimizer's state_dict (whole tensors per parameter, as torch's and
        training/checkpointing.py's readers give it) and the whole main parameters
        {name: tensor}: each piece takes its elements, each group its saved hyperparameters."""
        saved, inner = state_dict["state"], {}
        for j, (main, buffer, param, lo, hi, at) in enumerate(self.pieces):
            i = self.index[id(param)]
            with torch.no_grad():  # (in float32 and float64 the model's own elements, loaded)
                main.copy_(main_params[self.names[i]].reshape(-1)[lo:hi])
            inner[j] = {k: v.reshape(-1)[lo:hi].clone() if _per_element(v, param) else v
                        for k, v in saved.get(i, {}).items()}
        pieces = {id(main): j for j, (main, *_) in enumerate(self.pieces)}
        groups = regrouped(state_dict["param_groups"], self.optimizer, pieces)
        self.optimizer.load_state_dict(dict(state=inner, param_groups=groups))

    @torch.no_grad()
    def gather_main_model(self) -> nn.ModuleList:
        """The model holding the whole main parameters (fp32 under bf16), all-gathered from
        every replica's pieces: for model.pt, at the end. Without bf16, the model itself."""
        if not self.mixed_precision:
            return self.model
        main = copy.deepcopy(self.model).to(self.main_dtype)
        for param, copied in zip(self.params, main.parameters()):  # (deepcopy keeps no marks)
            for attribute in (*INHERITED, "vocab_size"):
                if hasattr(param, attribute):
                    setattr(copied, attribute, getattr(param, attribute))
        mains = dict(zip(map(id, self.params), main.parameters()))
        for buffer in self.buffers:
            flat = torch.zeros_like(buffer.grad_data)  # the main dtype, the buffer's length
            for piece, b, param, lo, hi, at in self.pieces:
                if b is buffer:
                    flat[at:at + hi - lo] = piece
            _all_gather(buffer.shard_of(flat),
                        ps.get_data_parallel_group(with_context_parallel=True), out=flat)
            for param, start in buffer.ranges:
                mains[id(param)].copy_(flat[start:start + param.numel()].view_as(param))
        return main


def _per_element(value, param) -> bool:
    """Is this state shaped as its parameter (momentum, Adam's moments), or one value for all
    of its elements (Adam's step count)?"""
    return torch.is_tensor(value) and value.dim() > 0 and value.numel() == param.numel()


def _accumulate_into_main_grad(param):
    """The hook that adds a gradient into the buffer as backward produces it (Megatron's
    main_grad accumulation); the parameter keeps none."""
    if param.grad is not None:
        param.main_grad.add_(param.grad)
        param.grad = None


def unshard_state(shards, shapes):
    """Every replica's sharded_state_dict() put back together, for training/checkpointing.py's
    readers: ({name: main parameter}, {name: its state}), each per-element tensor in its
    parameter's shape `shapes[name]`."""
    params, states = {}, {}
    for name, shape in shapes.items():
        pieces = sorted((s[name] for s in shards if name in s), key=lambda p: p["range"][0])
        covered, numel = [p["range"] for p in pieces], shape.numel()
        if not pieces or covered[0][0] != 0 or covered[-1][1] != numel or any(
                a[1] != b[0] for a, b in zip(covered, covered[1:])):
            raise ValueError(f"the replicas' shards of {name} cover {covered}, not [0, {numel})")
        whole = lambda key: torch.cat([p["state"][key] for p in pieces]).view(shape)
        params[name] = torch.cat([p["param"] for p in pieces]).view(shape)
        states[name] = {key: whole(key) if torch.is_tensor(value) and value.dim() > 0 else value
                        for key, value in pieces[0]["state"].items()}
    return params, states
