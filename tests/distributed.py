"""The session's rank processes: multi-rank checks and script runs without new interpreters.

Starting a process and importing torch costs seconds on 2 cores; most checks then take
milliseconds. So the suite starts one process per rank slot once (a "zygote": Python, torch,
numpy and matplotlib imported, nothing of this repo) and hands it work:

    run_distributed(fn, world_size, *args)   fn(*args) on every rank of a new gloo world
    run_script(script, *argv, nproc=N)       what `python scripts/launch.py --nproc_per_node N
                                             script argv` (torchrun) does
    run_script(script, *argv)                what `python script argv` does

Every job runs in a child the zygote forks for it, and the child exits when the job ends. So a job
starts from the state a new process has and leaves nothing behind, by construction: class
attributes, methods and objects (what a test patches, whatever it reaches), this repo's modules
(imported afresh in the job's environment, so a variable read at import is read in it),
torch.distributed's groups and pending work (a new world, a new store, for every job), signal
handlers, threads, atexit handlers. What it costs: a fork, this repo's imports and a new world,
about 0.1 s a job, where checking what a job might have touched could never be complete.

A script runs as torchrun runs it: the environment its agent gives a worker, a store the launcher
hosts (TORCHELASTIC_USE_AGENT_STORE), sys.path[0] the script's folder, atexit handlers run at the
end, the survivors of a failed rank stopped with SIGTERM, and the exit status and last line of
scripts/launch.py. A failure on any rank fails the test with that rank's traceback; a hang fails it
after its time limit; an error of this harness is a failure with its traceback, never a status.

What must go through a real launcher (torchrun's own behaviour, signals, faults that kill a
rank, two launchers as two nodes, the bash scripts) still does: see test_errors.py, test_scale.py
and docs/tests.md.
"""

import atexit
import importlib
import importlib.util
import os
import pickle
import re
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from multiprocessing import connection

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 60  # a check; also gloo's timeout for one collective
SCRIPT_TIMEOUT_S = 240  # a whole training run
START_TIMEOUT_S = 120  # a new zygote: start Python, import torch
# After the first rank fails, how long the others get to leave: a rank that failed leaves its
# world, which ends a peer's wait in a collective at once; a script's rank that leaves the error's
# line to another waits operations.REPORTER_FIRST_S (1 s) first. Past this a rank is killed.
GRACE_S = 5
# What the zygotes import before they fork: the costly imports, none of this repo's modules (a job
# imports those afresh, in its own environment). torch._dynamo is what the first optimizer step
# would import (0.8 s a job); DTensor is the benchmark's.
PRELOAD = ["numpy", "torch", "torch.distributed", "torch.multiprocessing", "torch.optim",
           "torch._dynamo", "torch.utils.checkpoint", "torch.distributed.tensor",
           "torch.distributed.elastic.multiprocessing", "matplotlib.pyplot", "hypothesis", "pytest"]


def load_script(path):
    """The module of a script of this repository, `path` from its root (scripts/ is no package)."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


failure_line = load_script("scripts/launch.py").failure_line  # its last line for a failed job


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
    """Call fn(*args) on `world_size` ranks of a new gloo world, after
    initialize_model_parallel(tp_size or world_size).

    An exception on any rank fails the test with that rank's traceback; a hang fails it after
    `timeout` seconds instead of blocking the suite.
    """
    call = pickle.dumps((fn, args))  # a function pickle cannot name fails here, at once
    jobs = [_Job("call", rank, world_size, call=call, tp_size=tp_size or world_size)
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
    """A rank's exception (its traceback in the message), a rank that died, a hang, or an error
    of this harness."""


@dataclass
class ScriptRun:
    """What a launch left: its exit status (scripts/launch.py's: 1 when a rank failed) and every
    rank's output, stdout before stderr as a terminal would show them after the run."""
    code: int
    stdout: str
    stderr: str

    @property
    def out(self):
        return self.stdout + self.stderr


def run_script(script, *argv, nproc=None, ok=True, env=None, timeout=SCRIPT_TIMEOUT_S):
    """`script` (a path from the repository root, or "-m package.module") with `argv`, as
    `python scripts/launch.py --standalone --nproc_per_node nproc` starts it (torchrun: its
    workers' environment, its store, its exit status and scripts/launch.py's line), or with nproc
    None as `python` starts it; returns a ScriptRun. ok=True asserts exit status 0, ok=False a
    non-zero one.

    The script runs as __main__ (runpy), through the same `run_cli` a user's run goes through.
    """
    jobs = [_Job("script", rank, nproc or 1, script=script, argv=[str(a) for a in argv],
                 env=dict(env or {}), torchrun=nproc is not None) for rank in range(nproc or 1)]
    results = _pool().run(jobs, timeout)
    stdout, stderr = ("".join(getattr(res, s) for res in results) for s in ("stdout", "stderr"))
    broken = [(rank, res) for rank, res in enumerate(results) if res.status == "error"]
    if broken:  # the harness failed, not the script: say so, with the traceback
        rank, res = broken[0]
        raise RankFailed(f"the rank pool failed running {script} on rank {rank}:\n{res.detail}")
    if any(res.status == "timeout" for res in results):
        raise RankFailed(f"{script} {' '.join(argv)} did not finish in {timeout} s:\n"
                         f"{stdout}{stderr}")
    failures = {rank: res.code for rank, res in enumerate(results) if res.code}
    if nproc is None:
        code = results[0].code if results[0].code >= 0 else 128 - results[0].code  # as a shell
    elif failures:  # as scripts/launch.py ends a failed job
        code, stderr = 1, stderr + failure_line(script, failures) + "\n"
    else:
        code = 0
    run = ScriptRun(code, stdout, stderr)
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
    call: bytes = b""  # a call: pickled (fn, args), unpickled in the job's own process
    tp_size: int = 1
    script: str = ""
    argv: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    torchrun: bool = False
    port: int = 0
    run_id: str = ""
    environ: dict = field(default_factory=dict)  # pytest's, when the job was given


@dataclass
class _Result:
    status: str  # "ok", "error", "exit", "died", "timeout", "stopped"
    detail: str = ""  # a call's traceback, or the harness's
    code: int = 0  # the process's exit status; a signal as its negative number
    stdout: str = ""
    stderr: str = ""
    arrival: int = 0  # the order in which the ranks' results came in

    @property
    def failed(self):
        return self.status in ("error", "died") or bool(self.code)


class _Pool:
    def __init__(self):
        self.workers = []  # (zygote process, connection) or None where one must be started
        self.logs = tempfile.mkdtemp(prefix="rank_pool_")

    def _start(self, n):
        """Zygotes 0..n-1 alive and ready (torch imported): a test's time limit does not count
        their start-up."""
        ctx = mp.get_context("spawn")
        self.workers += [None] * (n - len(self.workers))
        started = []
        for i in range(n):
            if self.workers[i] is not None and not self.workers[i][0].is_alive():
                self._replace(i)
            if self.workers[i] is None:
                mine, theirs = ctx.Pipe()
                process = ctx.Process(target=_zygote, args=(i, theirs, self.logs), daemon=True,
                                      name=f"rank-pool-{i}")
                process.start()
                theirs.close()
                self.workers[i] = (process, mine)
                started.append(i)
        for i in started:
            if not self.workers[i][1].poll(START_TIMEOUT_S) or self.workers[i][1].recv() != "ready":
                raise RankFailed(f"rank process {i} did not start in {START_TIMEOUT_S} s")

    def _replace(self, i):
        process, conn = self.workers[i]
        process.kill()
        process.join()
        conn.close()
        self.workers[i] = None

    def run(self, jobs, timeout):
        """Every job in a child of its zygote; their results, in rank order."""
        n = len(jobs)
        # The store torchrun's agent would host: the job's rendezvous, new for every job.
        store = dist.TCPStore("localhost", 0, None, is_master=True, wait_for_workers=False)
        run_id = uuid.uuid4().hex
        for job in jobs:
            job.port, job.run_id, job.environ = store.port, run_id, dict(os.environ)
        self._start(n)
        for i, job in enumerate(jobs):
            self.workers[i][1].send_bytes(pickle.dumps(job))
        ranks = _Ranks(self, n, jobs[0].kind == "script" and jobs[0].torchrun)
        deadline = time.monotonic() + timeout
        while ranks.pending:
            waits = {self.workers[i][1]: i for i in ranks.pending}
            waits.update({self.workers[i][0].sentinel: i for i in ranks.pending})
            for ready in connection.wait(list(waits), max(0.0, deadline - time.monotonic())):
                if waits[ready] in ranks.pending and ranks.hear(waits[ready]):
                    deadline = min(deadline, time.monotonic() + GRACE_S)
            if ranks.pending and time.monotonic() >= deadline:
                ranks.kill_pending(timeout)
        for i, res in enumerate(ranks.results):
            res.stdout, res.stderr = (_read(os.path.join(self.logs, f"{i}.{s}"))
                                      for s in ("out", "err"))
        del store
        return ranks.results

    def stop(self):
        for i, worker in enumerate(self.workers):
            if worker is not None:
                worker[1].close()  # the zygote reads EOF and leaves
                worker[0].join(5)
                if worker[0].is_alive():
                    self._replace(i)
        self.workers = []


class _Ranks:
    """The ranks of one job as the pool hears of them: each child's pid, result and exit status,
    and what torchrun's agent does when one fails (stops the others with SIGTERM)."""

    def __init__(self, pool, n, torchrun):
        self.pool, self.torchrun = pool, torchrun
        self.pending, self.pids, self.results = set(range(n)), {}, [None] * n
        self.arrivals = 0

    def hear(self, i):
        """Read what zygote i sent; True when rank i has just failed."""
        try:
            kind, value = self.pool.workers[i][1].recv()
        except (EOFError, OSError):  # the zygote itself died
            self.pool._replace(i)
            return self._done(i, _Result("died", "its zygote died", code=1))
        if kind == "pid":
            self.pids[i] = value
        elif kind == "result":
            self.results[i] = value
        elif kind == "exit":  # the child is gone: its result, or the status it ended with
            result = self.results[i] or _Result("exit" if self.torchrun or not value else "died",
                                                f"exit status {value}", code=value)
            if result.status == "ok" and value:
                result = _Result("died", f"exit status {value} after its result", code=value)
            return self._done(i, result)
        return False

    def _done(self, i, result):
        self.pending.discard(i)
        self.arrivals += 1
        result.arrival = self.arrivals
        self.results[i] = result
        if result.failed and self.torchrun:  # torchrun's agent stops the other workers
            for j in self.pending:
                self._signal(j, signal.SIGTERM)
        return result.failed

    def _signal(self, i, signum):
        try:
            os.kill(self.pids[i], signum)
        except (KeyError, ProcessLookupError):  # not started yet, or already gone
            pass

    def kill_pending(self, timeout):
        """Past the deadline: the ranks still running are killed, and their zygotes replaced (a
        child killed mid-message would leave half of it in the pipe)."""
        failed = any(r is not None and r.failed for r in self.results)
        for i in sorted(self.pending):
            self._signal(i, signal.SIGKILL)
            self.pool._replace(i)
            # After another rank failed, torchrun would stop this one too: "stopped".
            self.results[i] = (_Result("stopped", "stopped after another rank failed", code=-9,
                                       arrival=self.arrivals + 1) if failed else
                               _Result("timeout", f"still running after {timeout} s",
                                       code=-9, arrival=self.arrivals + 1))
        self.pending = set()


_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = _Pool()
    return _POOL


def stop_pool():
    if _POOL is not None:
        _POOL.stop()


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


# ---------------------------------------------------------------------------
# A zygote, and the child it forks for each job.

def _zygote(index, conn, logs):
    """Import what costs seconds, then fork a child per job and report how it ended."""
    os.setpgrp()  # Ctrl-C at pytest's terminal is pytest's: the pool leaves when pytest closes it
    os.chdir(REPO)  # where the tests start the scripts
    for name in PRELOAD:
        importlib.import_module(name)
    # A child can use CUDA only if this process never did ("Cannot re-initialize CUDA in forked
    # subprocess"): nothing here may touch it.
    assert not torch.cuda.is_initialized(), "the zygote initialised CUDA: its children cannot"
    torch.set_num_threads(1)  # one thread per rank: 4 ranks share 2 cores without thrashing
    conn.send("ready")
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        pid = os.fork()
        if pid == 0:
            os._exit(_child(index, conn, payload, logs))
        _, status = os.waitpid(pid, 0)
        conn.send(("exit", os.waitstatus_to_exitcode(status)))


def _child(index, conn, payload, logs):
    """Run one job; the exit status: the script's, or 0 after a call's result."""
    code = 1
    try:
        conn.send(("pid", os.getpid()))
        _output_to(*(os.path.join(logs, f"{index}.{s}") for s in ("out", "err")))
        atexit._clear()  # the zygote's handlers are not the job's
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a new interpreter
        job = pickle.loads(payload)
        os.environ.clear()  # what a process pytest starts now would inherit
        os.environ.update(job.environ, OMP_NUM_THREADS="1")  # as torchrun gives its workers
        if job.kind == "call" or job.torchrun:
            os.environ.update(_torchrun_env(job))
        if job.kind == "call":
            _call(job)
            conn.send(("result", _Result("ok")))
            code = 0
        else:
            os.environ.update(job.env)
            code = _run_script(job)
    except BaseException:  # noqa: BLE001 - a call's exception, or the harness's own
        conn.send(("result", _Result("error", traceback.format_exc())))
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _torchrun_env(job):
    """What `torchrun --standalone --nproc_per_node N` gives each of its workers (torch 2.13;
    tests/test_rank_pool.py checks it against a real launch)."""
    n = str(job.world_size)
    return dict(RANK=str(job.rank), LOCAL_RANK=str(job.rank), ROLE_RANK=str(job.rank),
                WORLD_SIZE=n, LOCAL_WORLD_SIZE=n, ROLE_WORLD_SIZE=n, GROUP_RANK="0",
                GROUP_WORLD_SIZE="1", ROLE_NAME="default", MASTER_ADDR="localhost",
                MASTER_PORT=str(job.port), TORCHELASTIC_USE_AGENT_STORE="True",
                TORCHELASTIC_RUN_ID=job.run_id, TORCHELASTIC_RESTART_COUNT="0",
                TORCHELASTIC_MAX_RESTARTS="0", TORCH_NCCL_ASYNC_ERROR_HANDLING="1",
                TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT",
                TORCHELASTIC_ERROR_FILE=os.path.join(tempfile.gettempdir(),
                                                     f"torchelastic_{job.run_id}_{job.rank}.json"),
                TP_LAUNCHER="scripts/launch.py")  # what scripts/launch.py adds for its workers


def _call(job):
    """fn(*args) as rank job.rank of a new world, after initialize_model_parallel(tp_size); the
    ranks leave together (a barrier) and the world is torn down."""
    from core import parallel_state as ps  # this repo, imported here: in the job's own environment
    from training import initialize
    fn, args = pickle.loads(job.call)  # imports the test module
    initialize.init_distributed(backend="gloo", timeout_minutes=TIMEOUT_S / 60, device="cpu")
    ps.initialize_model_parallel(job.tp_size)
    fn(*args)
    ps.destroy_model_parallel()  # a barrier first: no rank leaves mid-collective


def _run_script(job):
    """Exit status of `python script argv`, run here as __main__ (atexit handlers included)."""
    sys.argv = [job.script, *job.argv]
    module = job.script[3:] if job.script.startswith("-m ") else None
    # sys.path as the interpreter sets it: the script's folder (the working directory for -m)
    # first, then the standard library and site-packages, not pytest's additions.
    inside = lambda p: os.path.abspath(p) == REPO or os.path.abspath(p).startswith(REPO + os.sep)
    sys.path[:] = [os.getcwd() if module else os.path.dirname(os.path.join(REPO, job.script))] + [
        p for p in sys.path if p and not (inside(p) and "site-packages" not in p)]
    try:
        try:
            if module:  # python -m module
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(os.path.join(REPO, job.script), run_name="__main__")
        finally:
            atexit._run_exitfuncs()
    except SystemExit as e:  # as the interpreter treats it
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - the interpreter prints it and exits with 1
        traceback.print_exc()
        return 1
    return 0


def _output_to(out, err):
    """File descriptors 1 and 2 into these files (what the ranks print, C code's too)."""
    for fd, path in zip((1, 2), (out, err)):
        (sys.stdout, sys.stderr)[fd - 1].flush()
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
