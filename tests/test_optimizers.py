"""--optimizer adam beside the default SGD with momentum (Megatron's default optimizer, for its
memory table; issue 31): equal to serial under tensor parallelism, its two moments and step
count carried through a checkpoint cut for another tensor-parallel size.

Adam's update is element-wise, so a shard's update is the serial update's slice: the curves
agree to round-off, as SGD's do (float64: 5e-14 relative, curves.py).
"""

import torch

from curves import assert_same_curve, rows_after
from distributed import run_script

ADAM = ["--optimizer", "adam", "--init_lr", "1e-3", "--hidden_size", "256", "--dtype", "float64",
        "--num_iterations", "16", "--update_freq", "4", "--eval_interval", "8"]


def test_adam_under_tensor_parallelism_is_serial_and_resumes_at_another_size(data_dir, tmp_path):
    """TP 2 with Adam saved at 10, resumed at TP 1 (the moments cut with their parameters): the
    serial Adam run's curve and final weights, within float64 round-off."""
    from test_scale import killed_after
    flags = [*ADAM, "--data_dir", data_dir]
    serial, out, ck = (str(tmp_path / d) for d in ("serial", "out", "ck"))
    run_script("train.py", *flags, "--out_dir", serial)
    run_script("parallel_train.py", *flags, "--out_dir", out, "--save", ck, "--save_interval",
               "10", nproc=2)
    assert_same_curve(serial, out, "float64")
    shard = torch.load(f"{ck}/iter_0000010/mp_rank_00/model_optim_rng.pt", weights_only=True)
    assert {"exp_avg", "exp_avg_sq", "step"} <= shard["optimizer"]["state"][0].keys()
    killed_after(ck, 10)
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
