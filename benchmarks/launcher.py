"""How the benchmarks run their workers: each measurement in processes of its own, launched as
the trainings are (python for one rank, scripts/launch.py for several), one thread per rank; a
worker prints one line "RESULT {json}" and the driver reads it. Ctrl-C stops the workers and
ends the driver with one line (`driver_cli`), its results written whole or not at all
(`write_results`)."""

import argparse
import json
import os
import signal
import subprocess
import sys

from benchmarks.configs import REPO
from training.metrics import atomic_write
from training.operations import ArgumentParser, Terminated, check_output

DEVICE = "cpu"  # the driver's --device, passed to every worker
PARALLEL = ("ours", "dtensor", "loop-ours", "loop-dtensor", "recompute",  # launched with ranks
            "pipeline", "optimizer", "context", "overlap", "moe")
STOP_S = 30  # a stopped worker's time to stop its ranks (torchrun waits on them), then SIGKILL


def print_result(result: dict):
    print("RESULT " + json.dumps(result), flush=True)


def read_result(what, proc_stdout, proc_stderr, returncode):
    """The worker's RESULT, or the driver stops with the worker's output."""
    lines = [line for line in proc_stdout.splitlines() if line.startswith("RESULT ")]
    if returncode != 0 or not lines:
        sys.exit(f"error: {what} failed:\n{proc_stdout[-2000:]}{proc_stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def driver_args(doc, name, worker, hidden):
    """The flags of a driver whose workers are itself (`--worker`): --quick, --plot, --out, and
    the worker's own, hidden from --help. --plot and --out default to assets/NAME.png and .json,
    the committed full run's; with --quick to runs/NAME_quick.*, so that a quick look leaves the
    committed ones alone. Both are checked before any work, one line if one cannot be written."""
    p = ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer points, for the tests")
    p.add_argument("--plot", help=f"default: assets/{name}.png; --quick: runs/{name}_quick.png")
    p.add_argument("--out", help=f"default: assets/{name}.json; --quick: runs/{name}_quick.json")
    p.add_argument("--worker", choices=[worker], help=argparse.SUPPRESS)
    for flag in hidden:
        p.add_argument(f"--{flag}", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return args
    default = f"runs/{name}_quick" if args.quick else f"assets/{name}"
    args.plot, args.out = args.plot or default + ".png", args.out or default + ".json"
    check_output(p, "--plot", args.plot, ".png")
    check_output(p, "--out", args.out, ".json")
    return args


def write_results(report, out, draw, plot):
    """report as JSON at `out`, then draw(plot): the folders made (check_output said they can
    be), each file renamed into place whole, and Ctrl-C and SIGTERM held off for the second
    this takes, so that a run leaves both files or neither."""
    held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for path in (out, plot):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(out, lambda f: f.write(json.dumps(report, indent=1).encode()))
        print(f"wrote {out}")
        draw(plot)
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)


def driver_cli(main):
    """main(), a driver's: Ctrl-C or SIGTERM ends it with one line and 130 or 143, as run_cli
    ends a training; the worker running then has been stopped (`_communicate`). A worker (the
    same module, `--worker`) keeps Python's own handling: SIGTERM, torchrun's, ends it at once."""
    if "--worker" in sys.argv:
        return main()

    def terminate(signum, frame):
        raise Terminated()
    signal.signal(signal.SIGTERM, terminate)
    try:
        main()
    except (KeyboardInterrupt, Terminated) as e:
        print("interrupted; no results written", file=sys.stderr, flush=True)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 128 + signal.SIGTERM)


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
    proc = start(cmd, env)
    out, err = _communicate([proc], timeout=600)[0]
    return read_result(f"{variant} ({config}, {ranks} ranks)", out, err, proc.returncode)


def start(cmd, env):
    """A worker, in a session of its own: the terminal's Ctrl-C reaches the driver alone, which
    then stops the worker once (`_stop`); torchrun, signalled again while it stops its ranks,
    can leave them running."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO, start_new_session=True)


def _communicate(procs, timeout):
    """Each worker's (stdout, stderr) once it ends; on Ctrl-C (or a time-out, or any error)
    every one of them is stopped first, so that none outlives the driver."""
    try:
        return [proc.communicate(timeout=timeout) for proc in procs]
    except BaseException:
        for proc in procs:
            _stop(proc)
        raise


def _stop(proc):
    """SIGTERM: scripts/launch.py's torchrun stops its ranks (in sessions of their own: only it
    can) and leaves; a one-rank worker just ends. SIGKILL if it has not after STOP_S."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.communicate(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def run_side_by_side(cmd, copies, device="cpu"):
    """Run `copies` processes of cmd at once (as the ranks of a TP job run: sharing the memory
    bus and the last-level cache); each one's RESULT. On GPUs, each copy has a GPU of its own."""
    procs = []
    for i in range(copies):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        procs.append(start([sys.executable, *cmd], env))
    outputs = _communicate(procs, timeout=900)
    return [read_result(" ".join(cmd[:4]), out, err, proc.returncode)
            for proc, (out, err) in zip(procs, outputs)]
