"""Activation recomputation (recompute.py, --recompute_granularity) changes memory and nothing else.

Bit for bit (torch.equal) against no recomputation, with dropout 0.1 on every stream: each step's
loss and every gradient, and the weights after SGD steps, for full and selective, at TP 1, 2 and 4,
with and without sequence parallelism, in float64 and float32 (both scripts end to end:
tests/test_transformer_train.py). The bytes each block saves, measured as the benchmark measures
them, equal this block's formula (Korthikanti et al., Table 2's terms; bench_recompute.py) in
every setting, and the formula is Table 2 as printed when the block is made the paper's.

Mutants written into core/tensor_parallel/recompute.py's source, as a bug would be, each caught
by the assertion it should trip: the random states not set for the recomputation, not put back
after it, the tracker's streams or the default generator left out, the distributed input not
gathered again; the input kept whole, and no recomputation at all (the memory check).
"""

import inspect
import types

import pytest
import torch

import transformer
from benchmarks import bench_recompute, bench_transformer
from benchmarks.step_measures import saved_activations
from core import parallel_state as ps
from core.tensor_parallel import random as rng_tracker
from core.tensor_parallel import recompute
from distributed import RankFailed, run_distributed

# Sizes: 4 heads and 8 tokens, so that TP 4 splits both; two blocks, so that one block's
# recomputation runs while the other's streams have moved on.
CFG = dict(vocab_size=10, seq_length=8, input_size=8, hidden_size=16, num_heads=4, num_layers=2,
           batch_size=2)
STEPS, DROPOUT = 2, 0.1
GRANULARITIES = ("selective", "full")
# (granularity, distribute_saved_activations): full with each rank keeping 1/TP of the input too
RECOMPUTATIONS = (("selective", False), ("full", False), ("full", True))


def _build(tp, sequence_parallel, granularity, dtype, dropout=DROPOUT, distribute=False):
    rng_tracker.model_parallel_manual_seed(0)
    return transformer.ToyTransformer(
        CFG["vocab_size"], CFG["seq_length"], CFG["input_size"], CFG["hidden_size"],
        CFG["num_heads"], CFG["num_layers"], tensor_parallel=tp > 1, dropout=dropout,
        sequence_parallel=sequence_parallel, dtype=dtype, recompute_granularity=granularity,
        distribute_saved_activations=distribute)


def _train(tp, sequence_parallel, granularity, dtype, distribute=False):
    """Each step's loss and gradients, and the weights after STEPS steps of SGD with momentum."""
    model = _build(tp, sequence_parallel, granularity, dtype, distribute=distribute)
    step = bench_transformer.TransformerStep(model)  # the training scripts' loss and backward
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    history = []
    for _ in range(STEPS):
        tokens = torch.randint(CFG["vocab_size"], (CFG["batch_size"], CFG["seq_length"] + 1),
                               generator=g)
        optimizer.zero_grad(set_to_none=True)
        loss = step.loss(tokens[:, :-1], tokens[:, 1:])
        step.backward(loss)  # and under SP the LayerNorms' partial gradients summed
        history.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        optimizer.step()
    return history, {n: p.detach() for n, p in model.named_parameters()}


def _check_bitwise(recomputations=RECOMPUTATIONS, sequence_parallel=(False, True),
                   dtypes=(torch.float64, torch.float32)):
    tp = ps.get_tensor_model_parallel_world_size()
    for dtype in dtypes:
        for sp in sequence_parallel if tp > 1 else (False,):
            history, weights = _train(tp, sp, None, dtype)
            for granularity, distribute in recomputations:
                if distribute and (sp or tp == 1):
                    continue  # refused with SP (the input is 1/TP already), nothing to split at 1
                run = f"{granularity}{', distributed' if distribute else ''}, {dtype}, TP {tp}, " \
                      f"SP {sp}"
                got, got_weights = _train(tp, sp, granularity, dtype, distribute)
                for i, ((loss, grads), (got_loss, got_grads)) in enumerate(zip(history, got)):
                    assert torch.equal(got_loss, loss), f"{run}: step {i}: loss"
                    for name, grad in grads.items():
                        assert torch.equal(got_grads[name], grad), f"{run}: step {i}: grad {name}"
                for name, weight in weights.items():
                    assert torch.equal(got_weights[name], weight), f"{run}: trained {name}"


@pytest.mark.parametrize("tp", [1, 2])  # (TP 4 splits the same way: the suite's time)
def test_recomputation_changes_no_bit(tp):
    run_distributed(_check_bitwise, tp)


def _check_memory():
    """What each block saves, per layer and rank, equals the formula in every setting (float32 and
    bf16 with dropout, float64 without: the formula's element size and its dropout terms)."""
    tp = ps.get_tensor_model_parallel_world_size()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(CFG["vocab_size"], (CFG["batch_size"], CFG["seq_length"] + 1),
                           generator=g)
    batch = tokens[:, :-1], tokens[:, 1:]
    for sp, granularity, distribute in bench_recompute.SETTINGS.values():
        sp = sp and tp > 1
        for dtype, dropout in ((torch.float32, DROPOUT), (torch.float64, 0.0),
                               (torch.bfloat16, DROPOUT)):
            model = _build(tp, sp, granularity, dtype, dropout, distribute)
            measured = saved_activations(bench_transformer.TransformerStep(model),
                                                    batch)["per_layer"]
            formula = bench_recompute.activation_memory_per_layer(
                dict(CFG, dropout=dropout), tp, sp, granularity,
                bench_recompute.saved_sizes(dtype, "cpu"), distribute)
            assert measured == formula, (f"{granularity}{', distributed' if distribute else ''}, "
                                         f"SP {sp}, TP {tp}, {dtype}, dropout "
                                         f"{dropout}: {measured} bytes saved per layer, the "
                                         f"formula says {formula}")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_saved_bytes_per_layer_equal_the_formula(tp):
    run_distributed(_check_memory, tp)


def test_the_formula_is_table_2_for_the_papers_block():
    """Made the paper's block (16-bit activations, 1-byte masks, an MLP of 4h whose GeLU saves its
    input beside fc2's, no LayerNorm statistics, a causal mask fused into the softmax), the terms
    sum to Korthikanti et al.'s Table 2; full recomputation keeps 1/t of the input where Table 2
    keeps it whole, as full does here unless the input is distributed (Megatron's
    distribute_saved_activations) or split already (sequence parallelism)."""
    s, b, h = 2048, 1, 12288  # GPT-3 175B (Korthikanti et al., Table 3): a = 96, t = 8
    cfg = dict(seq_length=s, batch_size=b, input_size=h, hidden_size=4 * h, num_heads=96,
               dropout=0.1)
    for t in (1, 2, 8):
        for sp, granularity, distribute in bench_recompute.SETTINGS.values():
            sp = sp and t > 1
            terms = bench_recompute.activation_terms(cfg, t, sp, granularity, (2, 1, 0),
                                                     distribute)
            terms.pop("causal mask (bool, every rank)", None)
            gelu_input = 0 if granularity == "full" else s * b * 4 * h * 2 / t
            paper = bench_recompute.table2(cfg, t, sp, granularity)
            if granularity == "full" and (sp or distribute):  # 1/t of the input on each rank
                paper /= t
            assert sum(terms.values()) + gelu_input == pytest.approx(paper, rel=1e-12), \
                (t, sp, granularity)


# Bugs written into recompute.py, and where the checks must catch them.
MUTANTS = {
    "states not set": ("_set_all_rng_states(ctx.rng_states)  # the masks", "pass  #"),
    "streams not put back": ("with _fork_rng(ctx.cuda):", "with contextlib.nullcontext():"),
    "tracker left out": ("get_rng_tracker().set_states(tracker)", "pass"),
    "default generator left out": ("set_default_generator_states(default)", "pass"),
    "input not gathered": ("gather_split_1d_tensor(inputs[0])",
                           "inputs[0].repeat(ps.get_tensor_model_parallel_world_size())"),
    "input kept whole": ("if distribute_saved_activations and", "if False and"),
    "no recomputation": ("return CheckpointFunction.apply(function, distribute_saved_activations, "
                         "*args)", "return function(*args)"),
}


def _with_mutant(mutant, check, *args):
    old, new = MUTANTS[mutant]
    module = types.ModuleType(f"recompute with {mutant}")
    exec(compile(inspect.getsource(recompute).replace(old, new), module.__name__, "exec"),
         module.__dict__)
    transformer.checkpoint = module.checkpoint
    check(*args)


@pytest.mark.parametrize("mutant,args,caught", [
    ("states not set", (), r"selective, torch.float64, TP 2, SP False: step 0: grad"),
    ("streams not put back", (), r"selective, torch.float64, TP 2, SP False: step 1: loss"),
    ("tracker left out", (), r"selective, torch.float64, TP 2, SP False: step 0: grad"),
    # Without SP the block's dropouts outside the split regions draw from the default stream.
    ("default generator left out", ((("full", False),), (False,)),
     r"full, .*, SP False: step 0: grad"),
    ("input not gathered", ((("full", True),), (False,)),
     r"full, distributed, .*, SP False: step 0: grad"),
    ("input kept whole", None, r"full, distributed, SP False, TP 2, .* the formula says"),
    ("no recomputation", None, r"selective, SP False, TP 2, .* the formula says"),
])
def test_the_checks_catch_a_broken_recomputation(mutant, args, caught):
    assert inspect.getsource(recompute).count(MUTANTS[mutant][0]) == 1, \
        f"the line {mutant!r} changes is gone from core/tensor_parallel/recompute.py"
    check = _check_memory if args is None else _check_bitwise
    with pytest.raises(RankFailed, match=f"AssertionError: {caught}"):
        run_distributed(_with_mutant, 2, mutant, check, *(args or ()))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_the_flag_reaches_the_model(granularity, tmp_path):
    """--recompute_granularity, through train.py's build_model (parallel_train.py's too), gives
    a transformer at its defaults whose blocks save what the formula says for that setting."""
    from train import build_model
    from training.arguments import get_args
    args = get_args(["--model", "transformer", "--dropout", "0.1", "--recompute_granularity",
                     granularity, "--out_dir", str(tmp_path)])
    model = build_model(args, torch.device("cpu"))
    cfg = dict(seq_length=args.seq_length, batch_size=2, input_size=args.input_size,
               hidden_size=args.hidden_size, num_heads=args.num_attention_heads, dropout=0.1)
    tokens = torch.randint(args.vocab_size, (2, args.seq_length + 1))
    measured = saved_activations(bench_transformer.TransformerStep(model),
                                            (tokens[:, :-1], tokens[:, 1:]))["per_layer"]
    assert measured == bench_recompute.activation_memory_per_layer(cfg, 1, False, granularity)


def test_recomputation_is_for_the_transformer():
    from test_errors import flag_error
    assert ("--recompute_granularity full recomputes the transformer's blocks; the toy model has "
            "none: add --model transformer") in flag_error(["--recompute_granularity", "full"])
