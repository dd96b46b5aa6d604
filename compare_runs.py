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

import math
import sys

import numpy as np

from training.metrics import RunRecordError, read_runs, why_not_comparable
from training.operations import ArgumentParser

DEFAULT_RTOL = 1e-5


def curve_difference(a, b, column="train_loss"):
    """(max absolute, max relative) difference of `column` over the iterations both runs have.

    None when neither run has a value there (e.g. no validation loss yet).
    """
    n = min(len(a[column]), len(b[column]))
    x, y = a[column][:n], b[column][:n]
    keep = ~(np.isnan(x) & np.isnan(y))  # a value on one side only gives NaN: a difference
    if not keep.any():
        return None
    diff = np.abs(x[keep] - y[keep])
    return float(diff.max()), float((diff / np.abs(x[keep])).max())


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])  # one-line errors
    p.add_argument("reference", nargs="?", default="runs/serial")
    p.add_argument("other", nargs="?", default="runs/tensor_parallel")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="largest relative difference "
                                                                    "allowed")
    args = p.parse_args(argv)
    if not (args.rtol > 0 and math.isfinite(args.rtol)):
        p.error(f"--rtol must be a positive number, got {args.rtol}")
    try:
        runs = args.reference, args.other
        (a, b), configs = read_runs(*runs)
    except RunRecordError as e:
        sys.exit(f"error: {e}")
    if why := why_not_comparable(runs, (a, b), configs):
        sys.exit(f"error: these runs cannot be compared: {why}")
    for run, config in zip(runs, configs):
        if not config:
            print(f"note: {run} has no config.json: its model and sizes are not checked")
    n_a = len(a["iteration"])
    ok = True
    for column in ("train_loss", "valid_loss"):
        if curve_difference(a, b, column) is None:
            print(f"{column:<10}  no values in common")
            continue
        abs_diff, rel_diff = curve_difference(a, b, column)
        ok &= bool(rel_diff <= args.rtol)  # NaN (a diverged run) fails too
        print(f"{column:<10}  max abs diff {abs_diff:.3e}  max rel diff {rel_diff:.3e}  "
              f"({'within' if rel_diff <= args.rtol else 'BEYOND'} rtol {args.rtol:g})")
    print(f"{args.reference} and {args.other}: {'MATCH' if ok else 'DIFFER'} over {n_a} "
          "iterations")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
