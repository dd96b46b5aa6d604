"""Operations: what running the scripts safely takes, none of it tensor parallelism.

Nothing here is needed to read how the model is split (model.py, mappings.py,
parallel_layers.py, parallel_state.py, train.py, parallel_train.py); it is
what makes the runs behave when something goes wrong:

  * one-line errors instead of tracebacks (`ArgumentParser`, `run_cli`),
  * signals: SIGTERM unwinds so metrics reach the disk, Ctrl-C ends every
    rank, and a watcher thread ends a rank stuck in C code after a signal,
  * exits without tearing gloo down when peers may be mid-collective,
  * torchrun's key-value store under a prefix per restart attempt,
  * a shared verdict on file reads, and one line for a rank that lost a peer,
  * TF32 pinned off, so float32 serial and parallel curves agree to round-off.
"""

import argparse
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager

import torch
import torch.distributed as dist

from core import parallel_state as ps
from core import wire
from core.parallel_state import UserError  # what a user can cause: one line, no traceback


class QuietExit(SystemExit):
    """Exit status 2 on a rank that leaves the error's one line to another rank."""


# torchrun stops the whole job when the first rank exits: a rank that says nothing waits this
# long before leaving, so the rank that says the error is not stopped before it has said it.
REPORTER_FIRST_S = 1.0


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line that says what is wrong, instead of the whole usage text; once, from rank 0."""
        if os.environ.get("RANK", "0") != "0":
            raise QuietExit(2)
        self.exit(2, f"{self.prog}: error: {message} (see --help){under_raw_torchrun()}\n")


def under_raw_torchrun():
    """What to add to an error's one line when a bare torchrun launched the job: torchrun then
    prints its own 40-line report after it; scripts/launch.py (which the bash scripts use) cuts
    that report to one line, and says so to its workers (TP_LAUNCHER)."""
    if "TORCHELASTIC_RUN_ID" in os.environ and "TP_LAUNCHER" not in os.environ:
        return ("; torchrun's own report below says nothing more (python scripts/launch.py, or "
                "bash bash_parallel_train.sh, leaves this line alone)")
    return ""


def file_in_the_way(directory):
    """The file that keeps `directory` from being made (it, or a parent of it), or None."""
    path = os.path.normpath(directory)
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return path if path and not os.path.isdir(path) else None


def check_output(parser, flag, path, kind="dir"):
    """Before any work: `path` can be made as a `kind` ("dir", or a file ending: ".png",
    ".json", ".pt") and written, or parser.error says why in one line. Writing is checked by
    trying: permissions alone do not say (root, read-only file systems)."""
    directory = path if kind == "dir" else os.path.dirname(os.path.abspath(path))
    if file := file_in_the_way(directory):
        parser.error(f"{flag} {path}: {file} is a file; name a directory")
    if kind != "dir" and os.path.isdir(path):
        parser.error(f"{flag} {path} is a directory; name a file")
    if kind != "dir" and not path.endswith(kind):
        parser.error(f"{flag} {path}: it is written as {kind[1:].upper()}; name a {kind} file")
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        parser.error(f"{flag} {path}: {existing} cannot be written ({e.strerror}); name another "
                     "place")


def pin_float32_precision() -> dict:
    """Full-precision float32 matmuls and convolutions: TF32 off, in serial and parallel runs alike.

    On Ampere and later GPUs, TF32 (enabled by torch.set_float32_matmul_precision("high")
    or by an image that sets TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1) rounds matmul inputs to
    10 mantissa bits: serial and tensor-parallel float32 curves then differ by ~1e-3
    instead of round-off (~1e-6), and the comparison says nothing. Returns what
    config.json records.
    """
    override = os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")
    if override not in (None, "0"):
        # Read by torch at its first CUDA matmul.
        os.environ["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] = "0"
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    if torch.backends.cuda.matmul.allow_tf32:  # torch read the override before we could unset it
        raise ps.ParallelConfigError("TF32 could not be switched off "
                                  f"(TORCH_ALLOW_TF32_CUBLAS_OVERRIDE={override} was read "
                                  "already); unset it before starting")
    return dict(float32_matmul_precision="highest (TF32 off)",
                tf32_override_in_environment=override)


# ---------------------------------------------------------------------------
# Ending a run: one line, the right exit status, no hang.

class Terminated(BaseException):
    """SIGTERM (torchrun stopping its workers, or `kill`): unwind, so metrics reach the disk."""


def _terminate(signum, frame):
    """SIGTERM: unwind with Terminated, unless this rank is already on its way out.

    torchrun stops the other ranks as soon as one exits, and a rank that met the same error (or
    waits for the reporter) may be stopped in the instant between catching it and `_leaving_with`:
    the handler then lets it go on leaving, with its line and its status, instead of a second
    traceback (seen in 6 of 30 runs of a checkpoint missing on one rank). So does a rank that
    just lost a peer in a collective: its one line says so (die_first_error_first), not 143.
    """
    leaving = sys.exc_info()[1]
    if isinstance(leaving, (UserError, SystemExit)) or lost_a_peer(leaving):
        return  # run_cli, or die_first_error_first, is handling it
    raise Terminated()


def run_cli(main):
    """Run main(); a user error or Ctrl-C ends it with one line and a non-zero exit status.

    In a parallel run every rank reaches the same error, so rank 0 says it;
    an error that only some ranks met (a file they can't read) is said by
    the first of them.
    """
    rank0 = os.environ.get("RANK", "0") == "0"
    signal.signal(signal.SIGTERM, _terminate)
    if "RANK" in os.environ:  # under torchrun: peers can leave this rank stuck in a collective
        _leave_if_stuck_after_a_signal()
    try:
        main()
    except UserError as e:
        _leaving_with(2)
        if getattr(e, "reported_by_this_rank", rank0):
            print(f"error: {e}{under_raw_torchrun()}", file=sys.stderr, flush=True)
        else:
            time.sleep(REPORTER_FIRST_S)
        sys.exit(2)
    except QuietExit:
        _leaving_with(2)
        time.sleep(REPORTER_FIRST_S)
        raise
    except (KeyboardInterrupt, Terminated) as e:
        code = 130 if isinstance(e, KeyboardInterrupt) else 128 + signal.SIGTERM
        _leaving_with(code)
        if rank0 and isinstance(e, KeyboardInterrupt):
            print("interrupted", file=sys.stderr, flush=True)
        if dist.is_initialized():
            exit_now(code)  # peers may be mid-collective: no barrier, no teardown
        sys.exit(code)
    except SystemExit as e:  # --help, or a flag error said by argparse
        _leaving_with(e.code)
        raise
    except Exception as e:
        if not out_of_memory(e):
            raise  # a bug: its traceback
        _leaving_with(2)
        print(f"error: {out_of_memory(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    _leaving_with(0)


def out_of_memory(error):
    """What to say when `error` is the machine running out of memory (a model or batch too big
    for it, not a bug), else None."""
    oom = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
    if isinstance(error, oom) or "can't allocate memory" in str(error):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"out of memory ({first[:200]}); lower --hidden_size, --batch_size or "
                "--num_layers, or use more ranks")
    return None


def _leaving_with(code):
    """From here on, SIGTERM ends the process at once with the status it is already leaving with.

    torchrun stops the other ranks as soon as one exits. A rank still waiting
    for the reporter, or still in Python's shutdown (weakref finalizers,
    atexit), would otherwise raise Terminated there and print a traceback
    after the one line.
    """
    code = _status(code)
    signal.signal(signal.SIGTERM, lambda signum, frame: exit_now(code))


def _status(code):
    """The exit status of SystemExit(code), as the interpreter gives it."""
    return 0 if code is None else code if isinstance(code, int) else 1


STUCK_GRACE_S = 2.0


def _leave_if_stuck_after_a_signal():
    """A thread that ends the process when a signal's Python handler can't run.

    Python runs signal handlers between bytecodes, in the main thread. A rank
    whose peer died under NCCL is blocked inside a CUDA sync (NCCL reports no
    "connection reset" as gloo does), so torchrun's SIGTERM would wait out its
    30 s grace. The C-level handler still writes the signal number to the
    wakeup fd; this thread reads it, gives the main thread STUCK_GRACE_S to
    unwind normally, and otherwise leaves with one line.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch():
        signum = os.read(read_fd, 1)[0]
        time.sleep(STUCK_GRACE_S)
        print(f"error: rank {os.environ.get('RANK', 0)} was still inside a collective "
              f"{STUCK_GRACE_S:g} s after {signal.Signals(signum).name} (a peer is gone); leaving",
              file=sys.stderr, flush=True)
        exit_now(128 + signum)
    threading.Thread(target=watch, daemon=True).start()


def exit_now(code: int) -> None:
    """Leave at once, without tearing the process group down.

    For when peers may be gone or stuck mid-collective (a failure, Ctrl-C):
    Python's normal shutdown would destroy gloo's threads in the middle of an
    operation and abort ("terminate called without an active exception").
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def leaving_together():
    """Around a parallel run: every rank leaves the job together, or the first failure is told.

    A user error reaches every rank alike, so they leave through the barrier
    together. Anything else (a bug, a lost peer) may have happened on one rank
    only: it says so and exits at once (die_first_error_first).
    """
    try:
        yield
    except (UserError, SystemExit):
        ps.destroy_model_parallel()  # every rank reached the same verdict: leave together
        raise
    except Exception as e:
        die_first_error_first(e)
    ps.destroy_model_parallel()


def lost_a_peer(error):
    """Is `error` gloo's for a collective whose other end went away ("... reset by peer")?"""
    return error is not None and "by peer" in str(error)


def die_first_error_first(error):
    """Report an unexpected error on this rank, then exit at once.

    This rank's exit is what wakes its peers, who are waiting in a collective:
    they fail with "connection reset by peer", and torchrun stops the rest. So
    the real error is printed before exiting, and a rank that only lost a peer
    says so in one line instead of a second, misleading traceback.
    """
    rank = dist.get_rank()
    if out_of_memory(error):
        print(f"error: rank {rank}: {out_of_memory(error)}", file=sys.stderr, flush=True)
    elif lost_a_peer(error):
        cause = str(error).split(". ")[0].split("] ")[-1]
        print(f"error: rank {rank} lost a peer in a collective ({cause}); another rank failed "
              "first",
              file=sys.stderr, flush=True)
    else:
        print(f"rank {rank} failed:", file=sys.stderr)
        traceback.print_exc()
    exit_now(1)  # no teardown: peers are stuck in a collective this rank will never join


# ---------------------------------------------------------------------------
# Launch quirks.

def torchrun_store(timeout):
    """The job's key-value store, seen under a prefix of its own for each torchrun attempt.

    After a failure, `torchrun --max-restarts` starts the group again on the
    same store; the new ranks must not read the addresses the old ones left
    there (seen here: gloo then connects to a dead rank's port and fails).
    Under torchrun its agent hosts the store; without it, rank 0 does.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), timeout=timeout,
                          is_master=not agent_hosts_store and os.environ["RANK"] == "0")
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def single_process_env():
    """Run as a job of one rank when started with plain `python` (TP=1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _nodes():
    """How many launchers (nodes) the job has, as torchrun says (GROUP_WORLD_SIZE)."""
    return int(os.environ.get("GROUP_WORLD_SIZE", "1"))


def on_every_rank(fn, *args):
    """fn(*args) on every rank, and every rank learns whether it worked everywhere.

    Reading files (the data, a checkpoint shard) can fail on some ranks only,
    e.g. on a node that lacks them. Without the shared verdict the others
    would wait in their next collective until the timeout. The first rank
    that failed says why, naming its machine; the others leave quietly.
    """
    result, error = None, None
    try:
        result = fn(*args)
    except UserError as e:
        error = e
    world, rank = dist.get_world_size(), dist.get_rank()
    failed = torch.zeros(world, dtype=torch.int32, device=wire.get_device())
    failed[rank] = error is not None
    wire.all_reduce(failed, dist.group.WORLD)
    if not failed.any():
        return result
    if rank != int(failed.nonzero()[0]):
        raise QuietExit(2)
    if not failed.all() and _nodes() > 1:  # one node: the host's name says nothing new
        error = type(error)(f"{error} (on {socket.gethostname()}; every node needs its files)")
    error.reported_by_this_rank = True
    raise error


def given_flags(parser, argv) -> set:
    """The flags the user gave (argv read by the parser's own rules: abbreviations and
    --flag=value count), whatever their values: not a comparison with the defaults."""
    unset = object()
    probe = argparse.Namespace(**{a.dest: unset for a in parser._actions
                                  if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, probe)  # (parsed once already: no error here)
    return {a.option_strings[0] for a in parser._actions
            if a.option_strings and getattr(probe, a.dest, unset) is not unset}
