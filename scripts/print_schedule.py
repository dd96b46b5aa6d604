"""Print each pipeline stage's forwards and backwards in order, from the schedules' own code.

For every stage (rank): the forwards (F) and backwards (B), with micro-batch and chunk, that
core/pipeline_parallel/schedules.py runs, in its order and on time steps; no training.

    python scripts/print_schedule.py --pipeline_model_parallel_size 2 \\
        --virtual_pipeline_model_parallel_size 2 --num_microbatches 4     # interleaved 1F1B
    python scripts/print_schedule.py --pipeline_model_parallel_size 4 --num_microbatches 8 \\
        --pipeline_schedule gpipe                                          # or 1f1b, the default

The flags are parallel_train.py's (training/arguments.py): --virtual_pipeline_model_parallel_size
V runs the interleaved schedule; --num_microbatches M is what parallel_train.py computes from
the batch (a replica's rows / --micro_batch_size).

How: every stage (rank) is simulated in this one process, one after the other, by the real
schedule function (schedules.get_forward_backward_func) with that stage's rank set and stubs:
forward_step and backward_step record ("F" or "B", micro-batch, chunk) instead of computing,
deallocate_output_tensor does nothing, and p2p's _communicate records what the stage sends and
asks to receive, and hands back a placeholder. The n-th tensor a stage sends a neighbour is
then paired with the n-th that the neighbour receives from it, as batch_isend_irecv pairs them,
and checked: each received activation is the input of the same micro-batch's forward through
the next virtual stage, each gradient the output gradient of its backward through the previous
one. The time steps follow from the pairs: a forward or a backward takes one step, an exchange
completes once every stage in it has reached it (sends and receives block, as here and in
Megatron without overlap_p2p_comm), and a message takes no time.
"""

import os
import shutil
import sys
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core import parallel_state as ps  # noqa: E402
from core.pipeline_parallel import p2p_communication as p2p  # noqa: E402
from core.pipeline_parallel import schedules  # noqa: E402
from training.operations import ArgumentParser, run_cli  # noqa: E402

NAMES = {"forward_backward_no_pipelining": "no pipeline",
         "forward_backward_gpipe": "GPipe",
         "forward_backward_pipelining_without_interleaving": "1F1B",
         "forward_backward_pipelining_with_interleaving": "interleaved 1F1B"}


class ScheduleError(ps.UserError):
    """The schedule's stages do not fit together (an edited schedule): said in one line."""


@dataclass(frozen=True)
class Op:
    """A forward ("F") or a backward ("B") of a micro-batch (from 0) through a chunk (from 0)."""
    kind: str
    microbatch: int
    chunk: int

    def label(self, chunks):
        return f"{self.kind}{self.microbatch + 1}" + (f".{self.chunk}" if chunks > 1 else "")


@dataclass(frozen=True)
class Received:
    """What the stub exchange hands back: the n-th `kind` ("activation" or "gradient") that
    stage `dst` receives from stage `src`."""
    kind: str
    src: int
    dst: int
    n: int


@dataclass
class Exchange:
    """One _communicate call: [(peer, kind, the Op whose output or input gradient goes)], and
    the placeholders handed back."""
    sends: list
    receives: list


@dataclass
class Stage:
    """One rank's run of the schedule under the stubs: its operations and exchanges in order,
    and the operation that used each tensor it received."""
    rank: int
    events: list = field(default_factory=list)
    used_by: dict = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)

    def forward_step(self, forward_step_func, model_chunk, microbatch, input_tensor,
                     num_microbatches, losses):
        return self.ran(Op("F", microbatch, model_chunk), input_tensor)

    def backward_step(self, input_tensor, output_tensor, output_tensor_grad):
        return self.ran(Op("B", output_tensor.microbatch, output_tensor.chunk),
                        output_tensor_grad)

    def ran(self, op, received):
        """op ran on what this stage had received (None: on its data, or from its loss)."""
        if received is not None:
            self.used_by[received] = op
        self.events.append(op)
        return op  # the output (its gradient): the operation that made it

    def communicate(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next, tensor_shape,
                    dtype):
        prev, next_ = (ps.get_pipeline_model_parallel_prev_rank(),
                       ps.get_pipeline_model_parallel_next_rank())
        sends = [(peer, kind, t) for t, peer, kind in ((tensor_send_next, next_, "activation"),
                                                      (tensor_send_prev, prev, "gradient"))
                 if t is not None]
        got = {}
        for wanted, peer, kind in ((recv_prev, prev, "activation"), (recv_next, next_, "gradient")):
            if wanted:
                got[kind] = Received(kind, peer, self.rank, self.counts[peer, kind])
                self.counts[peer, kind] += 1
        if sends or got:
            self.events.append(Exchange(sends, list(got.values())))
        return got.get("activation"), got.get("gradient")


def run_stage(p, v, m, schedule, rank):
    """The real schedule function's run on stage `rank` of p, with the stubs."""
    stage = Stage(rank)
    with ExitStack() as stack:
        for module, name, value in (
                (ps, "_PIPELINE_GLOBAL_RANKS", list(range(p))),
                (ps, "_VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE", v if v > 1 else None),
                (ps, "_VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK", None),
                (ps, "get_pipeline_model_parallel_rank", lambda: rank),
                (schedules, "forward_step", stage.forward_step),
                (schedules, "backward_step", stage.backward_step),
                (schedules, "deallocate_output_tensor", lambda tensor: None),
                (p2p, "_communicate", stage.communicate)):
            stack.enter_context(mock.patch.object(module, name, value))
        run = schedules.get_forward_backward_func(schedule)
        run(None, list(range(m)), list(range(v)), None, None)
    return run.__name__, stage


def pair(stages, v):
    """{Received: the Op that made it}: the n-th send on a channel is its n-th receive.
    Checks that each is used by the operation the pipeline feeds it to."""
    sent, received = defaultdict(list), defaultdict(list)
    for stage in stages:
        for event in stage.events:
            if isinstance(event, Exchange):
                for peer, kind, op in event.sends:
                    sent[stage.rank, peer, kind].append(op)
                for r in event.receives:
                    received[r.src, r.dst, r.kind].append(r)
    for src, dst, kind in sorted(set(sent) | set(received)):
        a, b = len(sent[src, dst, kind]), len(received[src, dst, kind])
        if a != b:
            raise ScheduleError(f"stage {src} sends {a} {kind}(s) to stage {dst}, which receives "
                                f"{b}: the sends and receives do not pair")
    made_by = {r: op for channel in received for r, op in zip(received[channel], sent[channel])}
    for r, op in made_by.items():
        check_use(stages, r, op, v)
    return made_by


def check_use(stages, r, op, v):
    """The received tensor r, made by op on stage r.src, is used by the operation next to op
    in the model: the same micro-batch's, one virtual stage (chunk c of stage s: c p + s) on."""
    p = len(stages)
    step = 1 if r.kind == "activation" else -1
    target = op.chunk * p + r.src + step
    want = Op(op.kind, op.microbatch, target // p) if target % p == r.dst else None
    used = stages[r.dst].used_by.get(r)
    if used != want or want is None:
        says = lambda o: o.label(v) if o else "no operation"
        raise ScheduleError(f"stage {r.dst} received from stage {r.src} the {r.kind} of "
                            f"{says(op)} there, and {says(used)} used it: {says(want)} should "
                            "have")


def check_ops(stages, v, m):
    """Each stage runs every micro-batch forward and backward through each of its chunks once,
    on what its neighbours sent, except the first virtual stage's forwards and the last's
    backwards."""
    p = len(stages)
    for stage in stages:
        ops = [e for e in stage.events if isinstance(e, Op)]
        want = [Op(k, i, c) for k in "FB" for i in range(m) for c in range(v)]
        if Counter(ops) != Counter(want):
            raise ScheduleError(f"stage {stage.rank} runs {len(ops)} operations, not each of the "
                                f"{len(want)} forwards and backwards once")
        fed = set(stage.used_by.values())
        for op in want:
            own = (op.kind, op.chunk * p + stage.rank) in (("F", 0), ("B", p * v - 1))
            if not own and op not in fed:
                raise ScheduleError(f"stage {stage.rank}'s {op.label(v)} ran on nothing "
                                    "received: its schedule never asked for its input")


def time_steps(stages, made_by):
    """Each stage's [(step, Op)]: an operation takes one step; a stage that reaches an exchange
    goes on once every stage in the exchange has reached it."""
    reached, clock = {}, [0] * len(stages)
    done, steps = [0] * len(stages), [[] for _ in stages]
    moved = True
    while moved:
        moved = False
        for stage in stages:
            r = stage.rank
            while done[r] < len(stage.events):
                event = stage.events[done[r]]
                if isinstance(event, Op):
                    steps[r].append((clock[r], event))
                    clock[r] += 1
                else:
                    ends, partners = exchange_ends(stage, event, made_by, stages)
                    for end in ends:
                        reached.setdefault(end, clock[r])
                    if any(end not in reached for end in partners):
                        break
                    clock[r] = max([clock[r]] + [reached[end] for end in partners])
                done[r] += 1
                moved = True
    stuck = [f"stage {s.rank} after {len(steps[s.rank])} operations"
             for s in stages if done[s.rank] < len(s.events)]
    if stuck:
        raise ScheduleError(f"the schedule deadlocks: {', '.join(stuck)} wait(s) in an exchange "
                            "whose other side never comes")
    return steps


def exchange_ends(stage, exchange, made_by, stages):
    """(this exchange's ends, the other sides'): a send as ("send", the Op sent, peer), a
    receive as ("recv", the Op it brings, its stage)."""
    ends = [("send", op, peer) for peer, _, op in exchange.sends] + \
        [("recv", made_by[r], stage.rank) for r in exchange.receives]
    partners = [("recv", op, peer) for _, op, peer in ends[:len(exchange.sends)]] + \
        [("send", made_by[r], stage.rank) for r in exchange.receives]
    return ends, partners


def receipts(stage, made_by, v):
    """Stage's exchanges that receive, in order: (the operations since the one before, what
    arrives: "a F3.1" the input of F3.1, "g B2.0" the output gradient of B2.0)."""
    rows, since = [], []
    for event in stage.events:
        if isinstance(event, Op):
            since.append(event.label(v))
        elif event.receives:
            got = [f"{r.kind[0]} {stage.used_by[r].label(v)}" for r in event.receives]
            rows.append((" ".join(since) or "(start)", ", ".join(got)))
            since = []
    return rows


def grid(steps, v, columns):
    """A row a stage, a column a time step, in blocks as wide as the terminal."""
    width = max(len(op.label(v)) for ops in steps for _, op in ops)
    span = max(t for ops in steps for t, _ in ops) + 1
    at = [{t: op.label(v) for t, op in ops} for ops in steps]
    head = len(f"stage {len(steps) - 1}:")
    per_block = max(1, (columns - head) // (width + 1))
    lines = []
    for first in range(0, span, per_block):
        block = range(first, min(span, first + per_block))
        lines += [""] * (first > 0) + ["step".ljust(head) + "".join(f" {t + 1:>{width}}"
                                                                   for t in block)]
        lines += [f"stage {r}:".ljust(head) + "".join(f" {row.get(t, '.'):>{width}}"
                                                      for t in block)
                  for r, row in enumerate(at)]
    return lines


@dataclass
class Simulation:
    """A schedule's run on every stage: the function's name, the sizes, the stages' records,
    {Received: the Op that made it}, and each stage's [(step, Op)]."""
    name: str
    p: int
    v: int
    m: int
    stages: list
    made_by: dict
    steps: list


def simulate(p, v, m, schedule):
    """Every stage's run of the schedule, paired, checked and put on time steps."""
    runs = [run_stage(p, v, m, schedule, rank) for rank in range(p)]
    stages = [stage for _, stage in runs]
    made_by = pair(stages, v)
    check_ops(stages, v, m)
    return Simulation(runs[0][0], p, v, m, stages, made_by, time_steps(stages, made_by))


def report(run, receives):
    """The lines to print: the legend, each stage's order, the time steps (and the receives)."""
    name, p, v, m, steps = run.name, run.p, run.v, run.m, run.steps
    chunks = f", v = {v} chunks each" if v > 1 else ""
    lines = [f"{NAMES[name]}: schedules.{name}",
             f"p = {p} stage{'s' * (p > 1)}{chunks}, m = {m} micro-batch{'es' * (m > 1)}"]
    if v > 1:
        lines += ["F3.1: micro-batch 3's forward through chunk 1 of the stage, B3.1 its backward;",
                  "micro-batches from 1 (the paper's figures), chunks from 0 (stage s's chunk c: "
                  "virtual stage c p + s)"]
    else:
        lines += ["F3: micro-batch 3's forward, B3 its backward; micro-batches from 1 (the "
                  "paper's figures)"]
    lines += ["", "each stage's order:"]
    lines += [f"stage {r}: " + " ".join(op.label(v) for _, op in ops) for r, ops in
              enumerate(steps)]
    lines += ["", "time steps (a forward or backward a step; '.': the stage waits):"]
    lines += grid(steps, v, shutil.get_terminal_size((100, 24)).columns)
    if receives:
        lines += ["", "each exchange that receives, after the operations since the one before: "
                  "a F3.1, the input", "of F3.1 (an activation); g B3.1, the output gradient "
                  "of B3.1:"]
        for stage in run.stages:
            rows = receipts(stage, run.made_by, v)
            pad = max(len(ran) for ran, _ in rows) if rows else 0
            lines += [f"stage {stage.rank}:"] + [f"  {ran:<{pad}}  -> {got}" for ran, got in rows]
    return lines


def get_args(argv=None):
    parser = ArgumentParser(prog="scripts/print_schedule.py",
                            description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline_model_parallel_size", type=int, default=4, metavar="P",
                        help="stages (default 4, the paper's Figs. 3 and 4)")
    parser.add_argument("--virtual_pipeline_model_parallel_size", type=int, default=None,
                        metavar="V", help="V chunks per stage: the interleaved 1F1B schedule")
    parser.add_argument("--num_microbatches", type=int, default=8, metavar="M",
                        help="micro-batches a step (default 8); parallel_train.py's is the "
                             "replica's rows / --micro_batch_size")
    parser.add_argument("--pipeline_schedule", choices=["1f1b", "gpipe", "interleaved"],
                        default="1f1b", metavar="{1f1b,gpipe}")
    parser.add_argument("--receives", action="store_true",
                        help="also what each exchange of each stage receives, and for which "
                             "operation")
    args = parser.parse_args(argv)
    check_sizes(parser, args)
    args.v = args.virtual_pipeline_model_parallel_size or 1
    return args


def check_sizes(parser, args):
    """What the schedules cannot run, in parallel_train.py's words where it has them."""
    p, v, m = (args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size,
               args.num_microbatches)
    for flag, value in (("--pipeline_model_parallel_size", p), ("--num_microbatches", m)):
        if value <= 0:
            parser.error(f"{flag} must be a positive integer, got {value}")
    if args.pipeline_schedule == "interleaved":
        parser.error("--pipeline_schedule is 1f1b or gpipe, as parallel_train.py's: the "
                     "interleaved 1F1B schedule is --virtual_pipeline_model_parallel_size V")
    if v is not None and (v <= 1 or p == 1):
        parser.error(f"--virtual_pipeline_model_parallel_size {v} gives each pipeline stage "
                     "several chunks: it needs --pipeline_model_parallel_size 2 or more and a "
                     "size of 2 or more")
    if v is not None and args.pipeline_schedule == "gpipe":
        parser.error("--virtual_pipeline_model_parallel_size runs the interleaved 1F1B "
                     "schedule; leave out --pipeline_schedule gpipe")
    if v is not None and m % p != 0:
        parser.error(f"the interleaved schedule runs micro-batches in groups of the pipeline "
                     f"size {p} (as Megatron's): --num_microbatches {m} is not a multiple of {p}")


def main(argv=None):
    args = get_args(argv)
    run = simulate(args.pipeline_model_parallel_size, args.v, args.num_microbatches,
                   args.pipeline_schedule)
    print("\n".join(report(run, args.receives)))


if __name__ == "__main__":
    run_cli(main)
