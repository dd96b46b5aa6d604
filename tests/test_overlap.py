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

TOY = ["--tensor_model_parallel_size", "1", "--dtype", "float64", "--update_freq", "5",
       "--eval_interval", "5", "--num_iterations", "10"]
TRANSFORMER = ["--model", "transformer", "--input_size", "32", "--hidden_size", "64",
               "--num_attention_heads", "4", "--num_layers", "4", "--batch_size", "8",
               "--num_iterations", "4", "--update_freq", "2", "--eval_interval", "2",
               "--tensor_model_parallel_size", "1", "--micro_batch_size", "2", "--optimizer",
               "adam", "--recompute_granularity", "selective"]
BUCKETS = ["--overlap_grad_reduce", "--ddp_bucket_size", "3000"]  # several in both models
DISTRIBUTED = ["--use_distributed_optimizer", *BUCKETS, "--overlap_param_gather"]
# (ranks, flags, data, the options' runs): each run without the options, then with each set.
# The toy's plain optimizer without them is the distributed one's too, bit for bit. Neither
# clips: the distributed optimizer's buckets are sharded on their own, so the clipping norm
# adds other pieces' squares, equal to round-off (measured 1.1e-7 relative on the transformer's
# float32 norm, 2 steps); the plain optimizer's overlap leaves the gradients, so the norm, the
# same bits. (The pipeline's, context parallelism's, clipping and every other option's with
# them: the covering array, against serial.)
RUNS = {
    "toy-dp2-float64": (2, TOY, "data_dir", {"plain": BUCKETS, "resumed": DISTRIBUTED}),
    "transformer-dp2-float32-distributed": (2, [*TRANSFORMER, "--use_distributed_optimizer"],
                                            "token_dir", {"overlapped": DISTRIBUTED}),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_overlapped_buckets_change_no_number(run, request, tmp_path):
    ranks, flags, data, options = RUNS[run]
    data = ["--data_dir", request.getfixturevalue(data)]
    saves = lambda name: ["--save", tmp_path / f"{name}-ckpt", "--save_interval", "2"]
    run_script("parallel_train.py", *flags, *data, "--out_dir", tmp_path / "off",
               *(saves("off") if "resumed" in options else []), nproc=ranks)
    for name, on in options.items():
        out = ["--out_dir", tmp_path / name]
        if name == "resumed":  # 5 iterations, then resumed: the gathers land before a
            # checkpoint reads the parameters (at 2 and 4, with no validation's forward before
            # it), and the resumed run's hooks are the new model's
            half = [*flags[:flags.index("--num_iterations")], "--num_iterations", "5"]
            run_script("parallel_train.py", *half, *data, *on, *out, *saves(name), nproc=ranks)
            model = lambda name: torch.load(tmp_path / f"{name}-ckpt" / "iter_0000004" /
                                            "mp_rank_00" / "model_optim_rng.pt",
                                            weights_only=False)["model"]
            assert all(torch.equal(a, b) for a, b in zip(model("off").values(),
                                                         model(name).values()))
            on = [*on, "--load", tmp_path / f"{name}-ckpt"]
        log = run_script("parallel_train.py", *flags, *data, *on, *out, nproc=ranks).out
        assert_bitwise_same_run(str(tmp_path / "off"), str(tmp_path / name))
        assert os.path.isfile(tmp_path / name / "model.pt")
        assert ("dp_reduce_scatter" if "--use_distributed_optimizer" in on else
                "dp_all_reduce") in log, log


def _buckets_and_their_errors():
    """(A job, one rank.) Buckets the last parameters first, about the size asked; a bucket's
    gradients seen once too often, or a step that never launched one, are one-line errors."""
    from core.distributed.finalize_model_grads import start_grad_sync
    from core.distributed.param_and_grad_buffer import BucketGroup, GradSyncError, buckets_of
    params = [torch.nn.Parameter(torch.ones(n)) for n in (3, 5, 2, 7)]
    assert [[p.numel() for p in b] for b in buckets_of(params, 6)] == [[7], [2, 5], [3]]
    assert [[p.numel() for p in b] for b in buckets_of(params, 100)] == [[7, 2, 5, 3]]
    params[1].shared_embedding = True  # a pipeline's tied embeddings: a bucket of their own
    assert [[p.numel() for p in b] for b in buckets_of(params, 100)] == [[7, 2], [5], [3]]
    del params[1].shared_embedding
    buckets = buckets_of(params, 6)
    group = BucketGroup(buckets, lambda i: start_grad_sync([p.grad for p in buckets[i]],
                                                           buckets[i]), num_microbatches=2)
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
        # The third gradient, after the launch, is not in it: under TP_CHECK_COLLECTIVES (the
        # suite) a launched collective reads its input then, and writes at the wait
        # (wire._deferred).
        assert torch.equal(params[3].grad, torch.full((7,), 2.0))
        assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in params[:3])
    finally:
        group.remove_hooks()


def test_buckets_are_the_last_parameters_first_and_each_launches_once():
    run_distributed(_buckets_and_their_errors, 1)


def test_the_flags_say_what_they_do_in_one_line(capsys):
    """What the options need, refused in one line: the parameter gather needs the distributed
    optimizer and the bucketed reduction; a bucket size that is not one: refused; without a
    data-parallel average, a bucket size without the overlap, the posted exchanges without the
    interleaved schedule: a note."""
    from test_errors import flag_error
    tp1 = ["--tensor_model_parallel_size", "1"]
    assert "--overlap_param_gather hides the distributed optimizer's parameter all-gather: add " \
        "--use_distributed_optimizer" in flag_error(["--overlap_param_gather", *tp1], 2)
    assert "--overlap_param_gather gathers the buckets of --overlap_grad_reduce (Megatron asks " \
        "for both): add --overlap_grad_reduce" in flag_error(
            ["--overlap_param_gather", "--use_distributed_optimizer", *tp1], 2)
    assert flag_error(["--overlap_p2p_comm", "--pipeline_model_parallel_size", "2", *tp1],
                      2) is None  # 1F1B: a note, as Megatron turns it off
    assert "--ddp_bucket_size must be a positive integer, got 0" in \
        flag_error(["--overlap_grad_reduce", "--ddp_bucket_size", "0"], 2)
    assert flag_error(["--overlap_grad_reduce"], 2) is None  # TP 2: no replicas
    assert flag_error(["--ddp_bucket_size", "10", "--tensor_model_parallel_size", "1"], 2) is None
    notes = capsys.readouterr().out
    assert "note: --overlap_grad_reduce hides the data-parallel average behind backward: with " \
        "one replica there is none" in notes
    assert "note: --ddp_bucket_size 10 sizes --overlap_grad_reduce's buckets" in notes
    assert "note: --overlap_p2p_comm posts the interleaved schedule's sends and receives: " \
        "without --pipeline_model_parallel_size and --virtual_pipeline_model_parallel_size it " \
        "changes nothing" in notes
