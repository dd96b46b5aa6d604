"""torchrun, with its failure report cut to one line.

    python scripts/launch.py [torchrun flags] parallel_train.py [flags]

Exactly torchrun (torch.distributed.run), except at the end: when a worker
fails, torchrun raises ChildFailedError and Python prints a long traceback of
torchrun's own code after the worker's error. Each worker has already printed
its error above it, so one line that names the failed rank is enough.
"""

import logging
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main


def failure_line(name, exitcodes):
    """The one line for a failed job: {rank: exit code} of the ranks that failed (a signal as
    its negative number, as torchrun reports it)."""
    outcomes = [f"rank {rank} killed by {signal.Signals(-code).name}" if code < 0
                else f"rank {rank} exited with {code}" for rank, code in sorted(exitcodes.items())]
    # torchrun itself stops the survivors with SIGTERM: only another signal (SIGKILL, from
    # the out-of-memory killer, say) marks a cause. Which rank failed *first* torchrun can only
    # guess from timing; the first error printed is the cause.
    killed = [o for o in outcomes if "killed" in o and "SIGTERM" not in o]
    cause = f"{killed[0]} is the cause" if killed else "the first error above is the cause"
    return f"torchrun: {name} failed ({', '.join(outcomes)}); {cause}"


if __name__ == "__main__":
    # One thread per worker unless asked otherwise (torchrun's own default, without its banner),
    # and torchrun's own log lines about stopping the other workers kept out of the way: the
    # failing rank has said why, and the line below names every rank's fate.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The workers' one-line errors need no pointer to this script (training/operations.py).
    os.environ["TP_LAUNCHER"] = "scripts/launch.py"
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    nproc = next((a.split("=")[-1] if "=" in a else sys.argv[i + 2]
                  for i, a in enumerate(sys.argv[1:]) if a.startswith("--nproc")), "1")
    if not (nproc.isdigit() and int(nproc) > 0) and nproc not in ("auto", "cpu", "gpu", "xpu"):
        sys.exit(f"error: --nproc_per_node {nproc}: give a positive number of processes")
    try:
        main()
    except ChildFailedError as e:
        sys.exit(failure_line(e.name, {rank: f.exitcode for rank, f in e.failures.items()}))
    except SignalException as e:  # Ctrl-C or a kill: the workers have been stopped
        print(f"torchrun: stopped by signal {e.sigval.name}", file=sys.stderr)
        sys.exit(128 + e.sigval)
