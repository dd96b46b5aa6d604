"""The session's rank processes: multi-rank checks and script runs without new interpreters.

Starting a process and importing torch costs seconds on 2 cores; most checks then take
milliseconds. So, as PyTorch's own distributed tests do (`MultiProcContinuousTest` in
torch/testing/_internal/common_distributed.py), the suite starts its rank processes once and
hands them work:

    run_distributed(fn, world_size, *args)   fn(*args) on every rank of a gloo world
    run_script(script, *argv, nproc=N)       what `torchrun --nproc_per_node N script argv` does
    run_script(script, *argv)                what `python script argv` does

Each job starts from the state a new process has: environment, working directory, random
generators, thread count, default dtype, and the globals of this repo's modules and of
torch.distributed (so a test that breaks `parallel_state.all_reduce` breaks it for itself only).
A failure on any rank fails the test with that rank's traceback; a hang fails it after its time
limit. Either way the next test gets working ranks: a rank that raised leaves its world at once
(which wakes peers waiting for it in a collective), and a process that died or hung is replaced.

What must go through a real launcher (torchrun's own behaviour, signals, faults that kill a
rank, two launchers as two nodes, the bash scripts) still does: see test_errors.py, test_scale.py.
"""

import importlib
import os
import pickle
import random
import re
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from multiprocessing import connection

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel_state as ps
from training import initialize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 60  # a check; also gloo's timeout for one collective
SCRIPT_TIMEOUT_S = 240  # a whole training run
START_TIMEOUT_S = 120  # a new rank process: start Python, import torch and this repo
# After the first rank fails, how long the others get to report: a rank that failed leaves its
# world, which ends a peer's wait in a collective at once; a script's rank that leaves the error's
# line to another waits operations.REPORTER_FIRST_S (1 s) first. Past this a rank is stuck.
GRACE_S = 5


def comm_table(log):
    """parallel_train.py's communication table: {collective: (calls, KiB in, KiB sent per rank in a
    ring)}."""
    return {m[1]: (int(m[2]), float(m[3]), float(m[4]))
            for m in re.finditer(r"^  (\w+)\s+x(\d+)\s+([\d.]+) KiB\s+([\d.]+) KiB$", log, re.M)}


def all_ranks(tensor):
    """Every rank's copy of `tensor`, stacked: for checking that replicas agree."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def run_distributed(fn, world_size, *args, tp_size=None, timeout=TIMEOUT_S):
    """Call fn(*args) on `world_size` ranks joined by gloo, after
    initialize_model_parallel(tp_size or world_size).

    An exception on any rank fails the test with that rank's traceback; a hang fails it after
    `timeout` seconds instead of blocking the suite.
    """
    jobs = [_Job("call", rank, world_size, fn=fn, args=args, tp_size=tp_size or world_size)
            for rank in range(world_size)]
    results = _pool().run(jobs, timeout)
    failed = sorted(((r, res) for r, res in enumerate(results) if res.status != "ok"),
                    key=lambda failure: failure[1].arrival)  # the first to fail: the cause
    if failed:
        rank, res = failed[0]
        raise RankFailed(f"{fn.__name__} failed on rank {rank} of {world_size}:\n{res.detail}"
                         f"{res.stdout}{res.stderr}"
                         + "".join(f"\n(rank {r}: {other.status})" for r, other in failed[1:]))


class RankFailed(AssertionError):
    """A rank's exception (its traceback in the message), a rank that died, or a hang."""


@dataclass
class ScriptRun:
    """What a launch left: its exit status (torchrun's: the first non-zero of its ranks) and every
    rank's output, stdout before stderr as a terminal would show them after the run."""
    code: int
    stdout: str
    stderr: str

    @property
    def out(self):
        return self.stdout + self.stderr


def run_script(script, *argv, nproc=None, ok=True, env=None, timeout=SCRIPT_TIMEOUT_S):
    """`script` (a path from the repository root, or "-m package.module") with `argv`, as
    `torchrun --standalone --nproc_per_node nproc` starts it (the same environment variables
    and a fresh rendezvous port), or with nproc None as `python` starts it; returns a
    ScriptRun. ok=True asserts exit status 0, ok=False a non-zero one.

    The script runs as __main__ (runpy), through the same `run_cli` a user's run goes through.
    """
    jobs = [_Job("script", rank, nproc or 1, script=script, argv=[str(a) for a in argv],
                 env=dict(env or {}), torchrun=nproc is not None) for rank in range(nproc or 1)]
    results = _pool().run(jobs, timeout)
    codes = [res.code for res in results]
    run = ScriptRun(next((c for c in codes if c), 0), "".join(res.stdout for res in results),
                    "".join(res.stderr for res in results))
    if any(res.status == "timeout" for res in results):
        raise RankFailed(f"{script} {' '.join(argv)} did not finish in {timeout} s:\n{run.out}")
    if ok is not None:
        assert (run.code == 0) == ok, f"{script} exit {run.code}:\n{run.out}"
    return run


class pooled_subprocess:
    """Stands in for the `subprocess` module of code under test that launches the scripts itself
    (the benchmarks' drivers): its `python ...` and `torchrun ...` command lines run in the
    session's rank processes. Popen runs the command at once; communicate() hands over the
    output. (Side-by-side copies then run one after another: right for the tests, which check
    what the runs report, not how fast.)"""

    PIPE = subprocess.PIPE
    CompletedProcess = subprocess.CompletedProcess

    @staticmethod
    def run(cmd, env=None, **_):
        args, nproc = _launch_arguments([str(a) for a in cmd[1:]])
        if args[0] == "-m":  # python -m module ...
            args = [f"-m {args[1]}", *args[2:]]
        changed = {k: v for k, v in (env or {}).items() if os.environ.get(k) != v}
        run = run_script(args[0], *args[1:], nproc=nproc, ok=None, env=changed)
        return subprocess.CompletedProcess(cmd, run.code, run.stdout, run.stderr)

    class Popen:
        def __init__(self, cmd, env=None, **_):
            done = pooled_subprocess.run(cmd, env=env)
            self.returncode, self._output = done.returncode, (done.stdout, done.stderr)

        def communicate(self, timeout=None):
            return self._output


def _launch_arguments(args):
    """(script and its arguments, nproc) of `[scripts/launch.py | -m torch.distributed.run]
    [torchrun flags] script ...` (nproc None for a plain python command). Only what one node's
    standalone torchrun does: any other flag is refused."""
    nproc = None
    if args[:2] == ["-m", "torch.distributed.run"] or args[0].endswith("launch.py"):
        args = args[2:] if args[0] == "-m" else args[1:]
        while args[0].startswith("--"):  # torchrun's own flags
            flag, _, value = args.pop(0).replace("-", "_").partition("=")
            if flag in ("__nproc_per_node", "__max_restarts"):
                value = value or args.pop(0)
                nproc = int(value) if flag == "__nproc_per_node" else nproc
                assert flag == "__nproc_per_node" or value == "0", "restarts need a real torchrun"
            elif flag != "__standalone":
                raise ValueError(f"pooled_subprocess runs one node's standalone torchrun; "
                                 f"{flag.replace('_', '-')} needs a real one")
    return args, nproc


# ---------------------------------------------------------------------------
# The pool (pytest's process).

@dataclass
class _Job:
    kind: str  # "call" or "script"
    rank: int
    world_size: int
    fn: object = None
    args: tuple = ()
    tp_size: int = 1
    script: str = ""
    argv: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    torchrun: bool = False
    port: int = 0
    world: tuple = None  # call: the world to run in, (size, port)


@dataclass
class _Result:
    status: str  # "ok", "error", "exit", "died", "timeout"
    detail: str = ""  # a call's traceback
    code: int = 0  # a script's exit status
    stdout: str = ""
    stderr: str = ""
    arrival: int = 0  # the order in which the ranks' results came in

    @property
    def failed(self):
        """A rank that raised, died, or (a script) exited non-zero."""
        return self.status in ("error", "died") or bool(self.code)


class _Pool:
    def __init__(self):
        self.workers = []  # (process, connection) or None where one must be started
        self.world = None  # (size, port, generation) of the world the first `size` workers are in
        self.generation = 0
        self.logs = tempfile.mkdtemp(prefix="rank_pool_")

    def _start(self, n):
        """Workers 0..n-1 alive and ready (torch and this repo imported): a test's time limit
        does not count their start-up."""
        ctx = mp.get_context("spawn")
        self.workers += [None] * (n - len(self.workers))
        started = []
        for i in range(n):
            if self.workers[i] is not None and not self.workers[i][0].is_alive():
                self._kill(i)  # died between jobs (e.g. in a teardown): replace it
            if self.workers[i] is None:
                mine, theirs = ctx.Pipe()
                process = ctx.Process(target=_serve, args=(i, theirs, self.logs), daemon=True,
                                      name=f"rank-pool-{i}")
                process.start()
                theirs.close()
                self.workers[i] = (process, mine)
                started.append(i)
        for i in started:
            if not self.workers[i][1].poll(START_TIMEOUT_S) or self.workers[i][1].recv() != "ready":
                raise RankFailed(f"rank process {i} did not start in {START_TIMEOUT_S} s")

    def _kill(self, i):
        process, conn = self.workers[i]
        process.kill()
        process.join()
        conn.close()
        self.workers[i] = None
        self.world = None

    def run(self, jobs, timeout):
        n = len(jobs)
        payloads = [pickle.dumps(job) for job in self._stamp(jobs)]  # a bad fn fails here, at once
        self._start(n)
        for i, payload in enumerate(payloads):
            self.workers[i][1].send_bytes(payload)
        results, pending = [None] * n, set(range(n))
        deadline = time.monotonic() + timeout
        while pending:
            waits = {self.workers[i][1]: i for i in pending}
            waits.update({self.workers[i][0].sentinel: i for i in pending})
            for ready in connection.wait(list(waits), max(0.0, deadline - time.monotonic())):
                i = waits[ready]
                if i not in pending:
                    continue
                process, conn = self.workers[i]
                try:
                    results[i] = conn.recv()
                except (EOFError, OSError):  # it died: os._exit, a signal
                    process.join()
                    results[i] = _Result("died", f"exit status {process.exitcode}",
                                         code=process.exitcode or 1)
                    self._kill(i)
                pending.discard(i)
                results[i].arrival = n - len(pending)
                if results[i].failed:
                    deadline = min(deadline, time.monotonic() + GRACE_S)
            if pending and time.monotonic() >= deadline:
                failed = any(r is not None and r.failed for r in results)
                for i in pending:
                    self._kill(i)
                    # After another rank failed, torchrun would stop this one too: "stopped".
                    results[i] = (_Result("stopped", "stopped after another rank failed", code=-15,
                                          arrival=n) if failed else
                                  _Result("timeout", f"still running after {timeout} s",
                                          code=124, arrival=n))
                pending = set()
        for i, res in enumerate(results):
            if res.status in ("died", "timeout", "stopped"):  # what it wrote so far
                res.stdout, res.stderr = (_read(os.path.join(self.logs, f"{i}.{s}"))
                                          for s in ("out", "err"))
        if jobs[0].kind == "script" or any(r.status not in ("ok", "exit") for r in results):
            self.world = None  # the workers left it, or it may hold a half-done collective
        return results

    def _stamp(self, jobs):
        """Where the job's ranks meet: the standing world for checks (a new one when the size
        changed or the last one failed), a fresh rendezvous for every script run."""
        if jobs[0].kind == "call" and (self.world is None or self.world[0] != len(jobs)):
            self.generation += 1
            self.world = (len(jobs), _free_port(), self.generation)
        port = self.world[1] if jobs[0].kind == "call" else _free_port()
        for job in jobs:
            job.port, job.world = port, self.world if job.kind == "call" else None
        return jobs

    def stop(self):
        for i, worker in enumerate(self.workers):
            if worker is not None:
                worker[1].close()  # the worker reads EOF and leaves
                worker[0].join(5)
                if worker[0].is_alive():
                    self._kill(i)
        self.workers = []


_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = _Pool()
    return _POOL


def stop_pool():
    if _POOL is not None:
        _POOL.stop()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


# ---------------------------------------------------------------------------
# A rank process.

# Imported before the state every job starts from is taken, so that what a job patches in them is
# put back (a module first imported inside a job is dropped from sys.modules after it instead).
PRELOAD = ["parallel_state", "mappings", "parallel_layers", "sequence_parallel", "model",
           "transformer", "cross_entropy", "rng_tracker", "train", "parallel_train",
           "prepare_data", "merge_checkpoint", "compare_runs", "training.arguments",
           "training.checkpointing", "training.data", "training.initialize", "training.logbook",
           "training.metrics", "training.operations", "training.reshard"]


def _serve(index, conn, logs):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is pytest's; we leave when it closes
    torch.set_num_threads(1)  # one thread per rank: 4 ranks share 2 cores without thrashing
    os.environ["OMP_NUM_THREADS"] = "1"  # what scripts launched by the tests had
    os.chdir(REPO)  # where the tests start the scripts
    for name in PRELOAD:
        importlib.import_module(name)
    fresh = _ProcessState()
    out, err = (os.path.join(logs, f"{index}.{s}") for s in ("out", "err"))
    conn.send("ready")
    world = None
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        with _output_to(out, err):
            fresh.restore()
            try:
                job = pickle.loads(payload)  # imports the test module that defines fn
                # A check runs in the standing world; a script makes and leaves its own.
                world = _join(world, job) if job.kind == "call" else _leave()
                result = _run_job(job)
            except BaseException:  # noqa: BLE001 - anything a rank raises goes to the test
                result = _Result("error", traceback.format_exc())
        result.stdout, result.stderr = _read(out), _read(err)
        conn.send(result)  # before peers hear of it: the cause reaches the test first
        if result.status != "ok":
            world = _leave()  # peers waiting in a collective for this rank: wake them


def _join(world, job):
    """Be rank job.rank of job.world, leaving any other world first."""
    if world == job.world:
        return world
    _leave()
    os.environ.update(_rank_env(job))
    initialize.init_distributed(backend="gloo", timeout_minutes=TIMEOUT_S / 60, device="cpu")
    return job.world


# This world's tensor- and data-parallel groups, by tensor-parallel size: made once, the first
# time a check asks for that size, and kept (gloo groups made and destroyed in quick succession
# were seen to reset each other's connections).
_GROUPS = {}


def _use_groups(tp_size):
    """initialize_model_parallel(tp_size), the groups made once per world."""
    if tp_size not in _GROUPS:
        ps.initialize_model_parallel(tp_size)
        _GROUPS[tp_size] = ps._TENSOR_MODEL_PARALLEL_GROUP, ps._DATA_PARALLEL_GROUP
    ps._TENSOR_MODEL_PARALLEL_GROUP, ps._DATA_PARALLEL_GROUP = _GROUPS[tp_size]


def _leave():
    """Out of any world, without a barrier: peers may be gone or waiting for this rank."""
    _GROUPS.clear()
    if dist.is_initialized():
        ps.destroy_model_parallel(barrier=False)
    return None


def _rank_env(job):
    """What torchrun --standalone sets for each of its workers."""
    return dict(RANK=str(job.rank), LOCAL_RANK=str(job.rank), WORLD_SIZE=str(job.world_size),
                LOCAL_WORLD_SIZE=str(job.world_size), GROUP_RANK="0", ROLE_RANK=str(job.rank),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job.port),
                TORCHELASTIC_RESTART_COUNT="0")


def _run_job(job):
    modules = _ModuleGlobals()
    try:
        if job.kind == "call":
            os.environ.update(_rank_env(job))
            _use_groups(job.tp_size)
            job.fn(*job.args)
            dist.barrier()  # as destroy_model_parallel does: no rank leaves mid-collective
            return _Result("ok")
        return _Result("exit", code=_run_script(job))
    finally:
        modules.restore()


def _run_script(job):
    """Exit status of `python script argv`, run here as __main__."""
    if job.torchrun:
        os.environ.update(_rank_env(job))
    os.environ.update(job.env)
    sys.argv = [job.script, *job.argv]
    try:
        if job.script.startswith("-m "):  # python -m module, as a new interpreter would run it
            sys.modules.pop(job.script[3:], None)
            runpy.run_module(job.script[3:], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(os.path.join(REPO, job.script), run_name="__main__")
    except SystemExit as e:  # as the interpreter treats it
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - the interpreter prints it and exits with 1
        traceback.print_exc()
        return 1
    return 0


class _output_to:
    """File descriptors 1 and 2 into these files (what the ranks print, C code's too)."""

    def __init__(self, out, err):
        self.paths = (out, err)

    def __enter__(self):
        for fd, path in zip((1, 2), self.paths):
            (sys.stdout, sys.stderr)[fd - 1].flush()
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()


class _ProcessState:
    """What a new process starts with, to give every job the same."""

    def __init__(self):
        self.environ, self.cwd, self.path = dict(os.environ), os.getcwd(), list(sys.path)
        self.argv, self.warnings = list(sys.argv), list(warnings.filters)
        self.torch_rng, self.random, self.numpy = (torch.get_rng_state(), random.getstate(),
                                                   np.random.get_state())
        self.dtype, self.threads = torch.get_default_dtype(), torch.get_num_threads()
        self.handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        os.environ.clear()
        os.environ.update(self.environ)
        os.chdir(self.cwd)
        sys.path[:], sys.argv[:], warnings.filters[:] = self.path, self.argv, self.warnings
        signal.set_wakeup_fd(-1)  # run_cli's watcher thread of the last job hears nothing more
        torch.set_rng_state(self.torch_rng)
        random.setstate(self.random)
        np.random.set_state(self.numpy)
        torch.set_default_dtype(self.dtype)
        torch.set_num_threads(self.threads)
        torch.set_grad_enabled(True)
        for s, handler in self.handlers.items():
            signal.signal(s, handler)


class _ModuleGlobals:
    """The globals of this repo's modules and of torch.distributed, put back after a job: a test
    that patches `ps.all_reduce`, or a script that deletes a torch name, leaves nothing behind.
    Our modules' containers (the collective counters, config tables) get their contents back, and
    so do the attributes of our objects held in module globals (the RNG tracker's streams). A
    module of ours first imported during the job is dropped, to be imported afresh."""

    def __init__(self):
        modules = _our_modules()
        self.modules = {m.__name__ for m in modules}
        self.names = {m: dict(vars(m)) for m in modules + [dist]}
        self.contents = {(m, k): (v, _copy(v)) for m in modules for k, v in vars(m).items()
                         if isinstance(v, (dict, list, set)) and not k.startswith("__")}
        self.objects = [(obj, dict(vars(obj)), {k: (v, _copy(v)) for k, v in vars(obj).items()
                                                if isinstance(v, (dict, list, set))})
                        for m in modules for obj in list(vars(m).values())
                        if type(obj).__module__ in self.modules and hasattr(obj, "__dict__")
                        and not isinstance(obj, type)]

    def restore(self):
        for module, names in self.names.items():
            now = vars(module)
            for name, value in names.items():
                if now.get(name, now) is not value:
                    now[name] = value
        containers = list(self.contents.values())
        for obj, attributes, obj_containers in self.objects:
            vars(obj).clear()
            vars(obj).update(attributes)
            containers += obj_containers.values()
        for container, copy in containers:
            container.clear()
            (container.extend if isinstance(container, list) else container.update)(copy)
        for module in _our_modules():
            if module.__name__ not in self.modules:
                del sys.modules[module.__name__]
                parent, _, child = module.__name__.rpartition(".")
                if parent in sys.modules and getattr(sys.modules[parent], child, None) is module:
                    delattr(sys.modules[parent], child)


def _copy(container):
    return dict(container) if isinstance(container, dict) else type(container)(container)


def _our_modules():
    """This repo's modules (not what is installed under it, as in .venv)."""
    def ours(module):
        path = os.path.relpath(getattr(module, "__file__", None) or "/", REPO)
        return not path.startswith((".", os.sep)) and "site-packages" not in path
    return [m for m in list(sys.modules.values()) if ours(m) and m.__name__ != __name__]
