"""Train the ToyModel with Megatron-style tensor parallelism, under torchrun.

    torchrun --nproc_per_node 2 parallel_train.py --tensor_model_parallel_size 2

Same model, flags and training loop as train.py. What parallelism adds is all
here: process groups, the rows of each batch a rank takes (its data-parallel
replica's share), the averaging of gradients over data-parallel replicas, the
check that every rank computes the same loss, checkpoints, and the shards put
back together into a serial state_dict.

World size = data-parallel size x tensor-parallel size; --batch_size is the
global batch, split evenly between the data-parallel replicas.
"""

import math
import os
import socket
import sys
import traceback

import torch
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record

import parallel_state as ps
from checkpointing import CheckpointError, load_checkpoint, save_checkpoint
from data import DataError, iterate_batches, load_dataset, to_tensors
from metrics import MetricsWriter, run_config, save_model
from parallel_layers import allreduce_sequence_parallel_grads, gather_serial_state_dict, sequence_parallel_disabled
from train import (USER_ERRORS, build_model, evaluate, get_args_parser, make_optimizer, parse_args,
                   pin_float32_precision, run_cli, train)


def get_parallel_args(argv=None):
    """Flags, checked before any process-group work, identically on every rank."""
    parser = get_args_parser("parallel_train.py", __doc__.splitlines()[0], out_dir="runs/tensor_parallel")
    parser.add_argument("--tensor_model_parallel_size", type=int, default=2)
    parser.add_argument("--distributed_timeout_minutes", type=float, default=10.0)
    parser.add_argument("--distributed_backend", choices=["auto", "nccl", "gloo"], default="auto",
                        help="auto: nccl when every rank of the job has a GPU of its own, else gloo (said in "
                             "one line when GPUs are there)")
    parser.add_argument("--sequence_parallel", action="store_true",
                        help="outside the split region each rank keeps only its rows (Korthikanti et al., 2022)")
    parser.add_argument("--save", default=None, help="checkpoint directory (Megatron layout)")
    parser.add_argument("--save_interval", type=int, default=100, help="checkpoint every N iterations")
    parser.add_argument("--load", default=None, help="resume from the newest checkpoint here, if any")
    args = parse_args(parser, argv)
    if args.save_interval <= 0:
        parser.error(f"--save_interval must be a positive integer, got {args.save_interval}")
    tp = args.tensor_model_parallel_size
    if tp <= 0:
        parser.error(f"--tensor_model_parallel_size must be a positive integer, got {tp}")
    if not (args.distributed_timeout_minutes > 0 and math.isfinite(args.distributed_timeout_minutes)):
        parser.error(f"--distributed_timeout_minutes must be a positive number, got {args.distributed_timeout_minutes}")
    if args.hidden_size % tp != 0:
        parser.error(f"--hidden_size {args.hidden_size} is not divisible by --tensor_model_parallel_size {tp}")
    if "RANK" not in os.environ:
        if tp > 1:
            parser.error(f"--tensor_model_parallel_size {tp} needs {tp} processes: launch with "
                         f"torchrun --nproc_per_node {tp} parallel_train.py ... (or bash bash_parallel_train.sh)")
        _single_process_env()
    world_size = int(os.environ["WORLD_SIZE"])
    if tp > world_size:
        parser.error(f"--tensor_model_parallel_size {tp} is larger than the {world_size} processes launched; "
                     f"launch {tp} (torchrun --nproc_per_node {tp}, or GPUS_PER_NODE={tp} for the bash script)")
    if world_size % tp != 0:
        parser.error(f"world size {world_size} is not divisible by --tensor_model_parallel_size {tp}; "
                     f"launch a multiple of {tp} processes")
    dp = world_size // tp
    if args.batch_size % dp != 0:
        parser.error(f"--batch_size {args.batch_size} is not divisible by the data-parallel size {dp} "
                     f"(world size {world_size} / tensor-parallel size {tp}); each replica takes an equal share")
    if args.sequence_parallel and (args.batch_size // dp) % tp != 0:
        parser.error(f"--sequence_parallel splits each replica's {args.batch_size // dp} rows between "
                     f"{tp} tensor-parallel ranks; choose a --batch_size that makes them divisible")
    return args


def _single_process_env():
    """Run as a job of one rank when started with plain `python` (TP=1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def on_every_rank(fn, *args):
    """fn(*args) on every rank, and every rank learns whether it worked everywhere.

    Reading files (the data, a checkpoint shard) can fail on some ranks only,
    e.g. on a node that lacks them. Without the shared verdict the others
    would wait in their next collective until the timeout. The first rank
    that failed says why, naming its machine; the others leave quietly.
    """
    result, error = None, None
    try:
        result = fn(*args)
    except (DataError, CheckpointError) as e:
        error = e
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    failed = torch.zeros(world, dtype=torch.int32, device=ps.get_device())
    failed[rank] = error is not None
    ps.all_reduce(failed, group=torch.distributed.group.WORLD)
    if not failed.any():
        return result
    if rank != int(failed.nonzero()[0]):
        sys.exit(2)
    if not failed.all():
        error = type(error)(f"{error} (on {socket.gethostname()}; every node needs its files)")
    error.reported_by_this_rank = True
    raise error


def report_communication(stats, args):
    """Print what one step sent beside what the papers count, in bytes a ring moves per rank."""
    tp, rows = args.tensor_model_parallel_size, args.batch_size // ps.get_data_parallel_world_size()
    print(f"Communication in one training step (measured in its first step, tensor-parallel size {tp}):")
    print(f"  {'collective':<23}{'calls':>5}{'bytes in, per rank':>20}{'sent per rank in a ring':>25}")
    for op, c in stats.items():
        print(f"  {op:<22} x{c['calls']:<4}{c['bytes'] / 1024:>15.2f} KiB{c['ring_bytes'] / 1024:>21.2f} KiB")
    kib = rows * args.input_size * args.torch_dtype.itemsize / 1024  # one batch x input activation
    all_reduce, half = 2 * (tp - 1) / tp * kib, (tp - 1) / tp * kib  # a ring all-reduce = reduce-scatter + all-gather
    megatron = (f"Megatron-LM (Sec. 3, Fig. 3a): 2 all-reduces of batch x input = {rows}x{args.input_size} "
                f"({kib:.2f} KiB) per MLP step, g in forward and f in backward, {all_reduce:.2f} KiB sent each: "
                f"{2 * all_reduce:.2f} KiB.")
    if not args.sequence_parallel:
        print(f"  {megatron}\n  f's all-reduce of dL/dX is skipped here: X is the raw data and needs no gradient.")
        return
    print(f"  Korthikanti et al. (2022, Sec. 4.2.2): per MLP step, forward 1 all-gather + 1 reduce-scatter, backward "
          f"2 all-gathers + 1 reduce-scatter, of {rows}x{args.input_size} ({kib:.2f} KiB), {half:.2f} KiB sent each: "
          f"{5 * half:.2f} KiB.\n"
          f"  Without --sequence_parallel, {megatron}\n"
          f"  Each all-reduce became a reduce-scatter + an all-gather of the same bytes; the {half:.2f} KiB more is "
          f"the backward all-gather of fc1's input, the price of saving only this rank's rows of it.\n"
          f"  The backward reduce-scatter of dL/dX is skipped here: X is the raw data and needs no gradient. "
          f"The small all-reduce sums fc's gradient and the loss over the rows.")


def run(args, device, precision):
    ps.initialize_model_parallel(args.tensor_model_parallel_size)
    rank, tp, tp_rank = torch.distributed.get_rank(), args.tensor_model_parallel_size, ps.get_tensor_model_parallel_rank()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    model = build_model(args, tensor_parallel=True).to(device)
    optimizer = make_optimizer(model, args)
    start = on_every_rank(load_checkpoint, args.load, model, optimizer, args) if args.load else 0

    (X, y), valid = on_every_rank(load_dataset, args.data_dir, args.input_size, args.batch_size)
    # This replica's rows of every global batch; under sequence parallelism, this rank's rows of those.
    replica_rows = args.batch_size // dp_size
    rows = slice(dp_rank * replica_rows, (dp_rank + 1) * replica_rows)
    if args.sequence_parallel:
        rows = slice(rows.start + tp_rank * replica_rows // tp, rows.start + (tp_rank + 1) * replica_rows // tp)
    batches = iterate_batches(*to_tensors(X, y, args.torch_dtype, device), args.batch_size, start, rows)
    valid = to_tensors(*valid, args.torch_dtype, device)

    def loss_fn(outputs, targets):
        if not args.sequence_parallel:
            return F.mse_loss(outputs, targets)
        # This rank's rows' share of the replica's mean; the shares are summed after backward.
        return F.mse_loss(outputs, targets, reduction="sum") / replica_rows

    def evaluate_fn(model, inputs, targets):
        with sequence_parallel_disabled(model):
            return evaluate(model, inputs, targets)

    def gather_losses(losses):
        gathered = ps.all_gather(losses.to(device), dim=0)
        return gathered.view(tp, -1).cpu()

    def after_backward(loss):
        """Sum what sequence parallelism left partial, and average over data-parallel replicas."""
        if not args.sequence_parallel and dp_size == 1:
            return loss
        loss = loss.detach().reshape(1).clone()
        if dp_size == 1:  # sequence parallelism: fc's gradient and the loss came from this rank's rows only
            allreduce_sequence_parallel_grads(model, also=[loss])
        else:  # each replica saw batch / DP rows
            split = [p.grad for p in model.parameters() if getattr(p, "tensor_model_parallel", False)]
            whole = [p.grad for p in model.parameters() if not getattr(p, "tensor_model_parallel", False)]
            ps.average_over_data_parallel(split)
            ps.average_replicated(whole + [loss], partial_over_tensor_parallel=args.sequence_parallel)
        return loss[0]

    # The first group's ranks print, as in the original: "Rank 0 Iter 10 Train Loss ...".
    log_prefix = f"Rank {tp_rank} " if rank < tp else None
    metrics = None
    if rank == 0:
        config = run_config(args, device=str(device), world_size=torch.distributed.get_world_size(),
                            data_parallel_size=dp_size, **ps.backend_report(), **precision)
        metrics = MetricsWriter(args.out_dir, config, num_ranks=tp, resume_from=start)
    save = (lambda it, opt: save_checkpoint(args.save, it, model, opt, args)) if args.save else None
    _, comm = train(model, args, batches, valid, log_prefix=log_prefix, gather_losses=gather_losses,
                    metrics=metrics, optimizer=optimizer, start_iteration=start, after_backward=after_backward,
                    save_checkpoint=save, loss_fn=loss_fn, evaluate_fn=evaluate_fn)
    state = gather_serial_state_dict(model)
    if rank == 0:
        save_model(state, args.out_dir)
        report_communication(comm, args)
        print(f"wrote {args.out_dir}/metrics.csv and {args.out_dir}/model.pt")


def main():
    args = get_parallel_args()
    precision = pin_float32_precision()
    device = ps.init_distributed(args.distributed_backend, args.distributed_timeout_minutes, args.device)
    try:
        run(args, device, precision)
    except (*USER_ERRORS, SystemExit):
        ps.destroy_model_parallel()  # every rank reached the same verdict: leave together
        raise
    except Exception as e:
        die_first_error_first(e)
    ps.destroy_model_parallel()


def die_first_error_first(error):
    """Report an unexpected error on this rank, then exit at once.

    This rank's exit is what wakes its peers, who are waiting in a collective:
    they fail with "connection reset by peer", and torchrun stops the rest. So
    the real error is printed before exiting, and a rank that only lost a peer
    says so in one line instead of a second, misleading traceback.
    """
    rank = torch.distributed.get_rank()
    if "by peer" in str(error):  # gloo's words when the other end of a collective went away
        print(f"error: rank {rank} lost a peer in a collective ({str(error).split('. ')[0].split('] ')[-1]}); "
              f"another rank failed first", file=sys.stderr, flush=True)
    else:
        print(f"rank {rank} failed:", file=sys.stderr)
        traceback.print_exc()
    ps.exit_now(1)  # no teardown: peers are stuck in a collective this rank will never join


@record  # a bug's traceback (not a user error's: those exit with one line) reaches torchrun's summary
def cli():
    run_cli(main)


if __name__ == "__main__":
    cli()
