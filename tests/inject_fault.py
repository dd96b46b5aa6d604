"""parallel_train.py with a fault on one rank at one iteration: the fault tests' worker.

    torchrun ... tests/inject_fault.py {raise,die} RANK ITERATION [parallel_train.py flags]

raise: the rank raises an exception (a bug); die: the rank is killed (SIGKILL),
as by the out-of-memory killer. Either way it happens just after that rank
received the batch of ITERATION, while its peers go on into the step, and
only in torchrun's first attempt: a group restarted by --max-restarts runs clean.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import parallel_train  # noqa: E402

kind, fault_rank, fault_iteration = sys.argv.pop(1), int(sys.argv.pop(1)), int(sys.argv.pop(1))
batches = parallel_train.broadcast_batches


def faulty_batches(*args, **kwargs):
    for it, batch in enumerate(batches(*args, **kwargs), start=kwargs.get("start_step", 0) + 1):
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if it == fault_iteration and int(os.environ["RANK"]) == fault_rank and first_attempt:
            if kind == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault on rank {fault_rank} at iteration {it}")
        yield batch


parallel_train.broadcast_batches = faulty_batches
parallel_train.cli()
