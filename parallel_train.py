"""Train the ToyModel with Megatron-style tensor parallelism, under torchrun.

    torchrun --nproc_per_node 2 parallel_train.py --tensor_model_parallel_size 2

Same model, flags and loop as train.py. What parallelism adds is all here: the
process groups, the rows of each batch a rank takes (its data-parallel
replica's share), what happens after backward when some gradients hold only
part of the batch, checkpoints, and the shards put back together into a serial
state_dict. Every rank computes the same loss; the logbook checks it.

World size = data-parallel size x tensor-parallel size; --batch_size is the
global batch, split evenly between the data-parallel replicas. The flags and
their checks are in training/arguments.py.
"""

import torch
from torch.distributed.elastic.multiprocessing.errors import record

import communication as comm
import parallel_state as ps
from finalize_model_grads import finalize_model_grads
from sequence_parallel import sequence_parallel_disabled
from train import build_model, evaluate, holds, load_data, make_optimizer
from training import initialize
from training.arguments import get_parallel_args
from training.checkpointing import (
    gather_serial_state_dict,
    load_checkpoint,
    save_checkpoint,
    set_identity,
)
from training.clip_grads import clip_grad_norm
from training.data import iterate_batches, to_tensors
from training.logbook import Logbook, report_communication
from training.metrics import MetricsWriter, run_config, save_model
from training.mixed_precision import main_model, optimized_parameters
from training.operations import (
    leaving_together,
    on_every_rank,
    pin_float32_precision,
    run_cli,
)


def train(model, optimizer, batches, logbook, args, start=0):
    """train.py's loop, and what parallelism adds after backward (finalize_model_grads)."""
    params = optimized_parameters(optimizer)  # under bf16 the fp32 main parameters
    comm.reset_comm_stats()  # what the steps send, reported at the end beside the paper's count
    model.train()
    for it in range(start + 1, args.num_iterations + 1):
        inputs, targets = next(batches)
        optimizer.zero_grad(set_to_none=True)
        # ToyModel's mean squared error, the transformer's cross-entropy with the logits left
        # split (Sec. 3); under sequence parallelism ToyModel's is this rank's rows' share.
        loss = model.loss(model(inputs), targets)
        loss.backward()
        loss = finalize_model_grads(model, params, loss)  # data- and sequence-parallel sums
        # The global norm over every rank's shards (training/clip_grads.py), once the sums are done.
        grad_norm = clip_grad_norm(params, args.clip_grad) if args.clip_grad else None
        optimizer.step()
        logbook.step(it, loss, grad_norm)  # logging, validation, the ranks' agreement, checkpoints


def this_ranks_rows(args):
    """This replica's rows of every global batch; under sequence parallelism, this rank's of
    those (the ToyModel's: the transformer splits its sequence instead)."""
    tp, tp_rank = args.tensor_model_parallel_size, ps.get_tensor_model_parallel_rank()
    n = args.batch_size // ps.get_data_parallel_world_size()
    rows = slice(ps.get_data_parallel_rank() * n, (ps.get_data_parallel_rank() + 1) * n)
    if args.sequence_parallel and args.model == "toy":
        rows = slice(rows.start + tp_rank * n // tp, rows.start + (tp_rank + 1) * n // tp)
    return rows


def run(args, device, precision):
    ps.initialize_model_parallel(args.tensor_model_parallel_size)
    tp, tp_rank = args.tensor_model_parallel_size, ps.get_tensor_model_parallel_rank()
    model = build_model(args, device, tensor_parallel=True,
                        sequence_parallel=args.sequence_parallel)
    model = model.to(device)
    comm.set_reduce_in_fp32(args.tp_reduce_dtype == "float32")
    optimizer = make_optimizer(model, args)
    main = main_model(model, optimizer)  # what checkpoints hold: fp32 main parameters under bf16
    (X, y), valid = on_every_rank(load_data, args)
    set_identity(args, X, y)  # whose the checkpoints are
    start = on_every_rank(load_checkpoint, args.load, main, optimizer, args) if args.load else 0
    batches = iterate_batches(*to_tensors(X, y, args, device), args.batch_size, start,
                              this_ranks_rows(args))
    valid = to_tensors(*valid, args, device)

    def validate():  # every rank, every row: validation saves nothing for backward
        with sequence_parallel_disabled(model):
            return evaluate(model, *valid)

    rank = torch.distributed.get_rank()
    metrics = None
    if rank == 0:
        config = run_config(args, device=str(device), world_size=torch.distributed.get_world_size(),
                            data_parallel_size=ps.get_data_parallel_world_size(),
                            **initialize.backend_report(), **precision)
        metrics = MetricsWriter(args.out_dir, config, num_ranks=tp, resume_from=start)
    # The first group's ranks print, as in the original: "Rank 0 Iter 10 Train Loss ...".
    log_prefix = f"Rank {tp_rank} " if rank < tp else None
    with Logbook(args, validate, metrics, log_prefix, start) as logbook:
        if args.save:
            logbook.save_every(args.save_interval,
                               lambda it: save_checkpoint(args.save, it, main, optimizer, args))
        train(model, optimizer, batches, logbook, args, start)
    state = gather_serial_state_dict(main)
    if rank == 0:
        save_model(state, args.out_dir)
        report_communication(logbook.first_step_comm, args)
        print(f"wrote {args.out_dir}/metrics.csv and {args.out_dir}/model.pt{holds(args)}")


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
