"""The session's rank processes (distributed.py) keep their promises: a failing or hanging rank
fails its test quickly, with its traceback, and the next test gets working ranks that start from
a new process's state."""

import os
import time

import pytest
import torch
import torch.distributed as dist

import parallel_state as ps
from distributed import GRACE_S, RankFailed, _launch_arguments, run_distributed, run_script


def _rank_1_raises_while_rank_0_waits():
    if dist.get_rank() == 1:
        raise ValueError("rank 1 gave up")
    ps.all_reduce(torch.ones(1))  # rank 0 waits here for a peer that never comes


def _sum_of_ranks():
    t = torch.tensor([float(dist.get_rank())])
    ps.all_reduce(t)
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
    ps.all_reduce(torch.ones(1))


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
    run_distributed(_sum_of_ranks, 4)  # a new world of another size, with a replaced process
    run_distributed(_sum_of_ranks, 2)


def _break_things(directory):
    torch.save(torch.rand(3), os.path.join(directory, f"draw{dist.get_rank()}.pt"))
    import draw_diagram  # a module first imported in this job
    import rng_tracker
    draw_diagram.ROW = -1
    rng_tracker.model_parallel_manual_seed(3)  # an object's state: the tracker's streams
    ps.all_reduce = None
    ps.comm_calls["all_reduce"] += 5
    del dist.all_gather
    os.environ["LEFT_BEHIND"] = "1"
    torch.manual_seed(99)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(2)


def _nothing_left_behind(directory):
    import draw_diagram  # imported afresh, not the patched one
    import rng_tracker
    assert draw_diagram.ROW == 16 and not rng_tracker.get_rng_tracker().states
    assert callable(ps.all_reduce) and not ps.comm_calls and hasattr(dist, "all_gather")
    assert "LEFT_BEHIND" not in os.environ and os.environ["RANK"] == str(dist.get_rank())
    assert torch.get_default_dtype() == torch.float32 and torch.get_num_threads() == 1
    first_draw = torch.load(os.path.join(directory, f"draw{dist.get_rank()}.pt"))
    assert torch.equal(torch.rand(3), first_draw), "the random state the process started with"


def test_a_job_starts_from_a_new_process_state(tmp_path):
    run_distributed(_break_things, 2, str(tmp_path))
    run_distributed(_nothing_left_behind, 2, str(tmp_path))


def test_a_script_runs_as_python_or_torchrun_would_start_it(tmp_path):
    run = run_script("prepare_data.py", "--data_dir", tmp_path, "--num_samples", "0", ok=False)
    assert (run.code, run.stdout) == (2, "")
    assert run.stderr == ("prepare_data.py: error: --num_samples must be at least 10 and "
                          "--input_size at least 1 (see --help)\n")
    assert "Traceback" not in run.stderr
    run = run_script("parallel_train.py", "--hidden_size", "101", nproc=2, ok=False)
    assert run.code == 2
    assert run.stderr.count("--hidden_size 101 is not divisible") == 1  # said once, by rank 0


def test_command_lines_are_read_as_torchrun_reads_them():
    for flags in (["--nproc_per_node", "2"], ["--nproc-per-node=2"], ["--standalone",
                                                                      "--nproc_per_node=2"]):
        assert _launch_arguments(["scripts/launch.py", *flags, "train.py", "--x", "1"]) == (
            ["train.py", "--x", "1"], 2)
    assert _launch_arguments(["-m", "benchmarks.scaling", "--quick"]) == (
        ["-m", "benchmarks.scaling", "--quick"], None)
    with pytest.raises(ValueError, match="--nnodes needs a real one"):
        _launch_arguments(["scripts/launch.py", "--nnodes", "2", "train.py"])
