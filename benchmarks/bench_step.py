"""What tensor parallelism costs and buys: time one training step, serial and split.

    python -m benchmarks.bench_step                      # every variant, both configurations
    python -m benchmarks.bench_step --configs original --steps 50

Each variant runs in its own process(es), launched as the trainings are
(python for serial, torchrun for the parallel ones), one thread per rank:

  serial-1t    the serial ToyModel, 1 thread
  serial-Nt    the serial ToyModel, N threads (N = ranks of the parallel runs)
  ours-tpK     our ColumnParallelLinear / RowParallelLinear, K ranks
  ours-sp-tpK  the same with --sequence_parallel: each rank holds batch / K rows
               outside the split region (Korthikanti et al., 2022, Sec. 4.2.2)
  dtensor-tpK  PyTorch's ColwiseParallel / RowwiseParallel (parallelize_module)
               on the same ToyModel, same seed, same data, same K

and, beside the step, the whole training iteration (batch delivery, step,
bookkeeping: what a user waits for), timed between one batch and the next:

  loop-serial       train.py's own loop
  loop-ours-tpK     parallel_train.py's own loop
  loop-dtensor-tpK  the usual loop around DTensor: tensor-parallel rank 0 reads
                    the batch and broadcasts it (Megatron's broadcast_data),
                    the loss is read with .item() every step

On GPUs: steps are timed up to a torch.cuda.synchronize, memory is the peak
GPU memory (torch.cuda.max_memory_allocated), the GEMM ceiling is timed on
the GPU, and CUDA_DEVICE_MAX_CONNECTIONS is 1 as training sets it. The serial
N-threads variant and peak RSS mean something only on a CPU and run there
only; a variant needing more GPUs than the machine has is skipped, saying so.

A step is zero_grad, forward, loss, backward and the SGD step, with the batch
already on every rank (data delivery is timed by the loop variants).
Reported per variant: median and spread over --steps after --warmup, the
collectives issued per step (ours: counted in parallel_state; DTensor: by its
CommDebugMode) beside the Megatron paper's count, parameter/gradient/optimizer
memory per rank against the 1/TP theory, the activations saved for backward
inside and outside the split region (saved_tensors_hooks), peak resident memory, and achieved
GFLOP/s as a fraction of this machine's single-thread GEMM throughput for the
step's own matmul shapes (the ceiling). Writes assets/benchmark.json and
assets/benchmark.png.
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn

import communication as comm
import parallel_state as ps
from benchmarks import bench_transformer
from model import ToyModel
from sequence_parallel import allreduce_sequence_parallel_grads
from training import initialize
from training.operations import ArgumentParser, check_output, pin_float32_precision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# lr 1e-5 for the compute-heavy size: at 1e-3 it diverges (inf by iteration 14); a finite run is
# timed.
CONFIGS = {
    "original": dict(input_size=64, hidden_size=2048, batch_size=32, lr=1e-3),
    "compute_heavy": dict(input_size=1024, hidden_size=32768, batch_size=32, lr=1e-5),
    "tiny": dict(input_size=8, hidden_size=64, batch_size=4, lr=1e-3),  # for the tests
    # The toy GPT of transformer.py at its defaults (train.py --model transformer, the bash
    # scripts' lr), and a small one for the tests: bench_transformer.py.
    "transformer": dict(model="transformer", vocab_size=50, seq_length=16, input_size=64,
                        hidden_size=2048, num_heads=4, num_layers=1, batch_size=32, lr=0.01),
    "tiny_transformer": dict(model="transformer", vocab_size=10, seq_length=8, input_size=16,
                             hidden_size=32, num_heads=4, num_layers=1, batch_size=4, lr=0.01),
    # For activation recomputation (bench_recompute.py): the attention core's share of a layer's
    # activations is GPT-3 175B's (5as/h = 80, Korthikanti et al., Sec. 4.1), the MLP 4h as GPT's.
    "long_sequence": dict(model="transformer", vocab_size=50, seq_length=256, input_size=64,
                          hidden_size=256, num_heads=4, num_layers=1, batch_size=2, lr=0.01),
}
SEED = 1234


# ---------------------------------------------------------------------------
# Workers: each runs one variant and prints one line "RESULT {json}".

def make_batches(cfg, n, device, dtype=torch.float32):
    """n fixed batches, the same for every variant (numpy seed 7, as prepare_data.py)."""
    rng = np.random.RandomState(7)
    X = rng.randn(n * cfg["batch_size"], cfg["input_size"]).astype(np.float32)
    y = X @ rng.randn(cfg["input_size"]).astype(np.float32)
    return [(torch.from_numpy(x).to(device, dtype), torch.from_numpy(t).to(device, dtype))
            for x, t in zip(np.split(X, n), np.split(y, n))]


class Step:
    """Loss and after-backward work of one variant: plain MSE, or sequence parallelism's
    per-rank share of it with the partial sums (fc's gradient, the loss) added after backward."""

    def __init__(self, model, batch_size=None):
        # batch_size: the rows of all TP ranks, under SP
        self.model, self.batch_size = model, batch_size

    def loss(self, x, y):
        if self.batch_size is None:
            return nn.functional.mse_loss(self.model(x)[:, 0], y)
        return nn.functional.mse_loss(self.model(x)[:, 0], y, reduction="sum") / self.batch_size

    def backward(self, loss):
        loss.backward()
        if self.batch_size is not None:
            allreduce_sequence_parallel_grads(self.model.parameters(), loss)


def time_steps(step, batches, lr, steps, warmup, device, barrier=lambda: None, fused=False):
    """Seconds of each of `steps` training steps after `warmup` untimed ones."""
    optimizer = torch.optim.SGD(step.model.parameters(), lr=lr, momentum=0.9, fused=fused)
    times = []
    for i in range(warmup + steps):
        barrier()  # ranks start each step together; not timed
        seconds, _, loss = timed_step(step, optimizer, batches[i % len(batches)], device)
        if i >= warmup:
            times.append(seconds)
    if not torch.isfinite(local(loss)):
        raise RuntimeError(f"the loss is {local(loss).item()} after the timed steps: lower the "
                           "config's lr")
    return times, optimizer


def timed_step(step, optimizer, batch, device, split_forward=False):
    """(seconds of one training step, of its forward and loss alone or None, the loss). On a GPU,
    split_forward synchronizes after the loss: it costs the overlap of backward's launches."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = step.loss(*batch)
    if split_forward:
        sync()
        forward = time.perf_counter() - start
    step.backward(loss)
    optimizer.step()
    sync()
    return time.perf_counter() - start, forward if split_forward else None, loss


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def memory(model, optimizer, device):
    """Bytes this rank holds in parameters, gradients and optimizer state, and its peak memory:
    resident set size on a CPU, allocated GPU memory on a GPU."""
    params = [local(p) for p in model.parameters()]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    state = [local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    on_gpu = device.type == "cuda"
    if on_gpu:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(params=nbytes(params), grads=nbytes([local(p.grad) for p in model.parameters()]),
                optimizer=nbytes(state), peak=peak, peak_kind="GPU allocated" if on_gpu else "RSS")


def count_ours(step, batch):
    """Collectives of one step, counted by parallel_state: data without and with a gradient (the
    transformer's input, tokens, has none)."""
    counts = {}
    for input_grad in (False, True) if batch[0].is_floating_point() else (False,):
        x = batch[0].clone().requires_grad_(input_grad)
        comm.reset_comm_stats()
        step.backward(step.loss(x, batch[1]))
        counts["input_grad" if input_grad else "no_input_grad"] = dict(
            calls=dict(comm.comm_calls), bytes=dict(comm.comm_bytes),
            ring_bytes=dict(comm.comm_ring_bytes))
    step.model.zero_grad(set_to_none=True)
    return counts


def count_dtensor(step, batch):
    try:
        from torch.distributed.tensor.debug import CommDebugMode
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor.debug import CommDebugMode
    with CommDebugMode() as mode:
        step.backward(step.loss(*batch))
    step.model.zero_grad(set_to_none=True)
    return {"no_input_grad": dict(calls={str(op): n for op, n in mode.get_comm_counts().items()})}


# A column-parallel layer opens a split region (its output is this rank's columns), the
# row-parallel layer after it closes it (its output is whole again, after g).
OPENS_SPLIT, CLOSES_SPLIT = ("fc1", "query_key_value"), ("fc2", "dense")


def saved_activations(step, batch):
    """Bytes of the activations one forward and loss save for backward on this rank, inside the
    split regions and outside them; parameters and repeats of one tensor not counted.

    Inside: what is saved between the output of fc1 (QKV) and the end of fc2 (dense), their
    own input included, and the loss's tensors as wide as this rank's slice of the
    vocabulary (the transformer's logits). Outside: the rest (the layers' inputs, the
    residual stream, LayerNorms, the embeddings' indices). The transformer's also per_layer:
    what its blocks save (from the first block's input to the final LayerNorm's), per block,
    recomputation's checkpoints included (Korthikanti et al., Table 2: bench_recompute.py).
    """
    model = step.model
    params = {local(p).data_ptr() for p in model.parameters()}
    embedding = getattr(model, "word_embeddings", None)
    vocab_per_rank = local(embedding.weight).shape[0] if embedding is not None else None
    seen, saved, region = set(), dict(inside=0, outside=0), ["outside"]
    hooks = [module.register_forward_hook(lambda *_, where=where: region.__setitem__(0, where))
             for name, module in model.named_modules()
             for names, where in ((OPENS_SPLIT, "inside"), (CLOSES_SPLIT, "outside"))
             if name.rsplit(".", 1)[-1] in names]
    blocks, in_blocks = getattr(model, "blocks", None), [False]
    if blocks:
        saved["per_layer"] = 0
        hooks += [module.register_forward_pre_hook(
            lambda *_, now=now: in_blocks.__setitem__(0, now))
            for module, now in ((blocks[0], True), (model.ln_f, False))]

    def pack(t):
        t = local(t)
        if t.data_ptr() not in params and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            logits = t.dim() > 0 and t.shape[-1] == vocab_per_rank
            where = "inside" if logits else region[0]
            saved[where] += t.numel() * t.element_size()
            if in_blocks[0]:
                saved["per_layer"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step.loss(*batch)
    for hook in hooks:
        hook.remove()
    if blocks:
        saved["per_layer"] //= len(blocks)  # the blocks are alike
    return saved


def worker(args):
    cfg = CONFIGS[args.config]
    transformer = cfg.get("model") == "transformer"
    torch.set_num_threads(args.threads)
    pin_float32_precision()
    if args.variant == "serial":
        device, tp = torch.device(args.device), 1
        barrier = lambda: None
    else:
        device = initialize.init_distributed("auto", timeout_minutes=5, device=args.device)
        tp = torch.distributed.get_world_size()
        ps.initialize_model_parallel(tp)
        barrier = torch.distributed.barrier if tp > 1 else lambda: None
    torch.manual_seed(SEED)
    split, sp = args.variant == "ours", args.sequence_parallel
    if transformer:
        model = bench_transformer.build(cfg, tensor_parallel=split, sequence_parallel=sp)
        batches = bench_transformer.make_token_batches(cfg, 8, device)
    else:
        model = ToyModel(cfg["input_size"], cfg["hidden_size"], tensor_parallel=split,
                         sequence_parallel=sp)
        batches = make_batches(cfg, 8, device)
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
        step = (bench_transformer.DTensorTransformerStep(model, mesh)
                if args.variant == "dtensor" else bench_transformer.TransformerStep(model))
    else:
        step = Step(model, batch_size=cfg["batch_size"] if sp else None)
        if sp:  # each rank keeps its rows of every batch, copied so the rest is freed
            rank_rows = lambda t: t.chunk(tp)[ps.get_tensor_model_parallel_rank()].clone()
            batches = [(rank_rows(x), rank_rows(y)) for x, y in batches]
    count = {"ours": count_ours,
             "dtensor": count_dtensor}.get(args.variant, lambda s, b: {})(step, batches[0])
    activations = saved_activations(step, batches[0])
    # DTensor has no sharding rule for the fused SGD kernel: it always takes the standard one.
    fused = args.fused_sgd and args.variant != "dtensor"
    times, optimizer = time_steps(step, batches, cfg["lr"], args.steps, args.warmup, device,
                                  barrier, fused)
    result = dict(times=times,
                  memory=dict(memory(model, optimizer, device),
                              activations=activations), comm=count,
                  tp=tp, device=str(device))
    if args.variant != "serial":
        # The ranks of one step are coupled by the all-reduce: report the slowest rank's median.
        medians = comm.all_gather(torch.tensor([statistics.median(times)], dtype=torch.float64,
                                             device=device), dim=0)
        result["slowest_rank"] = int(medians.argmax())
        ps.destroy_model_parallel()
    if os.environ.get("RANK", "0") == "0":
        print("RESULT " + json.dumps(result), flush=True)


def ceiling_worker(args):
    """Seconds of each GEMM of one step, with the step's own shapes and layouts, on the device
    the steps run on (a CPU: one thread)."""
    torch.set_num_threads(1)
    cfg = CONFIGS[args.config]
    device = torch.device(args.device)
    B, d, h = cfg["batch_size"], cfg["input_size"], cfg["hidden_size"] // args.tp
    g = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(s, generator=g).to(device) for s in ((B, d), (h, d), (d, h)))
    y1, dz = torch.randn(B, h, generator=g).to(device), torch.randn(B, d, generator=g).to(device)
    gemms = {  # the matmuls of the layers, forward and backward, for this rank's shards
        "fc1 forward X A_i": lambda: x.matmul(w1.t()),
        "fc2 forward Y_i B_i": lambda: y1.matmul(w2.t()),
        "fc2 backward dL/dY_i": lambda: dz.matmul(w2),
        "fc2 backward dL/dB_i": lambda: dz.t().matmul(y1),
        "fc1 backward dL/dA_i": lambda: y1.t().matmul(x),
    }
    seconds = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    inner = 20 if device.type == "cuda" else 1  # a GPU GEMM takes microseconds: time 20 in a row
    for name, fn in gemms.items():
        for _ in range(3):
            fn()
        reps = []
        for _ in range(max(5, args.steps)):
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            reps.append((time.perf_counter() - start) / inner)
        seconds[name] = statistics.median(reps)
    flops = 2 * B * d * h  # each of the five GEMMs
    print("RESULT " + json.dumps(dict(seconds=seconds, flops_per_gemm=flops)), flush=True)


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
    print("RESULT " + json.dumps(dict(times=times, tp=int(os.environ.get("WORLD_SIZE", 1)),
                                      device=args.device)),
          flush=True)


# ---------------------------------------------------------------------------
# The driver: launch every variant, collect, report.

LOOPS = ("loop-serial", "loop-ours", "loop-dtensor")
DEVICE = "cpu"  # the driver's --device, passed to every worker


def launch(variant, config, steps, warmup, ranks=1, threads=1, extra=(),
           module="benchmarks.bench_step"):
    cmd = [sys.executable, "-m", module, "--worker", variant, "--config", config,
           "--device", DEVICE,
           "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads), *extra]
    if variant in ("ours", "dtensor", "loop-ours", "loop-dtensor", "recompute"):
        cmd = [sys.executable, os.path.join(REPO, "scripts", "launch.py"), "--standalone",
               "--nproc_per_node", str(ranks), *cmd[1:]]
    # As bash_parallel_train.sh sets it: the async all-reduce is queued before the matmul it
    # overlaps.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"error: {variant} ({config}, {ranks} ranks) "
                 f"failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def summarize_loop(name, result):
    times = np.array(result["times"]) * 1e3
    return dict(variant=name, tp=result["tp"], mean_ms=float(times.mean()),
                median_ms=float(np.median(times)),
                p10_ms=float(np.percentile(times,
                                           10)), p90_ms=float(np.percentile(times,
                                                                            90)), steps=len(times),
                device=result["device"])


def summarize(name, result, cfg, ceiling):
    """One variant's row; the GEMM ceiling where it was timed (the ToyModel's five GEMMs)."""
    times = np.array(result["times"]) * 1e3
    tp = result.get("tp", 1)
    median = float(np.median(times))
    row = dict(variant=name, tp=tp, median_ms=median, p10_ms=float(np.percentile(times, 10)),
               p90_ms=float(np.percentile(times, 90)), steps=len(times), gflops=None,
               ceiling_gflops=None, fraction_of_ceiling=None, memory=result["memory"],
               comm=result.get("comm", {}), device=result["device"])
    if ceiling:  # five GEMMs, see ceiling_worker
        flops = 10 * cfg["batch_size"] * cfg["input_size"] * cfg["hidden_size"] / tp
        ideal_ms = sum(ceiling[tp]["seconds"].values()) * 1e3
        row.update(gflops=flops / median / 1e6, ceiling_gflops=flops / ideal_ms / 1e6,
                   fraction_of_ceiling=ideal_ms / median)
    return row


def paper_count(cfg, tp, elem=4):
    """The papers' collectives per step at tensor-parallel size tp."""
    if cfg.get("model") == "transformer":
        return bench_transformer.paper_count(cfg, tp, elem)
    return mlp_paper_count(cfg, tp, elem)


def mlp_paper_count(cfg, tp, elem=4):
    """Per MLP step, batch x input fp32 each, and the bytes each rank sends in a ring of tp ranks.
    Megatron-LM Sec. 3: one all-reduce in forward (g), one in backward (f). Korthikanti et al.
    (2022, Sec. 4.2.2): forward all-gather + reduce-scatter, backward two all-gathers (one
    re-gathers fc1's input) + reduce-scatter."""
    n = cfg["batch_size"] * cfg["input_size"] * elem
    return dict(tensor_parallel=dict(calls=dict(all_reduce=2),
                                     ring_bytes=2 * 2 * (tp - 1) * n // tp),
                sequence_parallel=dict(calls=dict(all_gather=3, reduce_scatter=2),
                                       ring_bytes=5 * (tp - 1) * n // tp))


def describe(cfg):
    if cfg.get("model") == "transformer":
        return (f"vocabulary {cfg['vocab_size']}, sequence {cfg['seq_length']}, width "
                f"{cfg['input_size']}, hidden {cfg['hidden_size']}, {cfg['num_heads']} heads, "
                f"{cfg['num_layers']} block, batch {cfg['batch_size']}")
    return f"input {cfg['input_size']}, hidden {cfg['hidden_size']}, batch {cfg['batch_size']}"


def print_report(config, cfg, rows, loops):
    base = next(r for r in rows if r["variant"] == "serial-1t")["median_ms"]
    print(f"\n== {config}: {describe(cfg)} ==")
    print(f"{'variant':<13}{'median ms':>11}{'p10-p90 ms':>17}{'vs serial-1t':>13}{'GFLOP/s':>9}"
          f"{'of ceiling':>11}{'params+grads+optim':>20}{'saved act. in/out':>22}{'peak':>10}")
    for r in rows:
        m, act = r["memory"], r["memory"]["activations"]
        state = (m["params"] + m["grads"] + m["optimizer"]) / 2**20
        gemms = (f"{r['gflops']:>9.1f}{r['fraction_of_ceiling']:>10.0%}" if r["gflops"]
                 else f"{'-':>9}{'-':>10} ")  # no GEMM ceiling timed for the transformer
        print(f"{r['variant']:<13}{r['median_ms']:>11.3f}{r['p10_ms']:>8.3f}-{r['p90_ms']:<8.3f}"
              f"{base / r['median_ms']:>12.2f}x{gemms}"
              f"{state:>16.1f} MiB{act['inside'] / 2**10:>11.1f} /"
              f"{act['outside'] / 2**10:>6.1f} KiB"
              f"{m['peak'] / 2**20:>7.0f} MiB")
    for r in rows:
        for case, c in r["comm"].items():
            sent = ""
            if "ring_bytes" in c:
                sent = f", sent per rank in a ring {sum(c['ring_bytes'].values())} bytes"
            print(f"  {r['variant']} collectives per step ({case.replace('_', ' ')}): "
                  f"{c['calls']}{sent}")
    print(f"  peak: {rows[0]['memory']['peak_kind']}")
    if loops:
        print("  Whole training iteration (batch delivery, step, bookkeeping), ms:")
        for r in loops:
            print(f"  {r['variant']:<18} mean {r['mean_ms']:8.3f}   median {r['median_ms']:8.3f}   "
                  f"p10-p90 {r['p10_ms']:.3f}-{r['p90_ms']:.3f}")
    tp = max(r["tp"] for r in rows)
    paper = paper_count(cfg, tp)
    if cfg.get("model") == "transformer":
        print(f"  Megatron-LM per step at TP={tp}: {paper['tensor_parallel']} (per block 2 "
              "all-reduces of batch x sequence x width each way, the embedding's, the output "
              "layer's f, the cross-entropy's 2 small ones), instead of gathering "
              f"{paper['logits_gathered_instead']} bytes of logits. Sequence parallelism: see "
              "docs/sequence-parallelism.md.")
        return
    print(f"  Papers, per MLP step at TP={tp} (batch x input fp32 each): Megatron-LM "
          f"{paper['tensor_parallel']}; sequence parallel {paper['sequence_parallel']}. Ours skips "
          "what carries dL/dX when the input needs no gradient; sequence parallelism adds a small "
          "all-reduce of fc's gradient and the loss.")


TARGETS = [  # (config, variant, reference, limit, statistic): variant <= limit x reference
    ("original", "loop-ours-tp2", "loop-dtensor-tp2", 0.45, "mean_ms"),
    ("compute_heavy", "loop-ours-tp2", "loop-serial", 0.6, "mean_ms"),
    ("original", "ours-tp2", "dtensor-tp2", 0.6, "median_ms"),
    ("compute_heavy", "ours-tp2", "serial-1t", 0.55, "median_ms"),
    ("compute_heavy", "ours-tp2", "dtensor-tp2", 1.0, "median_ms"),
    ("original", "ours-tp1", "serial-1t", 1.05, "median_ms"),
    ("compute_heavy", "ours-tp1", "serial-1t", 1.05, "median_ms"),
]


def check_targets(results):
    """The issue's targets, as ratios measured in this one run; a target whose variants did not
    run here (too few GPUs, another config) is said to be skipped."""
    checks = []
    print("\nTargets:")
    for config, variant, reference, limit, stat in TARGETS:
        name = f"{config}: {variant} <= {limit} x {reference} ({stat.split('_')[0]})"
        rows = {r["variant"]: r for r in results.get(config, [])}
        if variant not in rows or reference not in rows:
            print(f"  skipped {name}: not measured here")
            continue
        ratio = rows[variant][stat] / rows[reference][stat]
        checks.append(dict(target=name, ratio=ratio, limit=limit, met=ratio <= limit))
        print(f"  {'met    ' if ratio <= limit else 'MISSED '} {name}: ratio {ratio:.2f}")
    return checks


def plot_loops(loop_ax, loop_rows):
    mean = [r["mean_ms"] for r in loop_rows]
    loop_ax.bar([r["variant"] for r in loop_rows], mean, color=[
        "#7f7f7f" if "serial" in r["variant"]
        else "#ff7f0e" if "dtensor" in r["variant"] else "#1f77b4"
        for r in loop_rows])
    for i, m in enumerate(mean):
        loop_ax.text(i, m, f"{m:.3g}", ha="center", va="bottom", fontsize=8)
    loop_ax.set_ylabel("ms per training iteration (mean)", fontsize=9)
    loop_ax.set_ylim(0, 1.2 * max(mean))
    loop_ax.grid(axis="y", alpha=0.3)


def plot(results, loops, path, per_rank="one thread per rank"):
    """Top: ms per step. Middle: ms per whole training iteration (mean). Bottom: activations saved
    for backward per rank, inside the split region and outside it (sequence parallelism's 1/TP)."""
    import matplotlib.pyplot as plt

    from plot_runs import save  # first: it sets the Agg backend
    with_loops = any(loops.values())  # the transformer alone has none: no middle row then
    fig, axes = plt.subplots(3 if with_loops else 2, len(results),
                             figsize=(max(8, 6 * len(results)), 10.5 if with_loops else 8),
                             squeeze=False,
                             gridspec_kw=dict(height_ratios=[3, 2, 2] if with_loops else [3, 2]))
    for column, (config, rows) in zip(axes.T, results.items()):
        ax, mem_ax = column[0], column[-1]
        loop_ax, loop_rows = (column[1] if with_loops else None), loops[config]
        if loop_ax is not None and loop_rows:
            plot_loops(loop_ax, loop_rows)
        elif loop_ax is not None:
            loop_ax.text(0.5, 0.5, "whole training loops: timed for the ToyModel only",
                         ha="center", va="center", fontsize=9, transform=loop_ax.transAxes)
            loop_ax.set_axis_off()
        names = [r["variant"] for r in rows]
        med = np.array([r["median_ms"] for r in rows])
        err = np.array([[m - r["p10_ms"] for m, r in zip(med, rows)],
                        [r["p90_ms"] - m for m, r in zip(med, rows)]])
        colors = ["#7f7f7f" if n.startswith("serial") else "#6baed6" if n.startswith("ours-sp")
                  else "#1f77b4" if n.startswith("ours") else "#ff7f0e" for n in names]
        ax.bar(names, med, yerr=err, color=colors, capsize=4)
        for i, (m, r) in enumerate(zip(med, rows)):  # above the error bar, clear of its cap
            ax.text(i, r["p90_ms"], f"{m:.3g}", ha="center", va="bottom", fontsize=8)
        cfg = CONFIGS[config]
        ax.set_title(f"{config}: {describe(cfg)}", fontsize=10 if len(describe(cfg)) < 60 else 8)
        ax.set_ylabel("ms per training step (median, p10-p90)")
        ax.tick_params(axis="x", labelbottom=False)
        ax.grid(axis="y", alpha=0.3)

        inside = np.array([r["memory"]["activations"]["inside"] for r in rows]) / 2**10
        outside = np.array([r["memory"]["activations"]["outside"] for r in rows]) / 2**10
        mem_ax.bar(names, inside, color="#c6dbef", label="inside the split region (1/TP with TP)")
        mem_ax.bar(names, outside, bottom=inside, color="#74c476",
                   label="outside it: the layers' inputs, the residual stream, the loss's "
                   "(1/TP with SP)")
        for i, (a, b) in enumerate(zip(inside, outside)):
            mem_ax.text(i, a + b, f"{b:.3g}", ha="center", va="bottom", fontsize=8, color="#238b45")
        mem_ax.set_ylabel("saved for backward, KiB per rank")
        mem_ax.set_ylim(0, 1.3 * (inside + outside).max())
        mem_ax.tick_params(axis="x", rotation=30)
        mem_ax.grid(axis="y", alpha=0.3)
        mem_ax.legend(fontsize=7.5, loc="upper right")
    loops_too = ", and one whole iteration of each training loop" if with_loops else ""
    fig.suptitle(f"One training step{loops_too}, {per_rank}\n"
                 "(grey: serial, blue: ours, light blue: ours with --sequence_parallel, orange: "
                 "PyTorch DTensor TP)",
                 fontsize=10)
    fig.tight_layout()
    save(fig, path)


def main():
    p = ArgumentParser(description=__doc__.splitlines()[0])  # one-line errors
    p.add_argument("--configs", nargs="+", default=["original", "compute_heavy", "transformer"],
                   choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per variant, after --warmup (default: 300 for steps under 10 "
                        "ms, else 30)")
    p.add_argument("--fused_sgd", action="store_true",
                   help="fused SGD for serial and ours (DTensor can't use it); default: standard "
                        "SGD for all")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: the GPUs when there are any, else the CPU")
    p.add_argument("--max_tp", type=int, default=None, help="largest tensor-parallel size "
                                                            "(default: cores or GPUs)")
    p.add_argument("--out", default="assets/benchmark.json")
    p.add_argument("--plot", default="assets/benchmark.png")
    # Worker mode (used by the driver).
    p.add_argument("--worker", choices=["serial", "ours", "dtensor", "ceiling", *LOOPS],
                   help=argparse.SUPPRESS)
    p.add_argument("--config", default="original", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--sequence_parallel", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hidden_size", type=int, default=None, help=argparse.SUPPRESS)  # scaling.py
    args = p.parse_args()
    if (args.steps is not None and args.steps < 1) or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    if args.max_tp is not None and args.max_tp < 1:
        p.error(f"--max_tp must be at least 1, got {args.max_tp}")
    if not args.worker:
        check_output(p, "--out", args.out, ".json")
        check_output(p, "--plot", args.plot, ".png")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and not gpus:
        p.error("--device cuda, but torch sees no CUDA GPU; use --device cpu (or auto)")
    if args.device == "auto":
        args.device = "cuda" if gpus else "cpu"
    if args.worker:
        args.variant = args.worker
        if args.worker in LOOPS:
            return loop_worker(args)
        return ceiling_worker(args) if args.worker == "ceiling" else worker(args)

    global DEVICE
    DEVICE, on_gpu = args.device, args.device == "cuda"
    fits = gpus if on_gpu else os.cpu_count()  # NCCL: a GPU per rank; CPU: a core per rank
    max_tp = args.max_tp or fits
    tps = [t for t in (1, 2, 4) if t <= min(max_tp, fits)]
    too_big = [t for t in (2, 4) if t <= max(max_tp, 2) and t not in tps]
    parallel_ranks = max(tps)
    results, loops, raw = {}, {}, {}
    for config in args.configs:
        cfg, rows, loop_rows = CONFIGS[config], [], []
        # The GEMM ceiling and the whole-loop variants are the ToyModel's; the transformer's
        # comparison is the step's.
        toy = cfg.get("model") != "transformer"
        # A 1 ms step on shared cores is noisy: take more samples where they are cheap.
        steps = args.steps or (30 if config == "compute_heavy" else 300)
        print(f"benchmarking {config} on {args.device} ...", flush=True)
        for t in too_big:
            needs = "GPUs (NCCL: one per rank)" if on_gpu else "cores"
            print(f"  skipped ours-tp{t}, ours-sp-tp{t}, dtensor-tp{t} and their loops: "
                  f"{t} ranks need {t} {needs}, this machine has {fits}", flush=True)
        ceiling = {tp: launch("ceiling", config, steps, 0, extra=("--tp", str(tp)))
                   for tp in tps if toy}
        fused = ("--fused_sgd",) if args.fused_sgd else ()
        run = lambda name, *a, extra=(), **k: rows.append(
            summarize(name, launch(*a, **k, extra=fused + extra), cfg, ceiling))
        run("serial-1t", "serial", config, steps, args.warmup, threads=1)
        if parallel_ranks > 1 and not on_gpu:  # threads of a CPU: no meaning on a GPU
            run(f"serial-{parallel_ranks}t", "serial", config, steps, args.warmup,
                threads=parallel_ranks)
        for tp in tps:
            run(f"ours-tp{tp}", "ours", config, steps, args.warmup, ranks=tp)
        for tp in tps[1:]:
            run(f"ours-sp-tp{tp}", "ours", config, steps, args.warmup, ranks=tp,
                extra=("--sequence_parallel",))
        for tp in tps[1:]:
            run(f"dtensor-tp{tp}", "dtensor", config, steps, args.warmup, ranks=tp)
        loop = lambda name, variant, ranks: loop_rows.append(
            summarize_loop(name, launch(variant, config, steps, args.warmup, ranks=ranks)))
        if toy:
            loop("loop-serial", "loop-serial", 1)
            for tp in tps:
                loop(f"loop-ours-tp{tp}", "loop-ours", tp)
            for tp in tps[1:]:
                loop(f"loop-dtensor-tp{tp}", "loop-dtensor", tp)
        results[config], loops[config], raw[config] = rows, loop_rows, ceiling
        print_report(config, cfg, rows, loop_rows)
    targets = check_targets({c: results[c] + loops[c] for c in results})
    machine = dict(cpu_count=os.cpu_count(), torch=torch.__version__, platform=sys.platform,
                   processor=cpu_name(), gpus=gpus, device=args.device,
                   gpu_name=torch.cuda.get_device_name(0) if on_gpu else None)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".tmp", "w") as f:  # written whole, then renamed
        json.dump(dict(machine=machine, configs={c: CONFIGS[c] for c in results}, results=results,
                       loops=loops,
                       papers={c: paper_count(CONFIGS[c], parallel_ranks) for c in results},
                       ceiling=raw, targets=targets, warmup=args.warmup, fused_sgd=args.fused_sgd),
                  f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    plot(results, loops, args.plot,
         per_rank=f"one GPU per rank ({machine['gpu_name']})" if on_gpu else
         "one thread per rank")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":",
                                   1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
