"""Issue 11 on any machine: one backend and device for the whole job, the device rule, TF32 pinned,
older torches' collective names, replicated weights identical by construction, missing shards named,
and a rank stuck in C code (as under NCCL when a peer dies) leaving soon."""

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from core import parallel_state as ps
from core import wire as comm
from core.distributed.finalize_model_grads import average_replicated
from curves import assert_same_curve
from distributed import all_ranks, run_distributed, run_script
from training import initialize
from training.operations import pin_float32_precision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd, ok=True, timeout=240):
    """A real launch, in new processes; (output, seconds)."""
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, f"exit {proc.returncode}:\n{out}"
    return out, time.monotonic() - start


def launch(nproc, *args, script="parallel_train.py", ok=True, timeout=240):
    """`torchrun --nproc_per_node nproc script args`, in the session's rank processes."""
    return run_script(script, *args, nproc=nproc, ok=ok, timeout=timeout).out


# ---------------------------------------------------------------------------
# One backend and one device for the whole job, decided from what every rank reports.

def choose(ranks, backend="auto", device="auto"):
    """The job's choice when rank r runs on host ranks[r][0] as local rank ranks[r][1] and sees the
    GPUs with UUIDs ranks[r][2]."""
    seen = []
    for host, local_rank, uuids in ranks:
        with mock.patch.dict(os.environ, {"LOCAL_RANK": str(local_rank)}), \
                mock.patch("socket.gethostname", return_value=host), \
                mock.patch("torch.cuda.is_available", return_value=bool(uuids)), \
                mock.patch("torch.cuda.device_count", return_value=len(uuids)), \
                mock.patch("torch.cuda.get_device_properties", lambda i,
                           uuids=uuids: SimpleNamespace(uuid=uuids[i])):
            seen.append(initialize.this_rank_gpu())
    return initialize.decide_backend(seen, backend, device)


def test_a_gpu_per_rank_is_nccl_on_cuda_without_a_word():
    assert choose([("a", 0, ["g0", "g1"]), ("a", 1, ["g0", "g1"])]) == ("nccl", "cuda", None)


def test_no_gpus_anywhere_is_gloo_on_cpu_without_a_word():
    assert choose([("a", 0, []), ("a", 1, [])]) == ("gloo", "cpu", None)


def test_two_ranks_on_one_gpu_fall_back_to_gloo_on_the_gpu_and_say_so():
    backend, device, note = choose([("a", 0, ["g0"]), ("a", 1, ["g0"])])
    assert (backend, device) == ("gloo", "cuda")
    assert note.startswith(
        "using gloo, not nccl: rank 1 (on a) would share a GPU with another rank")
    with pytest.raises(ps.ParallelConfigError,
                       match="nccl needs a GPU of its own for each of the 2 ranks, but "
                                                     "rank 1 .on a. would share a GPU"):
        choose([("a", 0, ["g0"]), ("a", 1, ["g0"])], backend="nccl")


def test_two_launchers_on_one_machine_never_put_two_nccl_ranks_on_one_gpu():
    # Both "nodes" have LOCAL_RANK 0 and would take cuda:0 (the same UUID): NCCL is ruled out for
    # the job.
    backend, _, note = choose([("a", 0, ["g0", "g1"]), ("a", 0, ["g0", "g1"])])
    assert backend == "gloo" and "rank 1 (on a) would share a GPU" in note


def test_a_node_without_gpus_makes_the_whole_job_gloo_on_cpu():
    # Decided per node, node 0 would pick nccl and node 1 gloo, and they would wait for each other.
    backend, device, note = choose([("a", 0, ["g0"]), ("b", 0, [])])
    assert (backend, device) == ("gloo", "cpu") and "rank 1 (on b) has no GPU" in note
    with pytest.raises(ps.ParallelConfigError, match="--device cuda, but rank 1 .on b. has no GPU"):
        choose([("a", 0, ["g0"]), ("b", 0, [])], device="cuda")
    with pytest.raises(ps.ParallelConfigError, match="nccl moves CUDA tensors only"):
        choose([("a", 0, ["g0"])], backend="nccl", device="cpu")


def test_every_collective_checks_the_device():
    """Every function marked @wire.collective (tests/test_nccl_rules.py checks that no collective
    goes around the wire, and that these are all of them)."""
    import core.context_parallel.attention  # noqa: F401  (not on a run's path yet: issue 38)
    import parallel_train  # noqa: F401  (imports every module that issues a collective)
    with mock.patch.object(comm, "_DEVICE", torch.device("cpu")):
        for name, op in comm.COLLECTIVES.items():
            with pytest.raises(comm.DeviceMismatchError) as e:
                op(torch.empty(4, device="meta"), None)
            assert "was given a tensor on meta, but this run's collectives use cpu" in str(e.value)
            assert "\n" not in str(e.value), name


def _check_staged_copies_come_back():
    """The wire's staging as gloo carrying CUDA tensors does it (a copy of every tensor the
    backend moves), played on the CPU by copying: every path brings the result back where the
    caller wants it — in place (sync and async), a new tensor, a list, an `out=` buffer."""
    from core.optimizer.distrib_optimizer import _all_gather
    from core.tensor_parallel import mappings, sequence_parallel
    comm._on_wire = lambda t, summed=False: t.to(comm._wire_dtype(t, summed)).clone()
    comm._empty_on_wire = lambda out, summed: torch.empty_like(out)
    rank, group = torch.distributed.get_rank(), ps.get_tensor_model_parallel_group()
    base = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    mine, summed = lambda: base + 10 * rank, 2 * base + 10  # rank r's, and both ranks' sum
    t = mine()
    assert mappings._reduce(t, group) is t and torch.equal(t, summed)
    t = mine()
    assert mappings._reduce(t, group, async_op=True)() is t and torch.equal(t, summed)
    gathered = mappings._gather_along_last_dim(mine(), group)
    assert torch.equal(gathered, torch.cat([base, base + 10], -1))
    rows = sequence_parallel._reduce_scatter_along_first_dim(mine(), group, async_op=True)()
    assert torch.equal(rows, summed[rank:rank + 1])
    pieces = [mine(), mine()[0]]
    average_replicated([], pieces)  # the list path (TP 2, DP 1: the sum over the stage's ranks)
    assert torch.equal(pieces[0], summed) and torch.equal(pieces[1], summed[0])
    buffer = torch.zeros(4, dtype=torch.float64)
    buffer[2 * rank:2 * rank + 2] = rank + 1
    assert _all_gather(buffer[2 * rank:2 * rank + 2], group, out=buffer) is buffer
    assert torch.equal(buffer, torch.tensor([1.0, 1, 2, 2], dtype=torch.float64))
    view = comm.collective("a_view", comm.ALL_REDUCE)(lambda x, group: x.view(-1))
    with pytest.raises(comm.CollectiveRuleError, match="must return the tensor it was given"):
        view(mine(), group)


def test_the_wires_staged_copies_come_back_on_every_path():
    run_distributed(_check_staged_copies_come_back, 2)


def test_tf32_is_switched_off_whatever_the_environment_asked():
    torch.set_float32_matmul_precision("high")
    with mock.patch.dict(os.environ, {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}):
        recorded = pin_float32_precision()
        assert os.environ["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] == "0"
    assert torch.get_float32_matmul_precision() == "highest"
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert recorded == {"float32_matmul_precision": "highest (TF32 off)",
                        "tf32_override_in_environment": "1"}


# ---------------------------------------------------------------------------
# Runs.

def test_older_torch_names_give_the_same_run(data_dir, tmp_path):
    """Without 2.13's all_gather_single / reduce_scatter_single (as on torch 2.4 to 2.12), sequence
    parallelism (all-gathers and reduce-scatters) and model.pt (all-gathers) still equal serial."""
    common = ["--data_dir", data_dir, "--dtype", "float64", "--num_iterations", "50",
              "--update_freq", "10"]
    run_script("train.py", *common, "--out_dir", tmp_path / "serial")
    log = launch(2, "--tensor_model_parallel_size", "2", "--sequence_parallel", *common,
                 "--out_dir", str(tmp_path / "old"), script="tests/without_new_collective_names.py")
    assert "all_gather" in log and "reduce_scatter" in log  # the renamed collectives ran
    assert_same_curve(str(tmp_path / "serial"), str(tmp_path / "old"), "float64")
    serial, old = (torch.load(tmp_path / d / "model.pt") for d in ("serial", "old"))
    # measured 3.9e-16 (test_end_to_end)
    assert serial.keys() == old.keys()
    assert all((serial[k] - old[k]).abs().max() <= 5e-15 for k in serial)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    assert config["float32_matmul_precision"] == "highest (TF32 off)"
    expected = ("gloo", "cuda") if torch.cuda.is_available() else ("gloo", "cpu")
    assert (config["backend"], config["device_type"]) == expected


def _check_replicated_average_is_bitwise_identical():
    """Every rank starts from different numbers; afterwards all hold the same bits, and they are
    the data-parallel mean of what tensor-parallel rank 0 of each replica held."""
    rank, tp_rank = torch.distributed.get_rank(), ps.get_tensor_model_parallel_rank()
    values = [torch.randn(5, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(r)) for r in range(6)]
    t = values[rank].clone()
    average_replicated([t])
    everyone = all_ranks(t)
    assert torch.equal(everyone, everyone[:1].expand_as(everyone))
    torch.testing.assert_close(t, (values[0] + values[2] + values[4]) / 3, rtol=0, atol=4e-16)
    # Sequence parallelism: every rank holds a partial sum of its rows; all of them add up.
    t = values[rank].clone()
    average_replicated([], [t])
    everyone = all_ranks(t)
    assert torch.equal(everyone, everyone[:1].expand_as(everyone)) and tp_rank in (0, 1)
    torch.testing.assert_close(t, sum(values) / 3, rtol=0, atol=2e-15)


def test_replicated_gradients_are_averaged_identically_on_every_rank():
    run_distributed(_check_replicated_average_is_bitwise_identical, 6, tp_size=2)


def test_a_missing_shard_is_named(data_dir, tmp_path):
    ck = tmp_path / "ck"
    common = ["--tensor_model_parallel_size", "2", "--data_dir", data_dir, "--save_interval", "10"]
    launch(2, *common, "--num_iterations", "10", "--save", str(ck), "--out_dir",
           str(tmp_path / "a"))
    missing = ck / "iter_0000010" / "mp_rank_01" / "model_optim_rng.pt"
    missing.unlink()
    # Fails fast: no rank waits for the one that cannot read. 30 s for a real launch, less its
    # start-up (about 5 s on 2 cores), which the pooled ranks have behind them.
    out = launch(2, *common, "--load", str(ck), "--out_dir", str(tmp_path / "b"), ok=False,
                 timeout=25)
    assert f"error: {ck} names iteration 10, but {missing} is missing (an incomplete " \
           "checkpoint)" in out, out
    assert out.count("error:") == 1 and "Traceback" not in out
    assert "every node needs its files" not in out, "one node: its name would say nothing new"


def test_a_rank_stuck_in_c_code_leaves_soon_after_its_peer_fails(data_dir, tmp_path):
    """As under NCCL: rank 1 raises, rank 0 is blocked where Python's signal handlers can't run.
    Without the watcher thread, rank 0 would outlive torchrun's SIGTERM until its 30 s grace
    ends."""
    out, seconds = run([sys.executable, "scripts/launch.py", "--standalone",
                        "--nproc_per_node", "2", "tests/inject_fault.py", "stuck", "1", "5",
                        "--tensor_model_parallel_size", "2", "--data_dir", data_dir,
                        "--out_dir", str(tmp_path), "--distributed_timeout_minutes", "1"],
                       ok=False)
    assert seconds < 20, seconds  # 2 s grace after torchrun's SIGTERM, and start-up
    stuck = "error: rank 0 was still inside a collective 2 s after SIGTERM"
    assert out.index("rank 1 failed:") < out.index(stuck)
    assert out.strip().splitlines()[-1].endswith("the first error above is the cause"), out
