"""The pipeline's bubble and the activations it keeps, measured against Narayanan et al. (2021).

    python -m benchmarks.bench_pipeline            # assets/pipeline_schedule.png and .json
    python -m benchmarks.bench_pipeline --quick    # fewer points: runs/pipeline_schedule_quick.*

On 2 CPU cores shared with other work: 79 s, and 21 s with --quick (docs/pipeline.md: what
that load does to the measured bubble).

The interleaved points run twice, the second time with --overlap_p2p_comm (each exchange posted
and waited for where its tensor is used, schedules._InterleavedOverlapped): what hiding the
exchanges behind compute takes off the bubble (docs/pipeline.md: little, on gloo and 2 cores).

Each stage records when each micro-batch's forward and backward ran (schedules.TIMELINE); the
step's span over all stages, less the ideal time m (t_f + t_b) of one stage's own work, over that
ideal time, is the bubble fraction: (p - 1) / m for GPipe and 1F1B, (p - 1) / (v m) interleaved
(Sec. 2.2). The micro-batches a stage has run forward but not yet backward, at the worst moment,
are the activations it keeps: m under GPipe (Fig. 3), p - s on stage s under 1F1B (Fig. 4, top).

On 2 shared cores P ranks cannot each have a core, and real compute would measure the scheduler
of the operating system more than the pipeline's. So the formula is checked with stages whose
work takes a fixed time and needs no core: a chunk's forward sleeps t_f / v and its backward
2 t_f / v (the paper's t_b = 2 t_f), every stage alike; the timeline then measures the schedule
and the point-to-point latency alone. Beside it, one real run: the toy transformer in two stages
(one core each), whose timeline shows the same pattern with compute's own irregular lengths.
"""

import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from benchmarks.configs import cpu_name
from benchmarks.launcher import driver_args, driver_cli, launch, print_result, write_results

T_F = 0.010  # seconds of one micro-batch's forward through one stage (synthetic mode)
POINTS = [("gpipe", 2, 4, 1), ("1f1b", 2, 4, 1), ("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1),
          ("1f1b", 4, 8, 2), ("1f1b", 2, 8, 1), ("1f1b", 2, 8, 2)]  # schedule, p, m, v
QUICK_POINTS = [("gpipe", 2, 2, 1), ("1f1b", 2, 4, 2)]
# The real transformer's saved bytes per stage (memory needs no core of its own): p, m.
MEMORY = (4, 8)
QUICK_MEMORY = (2, 4)
PICTURE = [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("1f1b", 4, 8, 2)]  # the paper's Figs. 3, 4
# The interleaved points again, their exchanges overlapped with compute (--overlap_p2p_comm).
OVERLAPPED = [point for point in POINTS if point[3] > 1]


class _Sleep(torch.autograd.Function):
    """Forward sleeps t_f, backward 2 t_f: work of a fixed length that needs no core."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)
        return grad, None


class SavedBytes:
    """saved_tensors_hooks that count the bytes a rank's autograd graphs hold for backward, live:
    each saved tensor (parameters aside) is wrapped in a holder counted until autograd drops it;
    `peak` is the most held at once."""

    def __init__(self, parameters):
        self.params = {p.data_ptr() for p in parameters}
        self.live = self.peak = 0

    def pack(self, t):
        return t if t.data_ptr() in self.params else _Held(t, self)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held


class _Held:
    def __init__(self, tensor, counter):
        self.tensor, self.counter = tensor, counter
        self.nbytes = tensor.numel() * tensor.element_size()
        counter.live += self.nbytes
        counter.peak = max(counter.peak, counter.live)

    def __del__(self):
        self.counter.live -= self.nbytes


class SleepingChunk(nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds, self.weight = seconds, nn.Parameter(torch.ones(()))

    def forward(self, x):
        return _Sleep.apply(x * self.weight, self.seconds)

    def loss(self, output, _):
        return output.sum()


def worker(args):
    """One point (or the real run): three steps, the last one's timeline of every stage."""
    from core import parallel_state as ps
    from core.pipeline_parallel import schedules
    from training import initialize
    torch.set_num_threads(1)
    initialize.init_distributed("gloo", timeout_minutes=5, device="cpu")
    p, v = dist.get_world_size(), args.v if args.v > 1 else None
    ps.initialize_model_parallel(1, p, v)
    model, microbatches, shape = _build(args, p, args.v)
    step = lambda chunk, mb, x: (chunk.loss(chunk(mb[0] if x is None else x), mb[1])
                                 if ps.is_pipeline_last_stage() else chunk(mb[0] if x is None
                                                                           else x))
    run = schedules.get_forward_backward_func(args.schedule, args.overlap)
    saved = SavedBytes(model.parameters())
    for repeat in range(3):  # the first two warm up (allocations, connections)
        schedules.TIMELINE = [] if repeat == 2 else None
        dist.barrier()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            run(step, microbatches, model, shape, torch.float32)
    timelines, peaks = [None] * p, [None] * p
    dist.all_gather_object(timelines, schedules.TIMELINE)
    dist.all_gather_object(peaks, saved.peak)
    dist.barrier()
    ps.destroy_model_parallel()
    if int(os.environ["RANK"]) == 0:
        print_result(dict(timelines=timelines, schedule=args.schedule, p=p, m=args.m, v=args.v,
                          real=args.real, overlap_p2p_comm=args.overlap, t_f=T_F,
                          saved_peak_bytes=peaks))


def _build(args, p, v):
    """(this rank's chunks, the micro-batches, the activation's shape)."""
    from core import parallel_state as ps
    if not args.real:
        model = nn.ModuleList(SleepingChunk(T_F / v) for _ in range(v))
        return model, [(torch.ones(4, 8), None) for _ in range(args.m)], (4, 8)
    from core.pipeline_parallel.schedules import chunk_layers
    from transformer import ToyTransformer
    chunks = []
    for c in range(v):  # two blocks a chunk
        ps.set_virtual_pipeline_model_parallel_rank(c if v > 1 else None)
        torch.manual_seed(0)
        chunks.append(ToyTransformer(50, 16, 64, 256, 4, p * v * 2, tensor_parallel=True,
                                     pre_process=ps.is_pipeline_first_stage(),
                                     post_process=ps.is_pipeline_last_stage(),
                                     layers=chunk_layers(p * v * 2, p,
                                                         ps.get_pipeline_model_parallel_rank(),
                                                         v, c)))
    ps.set_virtual_pipeline_model_parallel_rank(0 if v > 1 else None)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 50, (8, 17), generator=g) for _ in range(args.m)]
    return nn.ModuleList(chunks), [(t[:, :-1], t[:, 1:]) for t in tokens], (16, 8, 64)


def measure(timelines, m, v, t_f):
    """{bubble, formula, in_flight per stage} from the stages' timelines."""
    start = min(e[2] for t in timelines for e in t)
    end = max(e[3] for t in timelines for e in t)
    busy = [sum(e[3] - e[2] for e in t) for t in timelines]
    ideal = max(busy) if t_f is None else m * 3 * t_f  # forward t_f and backward 2 t_f, m times
    in_flight = []
    for t in timelines:
        live = peak = 0
        for kind, *_ in sorted(t, key=lambda e: e[2]):
            live += 1 if kind == "F" else -1
            peak = max(peak, live)
        in_flight.append(peak / v)  # micro-batches (a chunk's forward is 1/v of one)
    p = len(timelines)
    # One hop: a micro-batch's forward ending on stage s to its forward starting on s + 1.
    forwards = [[e for e in t if e[0] == "F"] for t in timelines]
    hops = [b[j][2] - a[j][3] for a, b in zip(forwards, forwards[1:]) for j in range(m)] \
        if v == 1 else []
    return dict(bubble=(end - start - ideal) / ideal, formula=(p - 1) / (v * m),
                in_flight=in_flight, span_s=end - start, ideal_s=ideal,
                hop_ms=1e3 * min(hops) if hops else None)


def report_memory(runs):
    """The real transformer's activations held per stage at the peak, GPipe and 1F1B: in
    micro-batches, GPipe's peak on that stage being m of them (Fig. 3: m; Fig. 4, top: p - s)."""
    gpipe, one_f_one_b = runs
    m, p = gpipe["m"], gpipe["p"]
    per_microbatch = [b / m for b in gpipe["saved_peak_bytes"]]
    kept = [b / a for a, b in zip(per_microbatch, one_f_one_b["saved_peak_bytes"])]
    print(f"the toy transformer, p={p}, m={m}: activations saved per stage at the peak, KiB: "
          f"GPipe {[round(b / 1024, 1) for b in gpipe['saved_peak_bytes']]}, 1F1B "
          f"{[round(b / 1024, 1) for b in one_f_one_b['saved_peak_bytes']]}; 1F1B's in "
          f"micro-batches {[round(k, 3) for k in kept]} (paper: p - s = "
          f"{[p - s for s in range(p)]})", flush=True)
    return dict(p=p, m=m, gpipe_bytes=gpipe["saved_peak_bytes"],
                one_f_one_b_bytes=one_f_one_b["saved_peak_bytes"], kept_microbatches=kept)


def plot(results, path):
    import matplotlib.pyplot as plt

    from plot_runs import save  # first: it sets the Agg backend
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 2.2 * len(results)), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, r in zip(axes[:, 0], results):
        start = min(e[2] for t in r["timelines"] for e in t)
        for stage, t in enumerate(r["timelines"]):
            count = {}
            for kind, chunk, s, e in t:
                mb = count[kind, chunk] = count.get((kind, chunk), -1) + 1
                shade = colors(mb % 10)
                ax.broken_barh([((s - start) * 1e3, (e - s) * 1e3)], (stage - 0.4, 0.8),
                               facecolors=shade, alpha=1.0 if kind == "B" else 0.45,
                               edgecolor="white", linewidth=0.5)
                ax.text((s + e - 2 * start) / 2 * 1e3, stage, f"{mb + 1}", ha="center",
                        va="center", fontsize=6)
        ax.set_yticks(range(r["p"]), [f"stage {s}" for s in range(r["p"])])
        ax.invert_yaxis()
        name = {"gpipe": "GPipe", "1f1b": "1F1B"}[r["schedule"]] + (
            f", interleaved v={r['v']}" if r["v"] > 1 else "") + (
            ", overlap_p2p_comm" if r["overlap_p2p_comm"] else "") + (
            ": the toy transformer, real compute" if r["real"] else "")
        ax.set_title(f"{name}, p={r['p']}, m={r['m']}: bubble {r['bubble']:.3f} measured, "
                     f"{r['formula']:.3f} = (p-1)/(v m) in the paper", fontsize=9)
        ax.set_xlabel("ms (light: forward, dark: backward, number: micro-batch)", fontsize=8)
    fig.suptitle("The pipeline's schedules, measured (Narayanan et al., 2021, Figs. 3 and 4)",
                 fontsize=10)
    fig.tight_layout()
    save(fig, path)


def main():
    args = driver_args(__doc__, "pipeline_schedule", "pipeline",
                       ("pipeline_schedule", "num_microbatches", "virtual_size", "real_compute",
                        "overlap_p2p_comm", "steps", "warmup", "threads", "config", "device"))
    if args.worker:
        args.schedule, args.m, args.v = (args.pipeline_schedule, int(args.num_microbatches),
                                         int(args.virtual_size))
        args.real, args.overlap = args.real_compute == "1", args.overlap_p2p_comm == "1"
        return worker(args)
    results = []
    points = QUICK_POINTS if args.quick else POINTS
    mp, mm = QUICK_MEMORY if args.quick else MEMORY
    # The real run's timeline beside the picture's (not with --quick: its memory runs are real).
    overlapped = [] if args.quick else OVERLAPPED
    runs = [(s, pp, m, v, False, False) for s, pp, m, v in points] + \
        [(s, pp, m, v, False, True) for s, pp, m, v in overlapped] + \
        [("1f1b", 2, 4, 1, True, False)] * (not args.quick) + [(s, mp, mm, 1, True, False)
                                                              for s in ("gpipe", "1f1b")]
    for schedule, pp, m, v, real, overlap in runs:
        extra = ("--pipeline_schedule", schedule, "--num_microbatches", str(m),
                 "--virtual_size", str(v), "--real_compute", str(int(real)),
                 "--overlap_p2p_comm", str(int(overlap)))
        r = launch("pipeline", "none", 1, 0, ranks=pp, extra=extra,
                   module="benchmarks.bench_pipeline")
        r.update(measure(r["timelines"], m, v, None if real else T_F))
        results.append(r)
        hop = f"  one hop {r['hop_ms']:.2f} ms" if r["hop_ms"] is not None else ""
        print(f"{schedule:>6} p={pp} m={m} v={v}{' real' if real else '     '}"
              f"{' overlap_p2p_comm' if overlap else ''}  bubble "
              f"{r['bubble']:.3f} (paper {r['formula']:.3f})  in flight per stage "
              f"{[round(x, 2) for x in r['in_flight']]}{hop}", flush=True)
    memory = report_memory(results[-2:])
    results = results[:-2]
    # The paper's figures and the real run; with --quick, every point measured.
    chosen = [r for r in results if (r["schedule"], r["p"], r["m"], r["v"]) in PICTURE
              and not r["real"] and not r["overlap_p2p_comm"]]
    # Fig. 4 (bottom) again, its exchanges overlapped (--overlap_p2p_comm): the bubble it leaves.
    overlapped = [r for r in results if r["overlap_p2p_comm"]
                  and (r["schedule"], r["p"], r["m"], r["v"]) in PICTURE]
    real = [r for r in results if r["real"]]
    drawn = chosen + overlapped + real if len(chosen) == len(PICTURE) else results
    print(f"measured on {cpu_name()}, {os.cpu_count()} cores")
    report = dict(machine=dict(processor=cpu_name(), cpu_count=os.cpu_count(),
                               torch=torch.__version__), t_f=T_F,
                  results=[{k: v for k, v in r.items() if k != "timelines"} for r in results],
                  memory=memory)
    write_results(report, args.out, lambda path: plot(drawn, path), args.plot)


if __name__ == "__main__":
    driver_cli(main)
