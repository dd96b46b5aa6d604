"""On a machine with CUDA: the same runs as on CPU, on the GPU, over NCCL where it fits and over
gloo with CUDA tensors where two ranks share one GPU. Skipped without CUDA (tests/conftest.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from curves import assert_bitwise_same_run, assert_same_curve, rows_after
from test_scale import killed_after

pytestmark = pytest.mark.gpu
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
# float64, 50 iterations, default sizes. Serial vs parallel on one GPU: reordered sums only, as on
# CPU (measured there 3.9e-15 over 200 iterations; bound as in test_end_to_end.py). CUDA vs CPU:
# cuBLAS and the CPU's BLAS sum in other orders, round-off of the same size (measured on an H200:
# 2.1e-15 over 200 iterations). float32: 1e-5, as compare_runs.py (measured on the H200, serial vs
# TP=2: 1.16e-6). curves.RTOL holds these bounds.
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


def stopped_and_resumed(common, tmp_path):
    """Run 40 iterations; then 30, killed after the checkpoint at 20, resumed to 40 from it;
    assert the two runs are the same bit for bit."""
    launch(2, *common, "--num_iterations", "40", "--out_dir", str(tmp_path / "full"))
    ck = str(tmp_path / "ck")
    launch(2, *common, "--num_iterations", "30", "--save", ck, "--out_dir",
           str(tmp_path / "resumed"))
    killed_after(ck, 20)
    out = launch(2, *common, "--num_iterations", "40", "--save", ck, "--load", ck, "--out_dir",
                 str(tmp_path / "resumed"))
    assert "at iteration 20" in out
    assert_bitwise_same_run(str(tmp_path / "full"), str(tmp_path / "resumed"))


def test_bitwise_resume_on_one_gpu(data_dir, tmp_path):
    stopped_and_resumed(["--tensor_model_parallel_size", "2", "--data_dir", data_dir, "--dtype",
                         "float64", "--update_freq", "10", "--save_interval", "20"], tmp_path)


@pytest.mark.skipif(not TWO_GPUS,
                    reason="NCCL with 2 ranks needs 2 GPUs (it refuses two ranks on one GPU)")
def test_nccl_tp2(data_dir, serial_cuda, tmp_path):
    launch(2, "--tensor_model_parallel_size", "2", "--data_dir", data_dir, "--dtype", "float64",
           *ITERS,
           "--out_dir", str(tmp_path))
    assert read_config(str(tmp_path))["backend"] == "nccl"
    assert_same_curve(serial_cuda["float64"], str(tmp_path), "float64")


def test_benchmark_tiny_on_cuda(tmp_path):
    out = run([sys.executable, "-m", "benchmarks.bench_step", "--configs", "tiny", "--steps", "3",
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


# ---------------------------------------------------------------------------
# The transformer on the GPU: dropout's streams, exact resume, resharding, NCCL.

TRANSFORMER = ["--model", "transformer", "--dtype", "float64", "--init_lr", "0.01",
               "--update_freq", "10"]

# A new process: CUDA not initialised yet, so torch.manual_seed only queues the CUDA seeding (the
# case the tracker must handle). Dropout outside the split regions must draw from --seed's stream,
# inside from the tracker's (seed + 2718 + TP rank), on the CUDA generator.
TWO_STREAMS = """
import torch, rng_tracker
rng_tracker.model_parallel_manual_seed(7, torch.device("cuda"))
outside = torch.rand(8, device="cuda")
with rng_tracker.get_rng_tracker().fork():
    inside = torch.rand(8, device="cuda")
torch.cuda.manual_seed(7); expected_outside = torch.rand(8, device="cuda")
torch.cuda.manual_seed(7 + 2718); expected_inside = torch.rand(8, device="cuda")
assert torch.equal(outside, expected_outside), "the outside dropout lost --seed's stream"
assert torch.equal(inside, expected_inside), "the inside dropout lost the tracker's stream"
print("two streams")
"""


def test_dropouts_two_streams_stay_apart_on_cuda():
    assert "two streams" in run([sys.executable, "-c", TWO_STREAMS])


def test_transformer_sequence_parallel_dropout_resumes_bit_for_bit_on_one_gpu(token_dir,
                                                                                 tmp_path):
    """TP=2 over gloo with CUDA tensors, --dropout 0.1 and --sequence_parallel, stopped at 30 and
    resumed from the checkpoint at 20: the run that was not stopped, bit for bit. Needs the CUDA
    generator's state in the checkpoint (dropout outside the split regions draws from it)."""
    stopped_and_resumed([*TRANSFORMER, "--tensor_model_parallel_size", "2", "--data_dir",
                         token_dir, "--dropout", "0.1", "--sequence_parallel", "--save_interval",
                         "20"], tmp_path)
    assert read_config(str(tmp_path / "full"))["device_type"] == "cuda"


@pytest.mark.parametrize("model", ["toy", "transformer"])
def test_nccl_world_of_one_and_a_checkpoint_resharded_to_it(model, data_dir, token_dir, tmp_path):
    """TP=2 over gloo on one GPU to iteration 20, then TP=1 over NCCL from its checkpoint (cut at
    load time): the curve of serial training on the GPU, for both models."""
    flags = ([*TRANSFORMER, "--data_dir", token_dir] if model == "transformer" else
             ["--data_dir", data_dir, "--dtype", "float64", "--update_freq", "10"])
    run([sys.executable, "train.py", *flags, "--num_iterations", "30",
         "--out_dir", str(tmp_path / "serial")])
    ck = str(tmp_path / "ck")
    launch(2, *flags, "--tensor_model_parallel_size", "2", "--num_iterations", "20", "--save", ck,
           "--save_interval", "20", "--out_dir", str(tmp_path / "tp"))
    out = run([sys.executable, "parallel_train.py", *flags, "--tensor_model_parallel_size", "1",
               "--num_iterations", "30", "--load", ck, "--out_dir", str(tmp_path / "tp")])
    assert "resharded from tensor-parallel size 2 to 1" in out
    config = read_config(str(tmp_path / "tp"))
    assert (config["backend"], config["device"]) == ("nccl", "cuda:0")
    # Every train loss; validation where both took it (the stopped run also took one at 20).
    serial, tp = str(tmp_path / "serial"), str(tmp_path / "tp")
    assert_same_curve(serial, tp, "float64", columns=["train_loss"])
    assert_same_curve(rows_after(serial, 20), rows_after(tp, 20), "float64")


@pytest.mark.skipif(not TWO_GPUS,
                    reason="NCCL with 2 ranks needs 2 GPUs (it refuses two ranks on one GPU)")
def test_nccl_tp2_transformer(token_dir, tmp_path):
    """The transposed gradient that reaches f in the transformer (NCCL refuses non-contiguous
    tensors), dropout and sequence parallelism, over NCCL: the serial curve."""
    flags = [*TRANSFORMER, "--data_dir", token_dir, "--num_iterations", "30"]
    run([sys.executable, "train.py", *flags, "--out_dir", str(tmp_path / "serial")])
    for extra in ([], ["--sequence_parallel"]):
        launch(2, *flags, "--tensor_model_parallel_size", "2", *extra,
               "--out_dir", str(tmp_path / "tp"))
        assert read_config(str(tmp_path / "tp"))["backend"] == "nccl"
        assert_same_curve(str(tmp_path / "serial"), str(tmp_path / "tp"), "float64")


def test_recomputation_changes_no_bit_on_one_gpu(token_dir, tmp_path):
    """TP=2 over gloo with CUDA tensors, --dropout 0.1 and --sequence_parallel: full and selective
    recomputation give the run without it, bit for bit (the CUDA generator's state and the
    tracker's CUDA streams restored around every recomputation)."""
    flags = [*TRANSFORMER, "--tensor_model_parallel_size", "2", "--data_dir", token_dir,
             "--dropout", "0.1", "--sequence_parallel", "--num_iterations", "20"]
    for granularity in (None, "full", "selective"):
        extra = ["--recompute_granularity", granularity] if granularity else []
        launch(2, *flags, *extra, "--out_dir", str(tmp_path / str(granularity)))
        assert read_config(str(tmp_path / str(granularity)))["device_type"] == "cuda"
    for granularity in ("full", "selective"):
        assert_bitwise_same_run(str(tmp_path / "None"), str(tmp_path / granularity))


def test_recompute_benchmark_on_one_gpu(tmp_path):
    """On a GPU dropout saves a bool mask and LayerNorm float32 statistics: the formula's sizes
    there (bench_recompute.saved_sizes), measured at TP 1."""
    run([sys.executable, "-m", "benchmarks.bench_recompute", "--configs", "tiny_transformer",
         "--steps", "2", "--warmup", "1", "--max_tp", "1", "--device", "cuda", "--out",
         str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    rows = json.loads((tmp_path / "r.json").read_text())["results"]["tiny_transformer"]
    assert {r["setting"] for r in rows} == {"none", "selective", "full"}
    assert all(r["match"] for r in rows)
