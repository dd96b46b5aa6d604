"""parallel_train.py with a bug injected, as a mistake in the code would put it there.

    torchrun --nproc_per_node 2 tests/inject_bug.py KIND [parallel_train.py flags]

KIND, by what it breaks:
  g's all-reduce (mappings._reduce, every g of the run):
    drop                      g forgets to sum the partial products
    average                   the mean instead of the sum (a mix-up with data parallelism)
    off_by_1pct               the sum comes out 1% too large
    skipped_once              g sums nothing in iteration 10 (a missed call), right elsewhere
  the global gradient norm of --clip_grad (training/clip_grads.py), the classic mistakes:
    replicated_counted_tp_times  every rank adds the replicated parameters' squares
    norm_not_all_reduced         each rank clips by the norm of its own shards
    dp_rank_norm_alone           each data-parallel replica clips by its own gradients' norm,
                                 before they are averaged
  sequence parallelism:
    layernorm_grads_not_summed   the replicated weights' partial gradients (LayerNorms, fc) are
                                 not summed over the group after backward

KIND_to_the_end (skipped_once_to_the_end, norm_not_all_reduced_to_the_end, ...): the same bug in a
run that goes on to its last iteration. These two bugs leave the tensor-parallel ranks with
different losses, so the ranks' agreement check stops the run; with the check off too, as in a
code base without it, only the loss curve against the round-off band can tell.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import parallel_train  # noqa: E402
from core import parallel_state as ps  # noqa: E402
from core.distributed import finalize_model_grads  # noqa: E402
from core.tensor_parallel import mappings  # noqa: E402
from training import clip_grads, logbook  # noqa: E402

kind = sys.argv.pop(1)
if kind.endswith("_to_the_end"):
    kind = kind[:-len("_to_the_end")]
    logbook.check_ranks_agree = lambda losses, iteration: None
reduce, iteration = mappings._reduce, [1]


def broken_reduce(input_, group, async_op=False):  # async_op: only an option's f uses it
    if kind == "drop" or (kind == "skipped_once" and iteration[0] == 10):
        return input_
    if kind == "average":
        return reduce(input_, group).div_(ps.get_tensor_model_parallel_world_size())
    if kind == "off_by_1pct":
        return reduce(input_, group).mul_(1.01)
    return reduce(input_, group)


class CountingLogbook(parallel_train.Logbook):
    def step(self, it, *args):
        iteration[0] = it + 1  # the next forward is iteration it + 1's (validation at it is not)
        return super().step(it, *args)


sum_squares = clip_grads._sum_squares
average_replicas = finalize_model_grads.average_over_data_parallel_replicas
allreduce_sequence_parallel_grads = finalize_model_grads.allreduce_sequence_parallel_grads
max_norm = float(sys.argv[sys.argv.index("--clip_grad") + 1]) if "--clip_grad" in sys.argv else 0


if kind in ("drop", "average", "off_by_1pct", "skipped_once"):
    mappings._reduce, parallel_train.Logbook = broken_reduce, CountingLogbook
elif kind == "replicated_counted_tp_times":
    clip_grads.counted_once = lambda param, sharded=False: True
elif kind == "norm_not_all_reduced":
    clip_grads._sum_squares = lambda squares, group: (
        squares if group is ps.get_tensor_model_parallel_group() else sum_squares(squares, group))
elif kind == "dp_rank_norm_alone":
    def clip_then_average(params, loss, partial_loss):
        clip_grads.clip_grad_norm(params, max_norm)  # this replica's own gradients
        return average_replicas(params, loss, partial_loss)
    finalize_model_grads.average_over_data_parallel_replicas = clip_then_average
elif kind == "layernorm_grads_not_summed":
    finalize_model_grads.allreduce_sequence_parallel_grads = lambda params, loss, partial: (
        allreduce_sequence_parallel_grads([], loss, partial) if partial else loss)
else:
    sys.exit(f"error: no bug called {kind}")
parallel_train.cli()
