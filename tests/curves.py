"""Two runs compared as the tests compare them: the same iterations, then every loss column within
the measured round-off, or every byte the same.

Bounds (measured over the default 200-iteration run, serial against tensor-parallel on CPU/gloo):
float32 loss at most 9.3e-7 relative (TP=2), 1.4e-6 (TP=4): compare_runs' 1e-5; float64 at most
4.4e-15: 5e-14. Both about 10x the measured round-off; a missing or wrong all-reduce moves the
loss by 1e-2 or more.
"""

import os

import numpy as np
import torch

from compare_runs import DEFAULT_RTOL, curve_difference
from training.metrics import read_metrics

RTOL = {"float32": DEFAULT_RTOL, "float64": 5e-14}


def rows_after(run_dir, iteration=0):
    """metrics.csv's rows past `iteration`, as {column: array}."""
    metrics = read_metrics(run_dir)
    keep = metrics["iteration"] > iteration
    return {k: v[keep] for k, v in metrics.items()}


def assert_same_curve(a, b, dtype, columns=("train_loss", "valid_loss")):
    """Runs a and b (directories, or rows as rows_after gives them) logged the same iterations, and
    every loss there agrees to the dtype's bound: a run that stopped early does not pass."""
    a, b = (rows_after(x) if isinstance(x, str) else x for x in (a, b))
    assert len(a["iteration"]) and np.array_equal(a["iteration"], b["iteration"]), \
        f"iterations differ: {a['iteration']} vs {b['iteration']}"
    for column in columns:
        _, rel = curve_difference(a, b, column)
        assert rel <= RTOL[dtype], f"{column} differs by {rel:.2e} relative"


def assert_bitwise_same_run(a_dir, b_dir):
    with open(os.path.join(a_dir, "metrics.csv")) as fa:
        with open(os.path.join(b_dir, "metrics.csv")) as fb:
            assert fa.read() == fb.read()  # every row, once, bit for bit
    wa, wb = (torch.load(os.path.join(d, "model.pt")) for d in (a_dir, b_dir))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
