"""Everything a training loop does besides the step, behind one call: `logbook.step(it, loss)`.

The losses stay on the device until a log point: reading one every step
would make the CPU wait for the GPU (and the collectives) each time. A log
point comes every --update_freq iterations, every --eval_interval, at every
checkpoint and at the last iteration. There the logbook

  * copies the pending losses to the host (one copy) and prints the original's
    "Iter N Train Loss" lines (the sum of the last --update_freq losses);
  * computes the validation loss when it is due;
  * gathers every tensor-parallel rank's losses and writes them to metrics.csv,
    then checks that they are bitwise equal;
  * stops a run whose loss is not finite, at its first such iteration;
  * saves a checkpoint when one is due, after that iteration's rows are on disk.

Used as a context manager, it writes every row so far however the loop ends.
"""

import math
import os
import sys

import torch

from core import parallel_state as ps
from core import wire
from core.parallel_state import UserError
from training.metrics import EARLIER_RUN, moe_layers_on_rank_0
from training.operations import Terminated


def earlier_run_note(out_dir):
    """Where an earlier run in out_dir was set aside, for an error that ends this one."""
    aside = os.path.join(out_dir, EARLIER_RUN)
    return f" (the earlier run there is in {aside})" if os.path.isdir(aside) else ""


class TrainingStopped(UserError, RuntimeError):
    """Training cannot go on (the loss is not finite, or ranks disagree); the message says why."""


class Logbook:
    """args: the run's flags (update_freq, eval_interval, num_iterations, init_lr, out_dir).
    validate: returns the validation loss. metrics: a MetricsWriter, or None on
    ranks that don't write. log_prefix: put before each printed line; None prints
    nothing. start: the iteration a resumed run starts after.
    """

    def __init__(self, args, validate, metrics=None, log_prefix="", start=0):
        self.args, self.validate, self.metrics = args, validate, metrics
        self.log_prefix = log_prefix
        self.said_what_it_is = False  # what "Train Loss" sums, said before the first one
        self.save, self.save_interval = None, None
        self.rows, self.pending, self.unwritten, self.running = [], [], [], 0.0
        self.pending_norms = []  # with --clip_grad, each step's gradient norm
        self.pending_loads = []  # with --num_experts, each step's load (metrics.moe_load)
        self.start = start
        self.first_step_comm = {}  # the collectives of the first step; stays empty if none ran
        self.first_step_tallies = {}  # and wire.tally's counts

    def save_every(self, interval, save):
        """Call save(iteration) every `interval` iterations, once that iteration's rows are on
        disk."""
        self.save, self.save_interval = save, interval

    def step(self, it, loss, grad_norm=None, load=None):
        if not self.pending and not self.rows:
            self.first_step_comm = wire.comm_stats()
            self.first_step_tallies = dict(wire.comm_tallies)
        self.pending.append(loss.detach())
        if grad_norm is not None:
            self.pending_norms.append(grad_norm.detach())
        if load is not None:
            self.pending_loads.append(load)
        args = self.args
        evaluating = it % args.eval_interval == 0 or it == args.num_iterations
        # Every save_interval iterations and at the end, as Megatron does.
        saving = self.save is not None and (it % self.save_interval == 0
                                            or it == args.num_iterations)
        if it % args.update_freq == 0 or evaluating or saving:
            self._log_point(it, evaluating, saving)

    def _log_point(self, it, evaluating, saving):
        losses = torch.stack(self.pending).to("cpu", torch.float64)  # one device-to-host copy
        diverged = next((k for k, v in enumerate(losses.tolist()) if not math.isfinite(v)), None)
        if diverged is not None:  # the same on every rank: they share the loss
            losses = losses[:diverged + 1]
        first = it - len(self.pending) + 1
        new_rows = [[first + k, v, None, norm, load] for k, (v, norm, load) in
                    enumerate(zip(losses.tolist(), *self._pending_extras()))]
        self.rows += new_rows
        self.pending, self.pending_norms, self.pending_loads = [], [], []
        self.unwritten = new_rows
        if evaluating and diverged is None:
            self.rows[-1][2] = self.validate()
        self._print(new_rows, it)
        rank_losses = self._losses_of_every_rank(losses)
        if self.metrics:  # written before the check, so a disagreement is on disk to look at
            self.metrics.write(new_rows, rank_losses)
        self.unwritten = []
        check_ranks_agree(rank_losses, self.rows[-1][0])
        if diverged is not None:
            iteration, loss = self.rows[-1][:2]
            raise TrainingStopped(
                f"the train loss is {loss} at iteration {iteration}: training diverged; lower "
                f"--init_lr (now {self.args.init_lr:g}). Metrics up to it are in "
                f"{os.path.join(self.args.out_dir, 'metrics.csv')}; no model.pt was written"
                f"{earlier_run_note(self.args.out_dir)}")
        if saving:
            if self.metrics:
                self.metrics.flush()  # a resumed run keeps exactly the rows up to its checkpoint
            self.save(it)

    def _pending_extras(self):
        """The pending steps' gradient norms and MoE loads as floats (a device-to-host copy
        each), or Nones."""
        n = len(self.pending)
        as_floats = lambda ts: torch.stack(ts).to("cpu", torch.float64).tolist() if ts else \
            [None] * n
        return as_floats(self.pending_norms), as_floats(self.pending_loads)

    def _print(self, new_rows, it):
        for row in new_rows:
            self.running += row[1]
            if row[0] % self.args.update_freq == 0:
                if self.log_prefix is not None:
                    if self.log_prefix in ("", "Rank 0 ") and not self.said_what_it_is:
                        if who_prints := _who_prints():
                            log(who_prints)
                        log(f"(Train Loss: the sum of the last {self.args.update_freq} "
                            "iterations' losses, as the original prints it; metrics.csv has "
                            "each iteration's)")
                        self.said_what_it_is = True
                    log(f"{self.log_prefix}Iter {row[0]} Train Loss {self.running:.3f}")
                self.running = 0.0
        if self.rows[-1][2] is not None and self.log_prefix is not None:
            log(f"{self.log_prefix}Iter {it} Valid Loss {self.rows[-1][2]:.6f}")

    def _losses_of_every_rank(self, losses):
        """(tp, k): every tensor-parallel rank's last k losses (one all-gather); (1, k) serially."""
        if not ps.model_parallel_is_initialized():
            return losses[None]
        gathered = wire.all_gather(losses.to(wire.get_device()),
                                   ps.get_tensor_model_parallel_group())
        return gathered.view(ps.get_tensor_model_parallel_world_size(), -1).cpu()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.metrics:  # every row so far reaches the disk, however the loop ends
            # Interrupted before a log point wrote them: no collective now, so no per-rank losses.
            first_pending = self.rows[-1][0] + 1 if self.rows else self.start + 1
            self.unwritten += [[first_pending + k, float(t), None, norm, load]
                               for k, (t, norm, load) in
                               enumerate(zip(self.pending, *self._pending_extras()))]
            if self.unwritten:
                self.metrics.write(self.unwritten, rank_losses=None)
            self.metrics.close()
            if exc[0] is not None and issubclass(exc[0], (KeyboardInterrupt, Terminated)):
                # Ctrl-C or SIGTERM (torchrun's, or kill): say what is on disk, and where an
                # earlier run went, before run_cli leaves with 130 or 143.
                last = self.metrics.rows[-1][0] if len(self.metrics.rows) > 1 else self.start
                print(f"stopped at iteration {last}: {self.metrics.path} has its rows so far"
                      f"{earlier_run_note(self.args.out_dir)}", file=sys.stderr, flush=True)
        return False


def _who_prints():
    """Why only the first tensor-parallel group prints the loss, said once where the other ranks
    hold it too (finalize_model_grads returns the same loss on every rank); None otherwise."""
    if not ps.model_parallel_is_initialized():
        return None
    tp, pp = (ps.get_tensor_model_parallel_world_size(),
              ps.get_pipeline_model_parallel_world_size())
    dp = ps.get_data_parallel_world_size()
    if pp == 1 and dp == 1:
        return None
    steps = ([f"computed on the last of the {pp} pipeline stages"] * (pp > 1)
             + [f"averaged over the {dp} data-parallel replicas"] * (dp > 1)
             + ["broadcast to the other stages"] * (pp > 1))
    how = ", ".join(steps[:-1]) + (" and " if len(steps) > 1 else "") + steps[-1]
    printers = ("rank 0 prints it" if tp == 1 else
                f"ranks {'0 and 1' if tp == 2 else f'0 to {tp - 1}'} (the first "
                + "stage's first " * (pp > 1) + "tensor-parallel group) print it")
    return f"(The loss is {how}, so every rank holds it; {printers})"


def log(line):
    """One write per line, so lines from several ranks on one terminal don't interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def check_ranks_agree(losses, iteration):
    """Every tensor-parallel rank computes the loss from the same all-reduced output: bitwise
    equal."""
    bits = losses.view(torch.int64)  # bit patterns: a NaN on every rank is agreement too
    if not torch.equal(bits, bits[:1].expand_as(bits)):
        raise TrainingStopped("tensor-parallel ranks disagree on the loss by iteration "
                              f"{iteration}: {losses[:, -1].tolist()}; the replicated parameters "
                              "have drifted apart")


def _kib(nbytes):
    """KiB to 2 decimals; a few bytes (the clipping norm's 4) to 4, not shown as 0.00."""
    return f"{nbytes / 1024:.2f}" if nbytes == 0 or nbytes >= 1024 / 100 else f"{nbytes / 1024:.4f}"


def report_communication(stats, args, tallies=None):
    """Print what one step sent beside what the papers count, in bytes a ring moves per rank;
    `tallies`: the step's wire.tally counts (expert parallelism's routed rows)."""
    tp, rows = args.tensor_model_parallel_size, args.batch_size // ps.get_data_parallel_world_size()
    print("Communication in one training step (measured in its first step, "
          f"tensor-parallel size {tp}):")
    print(f"  {'collective':<23}{'calls':>5}{'bytes in, per rank':>20}"
          f"{'sent per rank in a ring':>25}")
    for op, c in stats.items():
        print(f"  {op:<22} x{c['calls']:<4}{_kib(c['bytes']):>15} KiB"
              f"{_kib(c['ring_bytes']):>21} KiB")
    if "grad_norm_all_reduce" in stats:  # over whom: training/clip_grads.py's get_grad_norm
        over = ("every rank at once (the distributed optimizer's shards)"
                if getattr(args, "use_distributed_optimizer", False) else
                "the tensor-parallel group" + (", then over the pipeline's stages by "
                                               "grad_norm_pipeline_all_reduce"
                                               if "grad_norm_pipeline_all_reduce" in stats else ""))
        print(f"  grad_norm_all_reduce: --clip_grad's squared gradient norm, summed over {over} "
              "(training/clip_grads.py)")
    if getattr(args, "tp_reduce_dtype", "activation") == "float32":
        print("  --tp_reduce_dtype float32: the bf16 activations are summed as fp32, twice the "
              "bytes the papers count below")
    if tp == 1:
        print(f"  {_what_ran_at_tp_1(stats)}")
    if getattr(args, "context_parallel_size", 1) > 1:
        _report_context_parallel_papers(args, stats)
    if getattr(args, "expert_model_parallel_size", 1) * getattr(
            args, "expert_tensor_parallel_size", 1) > 1:
        _report_expert_parallel_formula(args, stats, tallies or {})
    if getattr(args, "pipeline_model_parallel_size", 1) > 1:
        _report_pipeline_papers(args, tp)
        return
    if tp == 1:
        return
    if args.model == "transformer":
        _report_transformer_papers(args, tp, rows)
        return
    kib = rows * args.input_size * args.torch_dtype.itemsize / 1024  # one batch x input activation
    # A ring all-reduce = reduce-scatter + all-gather.
    all_reduce, half = 2 * (tp - 1) / tp * kib, (tp - 1) / tp * kib
    megatron = (f"Megatron-LM (Sec. 3, Fig. 3a): 2 all-reduces of batch x input = "
                f"{rows}x{args.input_size} ({kib:.2f} KiB) per MLP step, g in forward and f in "
                f"backward, {all_reduce:.2f} KiB sent each: {2 * all_reduce:.2f} KiB.")
    if not args.sequence_parallel:
        print(f"  {megatron}\n  f's all-reduce of dL/dX is skipped here: X is the raw data and "
              "needs no gradient.")
        return
    print(f"  Korthikanti et al. (2022, Sec. 4.2.2): per MLP step, forward 1 all-gather + 1 "
          f"reduce-scatter, backward 2 all-gathers + 1 reduce-scatter, of {rows}x{args.input_size} "
          f"({kib:.2f} KiB), {half:.2f} KiB sent each: {5 * half:.2f} KiB.\n"
          f"  Without --sequence_parallel, {megatron}\n"
          f"  Each all-reduce became a reduce-scatter + an all-gather of the same bytes; the "
          f"{half:.2f} KiB more is the backward all-gather of fc1's input, the price of saving "
          f"only this rank's rows of it.\n"
          f"  The backward reduce-scatter of dL/dX is skipped here: X is the raw data and needs no "
          f"gradient. The small all-reduce sums fc's gradient and the loss over the rows.")


# Who sends each row at tensor-parallel size 1 (core/distributed, core/optimizer,
# core/pipeline_parallel, training/clip_grads.py).
SENT_BY = {"dp_all_reduce": "the data-parallel (and context-parallel) average of the parallel "
                            "layers' gradients",
           "replicated_all_reduce": "the data-parallel (and context-parallel) average of the "
                                    "other layers' gradients and the loss",
           "dp_reduce_scatter": "the distributed optimizer's gradient shards",
           "dp_all_gather": "the distributed optimizer's updated parameters",
           "pipeline_send": "the activations and their gradients between pipeline stages",
           "pipeline_loss_broadcast": "the loss, from the last stage to the others",
           "embedding_all_reduce": "the tied embedding's gradient over the first and last stages",
           "grad_norm_all_reduce": "--clip_grad's norm",
           "cp_ring_send": "the ring's K/V blocks (context parallelism, below)",
           "cp_ring_send_grad": "the ring's K/V gradients, back",
           "cp_all_gather": "the context ranks' K/V, gathered",
           "cp_reduce_scatter": "the gathered K/V's gradients, back",
           "cp_all_to_all": "Q, K, V and the output, heads traded for tokens",
           "grad_norm_pipeline_all_reduce": "--clip_grad's norm over the stages",
           "expert_dp_all_reduce": "the experts' gradients over the ranks holding them",
           "grad_norm_expert_all_reduce": "--clip_grad's norm of the experts, over their group",
           "moe_all_to_all": "the tokens to their experts and back (expert parallelism, below)",
           "moe_counts_all_gather": "the tokens per expert, before the all-to-all",
           "moe_all_gather": "every rank's tokens, gathered for the experts (below)",
           "moe_reduce_scatter": "the experts' outputs, summed back to their tokens' ranks",
           "moe_tokens_per_expert_all_reduce": "the load-balancing loss's token counts",
           "moe_load_all_reduce": "the step's tokens per expert, for metrics.csv"}


def _what_ran_at_tp_1(stats):
    """At tensor-parallel size 1 f and g are identities: say so, and what the rows are."""
    said = "Tensor-parallel size 1: no tensor-parallel collective ran (the papers' f and g are " \
           "identities; their counts start at size 2)"
    if not stats:
        return said + "; nothing was sent."
    return said + "; what ran is data, context and pipeline parallelism's: " + "; ".join(
        f"{op}, {SENT_BY.get(op, 'see its @wire.collective')}" for op in stats) + "."


def _report_pipeline_papers(args, tp):
    """Narayanan et al.'s count of the point-to-point traffic, for the first stage (this rank)."""
    shape = args.pipeline_tensor_shape  # as the schedule agrees it (parallel_train.py)
    kib = math.prod(shape) * args.torch_dtype.itemsize / 1024
    m, v = args.num_microbatches, args.virtual_pipeline_model_parallel_size or 1
    print(f"  Narayanan et al. (2021, Sec. 2.2): per micro-batch and stage boundary one activation "
          f"forward and its gradient back, {'x'.join(map(str, shape))} ({kib:.2f} KiB) each; the "
          f"first stage sends m (2v - 1) = {m * (2 * v - 1)} of them ({m} micro-batches, {v} "
          f"chunk(s)): {m * (2 * v - 1) * kib:.2f} KiB."
          + (" The tensor-parallel collectives above run per micro-batch, on this stage's layers."
             if tp > 1 else ""))


# What each context-parallel variant sends per block and micro-batch, in units of one of this
# rank's Q, K, V or O blocks (rows x heads / TP x s / C x head_dim), forward and backward, as a
# ring moves them: core/context_parallel/attention.py.
CP_SENT = {"p2p": lambda c: (2 * (c - 1), 2 * (c - 1)),  # C - 1 steps of K and V; dK, dV back
           "all_gather": lambda c: (2 * (c - 1), 2 * (c - 1)),  # the others' K, V; reduce-scatter
           "a2a": lambda c: (4 * (c - 1) / c, 4 * (c - 1) / c)}  # Q, K, V there and O back


def _report_context_parallel_papers(args, stats):
    """The context-parallel variant's bytes by the formula, beside the table's cp_ rows."""
    c, tp, variant = args.context_parallel_size, args.tensor_model_parallel_size, args.cp_comm_type
    blocks = args.num_layers // args.pipeline_model_parallel_size  # this (the first) stage's
    passes = 2 if args.recompute_granularity else 1  # recomputation runs attention's forward again
    block = (args.micro_batch_size * args.num_attention_heads // tp * args.seq_length // c
             * args.input_size // args.num_attention_heads * args.torch_dtype.itemsize / 1024)
    forward, backward = CP_SENT[variant](c)
    per_block = (passes * forward + backward) * block
    total = per_block * blocks * args.num_microbatches
    measured = sum(row["ring_bytes"] for op, row in stats.items() if op.startswith("cp_")) / 1024
    what = {"p2p": "the ring: C - 1 steps of a K and a V block forward, their gradients back "
                   "(the received blocks are kept for backward, not sent again as Transformer "
                   "Engine does)",
            "all_gather": "K and V all-gathered, (C - 1)/C of C blocks each, their gradients "
                          "reduce-scattered back",
            "a2a": "Q, K, V to their heads' ranks and O back, (C - 1)/C of each, the same in "
                   "backward"}[variant]
    print(f"  Context parallelism, --cp_comm_type {variant} at C = {c}: {what}. One block of "
          f"{args.micro_batch_size}x{args.num_attention_heads // tp}x{args.seq_length // c}x"
          f"{args.input_size // args.num_attention_heads} ({block:.2f} KiB) per block and "
          f"micro-batch: forward {forward:g}"
          + (" (x2, recomputed)" if passes == 2 else "") + f", backward {backward:g}; "
          f"{blocks} block(s) x {args.num_microbatches} micro-batch(es): {total:.2f} KiB; the "
          f"cp_ rows above: {measured:.2f} KiB"
          + (" (met)." if abs(measured - total) <= 1e-9 * max(total, 1) else " (differs!)."))


def _report_expert_parallel_formula(args, stats, tallies):
    """The token dispatcher's bytes (core/transformer/moe/token_dispatcher.py) by their formula,
    beside the table's moe_ rows: per MoE layer of rank 0 and micro-batch, T tokens of width H
    (T = micro-batch rows x sequence / TP under sequence parallelism / C), b bytes each."""
    tp = args.tensor_model_parallel_size if args.sequence_parallel else 1
    t = args.micro_batch_size * args.seq_length // tp // args.context_parallel_size
    h, b, e = args.input_size, args.torch_dtype.itemsize, args.num_experts
    layers = moe_layers_on_rank_0(args)
    n = layers * args.num_microbatches  # the dispatches in the step (each forward's)
    passes = 2 if args.recompute_granularity == "full" else 1  # forward run again in backward
    pb = max(b, 4)  # the probabilities' bytes: fp32 at least (moe_utils.py)
    ep, etp = args.expert_model_parallel_size, args.expert_tensor_parallel_size
    if args.moe_token_dispatcher_type == "alltoall":
        sent, received, gathered = (tallies.get(f"moe_rows_{k}", 0) // passes
                                    for k in ("sent", "received", "gathered"))
        formula = {"moe_all_to_all": (passes + 1) * (sent + received) * h * b * (ep > 1),
                   "moe_counts_all_gather": passes * n * e * 8,
                   # ETP: the received rows to each ETP rank, the gathered partial sums back
                   "moe_tp_all_to_all": (passes + 1) * (etp * received + gathered) * h * b
                   * (etp > 1)}
        formula = {op: value for op, value in formula.items() if value}
        what = (f"the all-to-all, the tokens out and back, in forward (x{passes}) and backward: "
                f"(sent + received) rows x H {h} x {b} B each, the rows the routing gave rank 0 in "
                f"the step: {sent} sent (layers x micro-batches x T x K = {n} x {t} x "
                f"{args.moe_router_topk} = {n * t * args.moe_router_topk} when none is dropped), "
                f"{received} received; before each forward's, the E = {e} counts (int64) "
                "all-gathered" + (f"; ETP {etp}: the received rows copied to every ETP rank "
                                  f"and the {gathered} gathered rows' partial outputs sent back, "
                                  "(ETP x received + gathered) rows each way" if etp > 1 else ""))
    else:  # over the ETP x EP ranks
        formula = {"moe_all_gather": n * (passes * t * (h * b + e * (pb + 1)) + t * h * b),
                   "moe_reduce_scatter": n * ep * etp * t * ((passes + 1) * h * b + e * pb)}
        what = (f"every rank's T = {t} tokens, probabilities ({pb} B) and routing (1 B) "
                f"gathered in forward (x{passes}), the outputs' gradients in backward; the outputs "
                f"reduce-scattered in forward, the gathered tokens' and probabilities' gradients "
                f"in backward, EP x as many rows; whatever the routing")
    met = all(stats.get(op, {}).get("bytes") == value for op, value in formula.items())
    print(f"  Expert parallelism, --moe_token_dispatcher_type {args.moe_token_dispatcher_type} "
          f"at EP = {ep}" + (f", ETP = {etp}" if etp > 1 else "") + f", {layers} MoE layer(s) x "
          f"{args.num_microbatches} micro-batch(es): {what}: "
          + ", ".join(f"{op} {value / 1024:.2f} KiB" for op, value in formula.items())
          + " in, per rank; the moe_ rows above" + (" (met)." if met else " (differ!)."))


def _report_transformer_papers(args, tp, rows):
    """The paper's count for the toy transformer, beside the table report_communication printed."""
    # (Under context parallelism each rank holds s / C of the tokens.)
    tokens = rows * args.seq_length // getattr(args, "context_parallel_size", 1)
    size = args.torch_dtype.itemsize
    kib = tokens * args.input_size * size / 1024  # batch x sequence x width
    layers = args.num_layers
    logits = tokens * args.vocab_size * size / 1024
    print(f"  Megatron-LM (Sec. 3, Fig. 4): per block 2 all-reduces of batch x sequence x width = "
          f"{rows}x{tokens // rows}x{args.input_size} ({kib:.2f} KiB) in forward (g) and 2 in "
          f"backward (f); {layers} block(s): {4 * layers}. The embedding's lookups: 1 in forward. "
          f"The output layer: f on the hidden states, 1 in backward; the cross-entropy: the max, "
          f"then the sum of exponentials with the target's logit, {3 * tokens * size / 1024:.2f} "
          f"KiB per rank in all, instead of gathering {logits:.2f} KiB of logits "
          f"(tensor-parallel size {tp}).")
    if args.sequence_parallel:
        print("  With --sequence_parallel (Korthikanti et al., 2022, Sec. 4.2.2): each block's "
              "all-reduces become a reduce-scatter and an all-gather, the blocks' inputs are "
              "all-gathered again in backward, the sequence is gathered before the output layer, "
              "and one small all-reduce sums the LayerNorms' and biases' gradients.")
    if args.recompute_granularity == "full":
        print("  With --recompute_granularity full (Korthikanti et al., 2022, Sec. 5): backward "
              "runs every block's forward again, and its collectives with it"
              + (", after an all-gather of the 1/TP of the block's input each rank kept "
                 "(--distribute_saved_activations)." if args.distribute_saved_activations else
                 "."))
