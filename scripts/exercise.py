"""Exercises: break one thing in a copy of the code, run it, and see what catches it.

    python scripts/exercise.py --list              the exercises, one line each
    python scripts/exercise.py NAME                one exercise, in a temporary copy
    python scripts/exercise.py NAME --keep DIR     the same, the copy and its runs kept in DIR

Each exercise copies the repository's files (git ls-files, as tests/mutants.py copies them),
makes the small data it needs and the reference runs on the unmodified copy, then makes one edit
in one file (one exact text replacement, which must occur exactly once), prints the diff and
runs the broken code: short serial and parallel runs, compare_runs.py, a benchmark's measure.
It prints the lines that tell, the question and the answer. The working tree is never touched.
docs/exercises.md has every exercise with the output of a run.

The runs go through a launcher: by default new processes, `python script` and `python
scripts/launch.py --standalone --nproc_per_node N script` (torchrun) in the copy;
tests/test_exercises.py gives the session's rank processes instead (tests/distributed.py).
"""

import dataclasses
import difflib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    sys.path.insert(0, ROOT)  # this copy's modules (a worker in a copy imports the copy's)

from training.operations import ArgumentParser, UserError, check_output, run_cli  # noqa: E402


def _mutants():
    """tests/mutants.py's MUTANTS: the edits shared with it are written once, there."""
    spec = importlib.util.spec_from_file_location("_exercise_mutants",
                                                  os.path.join(ROOT, "tests", "mutants.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MUTANTS = _mutants()


# ---------------------------------------------------------------------------
# The runs' flags.

# The toy model, small and short: 24 iterations of hidden size 256, the ranks' agreement checked
# (and the loss printed) every 4, validation at 12 and 24.
TOY = ["--hidden_size", "256", "--num_iterations", "24", "--update_freq", "4",
       "--eval_interval", "12"]
# The transformer in float64, small: two blocks (a pipeline of two stages holds one each).
TRANSFORMER = ["--model", "transformer", "--input_size", "16", "--hidden_size", "64",
               "--num_attention_heads", "2", "--num_layers", "2", "--num_iterations", "24",
               "--update_freq", "4", "--eval_interval", "12", "--dtype", "float64"]
# The pipeline: 4 micro-batches of 8 rows (the serial run adds the same micro-batches).
MICRO = ["--micro_batch_size", "8"]
CLIP = ["--clip_grad", "5"]
TP2 = ["--tensor_model_parallel_size", "2"]
DP2 = ["--tensor_model_parallel_size", "1"]  # 2 processes, TP 1: two data-parallel replicas
PP2 = ["--tensor_model_parallel_size", "1", "--pipeline_model_parallel_size", "2"]
CP2 = ["--tensor_model_parallel_size", "1", "--context_parallel_size", "2"]
# The transformer's MLPs as 4 experts, top 2, the load-balancing loss on, micro-batches of 8 rows
# (each rank's as serial's: the loss balances each micro-batch); EP 2 on 2 ranks (DP 2).
MOE = ["--num_experts", "4", "--moe_aux_loss_coeff", "0.01", "--micro_batch_size", "8"]
EP2 = ["--tensor_model_parallel_size", "1", "--expert_model_parallel_size", "2",
       "--moe_token_dispatcher_type", "alltoall"]
# Data sets beyond the two models' defaults: name -> (model, prepare_data.py's extra flags).
DATA = {"transformer_period_5": ("transformer", "--period", "5")}
NOISE_SEEDS = (1, 2)


class ExerciseError(UserError):
    """An exercise that cannot run as written: an edit whose text is gone, a run that failed
    where it must not."""


@dataclasses.dataclass
class Exercise:
    name: str
    question: str
    edit: tuple  # (file, text, replacement)
    run: object  # run(lab): the broken code's runs
    answer: str
    data: tuple = ("toy",)  # the data sets it needs
    references: tuple = ()  # the reference runs it needs, made before the edit

    def __post_init__(self):  # the texts as paragraphs, however the source wraps them
        self.question, self.answer = (" ".join(t.split()) for t in (self.question, self.answer))


def edit_from_mutant(name):
    path, old, new, _ = MUTANTS.MUTANTS[name]
    return path, old, new


# ---------------------------------------------------------------------------
# Launchers: how a command runs. launcher(copy, script, args, nproc, env) -> (exit status, output);
# `script` is a path in the copy, nproc None for `python script args`.

def subprocess_launcher(copy, script, args, nproc=None, env=None):
    """New processes in the copy: `python script args`, or scripts/launch.py (torchrun)."""
    cmd = [sys.executable, script, *args] if nproc is None else [
        sys.executable, os.path.join("scripts", "launch.py"), "--standalone",
        "--nproc_per_node", str(nproc), script, *args]
    proc = subprocess.run(cmd, cwd=copy, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True)
    return proc.returncode, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------
# The lab: one copy of the code, its data and reference runs, and what the runs printed.

class Lab:
    """One exercise's copy at `copy`; `shared` holds what exercises may share (the data sets and
    the reference runs, made on unmodified code): {"dir": where new ones go, key: path}."""

    def __init__(self, copy, launcher, shared, echo=print):
        self.copy, self.launcher, self.shared, self.echo = copy, launcher, shared, echo
        self.shared.setdefault("dir", os.path.join(copy, "runs"))
        self.runs = {}  # label: (exit status, output) of every command of the exercise

    def path(self, *parts):
        return os.path.join(self.copy, "runs", *parts)

    def show(self, path):
        """A path as the printed commands name it: from the copy's root when inside it."""
        path = str(path)
        inside = path.startswith(self.copy + os.sep)
        return os.path.relpath(path, self.copy) if inside else path

    def command(self, script, args, nproc=None, env=None):
        """The command line a user types in the copy for this run."""
        launch = f"python scripts/launch.py --standalone --nproc_per_node {nproc} " if nproc \
            else "python "
        prefix = "".join(f"{k}={v} " for k, v in (env or {}).items())
        return prefix + launch + " ".join([script, *(shlex.quote(self.show(a)) for a in args)])

    def launch(self, label, script, args, nproc=None, env=None, expect_ok=None, quiet=False):
        """Run one command in the copy; print it and the lines that tell. expect_ok True or False:
        the exercise stops where the exit status says otherwise."""
        args = [str(a) for a in args]
        env = {"TP_CHECK_COLLECTIVES": "0", **(env or {})}  # the same with either launcher
        shown_env = {k: v for k, v in env.items() if v != "0"}
        self.echo(f"$ {self.command(script, args, nproc, shown_env)}")
        code, out = self.launcher(self.copy, script, args, nproc, env)
        self.runs[label] = (code, out)
        if not quiet:
            for line in telling(out):
                self.echo(f"  {line.replace(self.copy + os.sep, '')}")
            self.echo(f"  (exit status {code})")
        if expect_ok is not None and (code == 0) != expect_ok:
            raise ExerciseError(f"{script} exited with {code}, which this exercise does not "
                                f"expect:\n{out[-3000:]}")
        return code, out

    def data(self, name):
        """A data set (made once per `shared`): a model's default one, or one of DATA."""
        key = f"data_{name}"
        if key not in self.shared:
            directory = os.path.join(self.shared["dir"], key)
            model, *extra = DATA.get(name, (name,))
            self.launch(key, "prepare_data.py", ["--model", model, "--data_dir", directory,
                                                 *extra], expect_ok=True, quiet=True)
            self.shared[key] = directory
        return self.shared[key]

    def reference(self, key):
        """A serial run on unmodified code (made once per `shared`): its --out_dir."""
        if key not in self.shared:
            model, flags, seed = REFERENCES[key]
            out = os.path.join(self.shared["dir"], key)
            args = [*flags, "--data_dir", self.data(model), "--out_dir", out]
            args += ["--reorder_seed", seed] if seed else []
            self.launch(key, "train.py", args, expect_ok=True, quiet=True)
            self.shared[key] = out
        return self.shared[key]

    def noise(self, key):
        return [self.reference(f"{key}_r{k}") for k in NOISE_SEEDS]

    def train(self, label, flags, nproc, model="toy", expect_ok=None, env=None):
        """parallel_train.py on `nproc` processes, into runs/LABEL; its --out_dir."""
        out = self.path(label)
        args = [*flags, "--data_dir", self.data(model), "--out_dir", out]
        self.launch(label, "parallel_train.py", args, nproc, env, expect_ok)
        return out

    def compare(self, label, reference, run, noise=None):
        """compare_runs.py, with --noise where noise runs are given."""
        args = [reference, run] + (["--noise", *noise] if noise else [])
        return self.launch(label, "compare_runs.py", args)


# The reference runs: key: (data set, train.py's flags, --reorder_seed or None).
REFERENCES = {"toy": ("toy", TOY, None), "toy_micro": ("toy", TOY + MICRO, None),
              "transformer": ("transformer", TRANSFORMER, None),
              "transformer_period_5": ("transformer_period_5", TRANSFORMER, None),
              "transformer_moe": ("transformer", TRANSFORMER + MOE, None)}
for _key in ("toy", "transformer"):
    for _k in NOISE_SEEDS:
        REFERENCES[f"{_key}_r{_k}"] = (*REFERENCES[_key][:2], str(_k))

# What a run prints that tells: the loss (first and last), errors, the communication table, the
# memory lines, compare_runs.py's report, the benchmark's memory line.
TELLING = re.compile(
    r"Rank 0 Iter \d+ (Train|Valid) Loss|error:|Error:|^Communication in one|^  \w+ +x\d+ |"
    r"^  grad_norm|^Memory of|^  parameters |^train_loss|^valid_loss|^round-off band|"
    r"^difference / band|leave the band|stay apart|stopped after|: (MATCH|DIFFER) over|"
    r"^activations kept|^torchrun: ")


def telling(out):
    """The lines of `out` that tell, each once, the losses shortened to the first and the last
    two."""
    keep = [line for line in dict.fromkeys(out.splitlines())  # each once: ranks repeat them
            if TELLING.search(line)]
    losses = [line for line in keep if " Train Loss " in line]
    drop = set(losses[1:-2]) if len(losses) > 3 else set()
    return [line for line in keep if line not in drop]


# ---------------------------------------------------------------------------
# The exercises.

def g_skipped(lab):
    run = lab.train("tp2", TOY + TP2, 2, expect_ok=False)
    lab.compare("compare", lab.reference("toy"), run, lab.noise("toy"))


def f_backward_dropped(lab):
    toy = lab.train("toy_tp2", TOY + TP2, 2, expect_ok=True)
    lab.compare("toy_compare", lab.reference("toy"), toy, lab.noise("toy"))
    run = lab.train("transformer_tp2", TRANSFORMER + TP2, 2, "transformer", expect_ok=True)
    lab.compare("transformer_compare", lab.reference("transformer"), run,
                lab.noise("transformer"))


def one_f_one_b_warmup(lab):
    run = lab.train("pp2", TOY + MICRO + PP2, 2, expect_ok=True)
    lab.compare("compare", lab.reference("toy_micro"), run)
    # benchmarks/bench_pipeline.py's memory measure: the bytes each stage's autograd graphs hold
    # at the peak, GPipe's (every micro-batch kept) the unit.
    peaks = {}
    for schedule in ("gpipe", "1f1b"):
        _, out = lab.launch(f"memory_{schedule}", "scripts/exercise.py", [
            "--module", "benchmarks.bench_pipeline", "--worker", "pipeline", "--config", "none",
            "--device", "cpu", "--steps", "1", "--warmup", "0", "--threads", "1",
            "--pipeline_schedule", schedule, "--num_microbatches", "4", "--virtual_size", "1",
            "--real_compute", "1"], 2, expect_ok=True, quiet=True)
        result = json.loads(next(line for line in out.splitlines()
                                 if line.startswith("RESULT "))[len("RESULT "):])
        peaks[schedule] = result["saved_peak_bytes"]
    m, p = 4, 2
    kept = [b / (a / m) for a, b in zip(peaks["gpipe"], peaks["1f1b"])]
    kib = {s: [round(b / 1024, 1) for b in peaks[s]] for s in peaks}
    line = (f"activations kept per stage at the peak, 1F1B, p={p}, m={m}: "
            f"{[round(k, 3) for k in kept]} micro-batches ({kib['1f1b']} KiB; GPipe "
            f"{kib['gpipe']} KiB, all {m}); the paper's p - s: {[p - s for s in range(p)]}")
    lab.runs["memory"] = (0, line)
    lab.echo(f"  {line}")


def tied_embedding_not_summed(lab):
    run = lab.train("pp2", TRANSFORMER + PP2, 2, "transformer", expect_ok=True)
    lab.compare("compare", lab.reference("transformer"), run, lab.noise("transformer"))


def sp_grads_not_summed(lab):
    run = lab.train("sp", TOY + TP2 + ["--sequence_parallel"], 2, expect_ok=True)
    lab.compare("compare", lab.reference("toy"), run, lab.noise("toy"))


def distributed_optimizer_no_all_gather(lab):
    run = lab.train("dp2", TOY + DP2 + ["--use_distributed_optimizer"], 2, expect_ok=True)
    lab.compare("compare", lab.reference("toy"), run, lab.noise("toy"))


def clip_norm_of_one_rank(lab):
    lab.train("tp2", TOY + TP2 + CLIP, 2, expect_ok=False)


def curve_only(flags):
    def run(lab):
        out = lab.train("parallel", TOY + flags, 2, expect_ok=True)
        lab.compare("compare", lab.reference("toy"), out, lab.noise("toy"))
    return run


def cp_positions_plain(lab):
    for data in ("transformer", "transformer_period_5"):
        run = lab.train(f"cp2_{data}", TRANSFORMER + CP2, 2, data, expect_ok=True)
        lab.compare(f"compare_{data}", lab.reference(data), run)


def expert_grads_over_dp(lab):
    run = lab.train("ep2", TRANSFORMER + MOE + EP2, 2, "transformer", expect_ok=True)
    lab.compare("compare", lab.reference("transformer_moe"), run)


def pipeline_shape_under_sp(lab):
    flags = [*TOY, *MICRO, *TP2, "--pipeline_model_parallel_size", "2", "--sequence_parallel"]
    lab.train("checked", flags, 4, expect_ok=False, env={"TP_CHECK_COLLECTIVES": "1"})
    lab.train("unchecked", flags, 4)


TOY_REFS = ("toy", "toy_r1", "toy_r2")
TRANSFORMER_REFS = ("transformer", "transformer_r1", "transformer_r2")

EXERCISES = [
    Exercise(
        "g-skipped", """g's forward all-reduce is dropped: each rank goes on with its own partial
        product Y_i B_i. What notices?""",
        ("core/tensor_parallel/mappings.py",
         "        return _reduce(input_, ps.get_tensor_model_parallel_group())",
         "        return input_"),
        g_skipped, """The ranks' agreement check. Without the sum each rank's output is its own
        partial product, so the replicated fc and the loss differ from rank to rank; the run
        compares the ranks' losses bit for bit every --update_freq iterations and stops at the
        first check. compare_runs.py --noise says DIFFER: the run stopped where the reference
        went on.""", references=TOY_REFS),
    Exercise(
        "f-backward-dropped", """f's backward all-reduce is dropped (g untouched): the gradient
        of a column-parallel layer's input stays each rank's part. Does the toy model notice? The
        transformer?""",
        ("core/tensor_parallel/mappings.py",
         "        return _reduce(grad, ps.get_tensor_model_parallel_group())",
         "        return grad"),
        f_backward_dropped, """The toy model shows nothing, rightly: its X is the raw data,
        which needs no gradient, so f's backward never runs (the communication table has one
        all-reduce, g's, with the edit or without it) and the run still MATCHes. In the
        transformer f's backward carries dL/dX back into the LayerNorm, the residual and the
        embedding: each rank now keeps its heads' share only, and the curve leaves the round-off
        band at once (DIFFER). The communication table counts 7 all-reduces where the correct run
        has 12: the f of each block's attention and MLP and of the output layer, 5 in backward,
        are gone. The ranks' agreement check stays silent: the vocabulary-parallel cross-entropy
        all-reduces its sums, so every rank reports the same loss even while their replicated
        weights drift apart. Only the comparison with serial catches it.""",
        data=("toy", "transformer"), references=TOY_REFS + TRANSFORMER_REFS),
    Exercise(
        "one-f-one-b-warmup", """1F1B's warm-up runs p - s forwards instead of p - s - 1. Is
        anything wrong with the losses? With the memory?""",
        ("core/pipeline_parallel/schedules.py",
         "                 - ps.get_pipeline_model_parallel_rank() - 1, m)",
         "                 - ps.get_pipeline_model_parallel_rank(), m)"),
        one_f_one_b_warmup, """The losses are the serial run's bit for bit (max abs diff 0):
        the schedule changes when each micro-batch's forward and backward run, not what they
        compute, and backward still takes the micro-batches in order. What changes is the memory:
        every stage keeps one micro-batch's activations more at its peak, p - s + 1 instead of
        p - s (the last stage 2 instead of 1: twice its activations). No training run prints
        it; benchmarks/bench_pipeline.py measures it (saved-tensor hooks count the bytes
        autograd holds), GPipe's bytes per micro-batch the unit. A bug no loss curve can show:
        only a memory measure catches it.""",
        references=("toy_micro",)),
    Exercise(
        "tied-embedding-not-summed", """With two pipeline stages the tied word embeddings live
        twice: the lookup's copy on the first stage, the output layer's on the last. What if
        their gradients are not summed?""",
        edit_from_mutant("the tied embedding's gradients not summed across stages"),
        tied_embedding_not_summed, """Each copy steps with the gradient of its own use only, so
        the two copies part after the first step and neither is the serial model's one weight:
        the curve leaves the round-off band at once (DIFFER). The communication table tells it
        too: its embedding_all_reduce row (6.25 KiB in the correct run) is gone. The ranks'
        agreement check cannot help: it compares tensor-parallel ranks, and the last stage
        computes the one loss every stage reports.""",
        data=("transformer",), references=TRANSFORMER_REFS),
    Exercise(
        "sp-grads-not-summed", """Under sequence parallelism the replicated parameters (the
        toy's fc, a transformer's LayerNorms) see 1/TP of the rows on each rank. What if their
        partial gradients are not summed over the tensor-parallel group?""",
        edit_from_mutant("SP partial gradients not summed"),
        sp_grads_not_summed, """Each rank steps fc with the gradient of its own rows: fc is no
        longer one replicated weight but one per rank, and the curve leaves the band (DIFFER).
        The ranks' agreement check stays silent: the toy's loss under SP is a sum over the ranks'
        rows, all-reduced, the same on every rank. The communication table shows it: its
        all_reduce carries 0.0039 KiB, the loss's 4 bytes alone, where the correct run's carries
        0.25 KiB, fc's 64 gradients beside it.""", references=TOY_REFS),
    Exercise(
        "distributed-optimizer-no-all-gather", """The distributed optimizer steps each replica's
        shard of the parameters. What if the all-gather that brings the updated shards to every
        replica is skipped?""",
        edit_from_mutant("the all-gather of the updated parameters skipped"),
        distributed_optimizer_no_all_gather, """Each replica's model takes the update only in
        its own shard; the rest of its parameters stay as they were, so neither replica holds
        the trained model and the curve leaves the band (DIFFER). The communication table has no
        dp_all_gather row (64.12 KiB in the correct run), only the reduce-scatter: half of the
        all-reduce the plain optimizer makes. The memory line is unchanged (10 bytes per
        parameter, the formula's), and no rank check fires (one rank per tensor-parallel
        group).""", references=TOY_REFS),
    Exercise(
        "clip-norm-of-one-rank", """--clip_grad scales the gradients by the global norm. What if
        each tensor-parallel rank takes the norm of its own shards only (the squares not summed
        over the group)?""",
        edit_from_mutant("the norm not all-reduced"),
        clip_norm_of_one_rank, """Each rank clips by another norm, so the replicated fc takes a
        different step on each rank, the replicas drift apart and their losses differ: the ranks'
        agreement check stops the run at its first check. (With the check off, the round-off band
        catches it: tests/inject_bug.py norm_not_all_reduced_to_the_end, docs/precision.md.)"""),
    Exercise(
        "dp-grads-summed", """Data-parallel replicas each hold their own rows' gradients. What if
        they are summed, not averaged?""",
        ("core/distributed/finalize_model_grads.py",
         "    return coalesced.div_(group.size())", "    return coalesced"),
        curve_only(DP2), """The split weights' gradients are d = 2 times too large, a learning
        rate twice the serial run's for fc1 and fc2: the run trains, its loss even goes down
        faster, and nothing inside it can tell; the curve leaves the round-off band (DIFFER).
        (fc's gradient and the loss are averaged by another all-reduce, replicated_all_reduce,
        which still divides.)""", references=TOY_REFS),
    Exercise(
        "g-averaged", """g averages the partial products instead of summing them (a mix-up with
        data parallelism's average). Does the ranks' agreement check catch it?""",
        edit_from_mutant("g's all-reduce averaged"),
        curve_only(TP2), """No: every rank computes the same wrong average, so the ranks agree
        bit for bit and the run goes to its end. The model is another one (fc2's output 1/TP of
        serial's), and its curve leaves the band at once (DIFFER). A check that compares ranks
        catches only the mistakes the ranks make differently.""", references=TOY_REFS),
    Exercise(
        "own-seed-init", """Each rank draws its slice of fc1 and fc2 from a seed of its own,
        instead of slicing one master weight drawn as serial nn.Linear draws it. Is the run still
        correct?""",
        ("parallel_layers.py",
         "    weight = master.weight.detach().chunk(tp_size, dim=partition_dim)[rank]",
         "    own = torch.Generator().manual_seed(1234 + rank)  # each rank a seed of its own\n"
         "    weight = master.weight.detach().chunk(tp_size, dim=partition_dim)[rank].clone()\n"
         "    weight.uniform_(-in_features ** -0.5, in_features ** -0.5, generator=own)"),
        curve_only(TP2), """It trains as serial does: the slices have nn.Linear's
        distribution, the ranks agree (fc is still drawn alike on every rank, and g sums) and the
        loss goes down. But it is another model from its first step, and its curve stays apart
        from serial's, 1e4 to 1e5 times the round-off band (DIFFER). Megatron does exactly this
        on GPUs (_initialize_affine_weight_gpu: each rank its partition, under the RNG tracker's
        stream); slicing one master weight (its use_cpu_initialization) is what makes a parallel
        run comparable with serial at all.""", references=TOY_REFS),
    Exercise(
        "pipeline-shape-under-sp", """A stage receives into a buffer whose shape both sides agree
        on in advance (as Megatron computes it from the sequence length, the micro-batch size and
        the width); under sequence parallelism each rank sends only its 1/TP of the rows. What if
        the receiver forgets that and expects the whole micro-batch?""",
        ("parallel_train.py", "    tp = args.tensor_model_parallel_size if sp else 1",
         "    tp = 1  # the whole micro-batch: sequence parallelism forgotten"),
        pipeline_shape_under_sp, """The sender sends what it computed, 4 rows of each 8-row
        micro-batch; the receiver waits for 8. Nothing in the message says its shape, so only a
        check can tell: with TP_CHECK_COLLECTIVES=1 each tensor is announced before it is sent (a
        header: its number, kind, dtype and shape), and the first one that does not pair stops
        the run (PipelineP2PError, naming both sides). Without the check gloo takes the 4 rows
        into the 8-row buffer and says nothing; the next stage computes on a half-filled buffer
        and fails far from the cause, on a shape in the loss (where the shapes happened to fit,
        it would train on garbage). NCCL would hang."""),
    Exercise(
        "cp-positions-plain", """Context parallelism cuts the sequence into 2C chunks and gives
        rank r chunks r and 2C - 1 - r (the causal load balance). What if the model takes its
        positions from the plain split (rank r: chunk r of C) while the tokens are cut
        load-balanced? Does a run on the default token data notice? On tokens that repeat every
        5?""",
        edit_from_mutant("context parallelism: the load-balanced split with positions from the "
                         "plain one"),
        cp_positions_plain, """On the default data, nothing: MATCH, to round-off (2e-16). Its
        sequences repeat every 4 tokens, and at C = 2 the chunks are 4 tokens long, so the two
        chunks a rank holds under the wrong positions are exactly the tokens that the right
        chunks would hold there (rank 0's tokens 12 to 15 are tokens 4 to 7 again): the model
        sees a relabelled sequence that is the same sequence, keys, queries and targets alike.
        On tokens that repeat every 5 the relabelled sequence is another one, and the curve is
        another curve, 1e-3 relative apart from the first iterations on (DIFFER). A check is
        only as good as the data it runs on: the tests train context parallelism on period 5
        (tests/conftest.py), and this bug passed every C = 2 run until they did.""",
        data=("transformer", "transformer_period_5"),
        references=("transformer", "transformer_period_5")),
    Exercise(
        "expert-grads-over-dp", """Under expert parallelism (EP 2 on 2 ranks, carved out of the
        two data-parallel replicas) rank 0 holds experts 0 and 1 of each MoE layer, rank 1
        experts 2 and 3, and each expert's gradient is summed over the ranks that hold it (the
        expert-data-parallel group, here one rank) and divided by the data-parallel size. What if
        the experts' gradients are averaged over the data-parallel group instead, as every dense
        gradient is? What does the communication table show?""",
        edit_from_mutant("moe: expert gradients averaged over all data-parallel ranks"),
        expert_grads_over_dp, """The curve leaves serial's from the first update (DIFFER): each
        rank's expert i now steps with the sum of its own gradient and the other rank's expert
        i + 2's, a gradient of another expert on other tokens. The table shows it too: an
        expert_dp_all_reduce row, over 2 ranks, where the right code has none (each expert is on
        one rank only, its group one rank wide: nothing to sum). Nothing else complains: the
        ranks do not share a loss to agree on (TP 1), and the sum has the right shapes. Megatron
        marks every expert parameter allreduce = False for this: its DDP keeps them in buffers of
        their own, reduced over the expert-data-parallel group.""",
        data=("transformer",), references=("transformer_moe",)),
]
EXERCISES = {e.name: e for e in EXERCISES}


# ---------------------------------------------------------------------------
# Running one.

def copy_code(into):
    """The repository's files into `into`, as tests/mutants.py copies them (a clean clone's)."""
    MUTANTS.copy_repository(into)


def apply_edit(copy, name, edit):
    """The one replacement; its unified diff. The text must occur exactly once."""
    path, old, new = edit
    with open(os.path.join(copy, path)) as f:
        source = f.read()
    if source.count(old) != 1:
        raise ExerciseError(f"EXERCISE {name!r} NO LONGER APPLIES: the text it replaces occurs "
                            f"{source.count(old)} times in {path} (it must occur once); update "
                            "scripts/exercise.py or tests/mutants.py")
    changed = source.replace(old, new)
    with open(os.path.join(copy, path), "w") as f:
        f.write(changed)
    # The reference runs compiled the unmodified module: its bytecode goes with the edit.
    shutil.rmtree(os.path.join(copy, os.path.dirname(path), "__pycache__"), ignore_errors=True)
    return "".join(difflib.unified_diff(source.splitlines(True), changed.splitlines(True),
                                        f"a/{path}", f"b/{path}"))


def run_exercise(name, launcher=subprocess_launcher, directory=None, shared=None, echo=print):
    """Exercise `name` in a copy at `directory` (made here; a temporary one if None): the
    references on the unmodified copy, then the edit and the broken code's runs. Returns
    {label: (exit status, output)} of its commands. `shared`: data sets and reference runs
    exercises may share (a dict kept between calls)."""
    exercise = EXERCISES[name]
    if directory is None:
        with tempfile.TemporaryDirectory(prefix=f"exercise_{name}_") as tmp:
            return run_exercise(name, launcher, tmp, shared, echo)
    copy = os.path.realpath(directory)
    os.makedirs(copy, exist_ok=True)
    copy_code(copy)
    lab = Lab(copy, launcher, {} if shared is None else shared, echo)
    echo(f"== {name} ==\n{exercise.question}\n\nthe code copied to {copy}")
    for model in exercise.data:
        lab.data(model)
    for key in exercise.references:
        lab.reference(key)
    if exercise.references:
        echo("reference runs (train.py, unmodified code): "
             + ", ".join(lab.show(lab.shared[k]) for k in exercise.references))
    echo(f"\nthe edit:\n{apply_edit(copy, name, exercise.edit)}")
    exercise.run(lab)
    echo(f"\nquestion: {exercise.question}\nanswer: {exercise.answer}")
    return lab.runs


def run_module():
    """`exercise.py --module NAME ARGS`: python -m NAME ARGS with this copy's modules first (a
    launcher that runs a script by its path can so run a module of the copy)."""
    import runpy
    name = sys.argv[2]
    sys.argv = [name, *sys.argv[3:]]
    runpy.run_module(name, run_name="__main__", alter_sys=True)


def main():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", nargs="?", help="the exercise (--list names them)")
    p.add_argument("--list", action="store_true", help="the exercises, one line each")
    p.add_argument("--keep", metavar="DIR",
                   help="make the copy here (a new or empty directory) and keep it")
    args = p.parse_args()
    if args.list:
        for e in EXERCISES.values():
            print(f"{e.name:<38}{e.question}")
        return
    if args.name is None:
        p.error("name an exercise (--list names them)")
    if args.name not in EXERCISES:
        p.error(f"no exercise {args.name!r}; --list names them")
    if args.keep:
        check_output(p, "--keep", args.keep)
        if os.path.isdir(args.keep) and os.listdir(args.keep):
            p.error(f"--keep {args.keep} is not empty; name a new or empty directory")
    run_exercise(args.name, directory=args.keep)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--module"]:
        run_module()
    else:
        run_cli(main)
