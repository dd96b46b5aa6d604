"""End to end: the scripts with a user's flags, serial against tensor-parallel. The runs go
through the session's rank processes as torchrun would start them (distributed.run_script);
test_errors.py and test_scale.py launch real torchruns for what only a launcher shows.

Measured here over the default run (200 iterations, input 64, hidden 2048,
batch 32), serial against tensor-parallel on CPU/gloo:
  float32  loss: at most 9.3e-7 relative (TP=2), 1.4e-6 (TP=4)
           final weights: at most 1.2e-7 absolute (weights of size <= 0.35)
  float64  loss: at most 3.9e-15 relative; final weights: at most 3.9e-16
The bounds below leave about 10x over those numbers. A dropped or wrong
all-reduce moves the loss by more than 1e-2 (and the ranks then disagree,
which stops the run).
"""

import os

import pytest
import torch

from curves import assert_same_curve, rows_after
from distributed import comm_table, run_script

WEIGHT_ATOL = {"float32": 1e-6, "float64": 5e-15}


def torchrun(nproc, *args, ok=True):
    """parallel_train.py as `torchrun --nproc_per_node nproc` starts it, at TP = nproc."""
    return run_script("parallel_train.py", "--tensor_model_parallel_size", nproc, *args,
                      nproc=nproc, ok=ok).out


def assert_same_run(serial_dir, parallel_dir, dtype):
    assert_same_curve(serial_dir, parallel_dir, dtype)
    # The shards, put back together, are the serial model's final weights.
    wa = torch.load(os.path.join(serial_dir, "model.pt"))
    wb = torch.load(os.path.join(parallel_dir, "model.pt"))
    assert wa.keys() == wb.keys() == {"mlp.fc1.weight", "mlp.fc2.weight", "fc.weight"}
    for name in wa:
        err = (wa[name] - wb[name]).abs().max().item()
        assert err <= WEIGHT_ATOL[dtype], f"final {name} differs by {err:.2e}"


# (TP 4: test_sequence_parallel_train.py's curve and table, test_precision.py's bf16 runs.)
@pytest.mark.parametrize("tp,dtype", [(2, "float32"), (2, "float64")])
def test_parallel_run_matches_serial(tp, dtype, data_dir, serial_runs, tmp_path):
    log = torchrun(tp, "--data_dir", data_dir, "--update_freq", "10", "--dtype", dtype, "--out_dir",
                   str(tmp_path))
    for rank in range(tp):
        assert f"Rank {rank} Iter 200 Train Loss " in log
    # What the printed number is, said once, before the first (--help said "running").
    assert log.count("(Train Loss: the sum of the last 10 iterations' losses, as the original "
                     "prints it; metrics.csv has each iteration's)\nRank 0 Iter 10 ") == 1, log
    # g only: f's backward all-reduce has no gradient to carry. A ring all-reduce of batch x input
    # (32x64) sends 2 (TP-1)/TP of it per rank.
    kib = 32 * 64 * {"float32": 4, "float64": 8}[dtype] / 1024
    assert comm_table(log)["all_reduce"] == pytest.approx((1, kib, 2 * (tp - 1) / tp * kib),
                                                          abs=0.005), log
    assert_same_run(serial_runs[dtype], str(tmp_path), dtype)
    out = run_script("compare_runs.py", serial_runs[dtype], str(tmp_path)).out
    assert "MATCH over 200 iterations" in out


def test_match_report_fails_on_a_different_curve(serial_runs, tmp_path):
    lines = open(os.path.join(serial_runs["float32"], "metrics.csv")).read().splitlines()
    it, loss, valid = lines[100].split(",")
    lines[100] = f"{it},{float(loss) * (1 + 1e-4)},{valid}"  # one loss off by 1e-4 relative
    (tmp_path / "metrics.csv").write_text("\n".join(lines) + "\n")
    out = run_script("compare_runs.py", serial_runs["float32"], str(tmp_path), ok=False).out
    assert "train_loss  max abs diff" in out and "(BEYOND rtol 1e-05)" in out
    assert "DIFFER over 200 iterations" in out


@pytest.mark.parametrize("kind", ["drop", "average"])
def test_match_report_catches_a_broken_all_reduce(kind, data_dir, serial_runs, tmp_path):
    # Dropping g's sum makes the ranks' losses disagree: the run stops at its first check (iteration
    # 10). Averaging keeps them equal, so the run finishes, on another curve.
    out = run_script("tests/inject_bug.py", kind, "--data_dir", data_dir, "--update_freq",
                     "10", "--out_dir", tmp_path, nproc=2, ok=kind == "average").out
    if kind == "drop":
        assert "error: tensor-parallel ranks disagree on the loss by iteration 10" in out, out
    else:
        assert "Rank 1 Iter 200 Train Loss" in out
    report = run_script("compare_runs.py", serial_runs["float32"], str(tmp_path), ok=False).out
    if kind == "average":
        assert "BEYOND" in report and "DIFFER over 200 iterations" in report
    else:  # a run that stopped early is not compared number by number
        assert ("error: these runs cannot be compared: the runs have 200 and 10 iterations "
                "(did one stop early?)") in report


def test_plain_python_runs_one_rank_and_init_from_shards(data_dir, serial_runs, tmp_path):
    """parallel_train.py without torchrun is a one-rank job; --init_from continues a run under TP=2.
    """
    start = os.path.join(serial_runs["float64"], "model.pt")
    args = ("--data_dir", data_dir, "--dtype", "float64", "--num_iterations", "20", "--init_from",
            start)
    run_script("train.py", *args, "--out_dir", tmp_path / "serial")
    run_script("parallel_train.py", "--tensor_model_parallel_size", "1", *args,
               "--out_dir", tmp_path / "tp1")  # plain python: no torchrun
    torchrun(2, *args, "--out_dir", str(tmp_path / "tp2"))
    a = str(tmp_path / "serial")
    assert rows_after(a)["train_loss"][0] < 0.5  # it continued from the trained model
    for other in ("tp1", "tp2"):
        assert_same_curve(a, str(tmp_path / other), "float64")


def test_clear_errors(data_dir, tmp_path):
    out = run_script("parallel_train.py", "--tensor_model_parallel_size", "2", ok=False).out
    assert "launch with torchrun --nproc_per_node 2" in out and "Traceback" not in out
    out = run_script("train.py", "--data_dir", tmp_path / "nowhere", ok=False).out
    assert f"create the data with: python prepare_data.py --data_dir {tmp_path / 'nowhere'}" in out
    assert "Traceback" not in out
    out = torchrun(2, "--data_dir", str(tmp_path / "nowhere"), "--distributed_backend", "gloo",
                   ok=False)
    assert "create the data with" in out
    assert "Traceback (most recent call last)" not in out.split("error:")[0]
    out = run_script("train.py", "--data_dir", data_dir, "--input_size", "32", ok=False).out
    assert "pass --input_size 64" in out
    out = run_script("parallel_train.py", "--tensor_model_parallel_size", "1",
                     "--hidden_size", "0", ok=False).out
    assert "--hidden_size must be a positive integer" in out
    out = torchrun(2, "--hidden_size", "101", ok=False)
    assert "--hidden_size 101 is not divisible by --tensor_model_parallel_size 2" in out
    assert out.count("parallel_train.py: error:") == 1  # said once, by rank 0


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the message for a machine without GPUs")
def test_nccl_without_gpus_is_a_clear_error(data_dir):
    out = run_script("parallel_train.py", "--tensor_model_parallel_size", "1",
                     "--distributed_backend", "nccl", "--data_dir", data_dir, ok=False).out
    assert ("error: --distributed_backend nccl needs a GPU of its own for each of the 1 ranks, "
            "but rank 0 (on ") in out
    assert "has no GPU; use --distributed_backend gloo (or auto)" in out
    assert "Traceback" not in out
