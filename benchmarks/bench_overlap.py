"""The data-parallel average hidden behind backward (Megatron's --overlap-grad-reduce), measured
against its floor: the last bucket's all-reduce, which nothing computes after.

    python -m benchmarks.bench_overlap          # assets/overlap.png and .json
    python -m benchmarks.bench_overlap --quick  # fewer layers and rounds: runs/overlap_quick.*

On 2 CPU cores shared with other work (AMD EPYC, load average about 1): 11 s, and 6 s with
--quick (1.7 s as a test, in the suite's rank processes: no interpreter to start); one launch
of 2 ranks.

Two ranks (data parallelism, TP 1, gloo, one thread each) run a model of L layers, each one
parameter of N float32 elements, for a few rounds after a warm-up; each round times one step of
each kind, one after another, so that the other work on the machine weighs on all of them alike:

  compute  forward and backward, nothing summed;
  off      backward, then the average of all L gradients (finalize_model_grads.py's
           average_over_data_parallel_replicas: a step without the flag). Its time over
           compute's is the communication, all of it exposed;
  on       core/distributed/param_and_grad_buffer.py's BucketGroup with one bucket per layer
           (--ddp_bucket_size N): each bucket's all-reduce is launched by the hook of its last
           gradient, on gloo's background thread, while backward goes on to the earlier layers;
           finish_grad_sync waits for them all (finalize_model_grads under
           --overlap_grad_reduce). Its time over compute's is what stays exposed;
  floor    the last bucket's average alone (start_grad_sync and its wait, on layer 0's
           gradient): backward computes nothing after layer 0, so no schedule hides it. Beside
           it ("wire"), the same all-reduce without the wire's staging: the bucket's gradients
           laid end to end (a copy) at the launch, copied back and divided at the wait.

Times are the slower rank's, medians over the rounds. The issue's target: exposed with overlap at
most 1.5 x the floor. Megatron's flags: --overlap-grad-reduce, --ddp-bucket-size
(megatron/core/distributed/distributed_data_parallel.py and param_and_grad_buffer.py).

As in bench_pipeline.py the layers sleep instead of computing: on 2 shared cores each rank's
compute and gloo's threads would fight for the cores, and the timings would measure the operating
system's scheduler more than the overlap. A layer's forward sleeps t_f, its backward 2 t_f and
then makes its gradient, a real tensor of N elements (every element rank + 1, so the average,
1.5, is checked after every step), so the all-reduces move real bytes. N is large enough that
one bucket's all-reduce takes a few ms over gloo here; t_f is such that a layer's backward
outlasts it (else the buckets queue behind each other and more of them stays exposed).

Beside it one run on real compute, reported as measured: a stack of the toy model's MLP blocks
(model.py), DP 2, one bucket per block. There the ranks' backward and gloo's threads, which move
the buckets, share the 2 cores (with other work too): an all-reduce runs as fast as the cores
left to it allow and slows the compute it runs under, so the overlap hides less than the
sleeping model's does.

The timelines (the median step, both ranks on one clock: time.perf_counter is the machine's
monotonic clock): each layer's forward and backward (the sleeps), each bucket's launch (the
hook's start_grad_sync, timed from outside by wrapping it), the moment its bytes had arrived
(its gloo work's future, seen through wire._off_wire, which holds it), and its wait in
finish_grad_sync. Nothing in core/ is changed: the wrappers live in the worker.

Measured (three full runs, 8 layers of 2^20 elements, t_f = 5 ms, 2026-12-07): compute 126 to
128 ms; communication without overlap 50 to 65 ms, all of it exposed; exposed with it 7.2 to
10.2 ms (82 to 86% hidden); the floor 3.2 to 5.4 ms; exposed / floor 1.9 to 2.6, not yet the
issue's 1.5. Every bucket but the last is launched during backward (the hooks work); what stays
exposed beyond the last bucket, from the timelines:

  * the slower rank: beside gloo's threads moving the previous bucket on the same 2 cores its
    backward runs slower, and ends 1 to 3 ms after compute alone; the last bucket starts only
    when both ranks have its gradient;
  * each bucket's wait, after backward: 0.2 to 0.3 ms of copy back and division each (a bucket
    of one gradient is reduced in place, no copy; Megatron's buckets are views of one contiguous
    gradient buffer, and scale before the sum, so neither). Before one-gradient buckets went
    in place, the launches' copies (0.5 to 1.3 ms each, on the main thread during backward)
    left 23 to 31 ms exposed, 4 to 6 x the floor.

Real compute (4 MLP blocks of 256 x 1024, batch 256, 37 to 45 ms of compute): the overlap hides
from 16% of the communication to -43% (it costs more than it hides) over runs: gloo's threads and
the compute share the 2 cores.
"""

import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from benchmarks.configs import cpu_name
from benchmarks.launcher import driver_args, driver_cli, launch, print_result, write_results

# The sleeping model: L layers of N elements, a layer's forward t_f seconds (backward 2 t_f);
# each round times the floors `floor_repeats` times (short: their median is the round's).
SLEEP = dict(layers=8, numel=2**20, t_f=0.005, rounds=7, warmup=2, floor_repeats=5)
QUICK_SLEEP = dict(layers=5, numel=2**20, t_f=0.004, rounds=3, warmup=1, floor_repeats=3)
# The real one: `blocks` of the toy model's MLP (input -> hidden -> input), batch rows per rank.
REAL = dict(blocks=4, input=256, hidden=1024, batch=256, rounds=5, warmup=1, floor_repeats=5)
QUICK_REAL = dict(blocks=2, input=32, hidden=128, batch=16, rounds=1, warmup=0,
                  floor_repeats=1)
MODES = ("compute", "off", "on", "floor", "wire")
KINDS = ("step", "F", "B", "launch", "done", "wait", "average")  # a timeline's events
TARGET = 1.5  # the issue's: exposed with overlap <= 1.5 x the floor
QUICK_NOTE = " (--quick: one round of a tiny MLP, run to see it run, not a measurement)"

EVENTS = None  # this step's [(kind, index, start, end)] on this rank while one is recorded


def _note(kind, index, start, end=None):
    if EVENTS is not None:
        EVENTS.append((kind, index, start, time.perf_counter() if end is None else end))


# ---------------------------------------------------------------------------
# The worker: 2 ranks, both models.

class _SleepingLayer(torch.autograd.Function):
    """Forward sleeps t_f; backward sleeps 2 t_f and returns the weight's gradient, N elements of
    rank + 1: work of a fixed length that needs no core, and a gradient of real bytes."""

    @staticmethod
    def forward(ctx, x, weight, seconds, layer):
        start = time.perf_counter()
        ctx.seconds, ctx.layer, ctx.numel = seconds, layer, weight.numel()
        time.sleep(seconds)
        _note("F", layer, start)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        start = time.perf_counter()
        time.sleep(2 * ctx.seconds)
        weight_grad = torch.full((ctx.numel,), dist.get_rank() + 1.0)
        _note("B", ctx.layer, start)
        return grad, weight_grad, None, None


class SleepingLayers(nn.Module):
    def __init__(self, layers, numel, t_f):
        super().__init__()
        self.t_f = t_f
        self.weights = nn.ParameterList(nn.Parameter(torch.zeros(numel)) for _ in range(layers))

    def forward(self, x):
        for layer, weight in enumerate(self.weights):
            x = _SleepingLayer.apply(x, weight, self.t_f, layer)
        return x

    def loss(self, x, _):
        return self(x).sum()


class MLPStack(nn.Module):
    """`blocks` of the toy model's MLP (model.py: Linear -> ReLU -> Linear, no bias), the
    squared error of its output."""

    def __init__(self, blocks, input_size, hidden_size):
        super().__init__()
        from model import MLP
        self.blocks = nn.Sequential(*(MLP(input_size, hidden_size) for _ in range(blocks)))

    def loss(self, x, y):
        return (self.blocks(x) - y).pow(2).mean()


def _instrument(layer_of):
    """Time each bucket's launch (param_and_grad_buffer.start_grad_sync, which the hooks call),
    the arrival of its bytes (its work's future: wire._off_wire holds the work) and its wait,
    from outside core/: the two functions wrapped in this process only. A bucket is named by its
    first layer (`layer_of`: parameter -> layer)."""
    from core import wire
    from core.distributed import param_and_grad_buffer as pgb
    start_grad_sync, off_wire, launching = pgb.start_grad_sync, wire._off_wire, [None]

    def timed_start(grads, params):
        bucket, start = min(layer_of[id(p)] for p in params), time.perf_counter()
        launching[0] = bucket
        try:
            finish = start_grad_sync(grads, params)
        finally:
            launching[0] = None
        _note("launch", bucket, start)

        def timed_finish():
            waited = time.perf_counter()
            finish()
            _note("wait", bucket, waited)
        return timed_finish

    def arrival_seen(given, tensor, staged, output, work, async_op):
        if async_op and work is not None and launching[0] is not None and EVENTS is not None:
            events, bucket = EVENTS, launching[0]
            work.get_future().add_done_callback(  # on gloo's thread, when the bytes are in
                lambda _: events.append(("done", bucket, time.perf_counter(),
                                         time.perf_counter())))
        return off_wire(given, tensor, staged, output, work, async_op)

    pgb.start_grad_sync, wire._off_wire = timed_start, arrival_seen


def _step(model, batch, params, mode, bucket_size):
    """(start, end, events) of one step of `mode` on this rank, from a barrier, in
    time.perf_counter's seconds (the machine's monotonic clock: the ranks' times compare):
    forward and backward, then the average as `mode` says."""
    global EVENTS
    from core.distributed.finalize_model_grads import average_over_data_parallel_replicas
    from core.distributed.param_and_grad_buffer import BucketGroup
    for p in params:
        p.grad = None
    group = BucketGroup(params, lambda p: p.grad, bucket_size, 1) if mode == "on" else None
    EVENTS = events = []
    dist.barrier()
    start = time.perf_counter()
    try:
        loss = model.loss(*batch)
        loss.backward()
        if mode == "off":
            averaging = time.perf_counter()
            average_over_data_parallel_replicas(params, loss, False)
            _note("average", 0, averaging)
        elif mode == "on":
            group.finish_grad_sync()
        end = time.perf_counter()
    finally:
        EVENTS = None
        if group is not None:
            group.remove_hooks()
    if mode == "on":  # a future's callbacks may run just after its wait has returned
        for _ in range(100):
            if sum(kind == "done" for kind, *_ in events) == len(group.buckets):
                break
            time.sleep(0.001)
    return start, end, list(events)


def _floor(params, staged):
    """Seconds of the last bucket's average alone (`params`' gradients), from a barrier: as the
    hook launches it and finish_grad_sync waits for it (`staged`), or one in-place all-reduce
    of its one tensor, nothing copied."""
    from core import parallel_state as ps
    from core import wire
    from core.distributed import param_and_grad_buffer as pgb
    dist.barrier()
    start = time.perf_counter()
    if staged:
        pgb.start_grad_sync([p.grad for p in params], params)()
    else:
        wire.all_reduce(params[0].grad, ps.get_tensor_and_data_parallel_group())
    return time.perf_counter() - start


def measure(model, batch, bucket_size, rounds, warmup, floor_repeats, check=None):
    """The slower rank's seconds per mode per round; both ranks' timelines of the off and on
    steps, their times from rank 0's start of the step."""
    from core.distributed.param_and_grad_buffer import buckets_of
    params = list(model.parameters())
    last = buckets_of(params, bucket_size)[-1]
    times, timelines, averaged = [], [], True
    for round_ in range(warmup + rounds):
        row = []
        for mode in MODES:
            if mode in ("floor", "wire"):  # short: the median of a few
                row.append(statistics.median(_floor(last, mode == "floor")
                                             for _ in range(floor_repeats)))
                continue
            start, end, events = _step(model, batch, params, mode, bucket_size)
            row.append(end - start)
            if mode != "compute" and check is not None:
                averaged &= all(check(p.grad) for p in params)
            if mode != "compute" and round_ >= warmup:
                timelines.append([(KINDS.index(k), i, s, e)
                                  for k, i, s, e in [("step", 0, start, end), *events]])
        if round_ >= warmup:
            times.append(row)
    slowest = _gather(torch.tensor(times, dtype=torch.float64)).amax(0).tolist()
    rows = 5 * len(params) + 2  # a step's events at most: itself, 5 per parameter, the average
    padded = torch.tensor([t + [(-2, 0, 0, 0)] * (rows - len(t)) for t in timelines],
                          dtype=torch.float64)
    every_rank = _gather(padded).tolist()  # [rank][step][row]
    steps = [[[r for r in every_rank[rank][k] if r[0] != -2] for rank in range(len(every_rank))]
             for k in range(len(timelines))]
    decoded = [[[(KINDS[int(c)], int(i), s - ranks[0][0][2], e - ranks[0][0][2])
                 for c, i, s, e in rank_rows] for rank_rows in ranks] for ranks in steps]
    return dict(times={mode: [r[m] for r in slowest] for m, mode in enumerate(MODES)},
                timelines={mode: decoded[m::2] for m, mode in enumerate(("off", "on"))},
                averaged=averaged if check is not None else None,  # None: not checked
                buckets=[[p.numel() for p in b] for b in buckets_of(params, bucket_size)])


def _gather(t):
    """Every rank's `t` (the same shape on each), stacked in rank order."""
    from core import wire
    return wire.all_gather(t[None].contiguous(), dist.group.WORLD)


def worker(sleep, real):
    """Both models on 2 ranks; rank 0 prints every rank's times and its own timelines."""
    from core import parallel_state as ps
    from core import wire
    from training import initialize
    torch.set_num_threads(1)
    initialize.init_distributed("gloo", timeout_minutes=5, device="cpu")
    ps.initialize_model_parallel(1)
    # The suite's TP_CHECK_COLLECTIVES=1 adds a blocking all-gather of shapes before each bucket's
    # all-reduce; a run's default (off) is what is timed.
    wire.CHECK_COLLECTIVES = False
    rank = dist.get_rank()
    model = SleepingLayers(sleep["layers"], sleep["numel"], sleep["t_f"])
    layer_of = {id(w): layer for layer, w in enumerate(model.weights)}
    torch.manual_seed(0)  # the same model on both ranks, each rank its own rows
    mlp = MLPStack(real["blocks"], real["input"], real["hidden"])
    layer_of.update({id(p): block for block, m in enumerate(mlp.blocks) for p in m.parameters()})
    _instrument(layer_of)
    sleeping = measure(model, (torch.ones(1), None), sleep["numel"], sleep["rounds"],
                       sleep["warmup"], sleep["floor_repeats"],
                       check=lambda g: bool((g == 1.5).all()))
    torch.manual_seed(1 + rank)
    batch = (torch.randn(real["batch"], real["input"]), torch.randn(real["batch"], real["input"]))
    real_run = measure(mlp, batch, 2 * real["input"] * real["hidden"], real["rounds"],
                       real["warmup"], real["floor_repeats"])
    dist.barrier()
    ps.destroy_model_parallel()
    if rank == 0:
        print_result(dict(sleeping=sleeping, real=real_run))


# ---------------------------------------------------------------------------
# The report (the driver).

def summarize(run, sleeping):
    """Medians, the communication, the exposed time without and with overlap, the floor, their
    ratio (ms); the staging's copies; for the sleeping model where the exposed time goes, how
    many buckets launched during backward, and the median steps' timelines."""
    ms = {mode: [1e3 * t for t in ts] for mode, ts in run["times"].items()}
    median = {mode: statistics.median(ts) for mode, ts in ms.items()}
    compute = median["compute"]
    out = dict(step_ms=ms, median_ms=median, compute_ms=compute,
               communication_ms=median["off"] - compute, exposed_off_ms=median["off"] - compute,
               exposed_on_ms=median["on"] - compute, floor_ms=median["floor"],
               wire_floor_ms=median["wire"], buckets=run["buckets"], averaged=run["averaged"])
    out["ratio"] = out["exposed_on_ms"] / out["floor_ms"]
    out["hidden_fraction"] = 1 - out["exposed_on_ms"] / out["communication_ms"]
    on = run["timelines"]["on"]
    last = min(i for kind, i, *_ in on[0][0] if kind == "launch")  # the last bucket's name
    durations = [[1e3 * (e - s) for step in on for events in step for kind, i, s, e in events
                  if kind == what and (what == "launch" or i != last)]
                 for what in ("launch", "wait")]  # the waits of the buckets before the last
    out["launch_ms"], out["wait_ms"] = (statistics.median(d) if d else None for d in durations)
    if sleeping:
        out["launched_during_backward"] = [min(map(_launched_during_backward, step))
                                           for step in on]
        parts = [_where_it_goes(step, compute) for step in on]
        for k, name in enumerate(("backward_stretch_ms", "rank_lag_ms", "tail_ms")):
            out[name] = statistics.median(p[k] for p in parts)
        out["timeline"] = {mode: run["timelines"][mode][_median_index(ms[mode])]
                           for mode in ("off", "on")}
    return out


def _ms(value):
    return "none" if value is None else f"{value:.2f} ms"


def _median_index(values):
    return sorted(range(len(values)), key=values.__getitem__)[len(values) // 2]


def _backward_end(events):
    return max(e for kind, _, _, e in events if kind == "B")


def _launched_during_backward(events):
    """Buckets whose launch began before backward's last layer had ended."""
    end = _backward_end(events)
    return sum(kind == "launch" and s < end for kind, _, s, _ in events)


def _where_it_goes(step, compute_ms):
    """(ms) An on step's backward, on the later rank, over compute alone (the hooks' launches,
    and compute slowed by gloo's threads); how far the other rank's backward ended before it;
    the tail after it (the last bucket, which the later rank launches, and the waits)."""
    ends = [_backward_end(events) for events in step]
    step_end = next(e for kind, _, _, e in step[0] if kind == "step")
    return (1e3 * max(ends) - compute_ms, 1e3 * (max(ends) - min(ends)),
            1e3 * (step_end - max(ends)))


def print_report(name, r):
    print(f"{name}: compute {r['compute_ms']:.1f} ms; communication (overlap off) "
          f"{r['communication_ms']:.1f} ms, all exposed; overlap on: exposed "
          f"{r['exposed_on_ms']:.1f} ms ({100 * r['hidden_fraction']:.0f}% hidden); floor (the "
          f"last bucket alone) {r['floor_ms']:.1f} ms ({r['wire_floor_ms']:.1f} without the "
          f"staging's copies); exposed / floor {r['ratio']:.2f} (target <= {TARGET}); a "
          f"bucket's copies: {_ms(r['launch_ms'])} at its launch, {_ms(r['wait_ms'])} at its "
          "wait", flush=True)
    if "tail_ms" in r:
        print(f"  where the exposed time goes (medians): backward on the later rank "
              f"{r['backward_stretch_ms']:.1f} ms longer than compute alone (the launches, "
              f"compute beside gloo's threads), the other rank {r['rank_lag_ms']:.1f} ms ahead "
              f"of it; after it {r['tail_ms']:.1f} ms (the last bucket, launched by the later "
              f"rank, and every bucket's wait); buckets launched during backward, per step: "
              f"{r['launched_during_backward']} of {len(r['buckets'])}", flush=True)


# ---------------------------------------------------------------------------
# The picture.

def _draw_compute(ax, events, y, height, alpha, colors, numbers):
    """One rank's forward (light) and backward (dark) per layer at height `y`, and in black the
    hooks' launches between them."""
    for kind, i, s, e in events:
        if kind == "launch":
            ax.broken_barh([(1e3 * s, 1e3 * (e - s))], (y - height / 2, height),
                           facecolors="black")
        if kind in ("F", "B"):
            ax.broken_barh([(1e3 * s, 1e3 * (e - s))], (y - height / 2, height),
                           facecolors=colors(i % 10), alpha=alpha * (0.4 if kind == "F" else 1),
                           edgecolor="white", linewidth=0.5)
            if numbers:
                ax.text(1e3 * (s + e) / 2, y, str(i), ha="center", va="center", fontsize=7)


def _draw_step(ax, r, mode, colors):
    """The median step of `mode`: rank 0's forward and backward per layer, rank 1's beneath
    (its times on rank 0's clock), then the gradients' all-reduces as rank 0 saw them (one bar
    per bucket from its launch to the arrival of its bytes, or the one average); shaded, the
    step beyond compute alone: the exposed time."""
    rank0, rank1 = r["timeline"][mode]
    _draw_compute(ax, rank0, 2, 0.7, 1.0, colors, True)
    _draw_compute(ax, rank1, 1, 0.45, 0.7, colors, False)
    end = 1e3 * next(e for kind, _, _, e in rank0 if kind == "step")
    if mode == "off":
        (_, _, s, e), = [ev for ev in rank0 if ev[0] == "average"]
        ax.broken_barh([(1e3 * s, 1e3 * (e - s))], (-0.3, 0.6), facecolors="0.55")
        ax.text(1e3 * (s + e) / 2, 0, "the average: one all-reduce\nof every gradient",
                ha="center", va="center", fontsize=7, color="white")
    else:
        done = {i: 1e3 * s for kind, i, s, _ in rank0 if kind == "done"}
        launches = sorted((s, i, e) for kind, i, s, e in rank0 if kind == "launch")
        for k, (s, i, e) in enumerate(launches):
            y = 0.17 if k % 2 else -0.17  # two lanes: a bucket may launch before the last arrives
            ax.broken_barh([(1e3 * s, done.get(i, 1e3 * e) - 1e3 * s)], (y - 0.15, 0.3),
                           facecolors=colors(i % 10), edgecolor="black", linewidth=0.4)
            ax.plot([1e3 * s] * 2, [y - 0.15, y + 0.15], color="black", linewidth=1.2)
        for kind, i, s, e in rank0:
            if kind == "wait":  # finish_grad_sync's wait for that bucket returned
                ax.plot([1e3 * e], [-0.45], marker="^", color=colors(i % 10), markersize=5,
                        markeredgecolor="black", markeredgewidth=0.4)
        later = 1e3 * max(_backward_end(rank0), _backward_end(rank1))
        ax.axvline(later, color="black", linestyle=":", linewidth=1)
        ax.text(later, 2.5, " the later rank's backward ends: the last bucket launches",
                fontsize=7, va="center")
    compute = r["compute_ms"]
    ax.axvline(compute, color="black", linestyle="--", linewidth=1)
    ax.axvspan(compute, end, color="tab:red", alpha=0.15, hatch="///", linewidth=0)
    ax.text(end + 0.004 * r["median_ms"][mode], 1, f"exposed\n{end - compute:.1f} ms\n(this "
            f"step,\nrank 0)", color="tab:red", fontsize=8, va="center")
    ax.text(compute, 2.5, "compute alone (median) ", fontsize=7, ha="right", va="center")
    ax.set_yticks([2, 1, 0], ["rank 0's compute\n(number: layer)", "rank 1's", "gradients'\n"
                              "all-reduce\n(rank 0)"], fontsize=8)
    ax.set_ylim(-0.6, 2.7)


def plot(report, path):
    import matplotlib.pyplot as plt

    from plot_runs import save  # first: it sets the Agg backend
    r, real, c = report["sleeping"], report["real"], report["sleeping_config"]
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    layers, numel = c["layers"], c["numel"]
    _draw_step(axes[0], r, "off", colors)
    axes[0].set_title(f"overlap off: backward, then the average (finalize_model_grads): "
                      f"communication {r['communication_ms']:.1f} ms, all of it exposed (medians "
                      f"over {len(r['step_ms']['off'])} steps)", fontsize=9)
    _draw_step(axes[1], r, "on", colors)
    axes[1].set_title(f"--overlap_grad_reduce (Megatron's --overlap-grad-reduce), "
                      f"--ddp_bucket_size {numel} (--ddp-bucket-size): {len(r['buckets'])} "
                      f"buckets, each launched by its last gradient's hook\nexposed "
                      f"{r['exposed_on_ms']:.1f} ms = {r['ratio']:.2f} x the floor "
                      f"{r['floor_ms']:.1f} ms (the last bucket's average alone; target <= "
                      f"{TARGET} x): the later rank's backward {r['backward_stretch_ms']:.1f} ms "
                      f"over compute alone, then {r['tail_ms']:.1f} ms\nblack: a hook's launch "
                      f"(the bucket's copy, {_ms(r['launch_ms'])}); bar: a bucket from its launch "
                      f"to its bytes' arrival; triangle: its wait returned (copy back and "
                      f"divide, {_ms(r['wait_ms'])})", fontsize=9)
    axes[1].set_xlabel(f"ms from the step's start (light: forward t_f = {1e3 * c['t_f']:g} ms, "
                       f"dark: backward 2 t_f, sleeping; each layer's gradient {numel} float32)",
                       fontsize=8)
    axes[1].set_xlim(0, 1.1 * max(r["median_ms"]["off"], r["median_ms"]["on"]))
    m = report["machine"]
    fig.suptitle(f"The data-parallel gradient average overlapped with backward: {layers} "
                 f"sleeping layers, DP 2 over gloo, rank 0's median step", fontsize=11)
    fig.text(0.01, 0.01, f"Real compute, measured as is ({len(real['buckets'])} buckets, one "
             f"per MLP block of the toy model; gloo's thread shares the {m['cpu_count']} cores "
             f"with compute):\ncompute {real['compute_ms']:.1f} ms, communication "
             f"{real['communication_ms']:.1f} ms, exposed with overlap "
             f"{real['exposed_on_ms']:.1f} ms = {real['ratio']:.2f} x its floor "
             f"{real['floor_ms']:.1f} ms{QUICK_NOTE * report['quick']}.\nMeasured on "
             f"{m['processor']}, {m['cpu_count']} cores "
             f"shared with other work (load average {m['load_average'][0]:.1f})", fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save(fig, path)


def main():
    args = driver_args(__doc__, "overlap", "overlap",
                       ("sleep", "real", "steps", "warmup", "threads", "config", "device"))
    if args.worker:
        return worker(json.loads(args.sleep), json.loads(args.real))
    sleep, real = (QUICK_SLEEP, QUICK_REAL) if args.quick else (SLEEP, REAL)
    r = launch("overlap", "none", sleep["rounds"], sleep["warmup"], ranks=2,
               extra=("--sleep", json.dumps(sleep), "--real", json.dumps(real)),
               module="benchmarks.bench_overlap")
    if not r["sleeping"]["averaged"]:
        raise SystemExit("error: a gradient was not the average of the two ranks' (1.5)")
    sleeping, real_run = summarize(r["sleeping"], True), summarize(r["real"], False)
    print_report(f"{sleep['layers']} sleeping layers of {sleep['numel']} elements", sleeping)
    print_report(f"real compute, {real['blocks']} MLP blocks (measured as is: gloo's thread "
                 "competes with compute on 2 cores)" + QUICK_NOTE * args.quick, real_run)
    print(f"measured on {cpu_name()}, {os.cpu_count()} cores")
    report = dict(machine=dict(processor=cpu_name(), cpu_count=os.cpu_count(),
                               torch=torch.__version__, load_average=os.getloadavg()),
                  quick=args.quick, sleeping_config=sleep, real_config=real, target=TARGET,
                  sleeping=sleeping,
                  real=real_run)
    write_results(report, args.out, lambda path: plot(report, path), args.plot)


if __name__ == "__main__":
    driver_cli(main)
