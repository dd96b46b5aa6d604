"""Shared fixtures, and the `gpu` marker: tests marked gpu run where torch sees a CUDA GPU and are
skipped, saying why, elsewhere. The session's rank processes (distributed.py) stop with it."""

import compileall
import os
import re

import numpy as np
import pytest
import torch

from distributed import REPO, run_script, stop_pool

# The repository's modules compiled once, here: every job imports them afresh in a new process,
# and where PYTHONDONTWRITEBYTECODE is set (as on this machine) each would compile them again,
# 35 ms a job (measured: 0.05 s of imports against 0.016 s), over a thousand jobs a session.
compileall.compile_dir(REPO, rx=re.compile(r"[/\\](\.venv|\.git|runs|data\w*)([/\\]|$)"),
                       quiet=1)

# Every collective of every run the tests start, in the rank processes or in new ones, first
# checks that its ranks agree on shape and dtype (communication._check): what NCCL would hang on.
os.environ.setdefault("TP_CHECK_COLLECTIVES", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    stop_pool()


def pytest_terminal_summary(terminalreporter, config):
    """The order's seed, printed even under -q: a failure that depends on the order is then
    run again in that order with `python -m pytest -q --randomly-seed=N`."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None:
        terminalreporter.write_line(f"tests run in a random order: to repeat it, "
                                    f"python -m pytest -q --randomly-seed={seed}")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The default data set, made here: a clean clone has no data/."""
    path = str(tmp_path_factory.mktemp("data"))
    run_script("prepare_data.py", "--data_dir", path)
    return path


@pytest.fixture(scope="session")
def token_dir(tmp_path_factory):
    """The transformer's default token data, its validation set cut to its first 256 sequences:
    the training set (the curves the tests' bounds were measured on) is the default one, and each
    validation of the default transformer costs 1/8 of the 2000's (its MLP is 32 x wider than
    the model, and every tensor-parallel rank validates)."""
    path = str(tmp_path_factory.mktemp("tokens"))
    run_script("prepare_data.py", "--model", "transformer", "--data_dir", path)
    valid = os.path.join(path, "tokens_valid.npy")
    np.save(valid, np.load(valid)[:256])
    return path


@pytest.fixture(scope="session")
def token_dir_period_5(tmp_path_factory):
    """Token data that repeats every 5 tokens, not 4: where context parallelism cuts a sequence
    into runs of 2, 4 or 8 tokens, a run put in the wrong place, its positions with it, holds
    other tokens than the right one (under period 4 it would hold the same, and no loss would
    tell: the context ranks' tests and the covering array train on this). 2000 sequences, not
    20000: their runs take a few batches, and every rank validates on all 200."""
    path = str(tmp_path_factory.mktemp("tokens_period_5"))
    run_script("prepare_data.py", "--model", "transformer", "--data_dir", path, "--period", "5",
               "--num_samples", "2000")
    return path


@pytest.fixture(scope="session")
def serial_runs(data_dir, tmp_path_factory):
    """The default serial run (200 iterations), in float32 and float64: {dtype: its --out_dir}."""
    out = {}
    for dtype in ("float32", "float64"):
        out[dtype] = str(tmp_path_factory.mktemp(f"serial_{dtype}"))
        log = run_script("train.py", "--data_dir", data_dir, "--update_freq", "10",
                         "--dtype", dtype, "--out_dir", out[dtype]).stdout
        assert "Iter 10 Train Loss " in log and "Iter 200 Valid Loss " in log
        assert log.count("(Train Loss: the sum of the last 10 iterations' losses") == 1
    return out
