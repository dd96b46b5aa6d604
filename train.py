"""Train the ToyModel on one device: the serial baseline.

    python train.py --data_dir data --input_size 64 --batch_size 32 \\
        --init_lr 0.001 --momentum 0.9 --num_iterations 200 --update_freq 10

The model, the data, and the loop: one step per batch, as nanoGPT's.
parallel_train.py runs the same model with the same flags and adds, in its own
loop, what tensor parallelism needs. The flags and their checks are in
training/arguments.py; training/operations.py keeps errors and signals out of
the way.
"""


import torch
import torch.nn.functional as F

from core.context_parallel.split import context_parallel_setup
from core.optimizer import optimizer_with_param_groups
from core.tensor_parallel.random import model_parallel_manual_seed
from core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from core.transformer.moe.router import reset_moe_trackers
from model import ToyModel
from training.arguments import get_args
from training.checkpointing import (
    data_fingerprint,
    gather_serial_state_dict,
    load_serial_state_dict,
    read_state_dict,
)
from training.clip_grads import clip_grad_norm
from training.data import iterate_batches, load_dataset, load_token_dataset, to_tensors
from training.logbook import Logbook
from training.metrics import MetricsWriter, moe_load, run_config, save_model
from training.mixed_precision import MixedPrecisionOptimizer, main_model, optimized_parameters
from training.operations import pin_float32_precision, run_cli
from training.reorder import reorder_sums
from transformer import ToyTransformer


def build_model(args, device, tensor_parallel=False, pre_process=True, post_process=True,
                layers=None):
    """The same model for every run: nn.Linear's init from --seed, or --init_from's weights.
    Built on the CPU, in fp32 for a bf16 run (make_optimizer casts it); `device` is where it
    will run (dropout's streams live there). The parallel model (parallel_train.py) is the same
    class with the parallel layers swapped in (`tensor_parallel`, and --sequence_parallel's); a
    pipeline stage holds its part: the first stage's inputs (pre_process), the last stage's
    output and loss (post_process), the transformer's `layers`."""
    sequence_parallel = tensor_parallel and getattr(args, "sequence_parallel", False)
    model_parallel_manual_seed(args.seed, device)  # and dropout's streams (tensor_parallel/random)
    if args.model == "transformer":
        model = ToyTransformer(args.vocab_size, args.seq_length, args.input_size, args.hidden_size,
                               args.num_attention_heads, args.num_layers, tensor_parallel,
                               args.dropout, sequence_parallel, dtype=args.main_dtype,
                               recompute_granularity=args.recompute_granularity,
                               distribute_saved_activations=getattr(
                                   args, "distribute_saved_activations", False),
                               pre_process=pre_process, post_process=post_process, layers=layers,
                               moe=moe_config(args),
                               context_parallel=context_parallel_setup(
                                   args.seq_length, args.cp_comm_type,
                                   args.cp_load_balance == "on") if tensor_parallel and getattr(
                                   args, "context_parallel_size", 1) > 1 else None)
    else:
        model = ToyModel(args.input_size, args.hidden_size, tensor_parallel, sequence_parallel,
                         dtype=args.main_dtype, pre_process=pre_process, post_process=post_process)
    if args.init_from:
        state = read_state_dict(args.init_from)
        if not (pre_process and post_process and layers is None) or getattr(
                args, "expert_model_parallel_size", 1) > 1:  # a stage, or EP: its part of it
            names = dict(model.named_parameters())
            state = {name: tensor for name, tensor in state.items() if name in names}
        load_serial_state_dict(model, state)
    return model


def moe_config(args):
    """--num_experts: the transformer's routed MLPs (core/transformer/moe/), as the keyword
    arguments of MoELayer beside its width, and which blocks have one (--moe_layer_freq: every
    N-th, from the first); None without."""
    if not args.num_experts:
        return None
    return dict(freq=args.moe_layer_freq, num_experts=args.num_experts,
                topk=args.moe_router_topk,
                ffn_hidden_size=args.moe_ffn_hidden_size or args.hidden_size,
                aux_loss_coeff=(args.moe_aux_loss_coeff
                                if args.moe_router_load_balancing_type != "none" else 0.0),
                aux_loss_type=args.moe_router_load_balancing_type,
                z_loss_coeff=args.moe_z_loss_coeff,
                capacity_factor=args.moe_expert_capacity_factor,
                dispatcher=getattr(args, "moe_token_dispatcher_type", "allgather"))


def load_data(args):
    """((inputs, targets) train, (inputs, targets) valid) as numpy arrays, checked."""
    if args.model == "transformer":
        return load_token_dataset(args.data_dir, args.vocab_size, args.seq_length, args.batch_size)
    return load_dataset(args.data_dir, args.input_size, args.batch_size)


@torch.no_grad()
def evaluate(model, inputs, targets, chunk_rows=1024, outputs=None):
    """The loss over a whole split, in chunks to bound activation memory: mean squared error, or
    the transformer's mean cross-entropy over every token. `outputs`: the model's, chunk by
    chunk, when they were computed already (a pipeline's stages, parallel_train.py)."""
    model.eval()
    outputs = None if outputs is None else iter(outputs)
    run = model if outputs is None else lambda x: next(outputs)
    if isinstance(model, ToyTransformer):
        chunks = zip(inputs.split(chunk_rows), targets.split(chunk_rows))
        loss = sum(model.loss(run(x), y).item() * len(x) for x, y in chunks) / len(inputs)
    else:
        outputs = torch.cat([run(x)[:, 0] for x in inputs.split(chunk_rows)])
        loss = F.mse_loss(outputs.to(targets.dtype), targets).item()
    model.train()
    return loss


def make_optimizer(model, args):
    """SGD with momentum (the original's), or Adam (--optimizer adam, Megatron's default, with
    its decoupled weight decay: AdamW); under --dtype bfloat16, over fp32 main copies of the
    parameters, their state in fp32 too, the model cast to bf16 (training/mixed_precision.py)."""
    if args.dtype == "bfloat16":
        return MixedPrecisionOptimizer(model, torch_optimizer(args))
    return torch_optimizer(args)(model.parameters())


def torch_optimizer(args):
    """The optimizer of --optimizer, as a function of the parameters it updates (the model's,
    the fp32 main copies under bf16, a replica's pieces under the distributed optimizer). With
    --weight_decay two groups: the weights decayed, the biases and norms not (Megatron's
    _get_param_groups: core/optimizer/__init__.py); at 0 torch's Adam or SGD over one, as before."""
    wd = args.weight_decay
    if args.optimizer == "adam":
        adam = torch.optim.AdamW if wd else torch.optim.Adam
        return lambda params: optimizer_with_param_groups(
            adam, params, wd, lr=args.init_lr, eps=args.adam_eps,
            betas=(args.adam_beta1, args.adam_beta2))
    return lambda params: optimizer_with_param_groups(torch.optim.SGD, params, wd,
                                                      lr=args.init_lr, momentum=args.momentum)


def train(model, optimizer, batches, logbook, args):
    """The training loop. parallel_train.py's adds what parallelism needs after backward."""
    params = optimized_parameters(optimizer)  # under bf16 the fp32 main parameters
    # --micro_batch_size: the batch's gradients summed over micro-batches, as a pipeline sums
    # them (and --reorder_seed's two, which split the batch's sums).
    m, rows = args.num_microbatches, args.micro_batch_size
    MoEAuxLossAutoScaler.set_loss_scale(1 / m)  # --num_experts: their losses' share, as the loss's
    model.train()
    for it in range(1, args.num_iterations + 1):
        inputs, targets = next(batches)
        optimizer.zero_grad(set_to_none=True)
        if args.num_experts:  # the routers' counts start again (router.py)
            reset_moe_trackers(model)
        loss = 0.0
        for x, y in zip(inputs.split(rows), targets.split(rows)):
            part = model.loss(model(x), y) / m  # its share of the mean
            part.backward()
            loss += part.detach()
        grad_norm = clip_grad_norm(params, args.clip_grad) if args.clip_grad else None
        optimizer.step()
        # logging, validation, metrics.csv: training/logbook.py
        logbook.step(it, loss, grad_norm, moe_load(model, args))


def holds(args):
    """What model.pt holds, when it is not the run's dtype."""
    return " (float32 main parameters of a bfloat16 run)" if args.dtype == "bfloat16" else ""


def main():
    args = get_args()
    precision = pin_float32_precision()
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model = build_model(args, device).to(device)
    unpermuted = reorder_sums(model, args.reorder_seed)  # --reorder_seed: sums in another order
    optimizer = make_optimizer(model, args)
    (X, y), valid = load_data(args)
    # The whole (small) data set goes to the device once; a batch is then a slice of it.
    batches = iterate_batches(*to_tensors(X, y, args, device), args.batch_size)
    valid = to_tensors(*valid, args, device)

    config = run_config(args, device=str(device), tensor_model_parallel_size=1,
                        data_fingerprint=data_fingerprint(X, y), **precision)
    metrics = MetricsWriter(args.out_dir, config)
    with Logbook(args, lambda: evaluate(model, *valid), metrics) as logbook:
        train(model, optimizer, batches, logbook, args)
    state = gather_serial_state_dict(main_model(model, optimizer))  # fp32 main params under bf16
    save_model(unpermuted(state), args.out_dir)
    print(f"wrote {args.out_dir}/metrics.csv and {args.out_dir}/model.pt{holds(args)}")


if __name__ == "__main__":
    run_cli(main)
