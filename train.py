"""Train the ToyModel on one device: the serial baseline.

    python train.py --data_dir data --input_size 64 --batch_size 32 \\
        --init_lr 0.001 --momentum 0.9 --num_iterations 200 --update_freq 10

parallel_train.py runs the same `train` loop on the tensor-parallel model;
everything that differs between the two lives there.
"""

import argparse
import math
import os
import sys

import torch
import torch.nn as nn

from data import DataError, iterate_batches, load_split, to_tensors
from metrics import MetricsWriter, save_config
from model import ToyModel
from parallel_layers import StateDictError, gather_serial_state_dict, load_serial_state_dict
import parallel_state as ps
from parallel_state import ParallelConfigError

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Mistakes a user can make: reported in one line, no traceback.
USER_ERRORS = (DataError, ParallelConfigError, StateDictError)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line that says what is wrong, instead of the whole usage text."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def get_args_parser(description=__doc__.splitlines()[0], out_dir="runs/serial"):
    p = ArgumentParser(description=description)
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
    if not args.init_lr > 0:
        parser.error(f"--init_lr must be positive, got {args.init_lr}")
    if not 0 <= args.momentum < 1:
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.init_from and not os.path.isfile(args.init_from):
        parser.error(f"--init_from {args.init_from}: no such file")
    args.torch_dtype = DTYPES[args.dtype]
    return args


def build_model(args, tensor_parallel=False):
    """The same model for every run: nn.Linear's init from --seed, or --init_from's weights."""
    torch.manual_seed(args.seed)
    model = ToyModel(args.input_size, args.hidden_size, tensor_parallel=tensor_parallel, dtype=args.torch_dtype)
    if args.init_from:
        load_serial_state_dict(model, torch.load(args.init_from, map_location="cpu", weights_only=True))
    return model


def check_data(X, y, args, split):
    if X.ndim != 2 or X.shape[1] != args.input_size:
        raise DataError(f"{split} inputs have shape {list(X.shape)} but --input_size is {args.input_size}; "
                        f"pass --input_size {X.shape[-1]} or recreate the data with prepare_data.py --input_size")
    if len(X) != len(y):
        raise DataError(f"{split} set has {len(X)} inputs but {len(y)} targets; recreate it with prepare_data.py")


@torch.no_grad()
def evaluate(model, inputs, targets, chunk_rows=1024):
    """Mean squared error over a whole split, in chunks to bound activation memory."""
    model.eval()
    outputs = torch.cat([model(x)[:, 0] for x in inputs.split(chunk_rows)])
    model.train()
    return nn.functional.mse_loss(outputs, targets).item()


def train(model, args, batches, valid, log_prefix="", gather_losses=lambda t: t[None], metrics=None):
    """The training loop shared by train.py and parallel_train.py.

    batches: endless iterator of (inputs, targets) tensors.
    valid: (inputs, targets) of the validation set.
    gather_losses: maps this rank's recent losses, shape (k,), to every
        tensor-parallel rank's, shape (tp, k); they must agree exactly.
    metrics: a MetricsWriter, or None on ranks that don't write.
    log_prefix: put before each printed line; None prints nothing.
    Returns the rows (iteration, train_loss, valid_loss or None) and the
    collectives of iteration 1, as (calls, bytes) counters.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=args.init_lr, momentum=args.momentum)
    loss_fn = nn.MSELoss()
    rows, pending, running = [], [], 0.0
    model.train()
    for it in range(1, args.num_iterations + 1):
        if it == 1:
            ps.reset_comm_stats()
        inputs, targets = next(batches)
        optimizer.zero_grad(set_to_none=True)
        outputs = model(inputs)
        loss = loss_fn(outputs[:, 0], targets)
        loss.backward()
        optimizer.step()
        if it == 1:
            first_step_comm = (ps.comm_calls.copy(), ps.comm_bytes.copy())

        pending.append(loss.item())
        running += pending[-1]
        valid_loss = None
        if it % args.eval_interval == 0 or it == args.num_iterations:
            valid_loss = evaluate(model, *valid)
        rows.append([it, pending[-1], valid_loss])
        if it % args.update_freq == 0:
            if log_prefix is not None:
                log(f"{log_prefix}Iter {it} Train Loss {running:.3f}")
            running = 0.0
        if valid_loss is not None and log_prefix is not None:
            log(f"{log_prefix}Iter {it} Valid Loss {valid_loss:.6f}")
        if it % args.update_freq == 0 or it == args.num_iterations:
            rank_losses = gather_losses(torch.tensor(pending, dtype=torch.float64))
            if metrics:  # written before the check, so a disagreement is on disk to look at
                metrics.write(rows[-len(pending):], rank_losses)
            check_ranks_agree(rank_losses, it)
            pending = []
    if metrics:
        metrics.close()
    return rows, first_step_comm


def log(line):
    """One write per line, so lines from several ranks on one terminal don't interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def check_ranks_agree(losses, iteration):
    """Every tensor-parallel rank computes the loss from the same all-reduced output: bitwise equal."""
    if not torch.equal(losses, losses[:1].expand_as(losses)):
        raise RuntimeError(f"tensor-parallel ranks disagree on the loss by iteration {iteration}: "
                           f"{losses[:, -1].tolist()}; the replicated parameters have drifted apart")


def main():
    args = parse_args(get_args_parser())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args).to(device)
    X, y = load_split(args.data_dir, "train")
    Xv, yv = load_split(args.data_dir, "valid")
    check_data(X, y, args, "train")
    check_data(Xv, yv, args, "valid")
    batches = (to_tensors(xb, yb, args.torch_dtype, device) for xb, yb in iterate_batches(X, y, args.batch_size))
    valid = to_tensors(Xv, yv, args.torch_dtype, device)

    save_config(args.out_dir, args, device=str(device), tensor_model_parallel_size=1)
    rows, _ = train(model, args, batches, valid, metrics=MetricsWriter(args.out_dir))
    torch.save(gather_serial_state_dict(model), os.path.join(args.out_dir, "model.pt"))
    if not math.isfinite(rows[-1][1]):
        print(f"warning: the final train loss is {rows[-1][1]}; lower --init_lr", file=sys.stderr)
    print(f"wrote {args.out_dir}/metrics.csv and {args.out_dir}/model.pt")


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
