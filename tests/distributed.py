"""Run a test function on several CPU processes joined by gloo, with a hard time limit."""

import os
import re
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel_state as ps

TIMEOUT_S = 60


def comm_table(log):
    """parallel_train.py's communication table: {collective: (calls, KiB in, KiB sent per rank in a
    ring)}."""
    return {m[1]: (int(m[2]), float(m[3]), float(m[4]))
            for m in re.finditer(r"^  (\w+)\s+x(\d+)\s+([\d.]+) KiB\s+([\d.]+) KiB$", log, re.M)}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, tp_size, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # one thread per rank: 4 ranks share 2 cores without thrashing
    ps.init_distributed(backend="gloo", timeout_minutes=TIMEOUT_S / 60, device="cpu")
    ps.initialize_model_parallel(tp_size)
    try:
        fn(*args)
    finally:
        ps.destroy_model_parallel()


def run_distributed(fn, world_size, *args, tp_size=None):
    """Call fn(*args) on `world_size` ranks (tensor-parallel size defaults to all of them).

    An exception on any rank fails the test with that rank's traceback; a hang
    fails it after TIMEOUT_S seconds instead of blocking the suite.
    """
    ctx = mp.start_processes(_worker,
                             args=(world_size, _free_port(), tp_size or world_size, fn, args),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in "
                               f"{TIMEOUT_S} s")


def all_ranks(tensor):
    """Every rank's copy of `tensor`, stacked: for checking that replicas agree."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)
