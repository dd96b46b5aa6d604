"""Independent references (issue 37, item 4): the code against what the papers say, written here,
not against itself.

The serial and the parallel run build their optimizer through the same function
(train.torch_optimizer), and print_schedule.py computes its orders from the schedules' own code:
a mistake there is on both sides of every comparison the other tests make. So here

  * each optimizer, built as the scripts build it, reads back the flags and takes three steps
    that are compared with the paper's equations, written out below in float64;
  * each schedule's order on real ranks is compared with the order derived from the paper's
    rules (and Megatron's, for the interleaved warm-up), with every sent output freed right after
    its send and the activations kept at once the formula's;
  * what other tests verify in isolation (finalize_model_grads and its reductions, the clipping,
    the distributed optimizer's reduce-scatter and all-gather, custom_backward) is shown to be
    called by the real caller, parallel_train.py's run, counted by wrapping it in the job.
"""

from collections import Counter

import pytest
import torch

from distributed import run_distributed

# A transformer small enough to build in milliseconds, with 2-D weights and 1-D biases and
# LayerNorms (the toy model has no 1-D parameter: it could not show the decay's groups).
MODEL = ["--model", "transformer", "--input_size", "8", "--hidden_size", "16",
         "--num_attention_heads", "2", "--vocab_size", "32"]
# Every hyperparameter away from torch's default (SGD's momentum 0, Adam's lr 1e-3, betas
# (0.9, 0.999), eps 1e-8, AdamW's weight decay 0.01): a flag not passed on shows.
HYPER = ["--init_lr", "0.02", "--momentum", "0.7", "--adam_beta1", "0.8", "--adam_beta2", "0.95",
         "--adam_eps", "1e-6"]
STEPS = 3
# |parameter - reference| / lr after three steps. Measured: float64 1.1e-14, one ulp of a
# LayerNorm's weight of 1.0 over lr 0.02 (SGD and Adam alike); the fp32 main parameters of bf16
# runs 6.9e-6 (SGD), 5.8e-6 (AdamW), a few fp32 ulps. Bounds about 10x.
TOL = {torch.float64: 1e-13, torch.float32: 5e-5}


# ---------------------------------------------------------------------------
# The optimizers' equations, in float64.

def sgd_reference(p, grads, lr, momentum, weight_decay):
    """SGD with momentum as the original's torch.optim.SGD writes it (Sutskever et al., 2013, in
    torch's form; dampening 0, no Nesterov): g <- g + wd p (L2 decay, as Megatron's SGD),
    v <- mu v + g (v_0 = 0), p <- p - lr v."""
    v = torch.zeros_like(p)
    for g in grads:
        g = g + weight_decay * p
        v = momentum * v + g
        p = p - lr * v
    return p


def adam_reference(p, grads, lr, betas, eps, weight_decay):
    """Adam, Kingma & Ba (2015), Algorithm 1: m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2,
    m^ = m / (1 - b1^t), v^ = v / (1 - b2^t), p <- p - lr m^ / (sqrt(v^) + eps); with the decay
    decoupled from the gradient, Loshchilov & Hutter (2019), Algorithm 2, line 12: p <- p -
    (lr m^ / (sqrt(v^) + eps) + eta wd p), where eta, the schedule's multiplier, is lr here (as
    torch's and Megatron's AdamW scale the decay)."""
    b1, b2 = betas
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * (m_hat / (v_hat.sqrt() + eps) + weight_decay * p)
    return p


def reference(args, p0, grads, dim):
    """The parameter after `grads`, from the flags: decayed only if it has 2 dims or more
    (Megatron's rule; biases and LayerNorms not)."""
    wd = args.weight_decay if dim >= 2 else 0.0
    if args.optimizer == "sgd":
        return sgd_reference(p0, grads, args.init_lr, args.momentum, wd)
    return adam_reference(p0, grads, args.init_lr, (args.adam_beta1, args.adam_beta2),
                          args.adam_eps, wd)


def known_gradients(params, dtype, seed=0):
    """{name: STEPS gradients}, float64 values exactly representable in `dtype` (what the
    optimizer will see), from the parameter's name and shape only: every rank draws the same."""
    generator = torch.Generator().manual_seed(seed)
    return {name: [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(dtype).double()
                   for _ in range(STEPS)] for name, p in params.items()}


def assert_flags_read_back(optimizer, args, dims):
    """The built optimizer's groups hold the flags, not torch's defaults; with weight decay two
    groups, [the weights (2 dims or more), the rest], the second undecayed. `dims`: id of what the
    optimizer steps -> its model parameter's number of dims (a distributed piece is 1-D)."""
    groups = optimizer.param_groups
    for group in groups:
        assert group["lr"] == args.init_lr and not group["maximize"], group
        if args.optimizer == "sgd":
            assert (group["momentum"], group["dampening"], group["nesterov"]) == (
                args.momentum, 0, False), group
        else:
            assert group["betas"] == (args.adam_beta1, args.adam_beta2), group
            assert group["eps"] == args.adam_eps and not group["amsgrad"], group
    if not args.weight_decay:
        assert [g["weight_decay"] for g in groups] == [0], groups
        return
    assert [g["weight_decay"] for g in groups] == [args.weight_decay, 0.0], groups
    assert all(dims[id(p)] >= 2 for p in groups[0]["params"])
    assert all(dims[id(p)] == 1 for p in groups[1]["params"])


def assert_close(name, stepped, expected, lr, dtype):
    error = (stepped.detach().double() - expected).abs().max().item() / lr
    assert error <= TOL[dtype], f"{name}: |p - reference| / lr = {error:.2e} > {TOL[dtype]:.0e}"


# ---------------------------------------------------------------------------
# train.py's optimizer (and parallel_train.py's without the distributed optimizer: the same
# make_optimizer).

SERIAL = {
    "sgd": ["--optimizer", "sgd", "--dtype", "float64"],
    "sgd_weight_decay": ["--optimizer", "sgd", "--weight_decay", "0.05", "--dtype", "float64"],
    "adam": ["--optimizer", "adam", "--weight_decay", "0", "--dtype", "float64"],
    "adamw": ["--optimizer", "adam", "--weight_decay", "0.05", "--dtype", "float64"],
    "adamw_bf16": ["--optimizer", "adam", "--weight_decay", "0.05", "--dtype", "bfloat16"],
    "sgd_weight_decay_bf16": ["--optimizer", "sgd", "--weight_decay", "0.05", "--dtype",
                              "bfloat16"],
}


@pytest.mark.parametrize("flags", SERIAL.values(), ids=SERIAL.keys())
def test_train_pys_optimizer_steps_as_the_papers_equations(flags):
    """train.py's make_optimizer (under bf16 over fp32 main parameters): the flags read back
    from its groups, every parameter stepped once per step, three steps with known gradients
    equal to sgd_reference / adam_reference; under bf16 the model holds the main parameters
    rounded to bf16."""
    from train import build_model, make_optimizer
    from training.arguments import get_args
    from training.mixed_precision import main_model
    args = get_args([*MODEL, *HYPER, *flags])
    model = build_model(args, torch.device("cpu"))
    optimizer = make_optimizer(model, args)
    main = dict(main_model(model, optimizer).named_parameters())  # fp32 copies under bf16
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, stepped)) == sorted(id(p) for p in main.values())  # each, once
    assert_flags_read_back(optimizer, args, {id(p): p.dim() for p in main.values()})
    p0 = {name: p.detach().double().clone() for name, p in main.items()}
    grads = known_gradients(main, args.main_dtype)
    for t in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        for name, p in main.items():
            p.grad = grads[name][t].to(p.dtype)
        optimizer.step()
    for name, p in main.items():
        assert_close(name, p, reference(args, p0[name], grads[name], p.dim()), args.init_lr,
                     args.main_dtype)
    if args.dtype == "bfloat16":  # the model: its main parameters rounded
        for name, p in model.named_parameters():
            assert p.dtype == torch.bfloat16 and torch.equal(p, main[name].to(p.dtype)), name


# ---------------------------------------------------------------------------
# parallel_train.py's build_optimizer with --use_distributed_optimizer.

DISTRIBUTED = [["--optimizer", "sgd", "--weight_decay", "0.05", "--dtype", "float64"],
               ["--optimizer", "adam", "--weight_decay", "0.05", "--dtype", "float64"],
               ["--optimizer", "adam", "--weight_decay", "0.05", "--dtype", "bfloat16"]]


def _distributed_steps(flags):
    """On each of 2 replicas (DP 2): the optimizer built as parallel_train.py builds it, its flags
    read back from its pieces' groups, then three steps: replica 0's gradient d x g, the others'
    0 (so the average, g, is exact, and a missing sum or division shows), reduce-scattered, the
    shards stepped and all-gathered; every rank's model (under bf16 the gathered fp32 main
    parameters) against the reference."""
    from core import parallel_state as ps
    from parallel_train import build_chunks, build_optimizer
    from training.arguments import get_parallel_args
    args = get_parallel_args([*MODEL, *HYPER, *flags, "--tensor_model_parallel_size", "1",
                              "--use_distributed_optimizer"])
    model = build_chunks(args, torch.device("cpu"))
    params = dict(model.named_parameters())
    p0 = {name: p.detach().double().clone() for name, p in params.items()}  # before bf16's cast
    optimizer = build_optimizer(model, args)
    dims = {id(main): param.dim() for main, _, param, *_ in optimizer.pieces}
    assert any(hi - lo < param.numel() for _, _, param, lo, hi, _ in optimizer.pieces)  # split
    assert_flags_read_back(optimizer, args, dims)
    grads = known_gradients(params, args.main_dtype)
    d, first = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank() == 0
    for t in range(STEPS):
        optimizer.zero_grad()
        for name, p in params.items():
            p.main_grad.copy_(grads[name][t] * d if first else torch.zeros_like(grads[name][t]))
        optimizer.finish_grad_sync()  # the reduce-scatter finalize_model_grads ends with
        optimizer.step()
    main = dict(optimizer.gather_main_model().named_parameters())  # the model itself in float64
    for name, p in main.items():
        assert_close(name, p, reference(args, p0[name], grads[name], p.dim()), args.init_lr,
                     args.main_dtype)
        assert torch.equal(params[name], p.to(params[name].dtype)), name  # the model: all-gathered


def _every_distributed_optimizer():
    for flags in DISTRIBUTED:
        _distributed_steps(flags)


def test_the_distributed_optimizer_steps_as_the_papers_equations():
    """SGD with L2 decay, AdamW in float64 and under bf16 (fp32 main pieces), at DP 2, where a
    parameter straddles the two shards (asserted): the pieces' groups are their parameters', and
    the step is the equations' on every element of every replica's model."""
    run_distributed(_every_distributed_optimizer, 2, tp_size=1)


# ---------------------------------------------------------------------------
# The schedules (Narayanan et al., 2021, Sec. 2.2), derived here from the paper's rules.

def reference_order(schedule, p, s, m, v=1):
    """Stage s's forwards and backwards in order, as "F<micro-batch>.<chunk>" ("B..."), from the
    rules, not from schedules.py:

      GPipe (Fig. 3): every forward, then every backward, micro-batches in order.
      1F1B (Sec. 2.2.1, Fig. 4 top): a warm-up of p - s - 1 forwards (at most m), then one
          forward and one backward at a time, then the warm-up's backwards.
      Interleaved (Sec. 2.2.2, Fig. 4 bottom; Megatron's schedule): the k-th forward runs chunk
          (k mod pv) // p on micro-batch (k // pv) p + k mod p, groups of p micro-batches
          through each chunk in turn; the k-th backward the same with the chunks in reverse
          (Megatron's get_model_chunk_id, get_microbatch_id_in_model_chunk). Warm-up: Megatron's
          (p - s - 1) 2 + (v - 1) p forwards, at most mv; all mv when m = p (its all-warm-up case),
          then 1F1B, then the cool-down's backwards.
    """
    total = m * v
    if schedule == "gpipe":
        warmup = total
    elif v == 1:
        warmup = min(p - s - 1, m)
    else:
        warmup = total if m == p else min((p - s - 1) * 2 + (v - 1) * p, total)

    def op(kind, k):
        chunk = (k % (p * v)) // p
        microbatch = (k // (p * v)) * p + k % p if v > 1 else k
        return f"{kind}{microbatch}.{chunk if kind == 'F' else v - 1 - chunk}"
    order = [op("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [op("F", warmup + k), op("B", k)]
    return order + [op("B", k) for k in range(total - warmup, total)]


def kept_formula(schedule, p, s, m, v=1):
    """The most micro-batches (chunk-micro-batches, interleaved) whose activations stage s keeps
    at once: GPipe m (Sec. 2.2.1); 1F1B min(p - s, m), its warm-up plus the one in flight ("at
    most p"); interleaved Megatron's warm-up + 1, at most mv."""
    if schedule == "gpipe":
        return m
    if v == 1:
        return min(p - s, m)
    warmup = m * v if m == p else (p - s - 1) * 2 + (v - 1) * p
    return min(warmup + 1, m * v)


def kept_by_order(order):
    """The most forwards not yet backward at any moment of `order`."""
    held = most = 0
    for op in order:
        held += 1 if op[0] == "F" else -1
        most = max(most, held)
    return most


class _Saved:
    """Stands beside one tensor a forward saved for backward; counts its (micro-batch, chunk)
    alive until autograd frees it (after that backward: keep_graph=False)."""

    def __init__(self, live, key):
        self.live, self.key = live, key
        live[key] += 1

    def __del__(self):
        self.live[self.key] -= 1


def _orders(p, cases):
    """Every case (schedule, m, v) run by the real schedule on p real ranks (gloo, real sends):
    each chunk logs its forwards and backwards (test_pipeline._Logged), counts the tensors it
    saved for backward while alive, and every send and free is logged beside, by wrapping
    p2p._communicate and schedules.deallocate_output_tensor (in this job's process only)."""
    from test_pipeline import _Logged

    from core import parallel_state as ps
    from core.pipeline_parallel import p2p_communication as p2p
    from core.pipeline_parallel import schedules
    log, sent = [], []
    communicate, deallocate = p2p._communicate, schedules.deallocate_output_tensor

    def sending(tensor_send_next, *args):
        if tensor_send_next is not None:  # an activation to the next stage
            sent.append(tensor_send_next)
            log.append(("sent", len(sent) - 1))
        return communicate(tensor_send_next, *args)

    def freeing(output):
        log.append(("freed", next((i for i, t in enumerate(sent) if t is output), None)))
        deallocate(output)
    p2p._communicate, schedules.deallocate_output_tensor = sending, freeing
    for schedule, m, v in cases:
        ps.initialize_model_parallel(1, p, v if v > 1 else None)
        s = ps.get_pipeline_model_parallel_rank()
        log.clear()
        sent.clear()
        live, kept = Counter(), [0]
        weights = [torch.ones(2, dtype=torch.float64, requires_grad=True) for _ in range(v)]

        def pack(tensor, key):
            saved = _Saved(live, key)
            kept[0] = max(kept[0], sum(1 for n in live.values() if n > 0))
            return saved, tensor

        def step(chunk, microbatch, x):
            data = torch.full((2,), float(microbatch), dtype=torch.float64) if x is None else x
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda t: pack(t, (microbatch, chunk)), lambda packed: packed[1]):
                out = _Logged.apply(data * weights[chunk], f"{microbatch}.{chunk}", log)
            return out.sum() if ps.is_pipeline_last_stage() else out
        schedules.get_forward_backward_func(schedule)(step, list(range(m)), list(range(v)), (2,),
                                                      torch.float64)
        case = (schedule, f"p {p} m {m} v {v} stage {s}")
        expected = reference_order(schedule, p, s, m, v)
        assert [e for e in log if isinstance(e, str)] == expected, (case, log, expected)
        assert kept_by_order(expected) == kept_formula(schedule, p, s, m, v), case
        assert kept[0] == kept_formula(schedule, p, s, m, v), (case, kept[0])
        assert not any(live.values()), (case, live)  # every saved tensor freed by the end
        # Every forward's output is sent on but the pipeline's last (the loss), and each is freed
        # at once: the next thing after its send is its deallocate_output_tensor.
        assert len(sent) == (m * v if s < p - 1 else m * (v - 1)), (case, len(sent))
        for i in range(len(sent)):
            at = log.index(("sent", i))
            assert log[at + 1] == ("freed", i), (case, i, log)
            assert sent[i].numel() == 1, (case, i)


SCHEDULES = {  # p: (schedule, m, v), v > 1 interleaved; m = p is its all-warm-up case
    2: [("gpipe", 4, 1), ("gpipe", 8, 1), ("1f1b", 1, 1), ("1f1b", 4, 1), ("1f1b", 8, 1),
        ("1f1b", 2, 2), ("1f1b", 4, 2), ("1f1b", 8, 2), ("1f1b", 4, 3)],
    4: [("gpipe", 4, 1), ("gpipe", 8, 1), ("1f1b", 2, 1), ("1f1b", 4, 1), ("1f1b", 8, 1),
        ("1f1b", 4, 2), ("1f1b", 8, 2)]}


@pytest.mark.parametrize("p", SCHEDULES)
def test_each_schedule_runs_the_papers_order_and_frees_what_it_sent(p):
    """GPipe, 1F1B and interleaved 1F1B at p 2 and 4, m up to 8, v 2 and 3, on p real ranks: each
    stage's order is reference_order's, every output sent on is freed right after its send, and
    the micro-batches whose activations a stage keeps at once are kept_formula's, counted from the
    tensors autograd saved and freed."""
    run_distributed(_orders, p, p, SCHEDULES[p], tp_size=1)


# ---------------------------------------------------------------------------
# Called where it must be: parallel_train.py's run, with the helpers other tests check in
# isolation wrapped to log their calls.

CALLED = ["--model", "transformer", "--input_size", "8", "--hidden_size", "16",
          "--num_attention_heads", "4", "--seq_length", "8", "--num_layers", "4",
          "--batch_size", "8", "--micro_batch_size", "2", "--num_iterations", "2",
          "--dtype", "float64", "--optimizer", "adam", "--clip_grad", "0.5"]
EMBEDDING_SUM = ("allreduce_embedding_grads", 1, {"embedding_all_reduce": 1})  # 1 tied weight
RUNS = {  # the world of 4 ranks, three ways; what finalize_model_grads must call in each, and
    # the collectives (core/wire.py's names) that the helpers doing the sums run
    "pp2_v2_dp2_distributed_optimizer": (
        ["--tensor_model_parallel_size", "1", "--pipeline_model_parallel_size", "2",
         "--virtual_pipeline_model_parallel_size", "2", "--use_distributed_optimizer"],
        [("reduce_scatter_over_data_parallel_replicas",), EMBEDDING_SUM]),
    "tp2_dp2_sequence_parallel_bf16": (  # bf16: the clipping must take the fp32 main parameters
        ["--tensor_model_parallel_size", "2", "--sequence_parallel", "--num_layers", "1",
         "--micro_batch_size", "4", "--dtype", "bfloat16"],
        [("average_over_data_parallel_replicas", {"dp_all_reduce": 1,
                                                  "replicated_all_reduce": 1})]),
    "tp2_pp2_sequence_parallel": (
        ["--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2",
         "--sequence_parallel", "--num_layers", "2", "--micro_batch_size", "4"],
        [("allreduce_sequence_parallel_grads", {"all_reduce": 1}), EMBEDDING_SUM]),
}


def _calls(token_dir, out_dir):
    """Each of RUNS through parallel_train.run (what its main calls once the world is up), with
    the helpers below wrapped in this job's process to log their calls (and, for those that
    sum, the collectives they ran); each rank's log is the order the step needs, iteration after
    iteration: the m v backwards through custom_backward (schedules.py), then
    finalize_model_grads and the reductions it must call for this layout (under the distributed
    optimizer the reduce-scatter of every buffer), then the clipping over the optimizer's own
    parameters, each with its gradient (sharded= under the distributed optimizer), the step, and
    (distributed optimizer) the all-gather of every buffer."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import parallel_train
    from core import wire
    from core.distributed import finalize_model_grads as finalize
    from core.optimizer.distrib_optimizer import ParamAndGradBuffer
    from core.pipeline_parallel import schedules
    from training.arguments import get_parallel_args
    from training.mixed_precision import optimized_parameters
    from training.operations import pin_float32_precision
    log, built = [], []

    def wrap(owner, name, entry=lambda *args, **kwargs: (), collectives=False):
        original = getattr(owner, name)

        def logged(*args, **kwargs):
            at, before = len(log), Counter(wire.comm_calls)
            log.append((name, *entry(*args, **kwargs)))
            result = original(*args, **kwargs)
            if collectives:  # what it ran on the wire, counted by core/wire.py
                log[at] += (dict(wire.comm_calls - before),)
            return result
        setattr(owner, name, logged)
    wrap(parallel_train, "finalize_model_grads")
    wrap(parallel_train, "clip_grad_norm", lambda params, max_norm, sharded=False: (
        [id(p) for p in params if p.grad is not None], max_norm, sharded))  # (bf16's: via hooks)
    wrap(finalize, "reduce_scatter_over_data_parallel_replicas")
    for name in ("average_over_data_parallel_replicas", "allreduce_sequence_parallel_grads"):
        wrap(finalize, name, collectives=True)
    wrap(finalize, "allreduce_embedding_grads", lambda grads: (len(grads),), collectives=True)
    wrap(schedules, "custom_backward")
    wrap(ParamAndGradBuffer, "reduce_scatter_grads", collectives=True)
    wrap(ParamAndGradBuffer, "all_gather_params", collectives=True)
    register_optimizer_step_post_hook(lambda *_: log.append(("step",)))  # the torch optimizer's
    build = parallel_train.build_optimizer
    parallel_train.build_optimizer = lambda model, args: built.append(build(model, args)) or \
        built[-1]
    for name, (flags, reductions) in RUNS.items():
        log.clear()
        args = get_parallel_args([*CALLED, *flags, "--data_dir", token_dir, "--out_dir",
                                  f"{out_dir}/{name}"])
        parallel_train.run(args, torch.device("cpu"), pin_float32_precision())
        optimizer = built[-1]
        distributed = args.use_distributed_optimizer
        buffers = len(optimizer.buffers) if distributed else 0
        backwards = args.num_microbatches * (args.virtual_pipeline_model_parallel_size or 1)
        clip = ("clip_grad_norm", [id(p) for p in optimized_parameters(optimizer)],
                args.clip_grad, distributed)
        iteration = ([("custom_backward",)] * backwards + [("finalize_model_grads",), *reductions]
                     + [("reduce_scatter_grads", {"dp_reduce_scatter": 1})] * buffers
                     + [clip, ("step",)] + [("all_gather_params", {"dp_all_gather": 1})] * buffers)
        assert log == iteration * args.num_iterations, (name, log, iteration)


def test_parallel_train_calls_each_helper_where_the_step_needs_it(tmp_path):
    """The real caller calls what other tests verify in isolation: finalize_model_grads after
    the schedule, with the reductions of the layout (the distributed optimizer's reduce-scatter
    and the tied embedding's sum at PP 2 x V 2 x DP 2; the data-parallel average at TP 2 x DP 2;
    the sequence-parallel and the tied embedding's sums at TP 2 x PP 2), clip_grad_norm after it
    over the optimizer's parameters (the fp32 main ones under bf16, the shards, sharded=True,
    under the distributed optimizer), the all-gather of every buffer after the step; every
    backward of the schedules through custom_backward."""
    from prepare_data import TOKEN_FILES, make_tokens, save_data
    save_data(make_tokens(num_sequences=100, seq_length=8), tmp_path / "tokens", TOKEN_FILES)
    run_distributed(_calls, 4, str(tmp_path / "tokens"), str(tmp_path))  # (a small validation)
