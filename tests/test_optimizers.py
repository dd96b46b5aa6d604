"""--optimizer adam beside the default SGD with momentum (Megatron's default optimizer, for its
memory table; issue 31): equal to serial under tensor parallelism, its two moments and step
count carried through a checkpoint cut for another tensor-parallel size. With --weight_decay
(Megatron's decoupled decay, AdamW): the weights decayed, the biases and norms not, in every
path (plain, bf16's main parameters; the distributed optimizer's pieces:
test_distrib_optimizer.py); the decay kept by a resume; --weight_decay 0 is torch's Adam as
before.

Adam's update is element-wise, so a shard's update is the serial update's slice: the curves
agree to round-off, as SGD's do (float64: 5e-14 relative, curves.py).
"""

import pytest
import torch

from curves import assert_same_curve, rows_after
from distributed import run_script

ADAM = ["--optimizer", "adam", "--init_lr", "1e-3", "--hidden_size", "256", "--dtype", "float64",
        "--num_iterations", "16", "--update_freq", "4", "--eval_interval", "8",
        "--weight_decay", "0.1"]
SMALL = ["--model", "transformer", "--input_size", "8", "--hidden_size", "16",
         "--num_attention_heads", "2", "--init_lr", "1e-3"]


def test_adam_under_tensor_parallelism_is_serial_and_resumes_at_another_size(data_dir, tmp_path):
    """TP 2 with Adam and weight decay saved at 10, resumed at TP 1 (the moments cut with their
    parameters, the decay kept; another --weight_decay refused): the serial run's curve and final
    weights, within float64 round-off."""
    from test_scale import killed_after
    flags = [*ADAM, "--data_dir", data_dir]
    serial, out, ck = (str(tmp_path / d) for d in ("serial", "out", "ck"))
    run_script("train.py", *flags, "--out_dir", serial)
    run_script("parallel_train.py", *flags, "--out_dir", out, "--save", ck, "--save_interval",
               "10", nproc=2)
    assert_same_curve(serial, out, "float64")
    shard = torch.load(f"{ck}/iter_0000010/mp_rank_00/model_optim_rng.pt", weights_only=True)
    assert {"exp_avg", "exp_avg_sq", "step"} <= shard["optimizer"]["state"][0].keys()
    # The toy model's three weights are decayed; it has no bias or norm (the transformer has).
    assert [(g["weight_decay"], g["params"]) for g in shard["optimizer"]["param_groups"]] == [
        (0.1, [0, 1, 2]), (0.0, [])]
    killed_after(ck, 10)
    refused = run_script("parallel_train.py", *flags, "--weight_decay", "0", "--load", ck,
                         "--out_dir", tmp_path / "refused", "--tensor_model_parallel_size", "1",
                         nproc=1, ok=False)
    assert (f"{ck} (iteration 10) was saved by a run with --weight_decay 0.1, this one has 0; "
            "resume with --weight_decay 0.1") in refused.stderr, refused.out
    log = run_script("parallel_train.py", *flags, "--out_dir", out, "--save", ck, "--load", ck,
                     "--tensor_model_parallel_size", "1", nproc=1).out
    assert "resharded from tensor-parallel size 2 to 1" in log, log
    assert_same_curve(rows_after(serial, 10), rows_after(out, 10), "float64")
    wa, wb = (torch.load(f"{d}/model.pt") for d in (serial, out))
    for name in wa:  # measured: at most 1.2e-16 (weights up to 0.14); bound about 10x
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=1.5e-15), name


def test_adam_flags_that_cannot_run_are_one_line():
    from test_errors import flag_error
    assert "--adam_beta2 must be in [0, 1), got 1.0" in flag_error(
        ["--optimizer", "adam", "--adam_beta2", "1"])
    assert "--adam_eps must be a positive number, got 0.0" in flag_error(["--adam_eps", "0"])
    for value in ("-0.1", "nan", "inf"):
        assert f"--weight_decay must be a non-negative number, got {float(value)}" in flag_error(
            ["--weight_decay", value])


def _optimizer(*flags):
    """A small transformer's optimizer under train.py's `flags` (in process), and the names of
    the parameters it steps (under bf16 the fp32 main copies)."""
    from train import build_model, make_optimizer
    from training.arguments import get_args
    from training.mixed_precision import main_model
    args = get_args([*SMALL, *flags])
    model = build_model(args, torch.device("cpu"))
    optimizer = make_optimizer(model, args)
    names = {id(p): n for n, p in main_model(model, optimizer).named_parameters()}
    return optimizer, names, args


@pytest.mark.parametrize("flags", [("--optimizer", "adam", "--dtype", "float64"),
                                   ("--optimizer", "adam", "--weight_decay", "0.1",
                                    "--dtype", "bfloat16"),
                                   ("--optimizer", "sgd", "--weight_decay", "0.1",
                                    "--dtype", "float64")])
def test_the_weights_are_decayed_the_biases_and_norms_not(flags):
    """Megatron's groups: weights (2 dims: embeddings, projections) decayed, the biases and the
    LayerNorms (1-D) not. One step from a fresh state, against its closed form: Adam's first
    update is g / (|g| + eps), AdamW's decay p (1 - lr wd) beside it (decoupled); SGD's decay is
    wd p added to the gradient (L2, as Megatron's SGD)."""
    optimizer, names, args = _optimizer(*flags)
    lr, wd = args.init_lr, args.weight_decay
    assert wd == (0.1 if "--weight_decay" in flags else 0.01)  # Adam's default: Megatron's
    decayed, other = optimizer.param_groups
    assert [names[id(p)] for p in decayed["params"]] == [
        n for n in names.values() if n.endswith("weight") and ".ln" not in n and "ln_f" not in n]
    assert {n.rsplit(".", 1)[-1] for n in map(names.get, map(id, other["params"]))} == {
        "weight", "bias"} and all(p.dim() == 1 for p in other["params"])
    assert (decayed["weight_decay"], other["weight_decay"]) == (wd, 0.0)
    generator = torch.Generator().manual_seed(0)
    before = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            before[id(p)] = (p.detach().clone(), p.grad.clone())
    optimizer.step()
    for group in optimizer.param_groups:
        for p in group["params"]:
            p0, g = before[id(p)]
            decay = lr * group["weight_decay"]
            expected = (p0 * (1 - decay) - lr * g / (g.abs() + args.adam_eps)
                        if args.optimizer == "adam" else p0 - lr * (g + group["weight_decay"] * p0))
            tol = 1e-12 if p.dtype == torch.float64 else 1e-6  # bf16's fp32 main parameters
            assert torch.allclose(p.detach(), expected, rtol=tol, atol=tol * lr), names[id(p)]
            assert (decay > 0) == (p.dim() > 1), names[id(p)]


def test_weight_decay_0_is_torchs_adam_as_before():
    """--weight_decay 0: torch.optim.Adam over one group, stepping as the optimizer before the flag
    did, bit for bit; SGD's default has no weight decay and one group (the original's runs)."""
    from train import build_model
    optimizer, names, args = _optimizer("--optimizer", "adam", "--weight_decay", "0",
                                        "--dtype", "float64")
    assert type(optimizer) is torch.optim.Adam and len(optimizer.param_groups) == 1
    params = optimizer.param_groups[0]["params"]
    twin = build_model(args, torch.device("cpu"))  # the same init, stepped by yesterday's Adam
    before = torch.optim.Adam(twin.parameters(), lr=args.init_lr, eps=args.adam_eps,
                              betas=(args.adam_beta1, args.adam_beta2))
    group, then = optimizer.param_groups[0], before.param_groups[0]
    assert {k: v for k, v in group.items() if k != "params"} == {
        k: v for k, v in then.items() if k != "params"}
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(params, twin.parameters()):
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            q.grad = p.grad.clone()
        optimizer.step()
        before.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin.parameters()))
    assert optimizer.state_dict()["param_groups"] == before.state_dict()["param_groups"]
    sgd, _, args = _optimizer("--dtype", "float64")
    assert args.weight_decay == 0 and type(sgd) is torch.optim.SGD
    assert [g["weight_decay"] for g in sgd.param_groups] == [0]
