"""A run's record on disk: metrics.csv, config.json and model.pt in its --out_dir.

metrics.csv columns: iteration, train_loss, valid_loss (empty where not
evaluated), grad_norm (with --clip_grad: the global gradient norm before
clipping), and in a tensor-parallel run train_loss_rank0 ... rankN-1, each
rank's own loss (they must be equal: it is how a reader sees that they are);
with --num_experts the step's load (moe_load): tokens_expert_0 ... E-1, the
tokens each expert took over every MoE layer and micro-batch, tokens_dropped
beyond the capacity, and load_balancing_loss (over the layers, the
micro-batches' mean, without its coefficient's gradient factor: the serial
model's value)

Every file is replaced atomically (written to a temporary name, then
renamed), so a reader, a plot or a crash never sees half a file.
"""

import csv
import io
import json
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

from core import parallel_state as ps
from core import wire
from core.parallel_state import UserError
from core.pipeline_parallel.schedules import chunk_layers
from core.transformer.moe.router import TopKRouter

RUN_FILES = ("metrics.csv", "config.json", "model.pt")
# An earlier run's files, moved here when a new run starts in the same --out_dir, and removed only
# once the new run has written its model.pt: a new run that fails or diverges loses nothing.
EARLIER_RUN = "earlier_run"


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it to `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)  # nothing half-written is left behind
        raise


class MetricsWriter:
    """Starts a run's record in out_dir and keeps metrics.csv up to date.

    An earlier run's files in out_dir are moved aside to out_dir/earlier_run
    first (with a message), so two runs' rows never mix and nothing is lost
    until this run has its model.pt (save_model). Rows are kept in memory; the file is rewritten
    at most every `min_interval_s` seconds and on close, which bounds the
    cost of long runs and still leaves every row on disk when a run stops.
    """

    def __init__(self, out_dir, config, num_ranks=1, min_interval_s=2.0, resume_from=0):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.csv")
        ranks = [f"train_loss_rank{r}" for r in range(num_ranks)] if num_ranks > 1 else []
        self.grad_norm = config.get("clip_grad") is not None
        norm = ["grad_norm"] if self.grad_norm else []
        experts = config.get("num_experts") or 0
        load = [f"tokens_expert_{e}" for e in range(experts)] + \
            ["tokens_dropped", "load_balancing_loss"] * bool(experts)
        self.rows = [["iteration", "train_loss", "valid_loss", *norm, *ranks, *load]]
        if resume_from and same_run(out_dir, config):
            # Keep the rows up to the checkpoint; rows after it were recomputed by this run. A run
            # resumed at another tensor-parallel size, or with --clip_grad switched, keeps the
            # earlier run's columns too, after its own (empty in its own rows), each row's values
            # under their own names.
            header, earlier = self._read_rows()
            self.rows[0] += [column for column in header if column not in self.rows[0]]
            self.rows += [[dict(zip(header, row)).get(column, "") for column in self.rows[0]]
                          for row in earlier if int(row[0]) <= resume_from]
            self._drop_the_stopped_runs_last_validation(config, resume_from)
        else:  # a new run, or a resume into a directory that holds another run's files
            set_aside_earlier_run(out_dir)
            if resume_from:
                print(f"note: {out_dir} holds no record of this run: its metrics.csv starts at "
                      f"iteration {resume_from + 1}, after the checkpoint (the rows before are "
                      "in the --out_dir the run started in)")
        text = json.dumps(config, indent=2).encode()
        atomic_write(os.path.join(out_dir, "config.json"), lambda f: f.write(text))
        self.num_ranks, self.min_interval_s = num_ranks, min_interval_s
        self.last_flush = float("-inf")

    def _drop_the_stopped_runs_last_validation(self, config, resume_from):
        """A run validates at its last iteration; the run resumed from there goes on, and an
        uninterrupted run has no validation there unless it falls on --eval_interval."""
        interval = config.get("eval_interval")
        last = self.rows[-1] if len(self.rows) > 1 else None
        if interval and last and int(last[0]) == resume_from and resume_from % interval:
            last[self.rows[0].index("valid_loss")] = ""

    def _read_rows(self):
        """(header, rows) of the earlier metrics.csv; nothing if there is none of this kind."""
        if not os.path.isfile(self.path):
            return [], []
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or rows[0][:3] != self.rows[0][:3]:
            return [], []
        return rows[0], rows[1:]

    def write(self, rows, rank_losses):
        """rows: [iteration, train_loss, valid_loss or None, grad_norm or None, the MoE load
        or None]; rank_losses: (ranks, len(rows)) or None."""
        if rank_losses is not None:
            per_rank = rank_losses.t().tolist()
        else:
            per_rank = [[""] * self.num_ranks] * len(rows)
        # repr() of a float round-trips exactly: float64 curves can be compared at 1e-15.
        text = lambda x: "" if x is None or x == "" else repr(x)
        for (it, loss, valid, norm, *load), losses in zip(rows, per_rank):
            ranks = [text(x) for x in losses] if self.num_ranks > 1 else []
            row = [it, repr(loss), text(valid), *([text(norm)] if self.grad_norm else []), *ranks,
                   *map(text, load[0] if load and load[0] else [])]
            self.rows.append(row + [""] * (len(self.rows[0]) - len(row)))
        if time.monotonic() - self.last_flush >= self.min_interval_s:
            self.flush()

    def flush(self):
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(self.rows)
        atomic_write(self.path, lambda f: f.write(text.getvalue().encode()))
        self.last_flush = time.monotonic()

    def close(self):
        self.flush()


def run_config(args, **extra):
    """The flags and set-up of a run, as written to config.json (for plot titles and readers)."""
    return {**{k: v for k, v in vars(args).items() if not isinstance(v, torch.dtype)}, **extra}


def same_run(out_dir, config):
    """Does out_dir hold the record of the run `config` describes (its run id, which a resumed
    run takes from its checkpoint)?"""
    try:
        recorded = read_config(out_dir).get("run_id")
    except RunRecordError:  # a damaged config.json: not this run's record
        return False
    return recorded is not None and recorded == config.get("run_id")


def set_aside_earlier_run(out_dir):
    """Move an earlier run's files in out_dir to out_dir/earlier_run. If that holds a run already,
    the files here are of one that never wrote its model.pt: they give way to the new run."""
    earlier = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    if not earlier:
        return
    aside = os.path.join(out_dir, EARLIER_RUN)
    if os.path.isdir(aside):
        for name in earlier:
            os.remove(os.path.join(out_dir, name))
        print(f"note: {out_dir} holds an unfinished run ({', '.join(earlier)}), removed; the "
              f"finished one before it stays in {aside} until this run writes its model.pt")
        return
    os.makedirs(aside)
    for name in earlier:
        os.replace(os.path.join(out_dir, name), os.path.join(aside, name))
    print(f"note: {out_dir} holds an earlier run ({', '.join(earlier)}); moved to {aside}, "
          "where it stays until this run writes its model.pt")


def save_model(state_dict, out_dir):
    """model.pt: the run is complete, and an earlier run set aside in out_dir is let go."""
    atomic_write(os.path.join(out_dir, "model.pt"), lambda f: torch.save(state_dict, f))
    shutil.rmtree(os.path.join(out_dir, EARLIER_RUN), ignore_errors=True)


class RunRecordError(UserError):
    """A run's files that cannot be read as one (missing, damaged, of another kind)."""


def run_directory(path):
    """The run's directory, also when given one of its files (runs/serial/metrics.csv)."""
    name = os.path.basename(os.path.normpath(path))
    return os.path.dirname(path) if name in RUN_FILES and os.path.isfile(path) else path


def read_metrics(run_dir):
    """{column: float array} from run_dir/metrics.csv; empty cells are NaN."""
    path = os.path.join(run_directory(run_dir), "metrics.csv")
    if not os.path.isfile(path):
        raise RunRecordError(f"{path} not found: run the training first "
                             f"(bash bash_train.sh / bash bash_parallel_train.sh)")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, fields = list(reader), reader.fieldnames
        if fields is None or fields[:3] != ["iteration", "train_loss", "valid_loss"]:
            raise ValueError("its header is not iteration,train_loss,valid_loss,...")
        return {k: np.array([float(r[k]) if r[k] else np.nan for r in rows]) for k in fields}
    except (ValueError, TypeError, csv.Error, UnicodeDecodeError) as e:
        raise RunRecordError(f"{path} is not a metrics.csv written by the training ({e})") from None


def read_config(run_dir):
    """run_dir/config.json as a dict ({} where a run has none)."""
    path = os.path.join(run_directory(run_dir), "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise RunRecordError(f"{path} is not a config.json written by the training ({e})") \
            from None
    if not isinstance(config, dict):
        raise RunRecordError(f"{path} is not a config.json written by the training")
    return config


# What makes two runs the same experiment: the model and its sizes (dtype, lr, TP, DP may differ).
SIZES = {"toy": ("input_size", "hidden_size", "batch_size"),
         "transformer": ("input_size", "hidden_size", "batch_size", "vocab_size", "seq_length",
                         "num_layers", "num_attention_heads")}


def read_runs(*run_dirs):
    """([metrics of each run], [config of each run]), each file read once."""
    return [read_metrics(d) for d in run_dirs], [read_config(d) for d in run_dirs]


def why_not_comparable(run_dirs, metrics, configs):
    """Why two runs (as read_runs gives them) cannot be compared curve against curve, or None:
    different models or sizes (from config.json), or a different number of logged iterations."""
    (a_dir, b_dir), (a, b) = run_dirs, configs
    models = a.get("model", "toy"), b.get("model", "toy")
    if models[0] != models[1]:
        return f"{a_dir} trained the {models[0]} model and {b_dir} the {models[1]}"
    for size in SIZES.get(models[0], ()):
        if size in a and size in b and a[size] != b[size]:
            return f"{a_dir} has {size} {a[size]} and {b_dir} {b[size]}"
    n = len(metrics[0]["iteration"]), len(metrics[1]["iteration"])
    if not min(n):
        return f"a run has no rows ({n[0]} and {n[1]}); did it stop before its first log line?"
    if n[0] != n[1]:
        return f"the runs have {n[0]} and {n[1]} iterations (did one stop early?)"
    return None


def moe_layers_on_rank_0(args):
    """--num_experts: the MoE layers rank 0 holds (every --moe_layer_freq-th block of its
    pipeline stage's chunks, the first always): the communication table's and the memory line's
    formulas count them."""
    v = args.virtual_pipeline_model_parallel_size or 1
    return sum(i % args.moe_layer_freq == 0 for c in range(v) for i in chunk_layers(
        args.num_layers, args.pipeline_model_parallel_size, 0, v, c))


def moe_load(model, args):
    """--num_experts: the step's load, summed over every rank and MoE layer (each rank routes
    its own tokens, each stage its own layers), for metrics.csv: [tokens per expert..., tokens
    dropped, load-balancing loss] (router.py's `load`); None without experts."""
    if not args.num_experts:
        return None
    loads = [m.load for m in model.modules() if isinstance(m, TopKRouter) and m.load is not None]
    load = torch.stack(loads).sum(0) if loads else torch.zeros(args.num_experts + 2,
                                                              dtype=torch.float64)
    if ps.model_parallel_is_initialized():
        load = _sum_over_every_rank(load.to(wire.get_device()), dist.group.WORLD)
    load[-1] /= args.num_microbatches  # the micro-batches' mean
    return load


@wire.collective("moe_load_all_reduce", wire.ALL_REDUCE, summed=True)
def _sum_over_every_rank(load, group):
    dist.all_reduce(load, group=group)
    return load
