"""parallel_train.py with a fault on one rank at one iteration: the fault tests' worker.

    torchrun ... tests/inject_fault.py {raise,die,stuck} RANK ITERATION [parallel_train.py flags]

raise: the rank raises an exception (a bug); die: the rank is killed (SIGKILL),
as by the out-of-memory killer; stuck: the rank raises, and every other rank
blocks at that iteration inside C code that ignores Python's signal handlers,
as a rank whose NCCL peer died blocks inside a CUDA sync. The fault happens
just after the rank took the batch of ITERATION, and only in torchrun's first
attempt: a group restarted by --max-restarts runs clean.
"""

import ctypes
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import parallel_train  # noqa: E402

kind, fault_rank, fault_iteration = sys.argv.pop(1), int(sys.argv.pop(1)), int(sys.argv.pop(1))
batches = parallel_train.iterate_batches


def block_forever_in_c():
    """Lock a mutex twice: the thread waits in C, with the GIL released, and no signal wakes it."""
    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # zeroed = PTHREAD_MUTEX_INITIALIZER (glibc)
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)


def faulty_batches(X, y, batch_size, start_step=0, rows=slice(None)):
    for it, batch in enumerate(batches(X, y, batch_size, start_step, rows), start=start_step + 1):
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if it == fault_iteration and first_attempt:
            if int(os.environ["RANK"]) == fault_rank:
                if kind == "die":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected fault on rank {fault_rank} at iteration {it}")
            if kind == "stuck":
                block_forever_in_c()
        yield batch


parallel_train.iterate_batches = faulty_batches
parallel_train.cli()
