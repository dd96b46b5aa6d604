"""Train the ToyModel on one device: the serial baseline.

    python train.py --data_dir data --input_size 64 --batch_size 32 \\
        --init_lr 0.001 --momentum 0.9 --num_iterations 200 --update_freq 10

parallel_train.py runs the same `train` loop on the tensor-parallel model;
everything that differs between the two lives there.
"""

import argparse
import math
import os
import signal
import sys
import threading
import time

import torch
import torch.nn as nn

import parallel_state as ps
from checkpointing import CheckpointError
from data import DataError, iterate_batches, load_dataset, to_tensors
from metrics import MetricsWriter, run_config, save_model
from model import ToyModel
from parallel_layers import StateDictError, gather_serial_state_dict, load_serial_state_dict
from parallel_state import ParallelConfigError

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def pin_float32_precision() -> dict:
    """Full-precision float32 matmuls and convolutions: TF32 off, in serial and parallel runs alike.

    On Ampere and later GPUs, TF32 (enabled by torch.set_float32_matmul_precision("high")
    or by an image that sets TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1) rounds matmul inputs to
    10 mantissa bits: serial and tensor-parallel float32 curves then differ by ~1e-3
    instead of round-off (~1e-6), and the comparison says nothing. Returns what
    config.json records.
    """
    override = os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")
    if override not in (None, "0"):
        os.environ["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] = "0"  # read by torch at its first CUDA matmul
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    if torch.backends.cuda.matmul.allow_tf32:  # torch read the override before we could unset it
        raise ParallelConfigError("TF32 could not be switched off (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE="
                                  f"{override} was read already); unset it before starting")
    return dict(float32_matmul_precision="highest (TF32 off)",
                tf32_override_in_environment=override)


class TrainingStopped(RuntimeError):
    """Training cannot go on (the loss is not finite, or ranks disagree); the message says why."""


# What a user can cause: reported in one line, without a traceback.
USER_ERRORS = (DataError, ParallelConfigError, StateDictError, TrainingStopped, CheckpointError)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line that says what is wrong, instead of the whole usage text; once, from rank 0."""
        rank0 = os.environ.get("RANK", "0") == "0"
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if rank0 else None)


def get_args_parser(prog="train.py", description=__doc__.splitlines()[0], out_dir="runs/serial"):
    p = ArgumentParser(prog=prog, description=description)
    # The original's flags, same names; its bash scripts' values as defaults.
    p.add_argument("--input_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--init_lr", type=float, default=0.001)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--num_iterations", type=int, default=200)
    p.add_argument("--data_dir", default="data")
    p.add_argument("--update_freq", type=int, default=50, help="print the running train loss every N iterations")
    # Ours.
    p.add_argument("--hidden_size", type=int, default=None, help="default: 32 x input_size")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when there is a GPU (for every rank), else cpu")
    p.add_argument("--seed", type=int, default=1234, help="seeds nn.Linear's init (same model for any TP size)")
    p.add_argument("--init_from", default=None, help="serial state_dict (.pt) to start from")
    p.add_argument("--eval_interval", type=int, default=50, help="validation loss every N iterations and at the end")
    p.add_argument("--out_dir", default=out_dir, help="where metrics.csv and model.pt go")
    return p


def parse_args(parser, argv=None):
    args = parser.parse_args(argv)
    if args.hidden_size is None:
        args.hidden_size = 32 * args.input_size
    for name in ("input_size", "hidden_size", "batch_size", "num_iterations", "update_freq", "eval_interval"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not (args.init_lr > 0 and math.isfinite(args.init_lr)):
        parser.error(f"--init_lr must be a positive number, got {args.init_lr}")
    if not 0 <= args.momentum < 1:
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.init_from and not os.path.isfile(args.init_from):
        parser.error(f"--init_from {args.init_from}: no such file")
    args.torch_dtype = DTYPES[args.dtype]
    return args


def build_model(args, tensor_parallel=False):
    """The same model for every run: nn.Linear's init from --seed, or --init_from's weights."""
    torch.manual_seed(args.seed)
    model = ToyModel(args.input_size, args.hidden_size, tensor_parallel=tensor_parallel,
                     sequence_parallel=getattr(args, "sequence_parallel", False), dtype=args.torch_dtype)
    if args.init_from:
        try:
            state_dict = torch.load(args.init_from, map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable file: a zip error, an unpickling error, ...
            raise StateDictError(f"--init_from {args.init_from} is not a state_dict saved with torch.save "
                                 f"({type(e).__name__}); use a model.pt written by train.py") from None
        if not isinstance(state_dict, dict):
            raise StateDictError(f"--init_from {args.init_from} holds a {type(state_dict).__name__}, "
                                 f"not a state_dict; use a model.pt written by train.py")
        load_serial_state_dict(model, state_dict)
    return model


@torch.no_grad()
def evaluate(model, inputs, targets, chunk_rows=1024):
    """Mean squared error over a whole split, in chunks to bound activation memory."""
    model.eval()
    outputs = torch.cat([model(x)[:, 0] for x in inputs.split(chunk_rows)])
    model.train()
    return nn.functional.mse_loss(outputs, targets).item()


def make_optimizer(model, args):
    return torch.optim.SGD(model.parameters(), lr=args.init_lr, momentum=args.momentum)


def train(model, args, batches, valid, log_prefix="", gather_losses=lambda t: t[None], metrics=None,
          optimizer=None, start_iteration=0, after_backward=lambda loss: loss, save_checkpoint=None,
          loss_fn=nn.functional.mse_loss, evaluate_fn=None):
    """The training loop shared by train.py and parallel_train.py.

    batches: endless iterator of (inputs, targets) tensors, from batch start_iteration on.
    valid: (inputs, targets) of the validation set.
    gather_losses: maps this rank's recent losses, shape (k,), to every
        tensor-parallel rank's, shape (tp, k); they must agree exactly.
    metrics: a MetricsWriter, or None on ranks that don't write.
    log_prefix: put before each printed line; None prints nothing.
    optimizer, start_iteration: a resumed run's; by default a new SGD from iteration 0.
    after_backward: takes this step's loss once gradients exist and returns the
        loss to report (data parallelism averages both there).
    save_checkpoint: called as save_checkpoint(iteration, optimizer) every
        --save_interval iterations, after that iteration's metrics are on disk.
    loss_fn, evaluate_fn: this rank's loss of a batch, and the validation loss
        (sequence parallelism changes both); by default MSE and evaluate().
    Returns the rows (iteration, train_loss, valid_loss or None) and the
    collectives of the first step, as parallel_state.comm_stats() gives them.
    """
    optimizer = optimizer or make_optimizer(model, args)
    evaluate_fn = evaluate_fn or evaluate
    rows, pending, unwritten, running = [], [], [], 0.0
    first_step_comm = {}  # stays empty if no step is left to run
    model.train()
    try:
        for it in range(start_iteration + 1, args.num_iterations + 1):
            first = it == start_iteration + 1
            if first:
                ps.reset_comm_stats()
            inputs, targets = next(batches)
            optimizer.zero_grad(set_to_none=True)
            outputs = model(inputs)
            loss = loss_fn(outputs[:, 0], targets)
            loss.backward()
            loss = after_backward(loss)
            optimizer.step()
            if first:
                first_step_comm = ps.comm_stats()
            # The loss stays on the device until a log point: reading it every step would make
            # the CPU wait for the GPU (and the collectives) each time.
            pending.append(loss.detach())

            evaluating = it % args.eval_interval == 0 or it == args.num_iterations
            saving = save_checkpoint is not None and it % args.save_interval == 0
            if not (it % args.update_freq == 0 or evaluating or saving):
                continue
            losses = torch.stack(pending).to("cpu", torch.float64)  # one device-to-host copy
            diverged = next((k for k, v in enumerate(losses.tolist()) if not math.isfinite(v)), None)
            if diverged is not None:  # the same on every rank: they share the loss
                losses = losses[:diverged + 1]
            new_rows = [[it - len(pending) + 1 + k, v, None] for k, v in enumerate(losses.tolist())]
            rows += new_rows
            pending, unwritten = [], new_rows
            if evaluating and diverged is None:
                rows[-1][2] = evaluate_fn(model, *valid)
            for row in new_rows:
                running += row[1]
                if row[0] % args.update_freq == 0:
                    if log_prefix is not None:
                        log(f"{log_prefix}Iter {row[0]} Train Loss {running:.3f}")
                    running = 0.0
            if rows[-1][2] is not None and log_prefix is not None:
                log(f"{log_prefix}Iter {it} Valid Loss {rows[-1][2]:.6f}")
            rank_losses = gather_losses(losses)
            if metrics:  # written before the check, so a disagreement is on disk to look at
                metrics.write(new_rows, rank_losses)
            unwritten = []
            check_ranks_agree(rank_losses, rows[-1][0])
            if diverged is not None:
                raise TrainingStopped(f"the train loss is {rows[-1][1]} at iteration {rows[-1][0]}: training "
                                      f"diverged; lower --init_lr (now {args.init_lr:g}). Metrics up to it are "
                                      f"in {os.path.join(args.out_dir, 'metrics.csv')}; no model.pt was written")
            if saving:
                if metrics:
                    metrics.flush()  # a resumed run keeps exactly the rows up to its checkpoint
                save_checkpoint(it, optimizer)
    finally:
        if metrics:  # every row so far reaches the disk, however the loop ends
            # Interrupted before a log point wrote them: no collective now, so no per-rank losses.
            first_pending = rows[-1][0] + 1 if rows else start_iteration + 1
            unwritten += [[first_pending + k, float(t), None] for k, t in enumerate(pending)]
            if unwritten:
                metrics.write(unwritten, rank_losses=None)
            metrics.close()
    return rows, first_step_comm


def log(line):
    """One write per line, so lines from several ranks on one terminal don't interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def check_ranks_agree(losses, iteration):
    """Every tensor-parallel rank computes the loss from the same all-reduced output: bitwise equal."""
    bits = losses.view(torch.int64)  # bit patterns: a NaN on every rank is agreement too
    if not torch.equal(bits, bits[:1].expand_as(bits)):
        raise TrainingStopped(f"tensor-parallel ranks disagree on the loss by iteration {iteration}: "
                           f"{losses[:, -1].tolist()}; the replicated parameters have drifted apart")


class Terminated(BaseException):
    """SIGTERM (torchrun stopping its workers, or `kill`): unwind, so metrics reach the disk."""


def _terminate(signum, frame):
    raise Terminated()


STUCK_GRACE_S = 2.0


def _leave_if_stuck_after_a_signal():
    """A thread that ends the process when a signal's Python handler can't run.

    Python runs signal handlers between bytecodes, in the main thread. A rank
    whose peer died under NCCL is blocked inside a CUDA sync (NCCL reports no
    "connection reset" as gloo does), so torchrun's SIGTERM would wait out its
    30 s grace. The C-level handler still writes the signal number to the
    wakeup fd; this thread reads it, gives the main thread STUCK_GRACE_S to
    unwind normally, and otherwise leaves with one line.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch():
        signum = os.read(read_fd, 1)[0]
        time.sleep(STUCK_GRACE_S)
        print(f"error: rank {os.environ.get('RANK', 0)} was still inside a collective {STUCK_GRACE_S:g} s after "
              f"{signal.Signals(signum).name} (a peer is gone); leaving", file=sys.stderr, flush=True)
        ps.exit_now(128 + signum)
    threading.Thread(target=watch, daemon=True).start()


def run_cli(main):
    """Run main(); a user error or Ctrl-C ends it with one line and a non-zero exit status.

    In a parallel run every rank reaches the same error, so rank 0 says it;
    an error that only some ranks met (a file they can't read) is said by
    the first of them.
    """
    rank0 = os.environ.get("RANK", "0") == "0"
    signal.signal(signal.SIGTERM, _terminate)
    if "RANK" in os.environ:  # under torchrun: peers can leave this rank stuck in a collective
        _leave_if_stuck_after_a_signal()
    try:
        main()
    except USER_ERRORS as e:
        if getattr(e, "reported_by_this_rank", rank0):
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (KeyboardInterrupt, Terminated) as e:
        if rank0 and isinstance(e, KeyboardInterrupt):
            print("interrupted", file=sys.stderr, flush=True)
        code = 130 if isinstance(e, KeyboardInterrupt) else 128 + signal.SIGTERM
        if torch.distributed.is_initialized():
            ps.exit_now(code)  # peers may be mid-collective: no barrier, no teardown
        sys.exit(code)


def main():
    parser = get_args_parser()
    args = parse_args(parser)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU; use --device cpu (or auto)")
    precision = pin_float32_precision()
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model = build_model(args).to(device)
    (X, y), valid = load_dataset(args.data_dir, args.input_size, args.batch_size)
    # The whole (small) data set goes to the device once; a batch is then a slice of it.
    batches = iterate_batches(*to_tensors(X, y, args.torch_dtype, device), args.batch_size)
    valid = to_tensors(*valid, args.torch_dtype, device)

    metrics = MetricsWriter(args.out_dir, run_config(args, device=str(device), tensor_model_parallel_size=1,
                                                     **precision))
    train(model, args, batches, valid, metrics=metrics)
    save_model(gather_serial_state_dict(model), args.out_dir)
    print(f"wrote {args.out_dir}/metrics.csv and {args.out_dir}/model.pt")


if __name__ == "__main__":
    run_cli(main)
