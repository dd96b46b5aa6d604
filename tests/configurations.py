"""The covering array: every pair of option values a run can hold together, in a few runs.

Each chapter is proven equal to serial on its own; the bugs that survived that (issue 37) hid in
pairs of options no test ran together. Most interaction faults need only two options, and a
covering array reaches every pair of values in a number of configurations that grows with the log
of the option count, not with the product of their values (pairwise, or all-pairs, testing).

OPTIONS declares the options and their values; the constraints are the scripts' own
(training/arguments.py's MODEL_RULES, FLAG_RULES and SIZE_RULES: what the argument checks refuse,
this array never picks) and the few of ARRAY_RULES below, which say where a value means nothing.
allpairspy (a pairwise generator, deterministic) builds the array; it stops at the first
configuration that adds no new pair, and a run with dropout proves only its pairs with dropout
(judged_pairs), so `covering_array` then adds configurations, found by search, until every pair
is proven. test_configurations.py checks that every pair some valid configuration
holds is in the array, and runs each configuration against serial.
"""

import itertools
from collections import OrderedDict
from types import SimpleNamespace

from allpairspy import AllPairs

# The options (parallel_train.py's flag names; data_parallel_size is the world size /
# (TP x PP x CP))
# and their values, the first of each the plain run's. Each later chapter adds its own here.
OPTIONS = OrderedDict(
    model=["toy", "transformer"],
    tensor_model_parallel_size=[1, 2],
    sequence_parallel=[False, True],
    pipeline_model_parallel_size=[1, 2],
    virtual_pipeline_model_parallel_size=[None, 2],
    # (Here, not with the overlapped reduction: the order of the options changes allpairspy's
    # array; here it is 30 configurations of 97 ranks, at the end 35 of 110.)
    overlap_param_gather=[False, True],
    overlap_p2p_comm=[False, True],
    pipeline_schedule=["1f1b", "gpipe"],
    data_parallel_size=[1, 2],
    context_parallel_size=[1, 2],
    cp_comm_type=["p2p", "all_gather", "a2a"],
    cp_load_balance=["on", "off"],
    use_distributed_optimizer=[False, True],
    overlap_grad_reduce=[False, True],
    optimizer=["sgd", "adam"],
    dtype=["float32", "float64", "bfloat16"],
    clip_grad=[None, True],  # CLIP_GRAD, each model's
    dropout=[0.0, 0.1],
    recompute_granularity=[None, "full", "selective"],
    micro_batch_size=[2, 4],
    num_layers=[2, 4],
    tp_reduce_dtype=["activation", "float32"],
)

# The sizes every run shares: the smallest models that still split (a batch of 8 rows: DP 2 and
# two micro-batches of 2 rows under TP 2 with sequence parallelism), a few steps.
BATCH_SIZE = 8
ITERATIONS = 4
MODEL_FLAGS = {
    "toy": ["--hidden_size", "64"],
    "transformer": ["--input_size", "16", "--hidden_size", "32", "--num_attention_heads", "2"],
}
# --clip_grad: below every step's gradient norm of these runs (the toy's 10 to 24, the
# transformer's 0.6 to 0.9), so that every step clips, and not so far below that the steps vanish
# (a clip of 0.05 left the transformer's SGD steps so small that a parameter never all-gathered
# stayed within bf16's round-off for 4 iterations).
CLIP_GRAD = {"toy": "5", "transformer": "0.5"}
FIXED = {  # what the rules read beside OPTIONS
    "toy": dict(num_attention_heads=4, seq_length=16, distribute_saved_activations=False),
    "transformer": dict(num_attention_heads=2, seq_length=16, distribute_saved_activations=False),
}

# Where a value means nothing, the array keeps the first (not an argument error: the flag is
# accepted and does nothing, so a pair with it would prove nothing); and at most 4 ranks.
ARRAY_RULES = (
    (("pipeline_schedule", "pipeline_model_parallel_size"),
     lambda a: a.pipeline_schedule != "1f1b" and a.pipeline_model_parallel_size == 1),
    (("model", "num_layers"), lambda a: a.model == "toy" and a.num_layers != 2),
    (("sequence_parallel", "tensor_model_parallel_size"),
     lambda a: a.sequence_parallel and a.tensor_model_parallel_size == 1),
    (("use_distributed_optimizer", "data_parallel_size", "context_parallel_size"),
     lambda a: a.use_distributed_optimizer and a.data_parallel_size * a.context_parallel_size == 1),
    (("overlap_grad_reduce", "data_parallel_size", "context_parallel_size"),
     lambda a: a.overlap_grad_reduce and a.data_parallel_size * a.context_parallel_size == 1),
    (("overlap_p2p_comm", "virtual_pipeline_model_parallel_size"),
     lambda a: a.overlap_p2p_comm and a.virtual_pipeline_model_parallel_size is None),
    (("cp_comm_type", "context_parallel_size"),
     lambda a: a.cp_comm_type != "p2p" and a.context_parallel_size == 1),
    (("cp_load_balance", "context_parallel_size"),
     lambda a: a.cp_load_balance != "on" and a.context_parallel_size == 1),
    # Not a rule of the scripts: a pair needs two of the three sizes, and 8 ranks on the suite's
    # 2 cores cost it 10 s (two more rank processes to start, the slowest runs).
    (("tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size",
      "context_parallel_size"),
     lambda a: a.tensor_model_parallel_size * a.pipeline_model_parallel_size *
     a.data_parallel_size * a.context_parallel_size > 4),
)


def _rules():
    from training.arguments import FLAG_RULES, MODEL_RULES, SIZE_RULES
    return [(r.reads, r.refuses) for r in MODEL_RULES + FLAG_RULES + SIZE_RULES] + list(ARRAY_RULES)


def _namespace(values):
    """The flags a (partial) configuration sets, with what the scripts derive from them."""
    a = dict(values)
    if "model" in a:
        a.update(FIXED[a["model"]])
    if "data_parallel_size" in a and "micro_batch_size" in a:
        a["num_microbatches"] = BATCH_SIZE // a["data_parallel_size"] // a["micro_batch_size"]
    return SimpleNamespace(**a)


def is_valid(values, rules=None):
    """Whether no rule refuses `values` ({option: value}, possibly partial): a rule is asked once
    every option it reads is known."""
    a = _namespace(values)
    return not any(all(hasattr(a, name) for name in reads) and refuses(a)
                   for reads, refuses in (_rules() if rules is None else rules))


def _needs(reads):
    """The options a rule's reads are known from (FIXED's come with the model, num_microbatches
    with the data-parallel and micro-batch sizes); None where one is no option's."""
    needed = set()
    for name in reads:
        if name in OPTIONS:
            needed.add(name)
        elif name == "num_microbatches":
            needed |= {"data_parallel_size", "micro_batch_size"}
        elif name in FIXED["transformer"]:
            needed.add("model")
        else:
            return None
    return needed


def _row_filter(rules):
    names = list(OPTIONS)
    return lambda row: is_valid(dict(zip(names, row)), rules)


def _completion(fixed, rules, wanted=frozenset()):
    """A valid configuration holding `fixed` ({option: value}), or None: depth-first, the fixed
    options first, each rule asked as soon as it can be; of each option's values, first the one
    that holds the most `wanted` pairs with the values chosen before it."""
    order = list(fixed) + [name for name in OPTIONS if name not in fixed]
    choices = [[fixed[name]] if name in fixed else OPTIONS[name] for name in order]
    # asked[d]: the rules first decidable once the first d options are chosen (each asked once).
    asked = [[] for _ in range(len(order) + 1)]
    for reads, refuses in rules:
        if (needs := _needs(reads)) is not None:
            asked[1 + max(order.index(name) for name in needs)].append((reads, refuses))

    def gain(values, option, value):
        return sum(((a, va), (option, value)) in wanted or ((option, value), (a, va)) in wanted
                   for a, va in values.items())

    def extend(values, depth):
        if not is_valid(values, asked[depth]):
            return None
        if depth == len(order):
            return values
        option = order[depth]
        for value in sorted(choices[depth], key=lambda v: -gain(values, option, v)):
            found = extend({**values, option: value}, depth + 1)
            if found:
                return found
        return None
    found = extend({}, 0)
    return None if found is None else {name: found[name] for name in OPTIONS}


def pairs_of(config):
    return {((a, config[a]), (b, config[b])) for a, b in itertools.combinations(OPTIONS, 2)}


def judged_pairs(config):
    """The pairs a run of `config` proves: all of them without dropout; with dropout only those
    that hold it (its losses are not serial's, test_configurations.py, so the other pairs of such
    a run are run again without it)."""
    pairs = pairs_of(config)
    if config["dropout"] == OPTIONS["dropout"][0]:
        return pairs
    return {pair for pair in pairs if ("dropout", config["dropout"]) in pair}


def valid_pairs(rules=None):
    """Every pair of values that some valid configuration holds together."""
    rules = rules or _rules()
    return {((a, va), (b, vb))
            for a, b in itertools.combinations(OPTIONS, 2)
            for va in OPTIONS[a] for vb in OPTIONS[b]
            if _completion({a: va, b: vb}, rules)}


def covering_array():
    """The configurations ({option: value}): allpairspy's, then one for each valid pair it left."""
    rules = _rules()
    configs = [dict(row._asdict()) for row in AllPairs(OPTIONS, filter_func=_row_filter(rules))]
    left = valid_pairs(rules) - set().union(*map(judged_pairs, configs))
    while left:  # each new configuration holds the first pair left and as many others as it can
        fixed = {"dropout": OPTIONS["dropout"][0], **dict(min(left, key=str))}
        configs.append(_completion(fixed, rules, left))
        left -= judged_pairs(configs[-1])
    return configs


def flags(config):
    """parallel_train.py's flags for a configuration (no --data_dir or --out_dir), and its ranks."""
    c = config
    argv = ["--model", c["model"], *MODEL_FLAGS[c["model"]], "--batch_size", str(BATCH_SIZE),
            "--num_iterations", str(ITERATIONS), "--eval_interval", "2", "--update_freq", "2",
            "--tensor_model_parallel_size", str(c["tensor_model_parallel_size"]),
            "--pipeline_model_parallel_size", str(c["pipeline_model_parallel_size"]),
            "--optimizer", c["optimizer"], "--dtype", c["dtype"],
            "--micro_batch_size", str(c["micro_batch_size"])]
    if c["model"] == "transformer":
        argv += ["--num_layers", str(c["num_layers"]), "--dropout", str(c["dropout"])]
    for option in ("virtual_pipeline_model_parallel_size", "recompute_granularity"):
        if c[option] is not None:
            argv += [f"--{option}", str(c[option])]
    if c["clip_grad"]:
        argv += ["--clip_grad", CLIP_GRAD[c["model"]]]
    for option in ("sequence_parallel", "use_distributed_optimizer"):
        if c[option]:
            argv.append(f"--{option}")
    if c["overlap_grad_reduce"]:  # buckets small enough to be several in every model here
        argv += ["--overlap_grad_reduce", "--ddp_bucket_size", "1000"]
    for option in ("overlap_param_gather", "overlap_p2p_comm"):
        if c[option]:
            argv.append(f"--{option}")
    if c["pipeline_model_parallel_size"] > 1:
        argv += ["--pipeline_schedule", c["pipeline_schedule"]]
    if c["tp_reduce_dtype"] != "activation":
        argv += ["--tp_reduce_dtype", c["tp_reduce_dtype"]]
    if c["context_parallel_size"] > 1:
        argv += ["--context_parallel_size", str(c["context_parallel_size"]), "--cp_comm_type",
                 c["cp_comm_type"], "--cp_load_balance", c["cp_load_balance"]]
    nproc = c["tensor_model_parallel_size"] * c["pipeline_model_parallel_size"] * \
        c["data_parallel_size"] * c["context_parallel_size"]
    return argv, nproc


def serial_flags(config):
    """train.py's flags for the serial run a configuration is judged against: the same model,
    optimizer, dtype and micro-batches (each replica's micro-batch size; the sums differ in order
    only)."""
    argv, _ = flags(config)
    serial_only = {"--model", "--hidden_size", "--input_size", "--num_attention_heads",
                   "--batch_size", "--num_iterations", "--eval_interval", "--update_freq",
                   "--optimizer", "--dtype", "--micro_batch_size", "--num_layers", "--dropout",
                   "--clip_grad"}
    pairs = [(argv[i], argv[i + 1]) for i in range(len(argv) - 1)
             if argv[i] in serial_only and not argv[i + 1].startswith("--")]
    return [x for pair in pairs for x in pair]


def name(config):
    """A short id: the options that differ from the first value."""
    short = dict(model="", tensor_model_parallel_size="tp", sequence_parallel="sp",
                 pipeline_model_parallel_size="pp", virtual_pipeline_model_parallel_size="v",
                 pipeline_schedule="", data_parallel_size="dp", use_distributed_optimizer="dist",
                 overlap_grad_reduce="overlap", overlap_param_gather="gather",
                 overlap_p2p_comm="p2p",
                 optimizer="", dtype="", clip_grad="clip", dropout="drop",
                 recompute_granularity="rc-", micro_batch_size="mbs", num_layers="L",
                 tp_reduce_dtype="reduce-", context_parallel_size="cp", cp_comm_type="",
                 cp_load_balance="lb-")
    parts = [config["model"]]
    for option, value in config.items():
        if option != "model" and value != OPTIONS[option][0]:
            parts.append(short[option] + ("" if value is True else str(value)))
    return "-".join(parts)
