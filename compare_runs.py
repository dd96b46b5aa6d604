"""Do two runs trace the same loss curve? Prints the largest differences, exits 1 if too large.

    python compare_runs.py runs/serial runs/tensor_parallel
    python compare_runs.py runs/serial runs/tensor_parallel --noise runs/reordered_1 \
        runs/reordered_2

Serial and tensor-parallel training do the same arithmetic in a different
order (fc2's sum over the hidden units is split into per-rank partial sums),
so their losses differ by round-off only. Measured here over the default
200-iteration run: float32 at most 9.3e-7 relative (TP=2) and 1.4e-6 (TP=4);
float64 at most 3.9e-15. The default tolerance, 1e-5, leaves an order of
magnitude of headroom over float32 round-off and is far below what any
missing or wrong communication produces (the curves then part at once, by
1e-2 or more).

That fixed tolerance fits float32 and float64 only. With --noise, the yardstick
is measured instead, for the run at hand: the noise runs are the reference
trained with its sums in another order (train.py --reorder_seed K, same
weights, data and dtype), so their differences from it are its round-off. At
each iteration the band is the largest relative difference seen so far among
the reference and the noise runs; the two runs MATCH while their own difference
stays within NOISE_FACTOR times the band, and DIFFER from the first iteration it
leaves it (docs/precision.md: the measurements behind the factor and the rule).
"""

import math
import os
import sys

import numpy as np

from training.metrics import RunRecordError, read_runs, run_directory, why_not_comparable
from training.operations import ArgumentParser

DEFAULT_RTOL = 1e-5
# How far beyond the round-off band a correct run may go: at the median over the run (a small
# error made at every step) and at any one iteration (a spike: one wrong step). Spikes count
# once the band has grown past SPIKES_FROM roundings of the loss: before that the runs differ by
# a handful of discrete events (a ReLU that flips on a 1-ulp change moves a gradient by 0.3%),
# and a correct run can meet one earlier than every noise run (measured: 70x the band at
# float32). Measured (docs/precision.md, benchmarks/precision.py): correct parallel runs at most
# 0.87x the band at the median and 4.0x in spikes (the reordered runs against each other's band:
# 2.6x and 6.7x); every bug but one (g 1% off in the transformer at bf16, hidden by the
# LayerNorms) at least 4.8x at the median or 30x in a spike.
TYPICAL_FACTOR = 3.0
NOISE_FACTOR = 10.0
SPIKES_FROM = 300
# The band is at least one rounding of the loss (computed in fp32 under bf16): with noise runs
# that happen to agree with the reference exactly, a difference is measured against that.
LOSS_ROUNDING = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-24}


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


def relative_difference(a, b, column="train_loss"):
    """|a - b| / |a| at every iteration (NaN where either has no value)."""
    return np.abs(a[column] - b[column]) / np.abs(a[column])


def round_off_band(reference, noise, dtype):
    """At each iteration, the largest relative difference seen so far between any two of
    `reference` and the `noise` runs, at least one rounding of the loss."""
    runs = [reference, *noise]
    spread = np.max([relative_difference(runs[i], runs[j])
                     for i in range(len(runs)) for j in range(i + 1, len(runs))], axis=0)
    return np.maximum(np.fmax.accumulate(np.nan_to_num(spread, nan=0.0)),
                      LOSS_ROUNDING.get(dtype, 0.0))


def verdict_numbers(a, b, noise, dtype):
    """What the verdict is drawn from: the band, the ratio of a's and b's difference to it at
    every iteration, where spikes count, the median ratio, the first iteration a spike leaves
    the band (or None), and whether the runs MATCH."""
    band = round_off_band(a, noise, dtype)
    ratio = relative_difference(a, b) / band
    ratio[np.isnan(ratio)] = np.inf  # a diverged run leaves any band
    counted = (band >= SPIKES_FROM * LOSS_ROUNDING.get(dtype, 0.0)) | np.isinf(ratio)
    beyond = np.flatnonzero(counted & (ratio > NOISE_FACTOR))
    typical = float(np.median(ratio))
    leaves_at = int(beyond[0]) if len(beyond) else None
    return dict(band=band, ratio=ratio, counted=counted, typical=typical, leaves_at=leaves_at,
                ok=leaves_at is None and typical <= TYPICAL_FACTOR)


def noise_verdict(a, b, noise, dtype):
    """(ok, lines): do a and b stay within the round-off band that a and the noise runs span?
    Every line says what was measured."""
    v = verdict_numbers(a, b, noise, dtype)
    band, ratio, it = v["band"], v["ratio"], a["iteration"]
    spikes = ratio[v["counted"]]
    worst = f"at most {spikes.max():.3g}x" if len(spikes) else "none counted yet"
    lines = [f"round-off band ({dtype}): the largest relative difference so far among the "
             f"reference and {len(noise)} noise run(s); from {band[0]:.1e} at iteration "
             f"{int(it[0])} to {band[-1]:.1e} at {int(it[-1])}",
             f"difference / band: typically {v['typical']:.3g}x (allowed {TYPICAL_FACTOR:g}x); "
             f"in spikes, once the band is past {SPIKES_FROM} roundings of the loss, {worst} "
             f"(allowed {NOISE_FACTOR:g}x)"]
    if v["leaves_at"] is not None:
        first = v["leaves_at"]
        lines.append(f"the runs leave the band at iteration {int(it[first])}, by "
                     f"{ratio[first]:.3g}x")
    if v["typical"] > TYPICAL_FACTOR:
        lines.append(f"the runs stay apart: their difference is typically {v['typical']:.3g}x "
                     "the band")
    return v["ok"], lines


# What makes a run the training it is, beside the model and its sizes: under --noise the compared
# run and the noise runs must share these with the reference, or the band measures another thing.
TRAINING = ("dtype", "init_lr", "momentum", "seed", "clip_grad", "batch_size", "dropout",
            "init_from", "data_fingerprint", "optimizer", "adam_beta1", "adam_beta2", "adam_eps",
            "weight_decay")


def why_not_judged(run_dirs, configs):
    """Why --noise cannot judge (reference, other, *noise), as config.json has them, or None: the
    other run and the noise runs are the reference's training, and the noise runs are serial
    reruns of it with --reorder_seed, each its own K."""
    reference = configs[0]
    for i, (run, config) in enumerate(zip(run_dirs[1:], configs[1:])):
        role = "noise run " if i else ""
        for key in TRAINING:
            if key in reference and key in config and reference[key] != config[key]:
                what = (f"other data (fingerprint {config[key]}, {run_dirs[0]}'s "
                        f"{reference[key]}: another --data_dir?)" if key == "data_fingerprint" else
                        f"--{key} {config[key]} and {run_dirs[0]} with {reference[key]}")
                return (f"{role}{run} was trained with {what}; the band is measured on the "
                        "reference's own training")
        if i and not config:
            return (f"noise run {run} has no config.json: nothing says it is the reference's "
                    "training again with --reorder_seed K; train it with python train.py ... "
                    "--reorder_seed K")
        if i and config.get("reorder_seed") is None:
            return (f"noise run {run} has no --reorder_seed: train the reference's flags again "
                    f"with python train.py ... --reorder_seed K --out_dir {run}")
        if i and config.get("tensor_model_parallel_size", 1) != 1:
            return (f"noise run {run} is a tensor-parallel run; noise runs are serial: python "
                    "train.py ... --reorder_seed K")
    seeds = [c.get("reorder_seed") for c in configs if c.get("reorder_seed") is not None]
    if len(set(seeds)) < len(seeds):
        return "two runs have the same --reorder_seed: the same run twice; give each its own K"
    return None


def read_judged_runs(reference, other, noise, cannot="cannot be compared"):
    """(metrics, configs) of the reference, the other run and the noise runs (cut to the
    reference's length), checked; exits with one line where they cannot be judged together.
    With noise runs, the other run may have stopped early: it is judged as far as it went."""
    for run in noise:
        role = {os.path.realpath(reference): "the reference", os.path.realpath(other):
                "the compared run"}.get(os.path.realpath(run_directory(run)))
        if role:  # said as what it is: a retraining into it would overwrite that run
            sys.exit(f"error: noise run {run} is {role} itself; noise runs are other runs: the "
                     "reference's training again, python train.py ... --reorder_seed K "
                     "--out_dir A_NEW_DIRECTORY")
        if not os.path.isfile(os.path.join(run_directory(run), "metrics.csv")):
            sys.exit(f"error: noise run {run} has no metrics.csv: train the reference's flags "
                     f"again with python train.py ... --reorder_seed K --out_dir {run}")
    runs = (reference, other, *noise)
    try:
        metrics, configs = read_runs(*runs)
    except RunRecordError as e:
        sys.exit(f"error: {e}")
    n = len(metrics[0]["iteration"])
    metrics[2:] = [{k: v[:n] for k, v in m.items()} for m in metrics[2:]]
    for i, (run, m, config) in enumerate(zip(runs[1:], metrics[1:], configs[1:])):
        if not i and noise and 0 < len(m["iteration"]) < n:
            continue  # the other run stopped early
        if why := why_not_comparable((reference, run), (metrics[0], m), (configs[0], config)):
            sys.exit(f"error: these runs {cannot}: {why}" + (f" (noise run {run})" if i else ""))
    if noise and (why := why_not_judged(runs, configs)):
        sys.exit(f"error: {why}")
    for run, m in zip(noise, metrics[2:]):
        if not np.isfinite(m["train_loss"]).all():  # no spread to measure: it would read as none
            first = int(m["iteration"][~np.isfinite(m["train_loss"])][0])
            sys.exit(f"error: noise run {run} diverged (its loss is not finite at iteration "
                     f"{first}): it measures no round-off; train it again as the reference was")
    for run, config in zip(runs, configs):
        if not config:
            print(f"note: {run} has no config.json: its model and sizes are not checked")
    return metrics, configs


# Below this relative difference two runs' curves may differ by round-off that the default --rtol
# does not cover (a transformer at PP 2 x DP 2, float32: 2.2e-5); a missing or wrong
# communication parts them by 1e-2 or more at once (the module's docstring).
NEAR = 1e-2


def near(a, b):
    """Do a and b, both finite, differ by less than NEAR (where only --noise can tell round-off
    from a bug)?"""
    finite = all(np.isfinite(run["train_loss"]).all() for run in (a, b))
    return finite and curve_difference(a, b)[1] < NEAR


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])  # one-line errors
    p.add_argument("reference", nargs="?", default="runs/serial")
    p.add_argument("other", nargs="?", default="runs/tensor_parallel")
    p.add_argument("--rtol", type=float, default=None,
                   help=f"largest relative difference allowed (default {DEFAULT_RTOL:g}); "
                        "not with --noise")
    p.add_argument("--noise", nargs="+", default=[], metavar="RUN",
                   help="the reference retrained with --reorder_seed K: the verdict is then "
                        "against their round-off, not --rtol")
    args = p.parse_args(argv)
    if args.rtol is not None and args.noise:
        p.error("--rtol and --noise: the verdict is against one or the other; give one")
    args.rtol = DEFAULT_RTOL if args.rtol is None else args.rtol
    if not (args.rtol > 0 and math.isfinite(args.rtol)):
        p.error(f"--rtol must be a positive number, got {args.rtol}")
    metrics, configs = read_judged_runs(args.reference, args.other, args.noise)
    a, b = metrics[:2]
    stopped = len(b["iteration"]) if len(b["iteration"]) < len(a["iteration"]) else None
    a = {k: v[:len(b["iteration"])] for k, v in a.items()}
    ok = True
    for column in ("train_loss", "valid_loss"):
        if (difference := curve_difference(a, b, column)) is None:
            print(f"{column:<10}  no values in common")
            continue
        abs_diff, rel_diff = difference
        verdict = ""
        if not args.noise:
            ok &= bool(rel_diff <= args.rtol)  # NaN (a diverged run) fails too
            verdict = f"  ({'within' if rel_diff <= args.rtol else 'BEYOND'} rtol {args.rtol:g})"
        print(f"{column:<10}  max abs diff {abs_diff:.3e}  max rel diff {rel_diff:.3e}{verdict}")
    dtype = configs[0].get("dtype", "float32")
    if args.noise:
        noise = [{k: v[:len(a["iteration"])] for k, v in m.items()} for m in metrics[2:]]
        ok, lines = noise_verdict(a, b, noise, dtype)
        if stopped:
            ok = False
            lines.append(f"{args.other} stopped after {stopped} iterations, {args.reference} "
                         "went on: the runs differ")
        print("\n".join(lines))
    elif not ok and dtype == "bfloat16" and configs[0].get("dropout", 0) > 0:
        print("note: bfloat16's round-off is far above any fixed --rtol, and --noise cannot "
              "measure it here: its reordered reruns refuse --dropout (the masks would fall on "
              "other heads); compare runs without --dropout (docs/precision.md)")
    elif not ok and dtype == "bfloat16":
        print("note: bfloat16's round-off is far above any fixed --rtol; measure it for this run "
              "with --noise (docs/precision.md)")
    elif not ok and near(a, b) and configs[0].get("dropout", 0) > 0:
        print(f"note: round-off grows with longer sums (pipelines, data-parallel averages, more "
              f"layers) and can pass --rtol {args.rtol:g}; --noise, which measures it, refuses "
              "--dropout (the reordered reruns' masks would fall on other heads): compare runs "
              "without --dropout to tell round-off from a bug (docs/precision.md)")
    elif not ok and near(a, b):
        print(f"note: round-off grows with longer sums (pipelines, data-parallel averages, more "
              f"layers) and can pass --rtol {args.rtol:g}; --noise tells round-off from a bug: "
              "retrain the reference's flags with python train.py ... --reorder_seed K (K = 1, "
              "2, 3) and give those runs to --noise (docs/precision.md)")
    print(f"{args.reference} and {args.other}: {'MATCH' if ok else 'DIFFER'} over "
          f"{len(a['iteration'])} iterations")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
