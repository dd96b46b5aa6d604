"""The session's rank processes (distributed.py) keep their promises: a failing or hanging rank
fails its test quickly, with its traceback; every job starts from a new process's state whatever
the job before it did on the same rank; and a script runs as torchrun runs it, checked against a
real launch of scripts/launch.py.

Each "leaves it dirty / sees it clean" pair runs on the same rank processes one job after the
other, as any two tests of the suite do. tests/mutants.py switches each isolation off in turn
(pool_*): each of these tests then fails (docs/tests.md, the table of mutants)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from core import parallel_state as ps
from core import wire as comm
from distributed import GRACE_S, REPO, RankFailed, _launch_arguments, run_distributed, run_script


def _rank_1_raises_while_rank_0_waits():
    if dist.get_rank() == 1:
        raise ValueError("rank 1 gave up")
    comm.all_reduce(torch.ones(1), dist.group.WORLD)  # rank 0 waits here for a peer never coming


def _sum_of_ranks():
    t = torch.tensor([float(dist.get_rank())])
    comm.all_reduce(t, dist.group.WORLD)
    assert t.item() == sum(range(dist.get_world_size()))


def test_a_raising_rank_fails_the_test_at_once_and_the_next_one_runs():
    start = time.monotonic()
    with pytest.raises(RankFailed, match="(?s)on rank 1 of 2.*ValueError: rank 1 gave up"):
        run_distributed(_rank_1_raises_while_rank_0_waits, 2)
    # Rank 1 left its world: rank 0's wait ended then, not at gloo's 60 s timeout.
    assert time.monotonic() - start < GRACE_S + 5
    run_distributed(_sum_of_ranks, 2)


def _rank_0_dies():
    if dist.get_rank() == 0:
        os._exit(7)
    comm.all_reduce(torch.ones(1), dist.group.WORLD)


def _rank_0_hangs():
    if dist.get_rank() == 0:
        time.sleep(120)


def test_a_rank_that_dies_or_hangs_fails_the_test_and_is_replaced():
    with pytest.raises(RankFailed, match="on rank 0 of 2:\nexit status 7"):
        run_distributed(_rank_0_dies, 2)
    run_distributed(_sum_of_ranks, 2)
    start = time.monotonic()
    with pytest.raises(RankFailed, match="on rank 0 of 2:\nstill running after 2 s"):
        run_distributed(_rank_0_hangs, 2, timeout=2)
    assert time.monotonic() - start < 10
    run_distributed(_sum_of_ranks, 4)  # a world of another size, with replaced processes
    run_distributed(_sum_of_ranks, 2)


# ---------------------------------------------------------------------------
# A job leaves it dirty; the next job on the same ranks sees it clean.

def _break_things(directory):
    torch.save(torch.rand(3), os.path.join(directory, f"draw{dist.get_rank()}.pt"))
    import draw_diagram  # a module first imported in this job
    from core.tensor_parallel import random as rng_tracker
    from training import metrics
    draw_diagram.ROW = -1
    rng_tracker.model_parallel_manual_seed(3)  # an object's state: the tracker's streams
    metrics.SIZES["toy"] = ()  # an object reachable from a module: a value inside a dict
    comm.all_reduce = None
    comm.comm_calls["all_reduce"] += 5
    del dist.all_gather
    os.environ["LEFT_BEHIND"] = "1"
    torch.manual_seed(99)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(2)
    os.chdir(directory)
    sys.path.insert(0, directory)


def _nothing_left_behind(directory):
    import draw_diagram  # imported afresh, not the patched one
    from core.tensor_parallel import random as rng_tracker
    from training import metrics
    assert draw_diagram.ROW == 16 and not rng_tracker.get_rng_tracker().states
    assert metrics.SIZES["toy"] == ("input_size", "hidden_size", "batch_size")
    assert callable(comm.all_reduce) and not comm.comm_calls and hasattr(dist, "all_gather")
    assert "LEFT_BEHIND" not in os.environ and os.environ["RANK"] == str(dist.get_rank())
    assert torch.get_default_dtype() == torch.float32 and torch.get_num_threads() == 1
    assert os.getcwd() == REPO and directory not in sys.path
    first_draw = torch.load(os.path.join(directory, f"draw{dist.get_rank()}.pt"))
    assert torch.equal(torch.rand(3), first_draw), "the random state the process started with"


def test_a_job_starts_from_a_new_process_state(tmp_path):
    run_distributed(_break_things, 2, str(tmp_path))
    run_distributed(_nothing_left_behind, 2, str(tmp_path))


def _patch_classes():
    """What test_rng_tracker.py's mutant does, and more: class attributes and methods, ours and
    torch's."""
    import contextlib

    from core.tensor_parallel import random as rng_tracker
    rng_tracker.RNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    torch.nn.Linear.forward = lambda self, x: x
    torch.Tensor.add_ = None


def _classes_as_defined():
    from core.tensor_parallel import random as rng_tracker
    assert rng_tracker.RNGStatesTracker.fork.__qualname__ == "RNGStatesTracker.fork"
    assert torch.nn.Linear.forward.__qualname__ == "Linear.forward"
    assert torch.ones(1).add_(1).item() == 2


def test_patched_classes_and_methods_are_as_defined_in_the_next_job():
    run_distributed(_patch_classes, 2)
    run_distributed(_classes_as_defined, 2)


def _leave_signals_threads_and_work():
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=time.sleep, args=(30,), name="left-behind", daemon=True).start()
    # Work left pending on a tensor-parallel group: a message rank 1 never receives, and a group
    # of our own.
    dist.new_group([0, 1])
    if dist.get_rank() == 0:
        dist.isend(torch.tensor([100.0]), 1, group=ps.get_tensor_model_parallel_group())


def _signals_threads_and_work_as_new():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "left-behind" not in [t.name for t in threading.enumerate()]
    # The groups of initialize_model_parallel(2) this rank is in, and the default group: no more.
    assert set(dist.distributed_c10d._world.pg_map) == {
        dist.group.WORLD, ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()}
    # The first message on the TP group is this job's, not what the last job left pending.
    got = torch.tensor([2.0])
    if dist.get_rank() == 0:
        dist.send(got, 1, group=ps.get_tensor_model_parallel_group())
    else:
        dist.recv(got, 0, group=ps.get_tensor_model_parallel_group())
    assert got.item() == 2.0, f"received {got.item()}: a message of the job before"


def test_signal_handlers_threads_groups_and_pending_work_are_new_in_the_next_job():
    run_distributed(_leave_signals_threads_and_work, 2)
    run_distributed(_signals_threads_and_work_as_new, 2)


PROBE = """\
import atexit, json, os, sys, time
path0 = sys.path[0]
sys.path.insert(0, {repo!r})  # as tests/inject_bug.py does: run from outside the repository
from core import wire as communication
out, rank = sys.argv[1], os.environ.get("RANK", "0")
atexit.register(lambda: open(os.path.join(out, "atexit" + rank), "w").close())
json.dump(dict(env=dict(os.environ), path0=path0, check=communication.CHECK_COLLECTIVES),
          open(os.path.join(out, "rank" + rank + ".json"), "w"))
if rank == "0" and len(sys.argv) > 2:  # after rank 1 has left: torchrun's report is then certain
    for _ in range(1000):  # 10 s at most: a launcher that runs no atexit handler fails the test
        if os.path.exists(os.path.join(out, "atexit1")):
            break
        time.sleep(0.01)
    time.sleep(0.5)
    sys.exit(int(sys.argv[2]))
"""


def _probe(tmp_path, name):
    out = tmp_path / name
    out.mkdir()
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)
                 if (out / f"rank{r}.json").exists()]


def test_environment_read_at_import_is_the_jobs_own(tmp_path):
    """core/wire.py reads TP_CHECK_COLLECTIVES when imported: each job imports it afresh."""
    (tmp_path / "probe.py").write_text(PROBE.format(repo=REPO))
    for value in ("0", "1", "0"):
        out = tmp_path / value / str(time.monotonic_ns())
        out.mkdir(parents=True)
        run_script(str(tmp_path / "probe.py"), out, env={"TP_CHECK_COLLECTIVES": value})
        assert json.loads((out / "rank0.json").read_text())["check"] == (value == "1")


def test_a_script_runs_as_scripts_launch_py_runs_it(tmp_path):
    """The same probe through a real torchrun (scripts/launch.py) and through the pool: the
    environment torchrun's agent sets, sys.path[0], atexit handlers, exit status and last line."""
    (tmp_path / "probe.py").write_text(PROBE.format(repo=REPO))
    real_out, pooled_out = tmp_path / "real", tmp_path / "pooled"
    real_out.mkdir(), pooled_out.mkdir()
    before = dict(os.environ)
    real = subprocess.run([sys.executable, "scripts/launch.py", "--standalone",
                           "--nproc_per_node", "2", str(tmp_path / "probe.py"), str(real_out),
                           "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    pooled = run_script(str(tmp_path / "probe.py"), pooled_out, "2", nproc=2, ok=False)
    assert real.returncode == pooled.code == 1  # torchrun's status: a rank failed
    line = f"torchrun: {tmp_path / 'probe.py'} failed (rank 0 exited with 2); the first error " \
           "above is the cause\n"
    assert real.stderr.endswith(line) and pooled.stderr.endswith(line)
    for out in (real_out, pooled_out):
        assert sorted(os.listdir(out)) == ["atexit0", "atexit1", "rank0.json", "rank1.json"]
    for rank in range(2):
        real_rank, pooled_rank = (json.loads((out / f"rank{rank}.json").read_text())
                                  for out in (real_out, pooled_out))
        assert pooled_rank["path0"] == real_rank["path0"] == str(tmp_path)
        # Not torchrun's: the shell's "_", and the terminal's size (seen set in the real
        # workers' environment under pytest, and not in pytest's).
        set_by = {out: {k: v for k, v in r["env"].items()
                        if before.get(k) != v and k not in ("_", "COLUMNS", "LINES")}
                  for out, r in (("real", real_rank), ("pooled", pooled_rank))}
        assert set(set_by["pooled"]) == set(set_by["real"]), "torchrun's variables, all of them"
        per_run = {"MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE"}
        assert {k: v for k, v in set_by["pooled"].items() if k not in per_run} == {
            k: v for k, v in set_by["real"].items() if k not in per_run}


def test_a_script_error_and_a_harness_error_are_told_apart(tmp_path):
    run = run_script("prepare_data.py", "--data_dir", tmp_path, "--num_samples", "0", ok=False)
    assert (run.code, run.stdout) == (2, "")
    assert run.stderr == ("prepare_data.py: error: --num_samples must be at least 10 and "
                          "--input_size at least 1 (see --help)\n")
    run = run_script("parallel_train.py", "--hidden_size", "101", nproc=2, ok=False)
    assert run.code == 1, "torchrun's status when a rank exits non-zero"
    assert run.stderr.count("--hidden_size 101 is not divisible") == 1  # said once, by rank 0
    assert "torchrun: parallel_train.py failed (rank 0 exited with 2" in run.stderr
    assert run.stderr.endswith("); the first error above is the cause\n")
    # An error of the pool itself (an environment value that is not a string) is a failure with
    # its traceback, not an exit status.
    with pytest.raises(RankFailed, match="(?s)the rank pool failed running prepare_data.py.*"
                                         "TypeError"):
        run_script("prepare_data.py", "--data_dir", tmp_path, env={"SEED": 1})


def test_command_lines_are_read_as_torchrun_reads_them():
    for flags in (["--nproc_per_node", "2"], ["--nproc-per-node=2"], ["--standalone",
                                                                      "--nproc_per_node=2"]):
        assert _launch_arguments(["scripts/launch.py", *flags, "train.py", "--x", "1"]) == (
            ["train.py", "--x", "1"], 2)
    assert _launch_arguments(["-m", "benchmarks.scaling", "--quick"]) == (
        ["-m", "benchmarks.scaling", "--quick"], None)
    with pytest.raises(ValueError, match="--nnodes needs a real one"):
        _launch_arguments(["scripts/launch.py", "--nnodes", "2", "train.py"])
