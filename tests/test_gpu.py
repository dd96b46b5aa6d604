"""On a machine with CUDA: the same runs as on CPU, on the GPU, over NCCL where it fits and over
gloo with CUDA tensors where two ranks share one GPU. Skipped without CUDA (tests/conftest.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from compare_runs import curve_difference
from metrics import read_metrics

pytestmark = pytest.mark.gpu
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
# float64, 50 iterations, default sizes. Serial vs parallel on one GPU: reordered sums only, as on
# CPU (measured there 3.9e-15 over 200 iterations; bound as in test_end_to_end.py). CUDA vs CPU:
# cuBLAS and the CPU's BLAS sum in other orders, round-off of the same size (measured on an H200:
# 2.1e-15 over 200 iterations). float32: 1e-5, as compare_runs.py (measured on the H200, serial vs
# TP=2: 1.16e-6).
RTOL = {"float32": 1e-5, "float64": 5e-14}
ITERS = ["--num_iterations", "50", "--update_freq", "10"]
TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2


def run(cmd, env=ENV):
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out}"
    return out


def launch(nproc, *args, script="parallel_train.py"):
    return run([sys.executable, "scripts/launch.py", "--standalone", "--nproc_per_node", str(nproc),
                script, *args])


@pytest.fixture(scope="module")
def serial_cuda(data_dir, tmp_path_factory):
    out = {}
    for dtype in ("float32", "float64"):
        out[dtype] = str(tmp_path_factory.mktemp(f"serial_cuda_{dtype}"))
        run([sys.executable, "train.py", "--data_dir", data_dir, "--dtype", dtype, *ITERS,
             "--out_dir", out[dtype]])
        assert read_config(out[dtype])["device"] == "cuda"
    return out


def read_config(run_dir):
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)


def assert_same_curve(a, b, dtype):
    rel = max(curve_difference(read_metrics(a), read_metrics(b),
                               column)[1] for column in ("train_loss", "valid_loss"))
    assert rel <= RTOL[dtype], f"{rel:.2e} relative"
    return rel


def test_serial_on_cuda_equals_serial_on_cpu(data_dir, serial_cuda, tmp_path):
    run([sys.executable, "train.py", "--data_dir", data_dir, "--dtype", "float64", *ITERS,
         "--device", "cpu",
         "--out_dir", str(tmp_path)])
    assert_same_curve(serial_cuda["float64"], str(tmp_path), "float64")


def test_tf32_asked_for_by_the_environment_stays_off(data_dir, serial_cuda, tmp_path):
    """An image that sets TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 would make float32 serial and TP differ
    by ~1e-3."""
    env = {**ENV, "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}
    run([sys.executable, "train.py", "--data_dir", data_dir, *ITERS, "--out_dir",
         str(tmp_path / "serial")], env=env)
    run([sys.executable, "scripts/launch.py", "--standalone", "--nproc_per_node", "2",
         "parallel_train.py",
         "--tensor_model_parallel_size", "2", "--data_dir", data_dir, *ITERS, "--out_dir",
         str(tmp_path / "tp")],
        env=env)
    for d in ("serial", "tp"):
        config = read_config(str(tmp_path / d))
        assert config["tf32_override_in_environment"] == "1", config
        assert config["float32_matmul_precision"] == "highest (TF32 off)"
    assert_same_curve(str(tmp_path / "serial"), str(tmp_path / "tp"), "float32")
    assert_same_curve(serial_cuda["float32"], str(tmp_path / "serial"), "float32")


def test_tp1_over_nccl(data_dir, serial_cuda, tmp_path):
    run([sys.executable, "parallel_train.py", "--tensor_model_parallel_size", "1", "--data_dir",
         data_dir,
         "--dtype", "float64", *ITERS, "--out_dir", str(tmp_path)])
    config = read_config(str(tmp_path))
    assert (config["backend"], config["device"], config["backend_note"]) == ("nccl", "cuda:0", None)
    assert_same_curve(serial_cuda["float64"], str(tmp_path), "float64")


@pytest.mark.parametrize("ranks,flags", [(2, ()), (2, ("--sequence_parallel",)), (4, ())])
def test_ranks_sharing_one_gpu_over_gloo(ranks, flags, data_dir, serial_cuda, tmp_path):
    if TWO_GPUS and ranks <= torch.cuda.device_count():
        pytest.skip("every rank has a GPU of its own here: that is NCCL (test_nccl_tp2)")
    out = launch(ranks, "--tensor_model_parallel_size", "2", *flags, "--data_dir", data_dir,
                 "--dtype", "float64",
                 *ITERS, "--out_dir", str(tmp_path))
    assert "note: using gloo, not nccl: rank 1 (on " in out
    assert "would share a GPU with another rank" in out
    config = read_config(str(tmp_path))
    assert (config["backend"], config["device_type"],
            config["data_parallel_size"]) == ("gloo", "cuda", ranks // 2)
    assert_same_curve(serial_cuda["float64"], str(tmp_path), "float64")


def test_bitwise_resume_on_one_gpu(data_dir, tmp_path):
    common = ["--tensor_model_parallel_size", "2", "--data_dir", data_dir, "--dtype", "float64",
              "--update_freq", "10",
              "--save_interval", "20"]
    launch(2, *common, "--num_iterations", "40", "--out_dir", str(tmp_path / "full"))
    ck = str(tmp_path / "ck")
    launch(2, *common, "--num_iterations", "30", "--save", ck, "--out_dir",
           str(tmp_path / "resumed"))
    out = launch(2, *common, "--num_iterations", "40", "--save", ck, "--load", ck, "--out_dir",
                 str(tmp_path / "resumed"))
    assert "at iteration 20" in out
    for name in ("metrics.csv",):
        assert (tmp_path / "full" / name).read_text() == (tmp_path / "resumed" / name).read_text()
    a, b = (torch.load(tmp_path / d / "model.pt") for d in ("full", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not TWO_GPUS,
                    reason="NCCL with 2 ranks needs 2 GPUs (it refuses two ranks on one GPU)")
def test_nccl_tp2(data_dir, serial_cuda, tmp_path):
    launch(2, "--tensor_model_parallel_size", "2", "--data_dir", data_dir, "--dtype", "float64",
           *ITERS,
           "--out_dir", str(tmp_path))
    assert read_config(str(tmp_path))["backend"] == "nccl"
    assert_same_curve(serial_cuda["float64"], str(tmp_path), "float64")


def test_benchmark_tiny_on_cuda(tmp_path):
    out = run([sys.executable, "benchmarks/bench_step.py", "--configs", "tiny", "--steps", "3",
               "--warmup", "1",
               "--device", "cuda", "--out", str(tmp_path / "b.json"), "--plot",
               str(tmp_path / "b.png")])
    report = json.loads((tmp_path / "b.json").read_text())
    steps = {r["variant"]: r for r in report["results"]["tiny"]}
    loops = {r["variant"] for r in report["loops"]["tiny"]}
    if TWO_GPUS:
        assert {"serial-1t", "ours-tp1", "ours-tp2", "ours-sp-tp2", "dtensor-tp2"} <= set(steps)
    else:
        assert set(steps) == {"serial-1t", "ours-tp1"} and loops == {"loop-serial", "loop-ours-tp1"}
        assert ("skipped ours-tp2, ours-sp-tp2, dtensor-tp2 and their loops: 2 ranks need 2 GPUs"
                in out)
    for row in steps.values():
        assert row["device"].startswith("cuda") and row["memory"]["peak_kind"] == "GPU allocated"
        assert row["memory"]["peak"] >= row["memory"]["params"] + row["memory"]["grads"]
    assert steps["ours-tp1"]["comm"]["input_grad"]["calls"] == {}
