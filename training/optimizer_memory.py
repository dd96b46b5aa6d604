"""What the model and its optimizer hold on one rank, counted from the tensors, beside the
distributed optimizer's formula (distrib_optimizer.py; Megatron's docs, "Distributed Optimizer").

    bytes per parameter = P + G + (M + S) / d

P: the model's parameter (2 under bf16), G: its gradient in the main dtype (4: Megatron's fp32
main_grad), M: the main parameter (4 under bf16; none otherwise, the model's own is stepped), S:
the optimizer's state (SGD's momentum 4, Adam's two moments 8); d: the data-parallel size the
optimizer is split over (1 for the plain optimizer). Adam under bf16: 18 plain, 6 + 12/d split.
"""

import torch

from core import parallel_state as ps
from core.optimizer.distrib_optimizer import DistributedOptimizer, is_expert
from training.metrics import moe_layers_on_rank_0


def optimizer_memory(model, optimizer) -> dict:
    """Bytes this rank holds in each kind of tensor, every storage counted once (a view of a
    buffer is the buffer; the distributed optimizer's float32 pieces are the model's own)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside a wrapper
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    seen = set()

    def nbytes(tensors):
        total = 0
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    model_params = list(model.parameters())
    return dict(
        parameters=nbytes(model_params),
        gradients=nbytes([p.grad for p in stepped + model_params if p.grad is not None]),
        main_parameters=nbytes(stepped),
        optimizer_state=nbytes([t for state in inner.state.values() for t in state.values()
                                if torch.is_tensor(t)]),
        numel=sum(p.numel() for p in model_params))


def formula(args, d, expert_share=0.0, d_experts=1) -> float:
    """Bytes per parameter by the formula above, for this run's dtype and optimizer; with MoE
    experts, `expert_share` of the parameters, their (M + S) split over `d_experts` ranks (the
    expert-data-parallel group) instead of d."""
    main = args.main_dtype.itemsize
    state = (2 if args.optimizer == "adam" else 1) * main
    mains = main if args.dtype == "bfloat16" else 0
    return args.torch_dtype.itemsize + main + (mains + state) * (
        (1 - expert_share) / d + expert_share / d_experts)


def report_optimizer_memory(model, optimizer, args, data_parallel_size):
    """Print this rank's bytes per parameter, measured and by the formula."""
    counted = optimizer_memory(model, optimizer)
    per = {k: v / counted["numel"] for k, v in counted.items() if k != "numel"}
    distributed = isinstance(optimizer, DistributedOptimizer)
    d = data_parallel_size if distributed else 1
    experts = sum(p.numel() for p in model.parameters() if is_expert(p))
    d_experts = ps.get_expert_data_parallel_group().size() if distributed and experts else d
    kind = f"distributed over {d} data-parallel replicas" if distributed else "plain"
    print(f"Memory of rank 0's model and optimizer ({args.optimizer}, {args.dtype}, {kind}), "
          f"counted from its tensors, in bytes per parameter of its {counted['numel']}:")
    print("  " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in per.items()) +
          f" = {sum(per.values()):.2f}; the formula P + G + (M + S)/d: "
          f"{formula(args, d, experts / counted['numel'], d_experts):.2f}" +
          (f" (the experts' M + S over their {d_experts} ranks)" if d_experts != d else ""))
    if experts:
        report_expert_parameters(args, counted["numel"], experts)


def report_expert_parameters(args, numel, experts):
    """--num_experts: rank 0's parameters, its experts' and the rest, beside the formula: each
    MoE layer's E experts of 2 H F weights (the toy MLP's two) spread over EP ranks, each split
    over ETP."""
    ep, etp = args.expert_model_parallel_size, args.expert_tensor_parallel_size
    layers = moe_layers_on_rank_0(args)
    f = args.moe_ffn_hidden_size or args.hidden_size
    expected = layers * args.num_experts // ep * 2 * args.input_size * f // etp
    print(f"  of which experts {experts} ({experts / numel:.0%}): {layers} MoE layer(s) x E "
          f"{args.num_experts} / EP {ep} x 2 H F / ETP {etp} = {layers} x "
          f"{args.num_experts // ep} x 2 x {args.input_size} x {f} / {etp} = {expected}" +
          (" (met)" if expected == experts else " (differs!)") +
          f"; the dense rest {numel - experts}, on every expert-parallel rank")
