"""The flags of train.py and parallel_train.py: the original's names and values, each model's
defaults, and every check that can be made before any work, identically on every rank."""

import math
import os
import sys
from typing import Callable, NamedTuple

import torch

from training.checkpointing import TRACKER
from training.operations import (
    ArgumentParser,
    check_output,
    file_in_the_way,
    given_flags,
    single_process_env,
)

MAX_ITERATIONS = 10**12
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def get_args_parser(prog="train.py", description="Train the ToyModel on one device: the serial "
                    "baseline.", out_dir="runs/serial"):
    p = ArgumentParser(prog=prog, description=description)
    # The original's flags, same names; its bash scripts' values as defaults.
    p.add_argument("--input_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--init_lr", type=float, default=None,
                   help="default: 0.001 (the original's; the transformer: 0.01)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD's")
    p.add_argument("--num_iterations", type=int, default=200)
    p.add_argument("--data_dir", default=None, help="default: data (data_transformer)")
    p.add_argument("--update_freq", type=int, default=50,
                   help="every N iterations print the sum of the last N train losses (the "
                        "original's 'Train Loss'; metrics.csv has each iteration's)")
    # Ours.
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="sgd: SGD with --momentum (the original's); adam: Adam (Megatron's "
                        "default) with --adam_beta1/--adam_beta2/--adam_eps and --weight_decay "
                        "(AdamW), fp32 moments")
    p.add_argument("--weight_decay", type=float, default=None,
                   help="weight decay of the weights (2 or more dims), not of the biases and "
                        "LayerNorms (1-D), as Megatron's --weight-decay; default: 0.01 under "
                        "--optimizer adam (Megatron's; decoupled, AdamW), 0 under sgd (the "
                        "original's runs; given, SGD adds it to the gradient, L2, as Megatron's "
                        "SGD). 0: one parameter group, torch's Adam or SGD as before")
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_eps", type=float, default=1e-8)
    p.add_argument("--hidden_size", type=int, default=None, help="default: 32 x input_size")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="bfloat16: bf16 model and activations, fp32 main parameters, gradients, "
                        "momentum and loss (training/mixed_precision.py)")
    p.add_argument("--clip_grad", type=float, default=None, metavar="NORM",
                   help="clip gradients to this global norm (off by default); the norm is logged "
                        "in metrics.csv (training/clip_grads.py)")
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
    p.add_argument("--micro_batch_size", type=int, default=None, metavar="B",
                   help="each replica's batch as micro-batches of B rows whose gradients add up "
                        "before the step (Megatron's; default: one micro-batch); the pipeline "
                        "runs them through its stages")
    p.add_argument("--recompute_granularity", choices=["full", "selective"], default=None,
                   help="transformer: recompute in backward each block (full) or its attention "
                        "core (selective) instead of keeping their activations (recompute.py)")
    # Mixture of experts (core/transformer/moe/), Megatron's names.
    p.add_argument("--num_experts", type=int, default=None, metavar="E",
                   help="transformer: each MLP (every --moe_layer_freq-th block's) becomes E "
                        "experts and a router that sends each token to its top k")
    p.add_argument("--moe_router_topk", type=int, default=2, metavar="K")
    p.add_argument("--moe_ffn_hidden_size", type=int, default=None,
                   help="each expert's hidden size (default --hidden_size)")
    p.add_argument("--moe_layer_freq", type=int, default=1,
                   help="every N-th block's MLP is routed, from the first (default: every one)")
    p.add_argument("--moe_router_load_balancing_type",
                   choices=["aux_loss", "global_aux_loss", "none"], default="aux_loss",
                   help="aux_loss: Switch's load-balancing loss over each micro-batch's tokens, "
                        "weighted by --moe_aux_loss_coeff; global_aux_loss: over the global "
                        "batch's (every data-parallel rank's); none")
    p.add_argument("--moe_aux_loss_coeff", type=float, default=0.0)
    p.add_argument("--moe_z_loss_coeff", type=float, default=None,
                   help="ST-MoE's router z-loss, weighted by this (off by default)")
    p.add_argument("--moe_expert_capacity_factor", type=float, default=None,
                   help="each expert takes at most ceil(tokens x K / E x this) tokens, the rest "
                        "dropped (default: dropless)")
    p.set_defaults(default_out_dir=out_dir)
    return p


def parse_args(parser, argv=None):
    args = parser.parse_args(argv)
    if args.hidden_size is None:
        args.hidden_size = 32 * args.input_size
    positive = ("input_size", "hidden_size", "batch_size", "num_iterations", "update_freq",
                "eval_interval", "vocab_size", "seq_length", "num_attention_heads", "num_layers",
                "moe_router_topk", "moe_layer_freq")
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.num_iterations > MAX_ITERATIONS:  # a typo, not a run: at 1 ms a step, 30 years
        parser.error(f"--num_iterations must be at most {MAX_ITERATIONS:,}, got "
                     f"{args.num_iterations:,}")
    transformer = args.model == "transformer"
    if args.init_lr is None:  # each model's lr, one it learns at in 200 iterations
        args.init_lr = 0.01 if transformer else 0.001
    if not (args.init_lr > 0 and math.isfinite(args.init_lr)):
        parser.error(f"--init_lr must be a positive number, got {args.init_lr}")
    if not 0 <= args.momentum < 1:
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}")
    for flag in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, flag) < 1:
            parser.error(f"--{flag} must be in [0, 1), got {getattr(args, flag)}")
    if not (args.adam_eps > 0 and math.isfinite(args.adam_eps)):
        parser.error(f"--adam_eps must be a positive number, got {args.adam_eps}")
    if args.weight_decay is None:  # Megatron's under Adam; the default SGD runs stay the original's
        args.weight_decay = 0.01 if args.optimizer == "adam" else 0.0
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        parser.error(f"--weight_decay must be a non-negative number, got {args.weight_decay}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be an integer from 0 to 2**63 - 1, got {args.seed}")
    clip = args.clip_grad
    if clip is not None and not (clip > 0 and math.isfinite(clip)):
        parser.error(f"--clip_grad must be a positive finite number, got {clip} (leave it out to "
                     "train without clipping)")
    main = "float64" if args.dtype == "float64" else "float32"  # the gradients' (main) dtype
    if clip is not None and clip < torch.finfo(DTYPES[main]).tiny:
        parser.error(f"--clip_grad {clip} is below the smallest normal {main} "
                     f"({torch.finfo(DTYPES[main]).tiny:.1e}): every update would round to 0; "
                     "give a larger NORM")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    check_combinations(parser, args, MODEL_RULES)
    if transformer and args.input_size % args.num_attention_heads != 0:
        parser.error(f"--input_size {args.input_size} is not divisible by "
                     f"--num_attention_heads {args.num_attention_heads}")
    args.data_dir = args.data_dir or ("data_transformer" if transformer else "data")
    default_out_dir = args.__dict__.pop("default_out_dir")
    if transformer:
        default_out_dir = default_out_dir.replace("runs/", "runs/transformer_")
    args.out_dir = args.out_dir or default_out_dir
    if args.init_from and os.path.isdir(args.init_from):
        parser.error(f"--init_from {args.init_from} is a directory; name a model.pt file")
    if args.init_from and not os.path.isfile(args.init_from):
        parser.error(f"--init_from {args.init_from}: no such file")
    for flag in ("out_dir", "save"):  # written to (--save: parallel_train.py's), before any work
        if path := getattr(args, flag, None):
            check_output(parser, f"--{flag}", path, "dir")
    save = getattr(args, "save", None)
    if save and os.path.isfile(os.path.join(save, TRACKER)) and not (
            getattr(args, "load", None) and os.path.abspath(args.load) == os.path.abspath(save)):
        parser.error(f"--save {save} holds a run's checkpoints already; resume that run with "
                     f"--load {save}, or name a new directory")
    if load := getattr(args, "load", None):
        if file := file_in_the_way(load):
            parser.error(f"--load {load}: {file} is a file; name a directory")
        if not os.path.isdir(load) and os.path.abspath(load) != os.path.abspath(args.save or ""):
            parser.error(f"--load {load}: no such directory (to restart a run from its own "
                         "checkpoints whatever they are, pass the same directory to --save)")
    args.torch_dtype = DTYPES[args.dtype]  # the model's parameters and activations
    # The optimizer's parameters and the loss: fp32 under bf16 (training/mixed_precision.py).
    args.main_dtype = torch.float32 if args.dtype == "bfloat16" else args.torch_dtype
    return args


# The flags of one script only: given to the other, they get a line that says whose they are.
PARALLEL_ONLY = ("--tensor_model_parallel_size", "--distributed_timeout_minutes",
                 "--distributed_backend", "--sequence_parallel", "--tp_reduce_dtype", "--save",
                 "--save_interval", "--load", "--distribute_saved_activations",
                 "--pipeline_model_parallel_size", "--pipeline_schedule",
                 "--virtual_pipeline_model_parallel_size", "--use_distributed_optimizer",
                 "--context_parallel_size", "--cp_comm_type", "--cp_load_balance",
                 "--overlap_grad_reduce", "--ddp_bucket_size", "--overlap_param_gather",
                 "--overlap_p2p_comm", "--expert_model_parallel_size",
                 "--expert_tensor_parallel_size", "--moe_token_dispatcher_type")
SERIAL_ONLY = ("--reorder_seed",)


def refuse_the_other_scripts_flags(parser, argv, flags, whose):
    for arg in sys.argv[1:] if argv is None else argv:
        if str(arg).split("=")[0] in flags:
            parser.error(f"{str(arg).split('=')[0]} is {whose}")


def get_args(argv=None):
    """train.py's flags, checked."""
    parser = get_args_parser()
    refuse_the_other_scripts_flags(parser, argv, PARALLEL_ONLY, "parallel_train.py's (bash "
                                   "bash_parallel_train.sh); train.py trains on one device")
    parser.add_argument("--reorder_seed", type=int, default=None, metavar="K",
                        help="the same model with its sums in another order (hidden units and "
                             "heads permuted by K): a run that differs from the plain one by "
                             "round-off only, for compare_runs.py --noise (training/reorder.py)")
    args = parse_args(parser, argv)
    if args.reorder_seed is not None:
        if not 0 <= args.reorder_seed < 2**63:
            parser.error(f"--reorder_seed must be an integer from 0 to 2**63 - 1, got "
                         f"{args.reorder_seed}")
        if args.micro_batch_size is None and (args.batch_size < 2 or args.batch_size % 2):
            parser.error("--reorder_seed takes each batch as two micro-batches: give it an even "
                         "--batch_size")
        if args.micro_batch_size is None and args.num_experts and (
                args.moe_aux_loss_coeff or args.moe_expert_capacity_factor is not None):
            parser.error("--reorder_seed with --num_experts: it splits the batch in two, and the "
                         "load-balancing loss and the capacity are per micro-batch, so the runs "
                         "would differ by more than round-off; give both runs --micro_batch_size "
                         f"{args.batch_size // 2}")
        if args.micro_batch_size is None:
            args.micro_batch_size = args.batch_size // 2
        if args.model == "transformer" and args.dropout > 0:
            parser.error("--reorder_seed with --dropout: the attention's dropout masks would "
                         "fall on other heads, which is another run, not round-off; use "
                         "--dropout 0")
    check_micro_batches(parser, args, args.batch_size)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU; use --device cpu (or auto)")
    check_the_flags_given(parser, args, argv)
    return args


def get_parallel_args(argv=None):
    """Flags, checked before any process-group work, identically on every rank."""
    parser = get_args_parser("parallel_train.py", "Train the ToyModel with Megatron-style tensor "
                             "parallelism, under torchrun.", out_dir="runs/tensor_parallel")
    refuse_the_other_scripts_flags(parser, argv, SERIAL_ONLY, "train.py's: a reordered run is "
                                   "the serial one (python train.py ... --reorder_seed K)")
    parser.add_argument("--tensor_model_parallel_size", type=int, default=2)
    parser.add_argument("--distributed_timeout_minutes", type=float, default=10.0)
    parser.add_argument("--distributed_backend", choices=["auto", "nccl", "gloo"], default="auto",
                        help="auto: nccl when every rank of the job has a GPU of its own, else "
                             "gloo (said in "
                             "one line when GPUs are there)")
    parser.add_argument("--sequence_parallel", action="store_true",
                        help="outside the split region each rank keeps only its rows (Korthikanti "
                             "et al., 2022)")
    parser.add_argument("--distribute_saved_activations", action="store_true",
                        help="with --recompute_granularity full: each rank keeps 1/TP of each "
                             "block's input, all-gathered before it runs again (Megatron's flag; "
                             "off, as there: the input is kept whole)")
    parser.add_argument("--tp_reduce_dtype", choices=["activation", "float32"],
                        default="activation",
                        help="the dtype the tensor-parallel all-reduces and reduce-scatters sum "
                             "bf16 activations in: their own (as Megatron) or float32 (twice the "
                             "bytes)")
    parser.add_argument("--pipeline_model_parallel_size", type=int, default=1, metavar="P",
                        help="split the model's layers into P stages (Narayanan et al., 2021; "
                             "the toy model: 2, the MLP | fc)")
    parser.add_argument("--pipeline_schedule", choices=["1f1b", "gpipe"], default="1f1b",
                        help="the micro-batches' order through the stages (schedules.py)")
    parser.add_argument("--virtual_pipeline_model_parallel_size", type=int, default=None,
                        metavar="V", help="transformer: V chunks of blocks per stage, the "
                                          "interleaved 1F1B schedule")
    parser.add_argument("--use_distributed_optimizer", action="store_true",
                        help="each data-parallel replica keeps 1/d of the main parameters and the "
                             "optimizer's state: gradients reduce-scattered, parameters "
                             "all-gathered (Megatron's flag; ZeRO stage 1; distrib_optimizer.py)")
    parser.add_argument("--context_parallel_size", type=int, default=1, metavar="C",
                        help="transformer: each of C ranks holds 1/C of every sequence's tokens "
                             "through the whole network; attention fetches the others' keys and "
                             "values (Megatron's flag; core/context_parallel/)")
    parser.add_argument("--cp_comm_type", choices=["p2p", "all_gather", "a2a"], default="p2p",
                        help="how attention meets the other context ranks' tokens: p2p, a ring "
                             "of K/V blocks (Ring Attention); all_gather, K/V gathered whole "
                             "(Llama 3); a2a, heads traded for tokens (DeepSpeed-Ulysses)")
    parser.add_argument("--cp_load_balance", choices=["on", "off"], default="on",
                        help="on: the sequence in 2C chunks, rank r keeps r and 2C-1-r, the same "
                             "causal work on every rank (Megatron's); off: rank r keeps chunk r "
                             "of C")
    parser.add_argument("--overlap_grad_reduce", action="store_true",
                        help="the data-parallel gradient average in buckets, each launched "
                             "during backward once its gradients are complete (Megatron's flag; "
                             "core/distributed/param_and_grad_buffer.py)")
    parser.add_argument("--ddp_bucket_size", type=int, default=None, metavar="N",
                        help="elements per bucket of --overlap_grad_reduce (default Megatron's: "
                             "max(40M, 1M x the data-parallel size), one bucket for these models)")
    parser.add_argument("--overlap_param_gather", action="store_true",
                        help="--use_distributed_optimizer: each bucket's parameter all-gather "
                             "launched after the step, waited for just before the forward that "
                             "uses it (Megatron's flag; distrib_optimizer.py)")
    parser.add_argument("--overlap_p2p_comm", action="store_true",
                        help="interleaved pipeline: sends and receives posted, each waited for "
                             "only when its tensor is used (Megatron's overlap_p2p_comm, on by "
                             "default there; core/pipeline_parallel/schedules.py)")
    parser.add_argument("--expert_model_parallel_size", type=int, default=1, metavar="EP",
                        help="--num_experts: each MoE layer's experts spread over EP ranks, carved "
                             "out of the data-parallel ones; tokens sent to them and back "
                             "(Megatron's flag; core/transformer/moe/token_dispatcher.py)")
    parser.add_argument("--expert_tensor_parallel_size", type=int, default=1,
                        help="the experts' own tensor-parallel size: 1, whole experts, or the "
                             "tensor-parallel size, each expert's hidden units split over it")
    parser.add_argument("--moe_token_dispatcher_type", choices=["allgather", "alltoall"],
                        default="allgather",
                        help="how tokens reach their experts' ranks: every rank's gathered "
                             "(allgather, Megatron's default) or each sent where it goes "
                             "(alltoall, the counts first)")
    parser.add_argument("--save", default=None, help="checkpoint directory (Megatron layout)")
    parser.add_argument("--save_interval", type=int, default=None,
                        help="checkpoint every N iterations (default 100), and at the end")
    parser.add_argument("--load", default=None, help="resume from the newest checkpoint here, if "
                                                     "any")
    args = parse_args(parser, argv)
    if args.save_interval is not None and not args.save and os.environ.get("RANK", "0") == "0":
        print("note: --save_interval without --save: no checkpoints are written", flush=True)
    args.save_interval = 100 if args.save_interval is None else args.save_interval
    if args.save_interval <= 0:
        parser.error(f"--save_interval must be a positive integer, got {args.save_interval}")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if args.ddp_bucket_size is not None and args.ddp_bucket_size <= 0:
        parser.error(f"--ddp_bucket_size must be a positive integer, got {args.ddp_bucket_size}")
    cp = args.context_parallel_size
    for flag, size in (("tensor_model", tp), ("pipeline_model", pp), ("context", cp),
                       ("expert_model", args.expert_model_parallel_size),
                       ("expert_tensor", args.expert_tensor_parallel_size)):
        if size <= 0:
            parser.error(f"--{flag}_parallel_size must be a positive integer, got {size}")
    check_combinations(parser, args, FLAG_RULES)
    timeout = args.distributed_timeout_minutes
    if not (timeout > 0 and math.isfinite(timeout)):
        parser.error("--distributed_timeout_minutes must be a positive number, got "
                     f"{args.distributed_timeout_minutes}")
    if args.hidden_size % tp != 0:
        parser.error(f"--hidden_size {args.hidden_size} is not divisible by "
                     f"--tensor_model_parallel_size {tp}")
    if "RANK" not in os.environ:
        for flag, size in (("tensor_model", tp), ("context", cp)):
            if size > 1:
                parser.error(f"--{flag}_parallel_size {size} needs {size} processes: launch "
                             f"with torchrun --nproc_per_node {size} parallel_train.py ... (or "
                             "bash bash_parallel_train.sh)")
        single_process_env()
    world_size = int(os.environ["WORLD_SIZE"])
    if tp > world_size:
        parser.error(f"--tensor_model_parallel_size {tp} is larger than the {world_size} "
                     "processes launched; "
                     f"launch {tp} (torchrun --nproc_per_node {tp}, or GPUS_PER_NODE={tp} for the "
                     "bash script)")
    if world_size % tp != 0:
        parser.error(f"world size {world_size} is not divisible by --tensor_model_parallel_size "
                     f"{tp}; launch a multiple of {tp} processes")
    if world_size % (tp * pp) != 0:
        parser.error(f"world size {world_size} is not divisible by --tensor_model_parallel_size "
                     f"{tp} x --pipeline_model_parallel_size {pp}; launch a multiple of {tp * pp} "
                     "processes")
    if world_size % (tp * pp * cp) != 0:
        parser.error(f"world size {world_size} is not divisible by --tensor_model_parallel_size "
                     f"{tp} x --pipeline_model_parallel_size {pp} x --context_parallel_size {cp}; "
                     f"launch a multiple of {tp * pp * cp} processes")
    dp = args.data_parallel_size = world_size // (tp * pp * cp)
    stage, ep, etp = world_size // pp, args.expert_model_parallel_size, \
        args.expert_tensor_parallel_size
    if stage % (ep * etp) != 0:  # (parallel_state.expert_group_ranks says it too)
        parser.error(f"--expert_model_parallel_size {ep} x --expert_tensor_parallel_size {etp} "
                     f"does not divide the {stage} ranks of a pipeline stage (tensor x context x "
                     f"data parallel); choose sizes whose product divides {stage}")
    if args.batch_size % dp != 0:
        sizes = f"tensor-parallel size {tp}" if pp == cp == 1 else \
            f"(tensor-parallel size {tp} x pipeline-parallel size {pp}" + \
            (f" x context-parallel size {cp})" if cp > 1 else ")")
        parser.error(f"--batch_size {args.batch_size} is not divisible by the data-parallel size "
                     f"{dp} (world size {world_size} / {sizes}); each replica takes an equal "
                     "share")
    check_micro_batches(parser, args, args.batch_size // dp)
    check_combinations(parser, args, SIZE_RULES)
    check_the_flags_given(parser, args, argv)
    return args


def check_micro_batches(parser, args, replica_rows):
    """--micro_batch_size: m = replica_rows / B micro-batches (B defaults to all of them)."""
    if args.micro_batch_size is None:
        args.micro_batch_size = replica_rows
    if args.micro_batch_size <= 0:
        parser.error(f"--micro_batch_size must be a positive integer, got {args.micro_batch_size}")
    if replica_rows % args.micro_batch_size != 0:
        parser.error(f"--micro_batch_size {args.micro_batch_size} does not divide each replica's "
                     f"{replica_rows} rows of a batch (--batch_size {args.batch_size} / the "
                     "data-parallel size): choose one that does")
    args.num_microbatches = replica_rows // args.micro_batch_size


class Rule(NamedTuple):
    """A combination of flags that cannot run: the flags it reads (names in args), whether it
    refuses them, and the one line that says why and what to do."""
    reads: tuple
    refuses: Callable
    says: Callable


def check_combinations(parser, args, rules):
    for rule in rules:
        if rule.refuses(args):
            parser.error(rule.says(args))


# The combinations that cannot run, each stated once: the checks above read these tables, and so
# does the tests' covering array of configurations (tests/configurations.py), which must never
# pick one. MODEL_RULES: both scripts' flags; FLAG_RULES: parallel_train.py's, before the sizes
# are checked against the world; SIZE_RULES: after, with the data-parallel size and the number of
# micro-batches known.
MODEL_RULES = (
    Rule(("num_experts", "moe_ffn_hidden_size"),
         lambda a: any(v is not None and v <= 0 for v in (a.num_experts, a.moe_ffn_hidden_size)),
         lambda a: "--num_experts and --moe_ffn_hidden_size must be positive integers, got "
                   f"{a.num_experts} and {a.moe_ffn_hidden_size}"),
    Rule(("num_experts", "model"), lambda a: a.num_experts is not None and a.model == "toy",
         lambda a: f"--num_experts {a.num_experts} routes the transformer's MLPs; the toy model "
                   "is one MLP and fc: add --model transformer"),
    Rule(("num_experts", "moe_router_topk"),
         lambda a: a.num_experts is not None and not 1 <= a.moe_router_topk <= a.num_experts,
         lambda a: f"--moe_router_topk {a.moe_router_topk} of --num_experts {a.num_experts}: "
                   "a token goes to at least 1 expert and at most all of them"),
    Rule(("moe_expert_capacity_factor",),
         lambda a: a.moe_expert_capacity_factor is not None and a.moe_expert_capacity_factor <= 0,
         lambda a: f"--moe_expert_capacity_factor must be positive, got "
                   f"{a.moe_expert_capacity_factor} (leave it out for dropless)"),
    Rule(("dropout", "model"), lambda a: a.dropout and a.model == "toy",
         lambda a: f"--dropout {a.dropout} drops out in the transformer's blocks; the toy model "
                   "has no dropout (Fig. 3a's MLP without it): add --model transformer"),
    Rule(("recompute_granularity", "model"), lambda a: a.recompute_granularity and a.model == "toy",
         lambda a: f"--recompute_granularity {a.recompute_granularity} recomputes the "
                   "transformer's blocks; the toy model has none: add --model transformer"),
)
FLAG_RULES = (
    Rule(("expert_model_parallel_size", "num_experts"),
         lambda a: a.expert_model_parallel_size > 1 and (
             a.num_experts or 1) % a.expert_model_parallel_size != 0,
         lambda a: f"--expert_model_parallel_size {a.expert_model_parallel_size} spreads each "
                   "MoE layer's experts over as many ranks: " + (
                       f"--num_experts {a.num_experts} must be a multiple of it" if a.num_experts
                       else f"add --num_experts (a multiple of {a.expert_model_parallel_size})")),
    Rule(("expert_tensor_parallel_size", "tensor_model_parallel_size"),
         lambda a: a.expert_tensor_parallel_size not in (1, a.tensor_model_parallel_size),
         lambda a: f"--expert_tensor_parallel_size {a.expert_tensor_parallel_size}: each expert "
                   "is whole on its rank (1) or split over the tensor-parallel group "
                   f"(--tensor_model_parallel_size {a.tensor_model_parallel_size}) here "
                   "(docs/moe.md: what differs); choose one of the two"),
    Rule(("expert_tensor_parallel_size", "num_experts", "moe_ffn_hidden_size", "hidden_size"),
         lambda a: a.expert_tensor_parallel_size > 1 and (
             not a.num_experts or (a.moe_ffn_hidden_size or a.hidden_size)
             % a.expert_tensor_parallel_size != 0),
         lambda a: f"--expert_tensor_parallel_size {a.expert_tensor_parallel_size} splits each "
                   "expert's hidden units: " + (
                       "add --num_experts" if not a.num_experts else
                       f"{a.moe_ffn_hidden_size or a.hidden_size} (--moe_ffn_hidden_size) is not "
                       "divisible by it")),
    Rule(("num_experts", "tensor_model_parallel_size", "sequence_parallel"),
         lambda a: a.num_experts and a.tensor_model_parallel_size > 1 and not a.sequence_parallel,
         lambda a: f"--num_experts with --tensor_model_parallel_size "
                   f"{a.tensor_model_parallel_size}: each rank must route other tokens, its part "
                   "of the sequence (Megatron's rule too): add --sequence_parallel"),
    Rule(("tp_reduce_dtype", "dtype"), lambda a: a.tp_reduce_dtype == "float32" and
         a.dtype != "bfloat16",
         lambda a: f"--tp_reduce_dtype float32 changes bfloat16 runs only; this one is --dtype "
                   f"{a.dtype}"),
    Rule(("distribute_saved_activations", "recompute_granularity"),
         lambda a: a.distribute_saved_activations and a.recompute_granularity != "full",
         lambda a: "--distribute_saved_activations splits what full recomputation keeps: add "
                   "--recompute_granularity full"),
    Rule(("distribute_saved_activations", "sequence_parallel"),
         lambda a: a.distribute_saved_activations and a.sequence_parallel,
         lambda a: "--distribute_saved_activations with --sequence_parallel: the block's input is "
                   "this rank's rows already (Megatron refuses both); leave one out"),
    Rule(("model", "context_parallel_size"),
         lambda a: a.model == "toy" and a.context_parallel_size > 1,
         lambda a: f"--context_parallel_size {a.context_parallel_size} splits the transformer's "
                   "sequences; the toy model has none: add --model transformer"),
    Rule(("overlap_param_gather", "use_distributed_optimizer"),
         lambda a: a.overlap_param_gather and not a.use_distributed_optimizer,
         lambda a: "--overlap_param_gather hides the distributed optimizer's parameter "
                   "all-gather: add --use_distributed_optimizer (the plain optimizer gathers "
                   "nothing)"),
    Rule(("overlap_param_gather", "overlap_grad_reduce"),
         lambda a: a.overlap_param_gather and not a.overlap_grad_reduce,
         lambda a: "--overlap_param_gather gathers the buckets of --overlap_grad_reduce "
                   "(Megatron asks for both): add --overlap_grad_reduce"),
    Rule(("tp_reduce_dtype", "tensor_model_parallel_size"),
         lambda a: a.tp_reduce_dtype == "float32" and a.tensor_model_parallel_size == 1,
         lambda a: "--tp_reduce_dtype float32 widens the tensor-parallel sums; at "
                   "--tensor_model_parallel_size 1 there are none"),
)
SIZE_RULES = (
    Rule(("model", "pipeline_model_parallel_size"),
         lambda a: a.model == "toy" and a.pipeline_model_parallel_size > 2,
         lambda a: f"--pipeline_model_parallel_size {a.pipeline_model_parallel_size}: the toy "
                   "model has two stages (the MLP | fc); use 1 or 2, or --model transformer"),
    Rule(("virtual_pipeline_model_parallel_size", "pipeline_model_parallel_size", "model"),
         lambda a: a.virtual_pipeline_model_parallel_size is not None and (
             a.virtual_pipeline_model_parallel_size <= 1 or a.pipeline_model_parallel_size == 1
             or a.model == "toy"),
         lambda a: f"--virtual_pipeline_model_parallel_size "
                   f"{a.virtual_pipeline_model_parallel_size} gives each of the transformer's "
                   "pipeline stages several chunks of blocks: it needs --model transformer, "
                   "--pipeline_model_parallel_size 2 or more and a size of 2 or more"),
    Rule(("virtual_pipeline_model_parallel_size", "pipeline_schedule"),
         lambda a: a.virtual_pipeline_model_parallel_size is not None and
         a.pipeline_schedule == "gpipe",
         lambda a: "--virtual_pipeline_model_parallel_size runs the interleaved 1F1B schedule; "
                   "leave out --pipeline_schedule gpipe"),
    Rule(("virtual_pipeline_model_parallel_size", "num_microbatches",
          "pipeline_model_parallel_size"),
         lambda a: a.virtual_pipeline_model_parallel_size is not None and
         a.num_microbatches % a.pipeline_model_parallel_size != 0,
         lambda a: "the interleaved schedule runs micro-batches in groups of the pipeline size "
                   f"{a.pipeline_model_parallel_size} (as Megatron's): {a.num_microbatches} "
                   "micro-batches are not; choose --micro_batch_size so that they are"),
    Rule(("model", "num_layers", "pipeline_model_parallel_size",
          "virtual_pipeline_model_parallel_size"),
         lambda a: a.model == "transformer" and a.num_layers % chunks(a) != 0,
         lambda a: f"--num_layers {a.num_layers} cannot be split evenly into {chunks(a)} pipeline "
                   f"chunks (PP {a.pipeline_model_parallel_size} x virtual "
                   f"{a.virtual_pipeline_model_parallel_size or 1}); choose a multiple of "
                   f"{chunks(a)}"),
    Rule(("model", "num_attention_heads", "tensor_model_parallel_size"),
         lambda a: a.model == "transformer" and
         a.num_attention_heads % a.tensor_model_parallel_size != 0,
         lambda a: f"--num_attention_heads {a.num_attention_heads} is not divisible by "
                   f"--tensor_model_parallel_size {a.tensor_model_parallel_size}; each rank "
                   "computes whole heads"),
    Rule(("model", "context_parallel_size", "cp_load_balance", "seq_length"),
         lambda a: a.model == "transformer" and a.context_parallel_size > 1 and
         a.seq_length % cp_chunks(a) != 0,
         lambda a: f"--seq_length {a.seq_length} is not divisible by {cp_chunks(a)}, the chunks "
                   f"of the {'load-balanced' if a.cp_load_balance == 'on' else 'plain'} split "
                   f"over {a.context_parallel_size} context-parallel ranks; choose a "
                   f"--seq_length divisible by {cp_chunks(a)}"),
    Rule(("model", "sequence_parallel", "seq_length", "tensor_model_parallel_size",
          "context_parallel_size"),
         lambda a: a.model == "transformer" and a.sequence_parallel and
         a.seq_length % (a.tensor_model_parallel_size * a.context_parallel_size) != 0,
         lambda a: f"--sequence_parallel splits the {a.seq_length // a.context_parallel_size} "
                   f"tokens of a sequence{' on each context rank' * (a.context_parallel_size > 1)}"
                   f" between {a.tensor_model_parallel_size} tensor-parallel ranks; choose a "
                   "--seq_length that they divide" + (
                       f" ({a.tensor_model_parallel_size} x --context_parallel_size "
                       f"{a.context_parallel_size})" if a.context_parallel_size > 1 else "")),
    Rule(("model", "cp_comm_type", "context_parallel_size", "num_attention_heads",
          "tensor_model_parallel_size"),
         lambda a: a.model == "transformer" and a.cp_comm_type == "a2a" and
         a.context_parallel_size > 1 and
         a.num_attention_heads % (a.context_parallel_size * a.tensor_model_parallel_size) != 0,
         lambda a: f"--cp_comm_type a2a gives each of the {a.context_parallel_size} context ranks "
                   f"1/{a.context_parallel_size} of a tensor-parallel rank's heads: "
                   f"--num_attention_heads {a.num_attention_heads} is not divisible by "
                   f"{a.context_parallel_size * a.tensor_model_parallel_size} (C x TP); choose a "
                   "multiple, or --cp_comm_type p2p"),
    Rule(("model", "sequence_parallel", "micro_batch_size", "num_microbatches",
          "tensor_model_parallel_size"),
         lambda a: a.model == "toy" and a.sequence_parallel and
         a.micro_batch_size % a.tensor_model_parallel_size != 0,
         lambda a: f"--sequence_parallel splits each "
                   f"{'replica' if a.num_microbatches == 1 else 'micro-batch'}'s "
                   f"{a.micro_batch_size} rows between {a.tensor_model_parallel_size} "
                   "tensor-parallel ranks; choose a --batch_size (or --micro_batch_size) that "
                   "makes them divisible"),
)


def cp_chunks(a):
    """The chunks a sequence is cut into over the context ranks: 2C load-balanced, C plain."""
    return a.context_parallel_size * (2 if a.cp_load_balance == "on" else 1)


def chunks(a):
    """The pipeline's chunks of layers: P stages of V chunks each."""
    return a.pipeline_model_parallel_size * (a.virtual_pipeline_model_parallel_size or 1)


def check_the_flags_given(parser, args, argv):
    """What the user's own flags (read from argv by the parser's rules: abbreviations, --flag=value;
    not by comparing with the defaults) do where they would do nothing, in one note each on
    rank 0; a --load or --save folder whose tracker is gone, refused. args.given_flags lists them
    (a resume takes the optimizer's hyperparameters given, and keeps the checkpoint's others:
    training/checkpointing.py). Called last in get_args and get_parallel_args."""
    from training.checkpointing import missing_tracker
    args.given_flags = sorted(given_flags(parser, argv))
    given = set(args.given_flags)
    for flag in ("--load", "--save"):  # --load first: the same folder for both is a restart
        directory = getattr(args, flag[2:], None)
        if directory and (message := missing_tracker(directory, flag)):
            parser.error(message)
    notes = []
    if "--momentum" in given and args.optimizer == "adam":
        notes.append(f"--momentum {args.momentum:g} is SGD's: --optimizer adam does not use it "
                     f"(its momentum is --adam_beta1, now {args.adam_beta1:g})")
    adams = [flag for flag in ("--adam_beta1", "--adam_beta2", "--adam_eps") if flag in given]
    if adams and args.optimizer == "sgd":
        one = len(adams) == 1
        notes.append(f"{' and '.join(adams)} {'is' if one else 'are'} Adam's: --optimizer sgd "
                     f"does not use {'it' if one else 'them'}; add --optimizer adam to train "
                     "with Adam")
    if "--pipeline_schedule" in given and getattr(args, "pipeline_model_parallel_size", 1) == 1:
        notes.append(f"--pipeline_schedule {args.pipeline_schedule} orders the micro-batches "
                     "through a pipeline's stages: without a pipeline "
                     "(--pipeline_model_parallel_size 1) it changes nothing")
    moe = [flag for flag in given if flag.startswith("--moe_")]
    if moe and args.num_experts is None:
        notes.append(f"{', '.join(sorted(moe))}: the routed MLP's; without --num_experts the "
                     "transformer's MLPs are dense and they change nothing")
    elif "--moe_token_dispatcher_type" in given and args.num_experts and \
            args.expert_model_parallel_size * args.expert_tensor_parallel_size == 1:
        notes.append(f"--moe_token_dispatcher_type {args.moe_token_dispatcher_type} takes the "
                     "tokens to other ranks' experts: at --expert_model_parallel_size 1 (and "
                     "--expert_tensor_parallel_size 1) every rank holds every expert and it "
                     "changes nothing")
    if "--ddp_bucket_size" in given and not getattr(args, "overlap_grad_reduce", False):
        notes.append(f"--ddp_bucket_size {args.ddp_bucket_size} sizes --overlap_grad_reduce's "
                     "buckets: without it the gradients are averaged in one piece after "
                     "backward")
    if getattr(args, "overlap_grad_reduce", False) and args.data_parallel_size * \
            args.context_parallel_size == 1:
        notes.append("--overlap_grad_reduce hides the data-parallel average behind backward: "
                     "with one replica there is none, and it changes nothing")
    if getattr(args, "overlap_p2p_comm", False) and \
            getattr(args, "virtual_pipeline_model_parallel_size", None) is None:
        notes.append("--overlap_p2p_comm posts the interleaved schedule's sends and receives: "
                     "without --pipeline_model_parallel_size and "
                     "--virtual_pipeline_model_parallel_size it changes nothing (Megatron turns "
                     "it off there too)")
    for flag in ("--cp_comm_type", "--cp_load_balance"):
        if flag in given and getattr(args, "context_parallel_size", 1) == 1:
            notes.append(f"{flag} {getattr(args, flag[2:])} chooses how context parallelism "
                         "splits the attention: without it (--context_parallel_size 1) it "
                         "changes nothing")
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"note: {note}", flush=True)
