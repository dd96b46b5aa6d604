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
With --overlap_grad_reduce the buffer is cut in buckets, each padded and sharded on its own,
its reduce-scatter launched during backward (core/distributed/param_and_grad_buffer.py); with
--overlap_param_gather step 4 only launches each bucket's all-gather, and the next forward waits
for each just before the first module that needs it. What differs from Megatron is said where
it is: the buffer's order and one bucket without the overlap (param_and_grad_buffer.py), the
sums before the reduce-scatter without it (finalize_model_grads.py), one file per replica in a
checkpoint.
"""

import copy

import torch
import torch.nn as nn

from core import parallel_state as ps
from core.distributed.param_and_grad_buffer import ParamAndGradBuffer, _all_gather
from core.optimizer import in_group, no_weight_decay, regrouped

# What a piece of a main parameter inherits from its model parameter: what the gradient's sums
# (finalize_model_grads.py) and the clipping norm (training/clip_grads.py) ask of a parameter.
INHERITED = ("tensor_model_parallel", "partition_dim", "grad_is_partial", "shared_embedding",
             "allreduce")


class DistributedOptimizerError(ps.UserError, ValueError):
    """A model too small to give every data-parallel rank a shard."""


class DistributedOptimizer:
    """`make_optimizer(params)` (torch's SGD or Adam) over this rank's shard of the main
    parameters, one piece per parameter the shard touches, instead of over the whole model.

    `model`: this rank's chunks of the model (an nn.ModuleList), built in the main dtype; a bf16
    run's is cast here, its main parameters fp32 copies of the pieces (Megatron's
    shard_fp32_from_float16_groups); in float32 and float64 a piece is a view of the parameter
    buffer itself (its shard_fp32_groups), stepped in place. A piece's gradient is the same
    elements of the gradient buffer.
    """

    def __init__(self, model: nn.ModuleList, make_optimizer, dtype, bucket_size=None,
                 overlap_param_gather=False):
        """`bucket_size`: --overlap_grad_reduce's, each bucket sharded on its own
        (param_and_grad_buffer.py); `overlap_param_gather`: the step only launches the buckets'
        all-gathers, forward pre-hooks wait for them (_wait_before_forward)."""
        self.model, self.mixed_precision = model, dtype == torch.bfloat16
        self.names = [name for chunk in model for name, _ in chunk.named_parameters()]
        self.params = [p for chunk in model for p in chunk.parameters()]
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.main_dtype = self.params[0].dtype  # fp32 under bf16: the gradients' and the pieces'
        values = [p.detach().reshape(-1) for p in self.params]  # in the main dtype, before the cast
        model.to(dtype)
        # One buffer per dtype per chunk, as Megatron's DDP gives each chunk its own, and the
        # MoE experts' apart: sharded over the ranks that hold them (expert_data_parallel).
        self.buffers = []
        for chunk in model:
            by_kind = {}
            for p in chunk.parameters():
                by_kind.setdefault((p.dtype, is_expert(p)), []).append(p)
            self.buffers += [ParamAndGradBuffer(params, self.main_dtype, bucket_size, expert)
                             for (_, expert), params in by_kind.items()]
        self.pieces = self._pieces(values)
        for param in self.params:
            param.register_post_accumulate_grad_hook(_accumulate_into_main_grad)
            if self.mixed_precision:  # parallel_layers.LinearWithGradAccumulation adds its fp32
                param.add_to_main_grad = param.main_grad.add_  # gradient here itself
        self.optimizer = make_optimizer([main for main, *_ in self.pieces])
        # --overlap_param_gather: (buffer, bucket) -> the wait of its all-gather, in flight
        self.overlap_param_gather, self.param_syncs = overlap_param_gather, {}
        self.bucket_of = {id(p): (j, i) for j, buffer in enumerate(self.buffers)
                          for i, bucket in enumerate(buffer.buckets) for p in bucket.params}
        if overlap_param_gather:
            self._wait_before_forward()

    def _pieces(self, values):
        """(main piece, its buffer, its model parameter, lo, hi, where [lo, hi) is in the buffer)
        for every piece of this rank's shards; `values`: the parameters in the main dtype."""
        d = ps.get_data_parallel_world_size(with_context_parallel=True)
        if all((buffer.group.size() - 1) * bucket.shard_size >= bucket.numel
               for buffer in self.buffers for bucket in buffer.buckets):
            raise DistributedOptimizerError(
                f"--use_distributed_optimizer: the {sum(b.numel for b in self.buffers)} "
                f"parameters of this stage leave data-parallel rank {d - 1} no shard; use fewer "
                "data-parallel ranks")
        pieces = []
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
                pieces.append((main, buffer, param, lo, hi, at))
        return pieces

    def _wait_before_forward(self):
        """--overlap_param_gather: a forward pre-hook on every module that holds parameters
        waits for their buckets' all-gathers, launched by the last step (Megatron's DDP
        _make_forward_pre_hook): the first module to need a bucket waits, the later buckets
        still on the wire. A last stage's tied word embeddings, which its loss reads outside any
        module's forward, are waited for by their chunk's own hook, before its forward."""
        tied = lambda p: getattr(p, "shared_embedding", False)
        for chunk in self.model:
            for module in chunk.modules():
                mine = [p for p in module.parameters(recurse=False) if not tied(p)]
                mine += [p for p in chunk.parameters() if tied(p)] if module is chunk else []
                if mine:
                    module.register_forward_pre_hook(
                        lambda _module, _inputs, mine=mine: self.finish_param_sync(mine))

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
        if self.overlap_param_gather:  # launched: the next forward's hooks wait for them
            self.start_param_sync()
            return
        for buffer in self.buffers:
            buffer.all_gather_params()

    def start_param_sync(self):
        """--overlap_param_gather: every bucket's all-gather launched, in the order the next
        forward needs them: each chunk's buckets last first (they are in backward's order), as
        Megatron chains them (next_param_gather_bucket_group); the backend moves them in that
        order, so the first layer's bucket lands first and the later ones while forward
        computes. (Megatron dispatches the first from the first forward pre-hook, or from the
        step under --overlap-param-gather-with-optimizer-step, and each pre-hook the next; here
        all at once, before forward: none of the launches' cost falls inside it.)"""
        if self.param_syncs:  # a gather never waited for: the step just wrote what it reads
            raise RuntimeError(f"buckets {list(self.param_syncs)}: a parameter all-gather was "
                               "launched and never waited for before the next step")
        self.param_syncs = {(j, i): buffer.start_param_sync(i)
                            for j, buffer in enumerate(self.buffers)
                            for i in reversed(range(len(buffer.buckets)))}

    def finish_param_sync(self, params=None):
        """Wait for the all-gathers still in flight of the buckets holding `params` (None:
        every one), in the buckets' order; each bucket once per step. What reads the parameters
        outside a forward (a checkpoint, the end's model) asks for them all first."""
        wanted = self.param_syncs if params is None else {self.bucket_of.get(id(p)) for p in params}
        for key in [key for key in self.param_syncs if key in wanted]:  # (in launch order)
            self.param_syncs.pop(key)()

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
            for bucket in buffer.buckets:
                _all_gather(buffer.shard_of(flat, bucket), buffer.group,
                            out=buffer.bucket_data(flat, bucket))
            for param, start, _ in buffer.ranges:
                mains[id(param)].copy_(flat[start:start + param.numel()].view_as(param))
        return main


def is_expert(param) -> bool:
    """A MoE layer's expert (Megatron's mark, `allreduce` False: not averaged over the
    data-parallel group, summed over the expert-data-parallel one)."""
    return not getattr(param, "allreduce", True)


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
        held = [s[name] for s in shards if name in s]  # a piece, or several (an expert's)
        pieces = sorted((p for h in held for p in (h if isinstance(h, list) else [h])),
                        key=lambda p: p["range"][0])
        covered, numel = [p["range"] for p in pieces], shape.numel()
        if not pieces or covered[0][0] != 0 or covered[-1][1] != numel or any(
                a[1] != b[0] for a, b in zip(covered, covered[1:])):
            raise ValueError(f"the replicas' shards of {name} cover {covered}, not [0, {numel})")
        whole = lambda key: torch.cat([p["state"][key] for p in pieces]).view(shape)
        params[name] = torch.cat([p["param"] for p in pieces]).view(shape)
        states[name] = {key: whole(key) if torch.is_tensor(value) and value.dim() > 0 else value
                        for key, value in pieces[0]["state"].items()}
    return params, states
