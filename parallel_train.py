"""Train the ToyModel (or the transformer) with Megatron-style tensor, data, pipeline and (the
transformer) context parallelism, under torchrun.

    torchrun --nproc_per_node 2 parallel_train.py --tensor_model_parallel_size 2

Same model, flags and loop as train.py; what parallelism adds is called from here: the
process groups (core/parallel_state.py), each rank's rows of a batch (its data-parallel
replica's share, here), the pipeline's schedule (core/pipeline_parallel/schedules.py), the
sums after backward (core/distributed/finalize_model_grads.py), the global gradient norm
(training/clip_grads.py), sharded checkpoints and the serial state_dict put back together
from them (training/checkpointing.py). Every rank computes the same loss; the logbook checks it.

World size = data-parallel size x pipeline-parallel size x context-parallel size x
tensor-parallel size; --batch_size is the global batch, split evenly between the data-parallel
replicas, and each replica's share into micro-batches of --micro_batch_size rows that run
through the pipeline's stages (schedules.py); under context parallelism each of a replica's C
ranks takes its tokens of every row (core/context_parallel/split.py). The flags and their
checks are in training/arguments.py.
"""

import torch
import torch.nn as nn
from torch.distributed.elastic.multiprocessing.errors import record

from core import parallel_state as ps
from core import wire
from core.context_parallel.split import context_parallel_disabled, get_batch_on_this_cp_rank
from core.distributed.finalize_model_grads import (
    broadcast_from_last_stage,
    finalize_model_grads,
    start_grad_sync,
)
from core.distributed.param_and_grad_buffer import BucketGroup, buckets_of, grads_of
from core.optimizer.distrib_optimizer import DistributedOptimizer
from core.pipeline_parallel.schedules import chunk_layers, forward_only, get_forward_backward_func
from core.tensor_parallel.sequence_parallel import sequence_parallel_disabled
from core.transformer.moe.router import reset_moe_trackers
from train import build_model, evaluate, holds, load_data, make_optimizer, torch_optimizer
from training import initialize
from training.activation_memory import report_activations_kept
from training.arguments import get_parallel_args
from training.checkpointing import (
    gather_over_experts,
    gather_over_pipeline,
    gather_serial_state_dict,
    load_checkpoint,
    save_checkpoint,
    set_identity,
)
from training.clip_grads import clip_grad_norm
from training.data import iterate_batches, to_tensors
from training.logbook import Logbook, report_communication
from training.metrics import MetricsWriter, moe_load, run_config, save_model
from training.mixed_precision import main_model, optimized_parameters
from training.operations import (
    leaving_together,
    on_every_rank,
    pin_float32_precision,
    run_cli,
)
from training.optimizer_memory import report_optimizer_memory


def train(model, optimizer, batches, logbook, args, start=0):
    """train.py's loop through the pipeline's schedule, and what parallelism adds after backward
    (finalize_model_grads). `model`: this rank's chunks of the model (one, unless interleaved)."""
    params = optimized_parameters(optimizer)  # under bf16 the fp32 main parameters (or their shard)
    forward_backward = get_forward_backward_func(args.pipeline_schedule, args.overlap_p2p_comm)
    shape = args.pipeline_tensor_shape = tensor_shape(args, args.micro_batch_size)
    wire.reset_comm_stats()  # what the steps send, reported at the end beside the paper's count
    model.train()
    for it in range(start + 1, args.num_iterations + 1):
        inputs, targets = next(batches)
        optimizer.zero_grad(set_to_none=True)
        if args.num_experts:  # the routers' counts start again (router.py)
            reset_moe_trackers(model)
        # The micro-batches' forward and backward through the stages (one stage without a
        # pipeline); on the last, the loss: ToyModel's mean squared error, the transformer's
        # cross-entropy with the logits left split (Sec. 3).
        losses = forward_backward(forward_step, microbatches(inputs, targets, args), model,
                                  shape, args.torch_dtype)
        # Data-parallel, sequence-parallel and the tied embedding's sums; every rank's loss.
        loss = finalize_model_grads(model, optimizer, losses)
        # The global norm over every rank's shards (training/clip_grads.py), once the sums are done.
        grad_norm = clip_grad_norm(params, args.clip_grad, sharded=args.use_distributed_optimizer) \
            if args.clip_grad else None
        optimizer.step()  # (--overlap_param_gather: its all-gathers waited for by the next forward)
        # logging, validation, the ranks' agreement, checkpoints
        logbook.step(it, loss, grad_norm, moe_load(model, args))
    finish_param_sync(optimizer)


def forward_step(model_chunk, microbatch, input_tensor):
    """One micro-batch through one chunk of the model: from its data on the first stage, from
    the previous stage's activation after it; on the last stage, its loss."""
    inputs, targets = microbatch
    output = model_chunk(inputs if input_tensor is None else input_tensor)
    return model_chunk.loss(output, targets) if ps.is_pipeline_last_stage() else output


def this_ranks_rows(args):
    """This replica's rows of every global batch."""
    n = args.batch_size // ps.get_data_parallel_world_size()
    return slice(ps.get_data_parallel_rank() * n, (ps.get_data_parallel_rank() + 1) * n)


def microbatches(inputs, targets, args, rows=None, sequence_parallel=None, whole=False):
    """The replica's batch as micro-batches of `rows` (--micro_batch_size); under the ToyModel's
    sequence parallelism, this rank's rows of each (the transformer splits its sequence); under
    context parallelism this rank's tokens of each sequence, and their targets (`whole`:
    validation's, every token)."""
    rows = rows or args.micro_batch_size
    parts = list(zip(inputs.split(rows), targets.split(rows)))
    sp = args.sequence_parallel if sequence_parallel is None else sequence_parallel
    if sp and args.model == "toy" and args.tensor_model_parallel_size > 1:
        tp, tp_rank = args.tensor_model_parallel_size, ps.get_tensor_model_parallel_rank()
        parts = [(x.chunk(tp)[tp_rank], y.chunk(tp)[tp_rank]) for x, y in parts]
    cp = args.context_parallel_size
    if cp > 1 and not whole:  # Megatron's get_batch_on_this_cp_rank, tokens and labels alike
        mine = lambda t: get_batch_on_this_cp_rank(t, 1, cp, ps.get_context_parallel_rank(),
                                                   args.cp_load_balance == "on")
        parts = [(mine(x), mine(y)) for x, y in parts]
    return parts


def tensor_shape(args, rows, sequence_parallel=None, whole=False):
    """The activation a stage sends the next for a micro-batch of `rows` (agreed in advance, as
    Megatron computes it from seq_length, micro_batch_size and hidden_size); under sequence and
    context parallelism this rank's part of it (`whole`: validation's, every token)."""
    sp = args.sequence_parallel if sequence_parallel is None else sequence_parallel
    tp = args.tensor_model_parallel_size if sp else 1
    if args.model == "toy":
        return (rows // tp, args.input_size)
    cp = 1 if whole else args.context_parallel_size
    return (args.seq_length // cp // tp, rows, args.input_size)


def build_chunks(args, device):
    """This rank's chunks of the model: its pipeline stage, or (interleaved) its V chunks, each
    with the transformer's blocks Megatron's layout gives it (schedules.chunk_layers). One chunk,
    the whole model, without a pipeline."""
    p, v = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for c in range(v):
        ps.set_virtual_pipeline_model_parallel_rank(c if v > 1 else None)
        layers = chunk_layers(args.num_layers, p, ps.get_pipeline_model_parallel_rank(), v,
                              c) if p > 1 else None
        chunks.append(build_model(args, device, tensor_parallel=True,
                                  pre_process=ps.is_pipeline_first_stage(),
                                  post_process=ps.is_pipeline_last_stage(), layers=layers))
    ps.set_virtual_pipeline_model_parallel_rank(0 if v > 1 else None)
    return nn.ModuleList(chunks).to(device)


@torch.no_grad()
def evaluate_pipeline(model, inputs, targets, args, chunk_rows=1024):
    """train.evaluate's loss, the rows in the same chunks, through the pipeline's stages
    (forward only); every rank returns the last stage's."""
    model.eval()
    parts = microbatches(inputs, targets, args, chunk_rows, sequence_parallel=False, whole=True)
    shapes = [tensor_shape(args, len(x), sequence_parallel=False, whole=True) for x, _ in parts]
    step = lambda chunk, part, x: chunk(part[0] if x is None else x)
    outputs = forward_only(step, parts, model, shapes, args.torch_dtype)
    loss = torch.zeros((), dtype=torch.float64, device=wire.get_device())
    if outputs:  # the last stage: serial's loss from serial's outputs
        loss += evaluate(model[-1], inputs, targets, chunk_rows, outputs)
    model.train()
    return broadcast_from_last_stage(loss).item()


def run(args, device, precision):
    ps.initialize_model_parallel(args.tensor_model_parallel_size,
                                 args.pipeline_model_parallel_size,
                                 args.virtual_pipeline_model_parallel_size,
                                 args.context_parallel_size, args.expert_model_parallel_size,
                                 args.expert_tensor_parallel_size)
    tp, tp_rank = args.tensor_model_parallel_size, ps.get_tensor_model_parallel_rank()
    model = build_chunks(args, device)
    wire.set_reduce_in_fp32(args.tp_reduce_dtype == "float32")
    optimizer = build_optimizer(model, args)
    main = main_model(model, optimizer)  # what checkpoints hold: fp32 main parameters under bf16
    (X, y), valid = on_every_rank(load_data, args)
    set_identity(args, X, y)  # whose the checkpoints are
    start = on_every_rank(load_checkpoint, args.load, main, optimizer, args) if args.load else 0
    batches = iterate_batches(*to_tensors(X, y, args, device), args.batch_size, start,
                              this_ranks_rows(args))
    valid = to_tensors(*valid, args, device)

    def validate():  # every rank, every row and token: validation saves nothing for backward
        with sequence_parallel_disabled(model), context_parallel_disabled(model):
            if args.pipeline_model_parallel_size > 1:
                return evaluate_pipeline(model, *valid, args)
            return evaluate(model[0], *valid)

    rank = torch.distributed.get_rank()
    metrics = metrics_writer(args, device, precision, start) if rank == 0 else None
    # The first group's ranks print, as in the original: "Rank 0 Iter 10 Train Loss ...".
    log_prefix = f"Rank {tp_rank} " if rank < tp else None
    with Logbook(args, validate, metrics, log_prefix, start) as logbook:
        if args.save:
            logbook.save_every(args.save_interval, lambda it: save(it, main, optimizer, args))
        train(model, optimizer, batches, logbook, args, start)
    state = serial_state_dict(optimizer.gather_main_model() if args.use_distributed_optimizer
                              else main)
    report_activations_kept(args)  # every stage's, gathered to the first
    if rank == 0:
        save_model(state, args.out_dir)
        report_communication(logbook.first_step_comm, args, logbook.first_step_tallies)
        report_optimizer_memory(model, optimizer, args, ps.get_data_parallel_world_size())
        print(f"wrote {args.out_dir}/metrics.csv and {args.out_dir}/model.pt{holds(args)}")


def build_optimizer(model, args):
    """train.py's optimizer over this rank's chunks, or (--use_distributed_optimizer) each
    data-parallel replica its shard of it; with --overlap_grad_reduce the hooks that launch the
    buckets of its gradients' average during backward."""
    size = bucket_size(args)
    if args.use_distributed_optimizer:  # each replica its shard of the optimizer (on every
        # rank's own line: a stage may be too small for its shards)
        optimizer = on_every_rank(DistributedOptimizer, model, torch_optimizer(args),
                                  args.torch_dtype, size, args.overlap_param_gather)
    else:
        optimizer = make_optimizer(model, args)
    if size is not None:
        model.grad_sync = bucket_group(model, optimizer, size, args.num_microbatches)
    return optimizer


def bucket_size(args):
    """--overlap_grad_reduce's elements per bucket (Megatron's default rule without
    --ddp_bucket_size); None without the overlap, or without replicas to average over."""
    d = ps.get_data_parallel_world_size(with_context_parallel=True)
    if not args.overlap_grad_reduce or d == 1:
        return None
    return args.ddp_bucket_size or max(40_000_000, 1_000_000 * d)


def bucket_group(model, optimizer, size, num_microbatches):
    """--overlap_grad_reduce: the data-parallel average in buckets, launched by hooks during
    backward (core/distributed/param_and_grad_buffer.py) and waited for in finalize_model_grads,
    which finds them on the model, as Megatron's DDP-wrapped chunks carry their own: the
    distributed optimizer's buffers' buckets, each reduce-scattered, or the plain optimizer's,
    each all-reduced."""
    if isinstance(optimizer, DistributedOptimizer):
        where = [(buffer, i) for buffer in optimizer.buffers for i in range(len(buffer.buckets))]
        return BucketGroup([buffer.buckets[i].params for buffer, i in where],
                           lambda j: where[j][0].start_grad_sync(where[j][1]), num_microbatches)
    buckets = buckets_of([p for chunk in model for p in chunk.parameters()], size)
    grads = grads_of(optimizer)
    return BucketGroup(buckets, lambda i: start_grad_sync([grads(p) for p in buckets[i]],
                                                          buckets[i]), num_microbatches)


def save(iteration, main, optimizer, args):
    """A checkpoint, once every parameter's all-gather has landed (--overlap_param_gather)."""
    finish_param_sync(optimizer)
    save_checkpoint(args.save, iteration, main, optimizer, args)


def finish_param_sync(optimizer):
    """--overlap_param_gather: the parameters' all-gathers still in flight waited for, before
    what reads the parameters outside a forward (a checkpoint, the end's model)."""
    if isinstance(optimizer, DistributedOptimizer):
        optimizer.finish_param_sync()


def metrics_writer(args, device, precision, start):
    """metrics.csv and config.json, written by global rank 0."""
    config = run_config(args, device=str(device), world_size=torch.distributed.get_world_size(),
                        data_parallel_size=ps.get_data_parallel_world_size(),
                        **initialize.backend_report(), **precision)
    return MetricsWriter(args.out_dir, config, num_ranks=args.tensor_model_parallel_size,
                         resume_from=start)


def serial_state_dict(main):
    """The serial model's state_dict (on global rank 0; None elsewhere): each chunk's shards put
    together over the tensor-parallel group, then every stage's parameters, the first stage's
    word embeddings kept (the last stage's copy is equal: finalize_model_grads.py)."""
    state = {}
    for chunk in main:
        state.update(gather_serial_state_dict(chunk))
    state = gather_over_experts(state)
    stages = gather_over_pipeline(state)
    if stages is None or None in stages:  # (a pipeline of expert-parallel ranks other than 0)
        return None
    merged = {}
    for stage in stages:
        for name, tensor in stage.items():
            merged.setdefault(name, tensor)
    return merged


def main():
    args = get_parallel_args()
    precision = pin_float32_precision()
    device = initialize.init_distributed(args.distributed_backend,
                                         args.distributed_timeout_minutes, args.device)
    with leaving_together():
        run(args, device, precision)


# A bug's traceback (not a user error's: those exit with one line) reaches torchrun's summary.
@record
def cli():
    run_cli(main)


if __name__ == "__main__":
    cli()
