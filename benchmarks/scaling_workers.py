"""scaling.py's separate measurements for its cost model, each in processes of its own
(launcher.py): one rank's compute C(w) per width, and the all-reduce per message size.

Both are timed by hand rather than through torch.utils.benchmark's Timer: a step's pieces
(forward with the loss, backward, the SGD step) depend on each other and run in that order, one
sample per step; an all-reduce is timed after a barrier, so that each rank times the collective
and not its wait for the others, which a block of back-to-back calls would include.
"""

import os
import statistics
import time

import torch

from benchmarks.launcher import print_result
from benchmarks.scaling_model import BATCH, ELEM, INPUT, gemm_flops


def compute_worker(args):
    """C(w) for each width: one rank's step computed alone, piece by piece, on one thread.

    A TP rank at H / p computes what the serial ToyModel of width H / p computes (its
    shards are that model's weights): so C(w) is that model's step, zero_grad and forward
    with the loss, backward, the SGD step, each timed, without the loop around it (data,
    log points: those are the overhead). Timing each GEMM alone instead, its operands stay
    in the cache between repetitions; in a step the weights, their gradients and momentum
    (3 x 2 I w floats) pass through it together, and from a few MiB on they no longer fit.
    """
    import torch.nn.functional as F

    from model import ToyModel
    torch.set_num_threads(1)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    g = torch.Generator().manual_seed(0)
    costs = {}
    for w in args.widths:
        torch.manual_seed(0)
        model = ToyModel(INPUT, w).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-9, momentum=0.9)
        x, y = torch.randn(BATCH, INPUT, generator=g).to(device), \
            torch.randn(BATCH, generator=g).to(device)
        state = {}

        def forward():
            optimizer.zero_grad(set_to_none=True)
            state["loss"] = F.mse_loss(model(x)[:, 0], y)

        pieces = {"forward": forward, "backward": lambda: state["loss"].backward(),
                  "sgd": optimizer.step}
        reps = max(30, min(300, int(4e9 / gemm_flops(w))))
        times = {name: [] for name in pieces}
        for i in range(reps + 3):
            for name, fn in pieces.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                if i >= 3:  # the first step allocates the momentum buffers
                    times[name].append(time.perf_counter() - start)
        costs[w] = {name: statistics.median(t) for name, t in times.items()}
    print_result(costs)


def allreduce_worker(args):
    """Median seconds of one all-reduce per message size, as the training issues it."""
    from core import parallel_state as ps
    from core import wire
    from training import initialize
    torch.set_num_threads(1)
    device = initialize.init_distributed("auto", timeout_minutes=5, device=args.device)
    ps.initialize_model_parallel(torch.distributed.get_world_size())
    result = {}
    for n in args.sizes:
        t = torch.ones(n // ELEM, device=device)
        times = []
        for i in range(args.reps + 5):
            torch.distributed.barrier()  # start together: each rank times the collective only
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            wire.all_reduce(t, ps.get_tensor_model_parallel_group())
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 5:
                times.append(time.perf_counter() - start)
        # coupled ranks: the slowest rank's median
        median = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
        result[n] = float(wire.all_gather(median, ps.get_tensor_model_parallel_group()).max())
    torch.distributed.barrier()
    ps.destroy_model_parallel()
    if os.environ["RANK"] == "0":
        print_result(result)
