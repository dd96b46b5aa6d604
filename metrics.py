"""A run's record on disk: metrics.csv (one row per iteration) and config.json.

metrics.csv columns: iteration, train_loss, valid_loss (empty where not
evaluated), and in a tensor-parallel run train_loss_rank0 ... rankN-1, each
rank's own loss (they must be equal: it is how a reader sees that they are).
"""

import csv
import json
import os

import numpy as np


class MetricsWriter:
    """Writes metrics.csv, flushing rows as they come."""

    def __init__(self, out_dir, num_ranks=1):
        os.makedirs(out_dir, exist_ok=True)
        self.file = open(os.path.join(out_dir, "metrics.csv"), "w", newline="")
        self.csv = csv.writer(self.file)
        ranks = [f"train_loss_rank{r}" for r in range(num_ranks)] if num_ranks > 1 else []
        self.csv.writerow(["iteration", "train_loss", "valid_loss", *ranks])
        self.num_ranks = num_ranks

    def write(self, rows, rank_losses):
        """rows: [iteration, train_loss, valid_loss or None]; rank_losses: (ranks, len(rows))."""
        # repr() of a float round-trips exactly: float64 curves can be compared at 1e-15.
        for (it, loss, valid), per_rank in zip(rows, rank_losses.t().tolist()):
            ranks = [repr(x) for x in per_rank] if self.num_ranks > 1 else []
            self.csv.writerow([it, repr(loss), "" if valid is None else repr(valid), *ranks])
        self.file.flush()

    def close(self):
        self.file.close()


def read_metrics(run_dir):
    """{column: float array} from run_dir/metrics.csv; empty cells are NaN."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run the training first "
                                f"(bash bash_train.sh / bash bash_parallel_train.sh)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return {k: np.array([float(r[k]) if r[k] else np.nan for r in rows]) for k in reader.fieldnames or []}


def save_config(out_dir, args, **extra):
    """config.json: the flags and set-up of a run, for plot titles and for a reader."""
    config = {k: v for k, v in vars(args).items() if k != "torch_dtype"}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**config, **extra}, f, indent=2)


def read_config(run_dir):
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
