"""Do two runs trace the same loss curve? Prints the largest differences, exits 1 if too large.

    python compare_runs.py runs/serial runs/tensor_parallel

Serial and tensor-parallel training do the same arithmetic in a different
order (fc2's sum over the hidden units is split into per-rank partial sums),
so their losses differ by round-off only. Measured here over the default
200-iteration run: float32 at most 9.3e-7 relative (TP=2) and 1.4e-6 (TP=4);
float64 at most 3.9e-15. The default tolerance, 1e-5, leaves an order of
magnitude of headroom over float32 round-off and is far below what any
missing or wrong communication produces (the curves then part at once, by
1e-2 or more).
"""

import argparse
import csv
import os
import sys

import numpy as np

DEFAULT_RTOL = 1e-5


def read_metrics(run_dir):
    """{column: array} from run_dir/metrics.csv; empty cells are NaN."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run the training first (bash bash_train.sh / bash_parallel_train.sh)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) if r[k] else np.nan for r in rows]) for k in rows[0]} if rows else {}


def curve_difference(a, b, column="train_loss"):
    """(max absolute, max relative) difference of `column` over the iterations both runs have."""
    n = min(len(a[column]), len(b[column]))
    x, y = a[column][:n], b[column][:n]
    keep = ~(np.isnan(x) & np.isnan(y))
    diff = np.abs(x[keep] - y[keep])
    return float(diff.max()), float((diff / np.abs(x[keep])).max())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reference", nargs="?", default="runs/serial")
    p.add_argument("other", nargs="?", default="runs/tensor_parallel")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="largest relative difference allowed")
    args = p.parse_args(argv)
    try:
        a, b = read_metrics(args.reference), read_metrics(args.other)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if len(a.get("iteration", [])) != len(b.get("iteration", [])) or not len(a.get("iteration", [])):
        sys.exit(f"error: the runs have {len(a.get('iteration', []))} and {len(b.get('iteration', []))} "
                 f"iterations; compare runs of the same length")
    ok = True
    for column in ("train_loss", "valid_loss"):
        abs_diff, rel_diff = curve_difference(a, b, column)
        ok &= bool(rel_diff <= args.rtol)  # NaN (a diverged run) fails too
        print(f"{column:<10}  max abs diff {abs_diff:.3e}  max rel diff {rel_diff:.3e}  "
              f"({'within' if rel_diff <= args.rtol else 'BEYOND'} rtol {args.rtol:g})")
    print(f"{args.reference} and {args.other}: {'MATCH' if ok else 'DIFFER'} "
          f"over {len(a['iteration'])} iterations")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
