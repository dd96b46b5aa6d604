"""Joining the job: one backend and one device for every rank, decided from what every rank has.

Before the process group exists, each rank writes to torchrun's store which GPU it would take (by
UUID, and on which machine) and reads what the others wrote; all then decide from the same facts
(`decide_backend`), so two nodes never pick different backends and wait for each other. The
result goes to parallel_state (`set_device`), which holds every collective to it.
"""

import inspect
import json
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from core import wire
from core.parallel_state import ParallelConfigError
from training.operations import torchrun_store

BACKEND_NOTE = None  # why 'auto' fell back to gloo on a machine with GPUs, if it did


def init_distributed(backend: str = "auto", timeout_minutes: float = 10.0,
                     device: str = "auto") -> torch.device:
    """Join the torchrun job with one backend and one device type for every rank.

    Returns this rank's device.

    The choice is made from what every rank reports, so all nodes agree (see `_choose`).
    """
    global BACKEND_NOTE
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(minutes=timeout_minutes)
    store = torchrun_store(timeout)  # one prefix per torchrun restart attempt
    backend, device_type, note = _choose(store, backend, device, rank, world_size)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        # NCCL: one GPU per rank, so local ranks map one to one (checked in _choose);
        # gloo may share a GPU between ranks.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)  # before the group exists, so NCCL binds to it
    else:
        device = torch.device("cpu")
    wire.set_device(device, stage_through_host=backend == "gloo" and device_type == "cuda")
    kwargs = {}
    if backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        kwargs["device_id"] = device  # torch >= 2.3: the group knows its GPU from the start
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout, **kwargs)
    BACKEND_NOTE = note
    if note and rank == 0:
        print(f"note: {note}", flush=True)
    return device


def _choose(store, backend, device, rank, world_size):
    """(backend, device type, note) for the whole job, the same on every rank.

    Each rank writes to the job's store which GPU it would use and reads what
    the others wrote; all then decide from the same facts (`decide_backend`).
    """
    store.set(f"gpu_of_rank_{rank}", json.dumps(this_rank_gpu()))
    seen = [json.loads(store.get(f"gpu_of_rank_{r}")) for r in range(world_size)]
    return decide_backend(seen, backend, device)


def this_rank_gpu() -> dict:
    """This rank's machine and the GPU it would take (cuda:LOCAL_RANK), by UUID; None without
    one."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu = None
    if gpus:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        properties = torch.cuda.get_device_properties(local_rank % gpus)
        gpu = str(getattr(properties, "uuid", local_rank % gpus))
        if local_rank >= gpus:
            gpu += f" (shared by local rank {local_rank})"
    return dict(host=socket.gethostname(), gpu=gpu)


def decide_backend(seen, backend, device):
    """The job's (backend, device type, note) from every rank's this_rank_gpu(), in rank order.

    NCCL needs a GPU of its own for every rank: a node with no GPUs, or two
    launchers on one machine that both map LOCAL_RANK 0 to cuda:0, rule it
    out ("Duplicate GPU detected"). 'auto' then falls back to gloo and says
    so; 'nccl' is an error. Device 'auto' is cuda when every rank has a GPU
    (gloo then shares a GPU between ranks), else cpu.
    """
    gpu_ids = [s["gpu"] for s in seen]
    where = lambda r: f"rank {r} (on {seen[r]['host']})"
    without = [r for r, g in enumerate(gpu_ids) if g is None]
    shared = [r for r, g in enumerate(gpu_ids)
              if g is not None and (gpu_ids.index(g) != r or "shared" in g)]
    why_not_nccl = (f"{where(without[0])} has no GPU" if without else
                    f"{where(shared[0])} would share a GPU with another rank (NCCL refuses two "
                    "ranks on one GPU)"
                    if shared else None)
    if backend == "nccl" and why_not_nccl:
        raise ParallelConfigError("--distributed_backend nccl needs a GPU of its own for each of "
                                  f"the {len(seen)} ranks, but {why_not_nccl}; use "
                                  "--distributed_backend gloo (or auto)")
    if device == "cuda" and without:
        raise ParallelConfigError(f"--device cuda, but {where(without[0])} has no GPU; "
                                  "use --device cpu (or auto)")
    if backend == "nccl" and device == "cpu":
        raise ParallelConfigError("--distributed_backend nccl moves CUDA tensors only; use "
                                  "--device cuda (or auto), or --distributed_backend gloo for CPU")
    device_type = "cuda" if device == "cuda" or (device == "auto" and not without) else "cpu"
    note = None
    if backend == "auto":
        backend = "nccl" if not why_not_nccl and device_type == "cuda" else "gloo"
        # A real fallback: there are GPUs, NCCL can't have them.
        if backend == "gloo" and any(gpu_ids):
            note = (f"using gloo, not nccl: {why_not_nccl or '--device cpu'}; tensors on "
                    f"{device_type}"
                    + (", each collective through host memory" if device_type == "cuda" else ""))
    return backend, device_type, note


def backend_report() -> dict:
    """What config.json records of the job's communication set-up."""
    return dict(backend=dist.get_backend(), device_type=wire.get_device().type,
                backend_note=BACKEND_NOTE)


