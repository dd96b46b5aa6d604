"""--overlap_grad_reduce (issue 39, core/distributed/param_and_grad_buffer.py): the data-parallel
average in buckets launched during backward changes no number. A run with it is the run without
it, bit for bit, at DP 2 (each element's sum is a + b, in any grouping): the toy model in float64,
and the transformer in float32 with two micro-batches, Adam, clipping and selective
recomputation (measured bit for bit too, by hand: bf16 under two interleaved pipeline stages,
TP 2 x DP 2 with sequence parallelism). With more summands (DP 2 x CP 2: four ranks) the ring's
order may move a last bit (measured 1.1e-16 relative on a loss). Every other option with it,
against serial: the covering array (test_configurations.py). The buckets themselves: their
order and sizes, and a bucket launched twice or never, each a one-line error.
"""

import os

import pytest
import torch

from curves import assert_bitwise_same_run
from distributed import run_distributed, run_script

TOY = ["--tensor_model_parallel_size", "1", "--dtype", "float64", "--num_iterations", "10",
       "--update_freq", "5", "--eval_interval", "5"]
TRANSFORMER = ["--model", "transformer", "--input_size", "32", "--hidden_size", "64",
               "--num_attention_heads", "4", "--num_layers", "4", "--batch_size", "8",
               "--num_iterations", "4", "--update_freq", "2", "--eval_interval", "2"]
# (ranks, flags, data): each run twice, without and with --overlap_grad_reduce, small buckets.
# (The pipeline's, context parallelism's and every other option's with it: the covering array.)
RUNS = {
    "toy-dp2-float64": (2, TOY, "data_dir"),
    "transformer-dp2-float32": (2, [*TRANSFORMER, "--tensor_model_parallel_size", "1",
                                    "--micro_batch_size", "2", "--optimizer", "adam",
                                    "--clip_grad", "0.5", "--recompute_granularity",
                                    "selective"], "token_dir"),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_overlapped_buckets_change_no_number(run, request, tmp_path):
    ranks, flags, data = RUNS[run]
    data = ["--data_dir", request.getfixturevalue(data)]
    run_script("parallel_train.py", *flags, *data, "--out_dir", tmp_path / "off", nproc=ranks)
    log = run_script("parallel_train.py", *flags, *data, "--overlap_grad_reduce",
                     "--ddp_bucket_size", "3000", "--out_dir", tmp_path / "on", nproc=ranks).out
    assert_bitwise_same_run(str(tmp_path / "off"), str(tmp_path / "on"))
    assert os.path.isfile(tmp_path / "on" / "model.pt") and "dp_all_reduce" in log


def _buckets_and_their_errors():
    """(A job, one rank.) Buckets the last parameters first, about the size asked; a bucket's
    gradients seen once too often, or a step that never launched one, are one-line errors."""
    from core.distributed.param_and_grad_buffer import BucketGroup, GradSyncError, buckets_of
    params = [torch.nn.Parameter(torch.ones(n)) for n in (3, 5, 2, 7)]
    assert [[p.numel() for p in b] for b in buckets_of(params, 6)] == [[7], [2, 5], [3]]
    assert [[p.numel() for p in b] for b in buckets_of(params, 100)] == [[7, 2, 5, 3]]
    group = BucketGroup(params, lambda p: p.grad, 6, num_microbatches=2)
    try:
        with pytest.raises(GradSyncError, match=r"^buckets \[0, 1, 2\] were never launched"):
            group.finish_grad_sync()
        (params[3] * 1.0).sum().backward()  # micro-batch 1 of 2: not yet
        assert group.waits[0] is None
        (params[3] * 1.0).sum().backward()  # 2 of 2: launched
        assert group.waits[0] is not None
        with pytest.raises(GradSyncError, match=r"^bucket 0: 3 gradients where 2 were expected"):
            (params[3] * 1.0).sum().backward()
        for p in params[:3]:
            for _ in range(2):
                (p * 1.0).sum().backward()
        group.finish_grad_sync()  # the average over one replica: the sum itself
        # (A bucket of one gradient is reduced in place: the third, too late, landed in it.)
        assert torch.equal(params[3].grad, torch.full((7,), 3.0))
        assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in params[:3])
    finally:
        group.remove_hooks()


def test_buckets_are_the_last_parameters_first_and_each_launches_once():
    run_distributed(_buckets_and_their_errors, 1)


def test_the_flags_say_what_they_do_in_one_line(capsys):
    """Not built with the distributed optimizer yet: refused; a bucket size that is not one:
    refused; without a data-parallel average, or a bucket size without the overlap: a note."""
    from test_errors import flag_error
    assert "--overlap_grad_reduce with --use_distributed_optimizer: the bucketed reduce-scatter " \
        "is not built yet" in flag_error(["--overlap_grad_reduce", "--use_distributed_optimizer",
                                          "--tensor_model_parallel_size", "1"], 2)
    assert "--ddp_bucket_size must be a positive integer, got 0" in \
        flag_error(["--overlap_grad_reduce", "--ddp_bucket_size", "0"], 2)
    assert flag_error(["--overlap_grad_reduce"], 2) is None  # TP 2: no replicas
    assert flag_error(["--ddp_bucket_size", "10", "--tensor_model_parallel_size", "1"], 2) is None
    notes = capsys.readouterr().out
    assert "note: --overlap_grad_reduce hides the data-parallel average behind backward: with " \
        "one replica there is none" in notes
    assert "note: --ddp_bucket_size 10 sizes --overlap_grad_reduce's buckets" in notes
