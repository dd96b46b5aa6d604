"""How the benchmarks run their workers: each measurement in processes of its own, launched as
the trainings are (python for one rank, scripts/launch.py for several), one thread per rank; a
worker prints one line "RESULT {json}" and the driver reads it."""

import argparse
import json
import os
import subprocess
import sys

from benchmarks.configs import REPO
from training.operations import ArgumentParser

DEVICE = "cpu"  # the driver's --device, passed to every worker
PARALLEL = ("ours", "dtensor", "loop-ours", "loop-dtensor", "recompute",  # launched with ranks
            "pipeline", "optimizer")


def print_result(result: dict):
    print("RESULT " + json.dumps(result), flush=True)


def read_result(what, proc_stdout, proc_stderr, returncode):
    """The worker's RESULT, or the driver stops with the worker's output."""
    lines = [line for line in proc_stdout.splitlines() if line.startswith("RESULT ")]
    if returncode != 0 or not lines:
        sys.exit(f"error: {what} failed:\n{proc_stdout[-2000:]}{proc_stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def driver_parser(doc, plot, out, worker, hidden):
    """The flags of a driver whose workers are itself (`--worker`): --quick, --plot, --out, and
    the worker's own, hidden from --help."""
    p = ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--plot", default=plot)
    p.add_argument("--out", default=out)
    p.add_argument("--worker", choices=[worker], help=argparse.SUPPRESS)
    for name in hidden:
        p.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    return p


def launch(variant, config, steps, warmup, ranks=1, threads=1, extra=(),
           module="benchmarks.bench_step"):
    """One worker of `module` (`--worker variant`), on `ranks` ranks; its RESULT."""
    cmd = [sys.executable, "-m", module, "--worker", variant, "--config", config,
           "--device", DEVICE,
           "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads), *extra]
    if variant in PARALLEL:
        cmd = [sys.executable, os.path.join(REPO, "scripts", "launch.py"), "--standalone",
               "--nproc_per_node", str(ranks), *cmd[1:]]
    # As bash_parallel_train.sh sets it: the async all-reduce is queued before the matmul it
    # overlaps.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    return read_result(f"{variant} ({config}, {ranks} ranks)", proc.stdout, proc.stderr,
                       proc.returncode)


def run_side_by_side(cmd, copies, device="cpu"):
    """Run `copies` processes of cmd at once (as the ranks of a TP job run: sharing the memory
    bus and the last-level cache); each one's RESULT. On GPUs, each copy has a GPU of its own."""
    procs = []
    for i in range(copies):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        procs.append(subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env, cwd=REPO))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        results.append(read_result(" ".join(cmd[:4]), out, err, proc.returncode))
    return results
