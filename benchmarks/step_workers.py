"""bench_step.py's workers, one variant each, run in processes of their own (launcher.py):

  serial, ours, dtensor   time_steps over the same batches: the step alone
  ceiling                 the step's GEMMs alone, the fastest this device does them
  loop-serial, loop-ours  train.py's and parallel_train.py's own loops, whole iterations
  loop-dtensor            the usual loop around DTensor (dtensor_loop)

Each prints one line, "RESULT {json}" (rank 0 for the parallel ones).
"""

import contextlib
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn

from benchmarks import bench_transformer
from benchmarks.configs import CONFIGS, SEED
from benchmarks.launcher import print_result
from benchmarks.step_measures import (
    Step,
    count_dtensor,
    count_ours,
    memory,
    saved_activations,
    time_steps,
)
from core import parallel_state as ps
from core import wire
from model import ToyModel
from training import initialize
from training.operations import pin_float32_precision


def make_batches(cfg, n, device, dtype=torch.float32):
    """n fixed batches, the same for every variant (numpy seed 7, as prepare_data.py)."""
    rng = np.random.RandomState(7)
    X = rng.randn(n * cfg["batch_size"], cfg["input_size"]).astype(np.float32)
    y = X @ rng.randn(cfg["input_size"]).astype(np.float32)
    return [(torch.from_numpy(x).to(device, dtype), torch.from_numpy(t).to(device, dtype))
            for x, t in zip(np.split(X, n), np.split(y, n))]


def build_variant(cfg, args, device, tp):
    """(the step, its 8 batches) of one variant, every variant the same model from SEED."""
    transformer = cfg.get("model") == "transformer"
    torch.manual_seed(SEED)
    split, sp = args.variant == "ours", args.sequence_parallel
    if transformer:
        model = bench_transformer.build(cfg, tensor_parallel=split, sequence_parallel=sp)
        batches = bench_transformer.make_token_batches(cfg, 8, device)
    else:
        model = ToyModel(cfg["input_size"], cfg["hidden_size"], tensor_parallel=split,
                         sequence_parallel=sp)
        batches = make_batches(cfg, 8, device)
    mesh = None
    if args.variant == "dtensor":
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (tp,))
        if transformer:
            bench_transformer.parallelize_with_dtensor(model, mesh)
        else:
            from torch.distributed.tensor.parallel import (
                ColwiseParallel,
                RowwiseParallel,
                parallelize_module,
            )
            parallelize_module(model, mesh,
                               {"mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()})
    model = model.to(device)
    if transformer:
        return (bench_transformer.DTensorTransformerStep(model, mesh) if mesh is not None
                else bench_transformer.TransformerStep(model)), batches
    if sp:  # each rank keeps its rows of every batch, copied so the rest is freed
        rank_rows = lambda t: t.chunk(tp)[ps.get_tensor_model_parallel_rank()].clone()
        batches = [(rank_rows(x), rank_rows(y)) for x, y in batches]
    return Step(model, batch_size=cfg["batch_size"] if sp else None), batches


def worker(args):
    """One step variant: its collectives, saved activations, times and memory."""
    cfg = CONFIGS[args.config]
    torch.set_num_threads(args.threads)
    pin_float32_precision()
    if args.variant == "serial":
        device, tp, barrier = torch.device(args.device), 1, lambda: None
    else:
        device = initialize.init_distributed("auto", timeout_minutes=5, device=args.device)
        tp = torch.distributed.get_world_size()
        ps.initialize_model_parallel(tp)
        barrier = torch.distributed.barrier if tp > 1 else lambda: None
    step, batches = build_variant(cfg, args, device, tp)
    count = {"ours": count_ours,
             "dtensor": count_dtensor}.get(args.variant, lambda s, b: {})(step, batches[0])
    activations = saved_activations(step, batches[0])
    # DTensor has no sharding rule for the fused SGD kernel: it always takes the standard one.
    fused = args.fused_sgd and args.variant != "dtensor"
    times, optimizer = time_steps(step, batches, cfg["lr"], args.steps, args.warmup, device,
                                  barrier, fused)
    result = dict(times=times, memory=dict(memory(step.model, optimizer, device),
                                           activations=activations),
                  comm=count, tp=tp, device=str(device))
    if args.variant != "serial":
        # The ranks of one step are coupled by the all-reduce: report the slowest rank's median.
        median = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
        medians = wire.all_gather(median, ps.get_tensor_model_parallel_group())
        result["slowest_rank"] = int(medians.argmax())
        ps.destroy_model_parallel()
    if os.environ.get("RANK", "0") == "0":
        print_result(result)


def ceiling_worker(args):
    """Seconds of each GEMM of one step, with the step's own shapes and layouts, on the device
    the steps run on (a CPU: one thread). A kernel alone, stateless: torch.utils.benchmark's
    Timer times it, in blocks long enough for the clock (and synchronizing a GPU), the median."""
    from torch.utils.benchmark import Timer
    cfg = CONFIGS[args.config]
    device = torch.device(args.device)
    B, d, h = cfg["batch_size"], cfg["input_size"], cfg["hidden_size"] // args.tp
    g = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(s, generator=g).to(device) for s in ((B, d), (h, d), (d, h)))
    y1, dz = torch.randn(B, h, generator=g).to(device), torch.randn(B, d, generator=g).to(device)
    gemms = {  # the matmuls of the layers, forward and backward, for this rank's shards
        "fc1 forward X A_i": "x.matmul(w1.t())",
        "fc2 forward Y_i B_i": "y1.matmul(w2.t())",
        "fc2 backward dL/dY_i": "dz.matmul(w2)",
        "fc2 backward dL/dB_i": "dz.t().matmul(y1)",
        "fc1 backward dL/dA_i": "y1.t().matmul(x)",
    }
    tensors = dict(x=x, w1=w1, w2=w2, y1=y1, dz=dz)
    run_time = min(0.2, 0.01 * args.steps)  # seconds per GEMM; the tests' 3 steps: 0.03 s
    seconds = {name: Timer(stmt, globals=tensors, num_threads=1).blocked_autorange(
                   min_run_time=run_time).median for name, stmt in gemms.items()}
    flops = 2 * B * d * h  # each of the five GEMMs
    print_result(dict(seconds=seconds, flops_per_gemm=flops))


def write_data(cfg):
    """A data set of the config's input size in a new directory (prepare_data.py's recipe)."""
    import prepare_data
    directory = tempfile.mkdtemp(prefix="bench_data_")
    prepare_data.save_data(prepare_data.make_data(4000, cfg["input_size"]), directory)
    return directory


def loop_worker(args):
    """Seconds of each whole training iteration: from taking one batch to taking the next."""
    cfg = dict(CONFIGS[args.config], **({"hidden_size": args.hidden_size} if args.hidden_size
                                        else {}))
    torch.set_num_threads(args.threads)
    n = args.warmup + args.steps
    data_dir, out_dir = write_data(cfg), tempfile.mkdtemp(prefix="bench_run_")
    stamps = []

    def timed(batches):
        for batch in batches:
            stamps.append(time.perf_counter())
            yield batch

    flags = ["--data_dir", data_dir, "--out_dir", out_dir, "--input_size", str(cfg["input_size"]),
             "--hidden_size", str(cfg["hidden_size"]), "--batch_size", str(cfg["batch_size"]),
             "--init_lr", str(cfg["lr"]), "--num_iterations", str(n + 1), "--update_freq", "10",
             # validation after the last timed iteration
             "--eval_interval", str(n + 1), "--device", args.device]
    if args.variant == "loop-dtensor":
        return dtensor_loop(cfg, n + 1, data_dir, timed, stamps, args)
    if args.variant == "loop-serial":
        import train as script
    else:
        import parallel_train as script
        flags += ["--tensor_model_parallel_size", os.environ["WORLD_SIZE"],
                  "--distributed_timeout_minutes", "5"]
    untimed = script.iterate_batches
    script.iterate_batches = lambda *a, **k: timed(untimed(*a, **k))
    sys.argv = [script.__file__, *flags]
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # its "Iter ..." lines
        script.main()
    if os.environ.get("RANK", "0") == "0":
        report_loop(stamps, args)


def dtensor_loop(cfg, n, data_dir, timed, stamps, args):
    """The loop one writes around DTensor: rank 0 of the group reads the batch and broadcasts it,
    every rank steps, the loss is read every step and printed every 10."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from training.data import iterate_batches, load_dataset
    pin_float32_precision()
    device = initialize.init_distributed("auto", timeout_minutes=5, device=args.device)
    tp, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(SEED)
    model = ToyModel(cfg["input_size"], cfg["hidden_size"])
    parallelize_module(model, init_device_mesh(device.type, (tp,)),
                       {"mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()})
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
    B, d = cfg["batch_size"], cfg["input_size"]
    source = iterate_batches(*load_dataset(data_dir, d, B)[0],
                             B) if rank == 0 else iter(lambda: None, 0)
    running = 0.0
    for it, batch in zip(range(1, n + 1), timed(source)):
        if rank == 0:
            packed = torch.cat([torch.as_tensor(batch[0]), torch.as_tensor(batch[1])[:, None]],
                               1).to(device)
        else:
            packed = torch.empty(B, d + 1, device=device)
        dist.broadcast(packed, 0)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(packed[:, :-1])[:, 0], packed[:, -1])
        loss.backward()
        optimizer.step()
        running += loss.item()
        if it % 10 == 0:
            # the driver keeps only RESULT lines
            print(f"Rank {rank} Iter {it} Train Loss {running:.3f}")
            running = 0.0
    dist.barrier()
    ps.destroy_model_parallel()
    if rank == 0:
        report_loop(stamps, args)


def report_loop(stamps, args):
    times = np.diff(stamps)[args.warmup:].tolist()  # iteration i: from batch i to batch i + 1
    print_result(dict(times=times, tp=int(os.environ.get("WORLD_SIZE", 1)), device=args.device))
