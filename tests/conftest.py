"""Shared fixtures, and the `gpu` marker: tests marked gpu run where torch sees a CUDA GPU and are
skipped, saying why, elsewhere."""

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _run(*cmd):
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The default data set, made here: a clean clone has no data/."""
    path = str(tmp_path_factory.mktemp("data"))
    _run(sys.executable, "prepare_data.py", "--data_dir", path)
    return path


@pytest.fixture(scope="session")
def serial_runs(data_dir, tmp_path_factory):
    """The default serial run (200 iterations), in float32 and float64: {dtype: its --out_dir}."""
    out = {}
    for dtype in ("float32", "float64"):
        out[dtype] = str(tmp_path_factory.mktemp(f"serial_{dtype}"))
        log = _run(sys.executable, "train.py", "--data_dir", data_dir, "--update_freq", "10",
                   "--dtype", dtype,
                   "--out_dir", out[dtype])
        assert "Iter 10 Train Loss " in log and "Iter 200 Valid Loss " in log
    return out
