"""Train the ToyModel on one device: the serial baseline.

    python train.py --data_dir data --input_size 64 --batch_size 32 \\
        --init_lr 0.001 --momentum 0.9 --num_iterations 200 --update_freq 10

Flags, the model, the data, and the loop: one step per batch, as nanoGPT's.
parallel_train.py runs the same model with the same flags and adds, in its own
loop, what tensor parallelism needs; operations.py keeps errors and signals out
of the way.
"""

import math
import os

import torch
import torch.nn.functional as F

from model import ToyModel
from rng_tracker import model_parallel_manual_seed
from training.checkpointing import StateDictError, gather_serial_state_dict, load_serial_state_dict
from training.data import iterate_batches, load_dataset, load_token_dataset, to_tensors
from training.logbook import Logbook
from training.metrics import MetricsWriter, run_config, save_model
from training.operations import ArgumentParser, file_in_the_way, pin_float32_precision, run_cli
from transformer import ToyTransformer

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def get_args_parser(prog="train.py", description=__doc__.splitlines()[0], out_dir="runs/serial"):
    p = ArgumentParser(prog=prog, description=description)
    # The original's flags, same names; its bash scripts' values as defaults.
    p.add_argument("--input_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--init_lr", type=float, default=0.001)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--num_iterations", type=int, default=200)
    p.add_argument("--data_dir", default=None, help="default: data (data_transformer)")
    p.add_argument("--update_freq", type=int, default=50,
                   help="print the running train loss every N iterations")
    # Ours.
    p.add_argument("--hidden_size", type=int, default=None, help="default: 32 x input_size")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when there is a GPU (for every rank), else cpu")
    p.add_argument("--seed", type=int, default=1234,
                   help="seeds nn.Linear's init (same model for any TP size)")
    p.add_argument("--init_from", default=None, help="serial state_dict (.pt) to start from")
    p.add_argument("--eval_interval", type=int, default=50,
                   help="validation loss every N iterations and at the end")
    p.add_argument("--out_dir", default=None,
                   help=f"where metrics.csv and model.pt go; default: {out_dir} "
                        f"({out_dir.replace('runs/', 'runs/transformer_')})")
    # The toy transformer (transformer.py): the rest of Sec. 3.
    p.add_argument("--model", choices=["toy", "transformer"], default="toy")
    p.add_argument("--vocab_size", type=int, default=50, help="transformer: tokens")
    p.add_argument("--seq_length", type=int, default=16, help="transformer: tokens per sequence")
    p.add_argument("--num_attention_heads", type=int, default=4)
    p.add_argument("--num_layers", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.0, help="transformer: dropout probability")
    p.set_defaults(default_out_dir=out_dir)
    return p


def parse_args(parser, argv=None):
    args = parser.parse_args(argv)
    if args.hidden_size is None:
        args.hidden_size = 32 * args.input_size
    positive = ("input_size", "hidden_size", "batch_size", "num_iterations", "update_freq",
                "eval_interval", "vocab_size", "seq_length", "num_attention_heads", "num_layers")
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not (args.init_lr > 0 and math.isfinite(args.init_lr)):
        parser.error(f"--init_lr must be a positive number, got {args.init_lr}")
    if not 0 <= args.momentum < 1:
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    transformer = args.model == "transformer"
    if transformer and args.input_size % args.num_attention_heads != 0:
        parser.error(f"--input_size {args.input_size} is not divisible by "
                     f"--num_attention_heads {args.num_attention_heads}")
    args.data_dir = args.data_dir or ("data_transformer" if transformer else "data")
    default_out_dir = args.__dict__.pop("default_out_dir")
    if transformer:
        default_out_dir = default_out_dir.replace("runs/", "runs/transformer_")
    args.out_dir = args.out_dir or default_out_dir
    if args.init_from and not os.path.isfile(args.init_from):
        parser.error(f"--init_from {args.init_from}: no such file")
    for flag in ("out_dir", "save", "load"):  # directories (--save, --load: parallel_train.py's)
        path = getattr(args, flag, None)
        if path and (file := file_in_the_way(path)):
            parser.error(f"--{flag} {path}: {file} is a file; name a directory")
    args.torch_dtype = DTYPES[args.dtype]
    return args


def build_model(args, device, tensor_parallel=False, sequence_parallel=False):
    """The same model for every run: nn.Linear's init from --seed, or --init_from's weights.
    Built on the CPU; `device` is where it will run (dropout's streams live there)."""
    model_parallel_manual_seed(args.seed, device)  # and dropout's streams (rng_tracker.py)
    if args.model == "transformer":
        model = ToyTransformer(args.vocab_size, args.seq_length, args.input_size, args.hidden_size,
                               args.num_attention_heads, args.num_layers, tensor_parallel,
                               args.dropout, sequence_parallel, dtype=args.torch_dtype)
    else:
        model = ToyModel(args.input_size, args.hidden_size, tensor_parallel, sequence_parallel,
                         dtype=args.torch_dtype)
    if args.init_from:
        try:
            state_dict = torch.load(args.init_from, map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable file: a zip error, an unpickling error, ...
            raise StateDictError(f"--init_from {args.init_from} is not a state_dict saved with "
                                 f"torch.save ({type(e).__name__}); use a model.pt written by "
                                 "train.py") from None
        if not isinstance(state_dict, dict):
            raise StateDictError(f"--init_from {args.init_from} holds a "
                                 f"{type(state_dict).__name__}, not a state_dict; use a model.pt "
                                 "written by train.py")
        load_serial_state_dict(model, state_dict)
    return model


def load_data(args):
    """((inputs, targets) train, (inputs, targets) valid) as numpy arrays, checked."""
    if args.model == "transformer":
        return load_token_dataset(args.data_dir, args.vocab_size, args.seq_length, args.batch_size)
    return load_dataset(args.data_dir, args.input_size, args.batch_size)


@torch.no_grad()
def evaluate(model, inputs, targets, chunk_rows=1024):
    """The loss over a whole split, in chunks to bound activation memory: mean squared error, or
    the transformer's mean cross-entropy over every token."""
    model.eval()
    if isinstance(model, ToyTransformer):
        chunks = zip(inputs.split(chunk_rows), targets.split(chunk_rows))
        loss = sum(model.loss(model(x), y).item() * len(x) for x, y in chunks) / len(inputs)
    else:
        outputs = torch.cat([model(x)[:, 0] for x in inputs.split(chunk_rows)])
        loss = F.mse_loss(outputs, targets).item()
    model.train()
    return loss


def make_optimizer(model, args):
    return torch.optim.SGD(model.parameters(), lr=args.init_lr, momentum=args.momentum)


def train(model, optimizer, batches, logbook, args):
    """The training loop. parallel_train.py's adds what parallelism needs after backward."""
    model.train()
    for it in range(1, args.num_iterations + 1):
        inputs, targets = next(batches)
        optimizer.zero_grad(set_to_none=True)
        outputs = model(inputs)
        if args.model == "transformer":  # mean cross-entropy of the next token
            loss = model.loss(outputs, targets)
        else:
            loss = F.mse_loss(outputs[:, 0], targets)
        loss.backward()
        optimizer.step()
        logbook.step(it, loss)  # logging, validation, metrics.csv: logbook.py


def main():
    parser = get_args_parser()
    args = parse_args(parser)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU; use --device cpu (or auto)")
    precision = pin_float32_precision()
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model = build_model(args, device).to(device)
    optimizer = make_optimizer(model, args)
    (X, y), valid = load_data(args)
    # The whole (small) data set goes to the device once; a batch is then a slice of it.
    batches = iterate_batches(*to_tensors(X, y, args.torch_dtype, device), args.batch_size)
    valid = to_tensors(*valid, args.torch_dtype, device)

    config = run_config(args, device=str(device), tensor_model_parallel_size=1, **precision)
    metrics = MetricsWriter(args.out_dir, config)
    with Logbook(args, lambda: evaluate(model, *valid), metrics) as logbook:
        train(model, optimizer, batches, logbook, args)
    save_model(gather_serial_state_dict(model), args.out_dir)
    print(f"wrote {args.out_dir}/metrics.csv and {args.out_dir}/model.pt")


if __name__ == "__main__":
    run_cli(main)
