"""Bug or round-off? The measurements behind compare_runs.py --noise and docs/precision.md.

    python -m benchmarks.precision                      # both models, float64/float32/bfloat16
    python -m benchmarks.precision --models toy --dtypes bfloat16

For each model and dtype it trains the serial run, NOISE_RUNS reordered serial
runs (train.py --reorder_seed K: the serial run's round-off), correct parallel
runs (TP 2 and 4, SP, DP x TP; under bf16 also with the all-reduces in fp32),
and the same runs with each bug of tests/inject_bug.py. Then, for every run
against the serial one: the largest relative difference of the train loss, and
the largest ratio of that difference to the round-off band
(compare_runs.verdict_numbers). With --clip_grad the same again (its own serial
and noise runs). Writes runs/precision/results.json, prints the markdown table
of docs/precision.md and draws precision_bugs.png and precision_clip_bugs.png beside the
results (--pictures assets redraws the committed ones).
"""

import json
import os
import subprocess
import sys

import numpy as np

from compare_runs import relative_difference, verdict_numbers
from plot_runs import draw_band
from training.data import DataError, load_dataset, load_token_dataset
from training.metrics import read_metrics
from training.operations import ArgumentParser, check_output

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE_RUNS = 2
CLIP = {"toy": 5.0, "transformer": 1.0}  # below the gradient norm for much of the run
# name, processes, flags, bug (tests/inject_bug.py) or None
CORRECT = [("TP=2", 2, [], None), ("TP=4", 4, ["--tensor_model_parallel_size", "4"], None),
           ("TP=2, SP", 2, ["--sequence_parallel"], None),
           ("DP=2 x TP=2", 4, [], None)]
IN_FP32 = [("TP=2, all-reduce in fp32", 2, ["--tp_reduce_dtype", "float32"], None),
           ("TP=4, all-reduce in fp32", 4, ["--tensor_model_parallel_size", "4",
                                            "--tp_reduce_dtype", "float32"], None)]
BUGS = [("bug: g 1% off", 2, [], "off_by_1pct"),
        ("bug: g skipped at iteration 10", 2, [], "skipped_once"),
        ("bug: SP, LayerNorm/fc gradients not summed", 2, ["--sequence_parallel"],
         "layernorm_grads_not_summed")]
CLIPPED = [("TP=2", 2, [], None), ("DP=2 x TP=2", 4, [], None),
           ("bug: replicated parameters counted TP times", 2, [], "replicated_counted_tp_times"),
           ("bug: norm not all-reduced", 2, [], "norm_not_all_reduced"),
           ("bug: a DP replica's own norm", 4, [], "dp_rank_norm_alone")]


def launch(out_dir, model, dtype, flags, nproc=None, bug=None):
    """One training run into out_dir; True if it finished. A run this script completed before
    (its exit status recorded in out_dir/launched.json) is reused and said so; a directory
    without that record (a run interrupted, or someone else's) is trained again."""
    record = os.path.join(out_dir, "launched.json")
    if os.path.isfile(record):
        with open(record) as f:
            code = json.load(f)["exit_status"]
        print(f"  {os.path.basename(out_dir):<40} {'ok' if code == 0 else 'stopped'} (reused: "
              f"run earlier into {out_dir})", flush=True)
        return code == 0
    common = ["--model", model, "--dtype", dtype, "--out_dir", out_dir, "--update_freq", "50",
              *flags]
    if nproc is None:
        cmd = [sys.executable, "train.py", *common]
    else:
        script = ["tests/inject_bug.py", bug] if bug else ["parallel_train.py"]
        tp = [] if "--tensor_model_parallel_size" in flags else ["--tensor_model_parallel_size",
                                                                 "2"]
        cmd = [sys.executable, "scripts/launch.py", "--standalone", "--nproc_per_node",
               str(nproc), *script, *common, *tp]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(f"  {os.path.basename(out_dir):<40} {'ok' if done.returncode == 0 else 'stopped'}",
          flush=True)
    if os.path.isdir(out_dir):  # it ran (a bug's run may stop early, by design)
        with open(record, "w") as f:
            json.dump({"exit_status": done.returncode}, f)
    return done.returncode == 0


def measure(root, model, dtype, clip):
    """{run name: summary(...)} for one model, dtype and clipping."""
    tag = f"{model}_{dtype}" + ("_clip" if clip else "")
    flags = ["--clip_grad", str(CLIP[model])] if clip else []
    path = lambda name: os.path.join(root, tag, name.replace(" ", "_").replace(",", "")
                                     .replace(":", "").replace("%", "pct").replace("'", "")
                                     .replace("/", "_"))
    launch(path("serial"), model, dtype, flags)
    for k in range(1, NOISE_RUNS + 1):
        launch(path(f"reordered {k}"), model, dtype, flags + ["--reorder_seed", str(k)])
    cases = CLIPPED if clip else CORRECT + (IN_FP32 if dtype == "bfloat16" else []) + BUGS
    serial = read_metrics(path("serial"))
    noise = [read_metrics(path(f"reordered {k}")) for k in range(1, NOISE_RUNS + 1)]
    results = {}
    for k, run in enumerate(noise[:1], 1):  # the noise runs against each other's band
        results[f"reordered {k}"] = summary(serial, run, noise[1:], dtype)
    for name, nproc, case_flags, bug in cases:
        launch(path(name), model, dtype, flags + case_flags, nproc, bug)
        results[name] = summary(serial, read_metrics(path(name)), noise, dtype)
    return results


def summary(serial, run, noise, dtype):
    n = len(run["iteration"])
    cut = lambda m: {k: v[:n] for k, v in m.items()}
    v = verdict_numbers(cut(serial), run, [cut(m) for m in noise], dtype)
    spikes, rel = v["ratio"][v["counted"]], relative_difference(cut(serial), run)
    leaves_at = None if v["leaves_at"] is None else int(run["iteration"][v["leaves_at"]])
    return dict(max_rel=float(np.nanmax(rel)), typical=v["typical"], leaves_at=leaves_at,
                max_ratio=float(spikes.max()) if len(spikes) else 0.0, iterations=n,
                of=len(serial["iteration"]), match=bool(v["ok"] and n == len(serial["iteration"])),
                rel=rel.tolist(), band=v["band"].tolist(), counted=v["counted"].tolist())


def print_table(results):
    print("| model | dtype | clip | run | max relative difference from serial | "
          "difference / band: median | in spikes, max | verdict |")
    print("|---|---|---|---|---:|---:|---:|---|")
    for key, runs in results.items():
        model, dtype, clip = key.split("/")
        for name, r in runs.items():
            verdict = "MATCH" if r["match"] else (
                f"DIFFER from iteration {r['leaves_at']}" if r["leaves_at"] else "DIFFER")
            if r["iterations"] < r["of"]:
                verdict += f" (stopped after {r['iterations']})"
            spikes = f"{r['max_ratio']:.3g}" if r["max_ratio"] else "—"  # none counted
            print(f"| {model} | {dtype} | {clip} | {name} | {r['max_rel']:.1e} | "
                  f"{r['typical']:.3g} | {spikes} | {verdict} |")


def draw(results, key, path):
    """One panel per run: its relative difference from serial over the band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {k: v for k, v in results[key].items() if not k.startswith("reordered")}
    cols = 3
    rows = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), sharey=True,
                             squeeze=False)
    for ax, (name, r) in zip(axes.flat, runs.items()):
        it = np.arange(1, len(r["band"]) + 1)
        draw_band(ax, it, np.array(r["band"]), floor=1e-7, counted=np.array(r["counted"]))
        rel = np.array(r["rel"])
        color = "#2ca02c" if r["match"] else "#d62728"
        ax.semilogy(it[:len(rel)], np.where(rel > 0, rel, np.nan), ".", ms=2.5, color=color,
                    label="|serial - run| / |serial|")
        if r["leaves_at"]:
            ax.axvline(r["leaves_at"], color=color, lw=0.8, ls=":")
        ax.set_title(f"{name}: {'MATCH' if r['match'] else 'DIFFER'}", fontsize=9)
        ax.set_ylim(1e-7, 2)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    model, dtype, clip = key.split("/")
    fig.suptitle(f"{model} model, {dtype}{', --clip_grad' if clip == 'clip' else ''}: each "
                 "run's difference from serial against the reordered runs' band", fontsize=10)
    fig.supxlabel("iteration", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def main():
    p = ArgumentParser(description=__doc__.splitlines()[0])  # one-line errors, before any work
    p.add_argument("--models", nargs="+", default=["toy", "transformer"],
                   choices=["toy", "transformer"])
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32", "bfloat16"],
                   choices=["float64", "float32", "bfloat16"])
    p.add_argument("--out", default="runs/precision")
    p.add_argument("--pictures", default=None,
                   help="where the two pictures go (default: --out; assets redraws the "
                        "committed ones)")
    args = p.parse_args()
    check_output(p, "--out", os.path.join(REPO, args.out))
    pictures = os.path.join(REPO, args.pictures or args.out)
    check_output(p, "--pictures", pictures)
    for model in args.models:  # the default data, as the trainings will read it
        try:
            load_token_dataset(os.path.join(REPO, "data_transformer"), 50, 16, 32) \
                if model == "transformer" else load_dataset(os.path.join(REPO, "data"), 64, 32)
        except DataError as e:
            p.error(str(e).replace(REPO + os.sep, ""))
    results_path = os.path.join(REPO, args.out, "results.json")
    results = {}
    if os.path.isfile(results_path):
        with open(results_path) as f:
            results = json.load(f)
    for model in args.models:
        for dtype in args.dtypes:
            for clip in (False, True):
                print(f"{model}, {dtype}{', --clip_grad' if clip else ''}:", flush=True)
                key = f"{model}/{dtype}/{'clip' if clip else '-'}"
                results[key] = measure(os.path.join(REPO, args.out), model, dtype, clip)
                os.makedirs(os.path.dirname(results_path), exist_ok=True)
                with open(results_path, "w") as f:
                    json.dump(results, f)
    print_table(results)
    for key, name in (("toy/bfloat16/-", "precision_bugs.png"),
                      ("toy/bfloat16/clip", "precision_clip_bugs.png")):
        if key in results:
            os.makedirs(pictures, exist_ok=True)
            draw(results, key, os.path.join(pictures, name))


if __name__ == "__main__":
    main()
