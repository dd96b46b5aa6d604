"""Scaling out: data x tensor parallelism, multi-node launch, sharded checkpoints, exact resume,
merging, resharding, and surviving a lost rank. Each proved equal to the serial run.

Measured here (200 iterations, default sizes), against serial: DP=2 x TP=2 float32 loss within
9.8e-7 relative, float64 within 4e-15 (bound: 5e-14, as in test_end_to_end.py). Resumed and
restarted runs are compared bitwise: same operations on the same values, on CPU.
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from compare_runs import curve_difference
from curves import assert_bitwise_same_run, assert_same_curve, rows_after
from distributed import comm_table, run_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def run(cmd, ok=True, env=ENV):
    """A real launch, in new processes: for what only a launcher shows."""
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert (proc.returncode == 0) == ok, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def launch(nproc, *args, script="parallel_train.py", ok=True):
    """`torchrun --nproc_per_node nproc script args`, in the session's rank processes."""
    return run_script(script, *args, nproc=nproc, ok=ok).out


def killed_after(ck, iteration):
    """The checkpoint directory as a run killed after `iteration`'s checkpoint leaves it: the
    checkpoints after it (a run that ends saves at its end) gone, the tracker naming it."""
    for later in glob.glob(os.path.join(ck, "iter_*")):
        if int(os.path.basename(later)[len("iter_"):]) > iteration:
            shutil.rmtree(later)
    with open(os.path.join(ck, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(f"{iteration}\n")


def test_data_times_tensor_parallel_matches_serial(data_dir, serial_runs, tmp_path):
    """DP 2 x TP 2 at the original's sizes: its collectives, and serial's first 50 iterations (in
    float32 too, and with every other option, in the covering array: test_configurations.py)."""
    dtype = "float64"
    log = launch(4, "--tensor_model_parallel_size", "2", "--data_dir", data_dir, "--dtype", dtype,
                 "--out_dir", str(tmp_path), "--num_iterations", "50")
    # This rank's shards of fc1's and fc2's gradients averaged over its data-parallel group: over
    # DP=2 ranks a ring sends 2 (2-1)/2 = all of it per rank. fc's gradient and the loss averaged in
    # one all-reduce over all 4 ranks (identical bits on every tensor-parallel rank): a ring sends 2
    # (4-1)/4.
    elem = {"float32": 4, "float64": 8}[dtype]
    kib, small = 2 * 2048 * 64 // 2 * elem / 1024, (64 + 1) * elem / 1024
    table = comm_table(log)
    assert table["dp_all_reduce"] == pytest.approx((1, kib, kib), abs=0.005), log
    assert table["replicated_all_reduce"] == pytest.approx((1, small, 1.5 * small), abs=0.005), log
    serial = rows_after(serial_runs[dtype])
    assert_same_curve({k: v[serial["iteration"] <= 50] for k, v in serial.items()}, str(tmp_path),
                      dtype)


def test_batch_must_split_evenly_over_replicas(data_dir, tmp_path):
    out = launch(4, "--tensor_model_parallel_size", "1", "--batch_size", "30", "--data_dir",
                 data_dir, "--out_dir", str(tmp_path), ok=False)
    assert ("--batch_size 30 is not divisible by the data-parallel size 4 (world size 4 / "
            "tensor-parallel size 1)"
            in out)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("per_node,tp", [(2, 2)])
def test_two_nodes_on_one_machine(per_node, tp, data_dir, serial_runs, tmp_path):
    """Two launchers over 127.0.0.1, as two machines would run bash_parallel_train.sh: DP 2 x TP 2,
    each node a tensor-parallel group, the data-parallel sums across the nodes. (One rank per
    node, TP across them, is the same code over the same gloo: it ran here until issue 37.)"""
    env = {**ENV, "NNODES": "2", "GPUS_PER_NODE": str(per_node), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DATA_DIR": data_dir}
    args = ["bash", "bash_parallel_train.sh", "--tensor_model_parallel_size", str(tp), "--out_dir",
            str(tmp_path), "--num_iterations", "50"]  # serial's first 50: the suite's time
    nodes = [subprocess.Popen(args, cwd=REPO, env={**env, "NODE_RANK": str(n)},
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for n in (1, 0)]
    outputs = [p.communicate(timeout=240)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outputs
    # One job over both launchers, not two jobs of one node each writing the same curve.
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["world_size"], config["data_parallel_size"]) == (2 * per_node,
                                                                    2 * per_node // tp), config
    serial = rows_after(serial_runs["float32"])
    first_50 = {k: v[serial["iteration"] <= 50] for k, v in serial.items()}
    assert_same_curve(first_50, str(tmp_path), "float32")


def test_checkpoints_resume_exactly_and_merge_into_the_serial_model(data_dir, serial_runs,
                                                                    tmp_path):
    common = ["--tensor_model_parallel_size", "2", "--data_dir", data_dir, "--dtype", "float64"]
    launch(2, *common, "--out_dir", str(tmp_path / "full"), "--save", str(tmp_path / "ck_full"))
    # Megatron's layout: one shard per tensor-parallel rank, and the tracker.
    assert (tmp_path / "ck_full" / "latest_checkpointed_iteration.txt").read_text() == "200\n"
    for it in (100, 200):
        for r in (0, 1):
            shard = tmp_path / "ck_full" / f"iter_{it:07d}" / f"mp_rank_{r:02d}"
            assert (shard / "model_optim_rng.pt").is_file()

    # Stopped after iteration 130 (last checkpoint 100), then resumed: the same run, bit for bit.
    ck = str(tmp_path / "ck")
    launch(2, *common, "--out_dir", str(tmp_path / "resumed"), "--save", ck,
           "--save_interval", "50", "--num_iterations", "130")
    killed_after(ck, 100)
    log = launch(2, *common, "--out_dir", str(tmp_path / "resumed"), "--save", ck, "--load", ck,
                 "--save_interval", "50")
    assert "resuming from" in log and "at iteration 100" in log
    assert_bitwise_same_run(str(tmp_path / "full"), str(tmp_path / "resumed"))

    # The merged shards are the serial run's final weights.
    merged = str(tmp_path / "merged.pt")
    run_script("merge_checkpoint.py", tmp_path / "ck_full", "--out", merged)
    serial_final = torch.load(os.path.join(serial_runs["float64"], "model.pt"))
    merged_weights = torch.load(merged)
    assert merged_weights.keys() == serial_final.keys()
    for name, weight in merged_weights.items():
        # measured 3.9e-16 (test_end_to_end)
        assert (weight - serial_final[name]).abs().max() <= 5e-15, name

    # Reshard: TP=2's checkpoint, merged, continues under TP=4 as it does serially.
    more = ["--data_dir", data_dir, "--dtype", "float64", "--num_iterations", "50", "--init_from",
            merged]
    run_script("train.py", *more, "--out_dir", tmp_path / "cont_serial")
    launch(4, *more, "--tensor_model_parallel_size", "4", "--out_dir", str(tmp_path / "cont_tp4"))
    assert_same_curve(str(tmp_path / "cont_serial"), str(tmp_path / "cont_tp4"), "float64")


def test_mismatched_checkpoints_are_refused(data_dir, tmp_path):
    ck = str(tmp_path / "ck")
    launch(2, "--tensor_model_parallel_size", "2", "--data_dir", data_dir, "--num_iterations", "10",
           "--save", ck, "--save_interval", "10", "--out_dir", str(tmp_path / "a"))
    out = launch(4, "--tensor_model_parallel_size", "4", "--data_dir", data_dir, "--load", ck,
                 "--dtype", "float64", "--out_dir", str(tmp_path / "b"), ok=False)
    # The tensor-parallel size may change (resharded); a size of the model itself may not.
    assert ("was saved by a --dtype float32 run, this one is --dtype float64; resume it with "
            "--dtype float32") in out
    out = launch(2, "--tensor_model_parallel_size", "2", "--hidden_size", "1024", "--data_dir",
                 data_dir, "--load", ck, "--out_dir", str(tmp_path / "c"), ok=False)
    assert "was saved with hidden size 2048, this run has 1024; resume with --hidden_size 2048 " \
           "(its weights have that shape)" in out, out
    assert "--init_from" not in out  # it would fail on the shapes too


def test_a_lost_rank_is_restarted_and_resumes_exactly(data_dir, tmp_path):
    common = ["--tensor_model_parallel_size", "2", "--data_dir", data_dir, "--save_interval", "50"]
    launch(2, *common, "--out_dir", str(tmp_path / "full"))
    # Rank 1 is SIGKILLed at iteration 130 in torchrun's first attempt; the restarted group resumes
    # at 100. Real torchrun: its restart is what is tested.
    ck = str(tmp_path / "ck")
    log = run([sys.executable, "scripts/launch.py", "--standalone", "--nproc_per_node", "2",
               "--max-restarts", "1", "tests/inject_fault.py", "die", "1", "130", *common,
               "--out_dir", str(tmp_path / "restarted"), "--save", ck, "--load", ck])
    assert "resuming from" in log and "at iteration 100" in log
    assert_bitwise_same_run(str(tmp_path / "full"), str(tmp_path / "restarted"))


def test_a_checkpoint_resumes_at_another_size_as_if_nothing_changed(data_dir, tmp_path):
    """TP=2 with sequence parallelism, checkpointed at iteration 100, goes on at TP=4 without it
    (cut at load time), and at TP=1 x DP=2 (cut offline): each curve is the one TP=2 went on
    with (float64, measured: 2.9e-15 and 2.9e-15 relative). Without the momentum buffers it is
    not (0.25). (The transformer's test turns sequence parallelism on at the change.)"""
    common = ["--data_dir", data_dir, "--dtype", "float64", "--save_interval", "100"]
    ck = str(tmp_path / "ck")
    launch(2, *common, "--tensor_model_parallel_size", "2", "--sequence_parallel",
           "--num_iterations", "150", "--out_dir", str(tmp_path / "stayed"), "--save", ck)
    killed_after(ck, 100)  # (it also saved at its end, 150)
    log = launch(4, *common, "--tensor_model_parallel_size", "4",
                 "--num_iterations", "150", "--out_dir", str(tmp_path / "tp4"), "--load", ck)
    assert "at iteration 100, resharded from tensor-parallel size 2 to 4" in log
    stayed = rows_after(str(tmp_path / "stayed"), 100)
    for name, way in (("tp4", None), ("tp1_dp2", "offline")):
        if way:
            run_script("merge_checkpoint.py", ck, "--tensor_model_parallel_size", "1",
                       "--save", tmp_path / "ck_tp1")
            launch(2, *common, "--tensor_model_parallel_size", "1", "--num_iterations", "150",
                   "--out_dir", str(tmp_path / name), "--load", str(tmp_path / "ck_tp1"))
        went_on = rows_after(str(tmp_path / name), 100)
        assert len(went_on["iteration"]) == 50
        assert_same_curve(stayed, went_on, "float64")

    # The momentum buffers dropped from the cut checkpoint: the curve notices.
    for shard in (tmp_path / "ck_tp1").glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(shard)
        state["optimizer"]["state"] = {}
        torch.save(state, shard)
    launch(1, *common, "--tensor_model_parallel_size", "1", "--num_iterations", "150",
           "--out_dir", str(tmp_path / "no_momentum"), "--load", str(tmp_path / "ck_tp1"))
    no_momentum = rows_after(str(tmp_path / "no_momentum"), 100)
    assert list(no_momentum["iteration"]) == list(stayed["iteration"])
    _, rel = curve_difference(stayed, no_momentum)
    assert rel > 1e-3, rel


def test_checkpoints_know_whose_they_are(data_dir, tmp_path):
    """Every shard names the run that wrote it (model and sizes, seed, data, run id): shards of two
    runs mixed are refused by name at the saved size, resharded, and merged; a checkpoint of
    another seed or data is refused; a run saves at its end; a checkpoint at the end of the run
    asked for leaves nothing to train."""
    common = ["--tensor_model_parallel_size", "2", "--data_dir", data_dir, "--num_iterations",
              "10", "--save_interval", "100"]  # an interval beyond the run
    a, b = tmp_path / "a", tmp_path / "b"
    launch(2, *common, "--save", a, "--out_dir", tmp_path / "run_a")
    assert (a / "latest_checkpointed_iteration.txt").read_text() == "10\n", "saved at its end"
    out = launch(2, *common, "--load", a, "--out_dir", tmp_path / "again", ok=False)
    assert f"error: {a} is at iteration 10 and --num_iterations is 10: nothing to train" in out
    assert not (tmp_path / "again").exists()
    more = [*common, "--num_iterations", "20", "--out_dir", tmp_path / "more"]
    out = launch(2, *more, "--load", a, "--seed", "5", ok=False)
    assert "was saved by a run with another --seed (1234, this run has 5)" in out
    other_data = tmp_path / "other_data"
    run_script("prepare_data.py", "--data_dir", other_data, "--seed", "8")
    out = launch(2, *more, "--load", a, "--data_dir", other_data, ok=False)
    assert "was saved by a run with another data set (" in out
    # Rank 1's shard from another run of the same sizes and iteration.
    launch(2, *common, "--seed", "5", "--save", b, "--out_dir", tmp_path / "run_b")
    shard = os.path.join("iter_0000010", "mp_rank_01", "model_optim_rng.pt")
    shutil.copy(b / shard, a / shard)
    mixed = f"error: {a / shard} belongs to another run than {a}/iter_0000010/mp_rank_00"
    for tp in (2, 4):  # at the saved size, and cut for another
        out = launch(tp, *more, "--tensor_model_parallel_size", tp, "--load", a, ok=False)
        assert mixed in out and out.count("error:") == 1, out
    out = run_script("merge_checkpoint.py", a, "--out", tmp_path / "merged.pt", ok=False).out
    assert mixed in out and not (tmp_path / "merged.pt").exists()


# ---------------------------------------------------------------------------
# Issue 37: a resume with other optimizer flags, merging a distributed optimizer's checkpoint, a
# virtual pipeline's and a pipeline's with a stage gone. Tiny runs (--hidden_size 16, 2 to 4
# iterations): what is checked is the lines, the files and the bits, not a curve.

TINY = ["--tensor_model_parallel_size", "1", "--hidden_size", "16", "--update_freq", "1",
        "--eval_interval", "2", "--save_interval", "2"]


def test_a_resume_takes_the_optimizer_flags_given_and_refuses_another_optimizer(data_dir,
                                                                                 tmp_path):
    """SGD saved at 2 with --momentum 0.5: resumed with --optimizer adam (and the saved decay),
    one line before anything is written (it was a KeyError); resumed with a new --init_lr and
    no --momentum, the flag given wins (as Megatron's --override-opt_param-scheduler) and the
    checkpoint's momentum is kept, both said, and config.json and the next checkpoint hold what
    the run used."""
    ck, flags = tmp_path / "ck", [*TINY, "--data_dir", data_dir]
    run_script("parallel_train.py", *flags, "--num_iterations", "2", "--momentum", "0.5",
               "--save", ck, "--out_dir", tmp_path / "first", nproc=1)
    refused = run_script("parallel_train.py", *flags, "--num_iterations", "4", "--optimizer",
                         "adam", "--weight_decay", "0", "--load", ck, "--save", ck, "--out_dir",
                         tmp_path / "adam", nproc=1, ok=False)  # (the decay as saved)
    assert refused.stderr.startswith(
        f"error: {ck} (iteration 2) was saved by a run with --optimizer sgd, this one has adam; "
        "resume with --optimizer sgd"), refused.out
    assert refused.out.count("error:") == 1 and "resuming" not in refused.out
    assert not (tmp_path / "adam").exists()
    out = run_script("parallel_train.py", *flags, "--num_iterations", "3", "--init_lr", "0.002",
                     "--load", ck, "--save", ck, "--out_dir", tmp_path / "first", nproc=1).out
    assert (f"resuming from {ck} at iteration 2; --init_lr 0.002 replaces the checkpoint's "
            "0.001; --momentum 0.5 kept from the checkpoint (not given; give it to change it)"
            ) in out, out
    config = json.loads((tmp_path / "first" / "config.json").read_text())
    assert (config["init_lr"], config["momentum"]) == (0.002, 0.5)
    saved = torch.load(ck / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt")
    assert [(g["lr"], g["momentum"]) for g in saved["optimizer"]["param_groups"]] == [(0.002, 0.5)]


def test_a_distributed_optimizer_checkpoint_merges_into_one_that_resumes(data_dir, tmp_path):
    """Adam under --use_distributed_optimizer at DP 2, saved at 2: resumed with SGD (and the
    saved decay), one line (it was a KeyError);
    merge_checkpoint.py --save puts the replicas' files into the shard (it kept the header and
    wrote no files: unreadable), and the run resumed from it is the uninterrupted one, bit for
    bit. Another run's model_optim_rng.pt among the replicas' files is named, not theirs."""
    flags = [*TINY, "--data_dir", data_dir, "--optimizer", "adam", "--use_distributed_optimizer"]
    ck, out, full = tmp_path / "ck", tmp_path / "out", tmp_path / "full"
    run_script("parallel_train.py", *flags, "--num_iterations", "4", "--save", ck, "--out_dir",
               out, nproc=2)
    shutil.copytree(out, full)
    killed_after(str(ck), 2)
    refused = run_script("parallel_train.py", *TINY, "--data_dir", data_dir, "--num_iterations",
                         "4", "--weight_decay", "0.01", "--load", ck, "--out_dir",
                         tmp_path / "sgd", nproc=1, ok=False)
    assert refused.stderr.startswith(
        f"error: {ck} (iteration 2) was saved by a run with --optimizer adam, this one has sgd; "
        "resume with --optimizer adam"), refused.out
    merged = tmp_path / "merged"
    said = run_script("merge_checkpoint.py", ck, "--tensor_model_parallel_size", "1", "--save",
                      merged).stdout
    assert "the distributed optimizer's 2 replicas' files put together" in said, said
    assert "distributed_optimizer" not in torch.load(
        merged / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt")
    log = run_script("parallel_train.py", *flags, "--num_iterations", "4", "--load", merged,
                     "--out_dir", out, nproc=2).out
    assert ("at iteration 2, the optimizer's shards from the plain optimizer to 2") in log, log
    assert_bitwise_same_run(str(full), str(out))
    run_script("merge_checkpoint.py", merged, "--out", tmp_path / "merged.pt")
    # Another run's shard (another run id) copied among the replicas' files.
    shard = ck / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt"
    other = torch.load(shard)
    run_id = other["identity"]["run"]
    other["identity"]["run"] = "another"
    torch.save(other, shard)
    mixed = run_script("merge_checkpoint.py", ck, "--out", tmp_path / "m.pt", ok=False).stderr
    assert mixed == (f"error: {shard} belongs to another run than the distrib_optim_*.pt beside "
                     f"it (run another vs {run_id}): shards of two checkpoints are mixed\n")
    del other["distributed_optimizer"]  # another run's, saved without the distributed optimizer
    torch.save(other, shard)
    mixed = run_script("merge_checkpoint.py", ck, "--out", tmp_path / "m.pt", ok=False).stderr
    assert mixed == (f"error: {shard} belongs to another run than {shard.parent}/"
                     "distrib_optim_000.pt beside it (it was saved without "
                     "--use_distributed_optimizer): shards of two checkpoints are mixed\n")


def test_a_virtual_pipelines_resume_says_its_chunks_and_a_missing_stage_is_named(token_dir,
                                                                                  tmp_path):
    """PP 2 x V 2 saved at 2, resumed at V 1: the line says the chunks per stage (it said "from
    2 pipeline stage(s) to 2"). Stage 1's folder deleted: --load and merge name it (they said
    "holds no shards")."""
    flags = ["--model", "transformer", "--input_size", "8", "--hidden_size", "16",
             "--num_attention_heads", "2", "--num_layers", "4", "--batch_size", "4",
             "--micro_batch_size", "2", "--pipeline_model_parallel_size", "2", *TINY,
             "--data_dir", token_dir]
    ck, out = tmp_path / "ck", tmp_path / "out"
    run_script("parallel_train.py", *flags, "--virtual_pipeline_model_parallel_size", "2",
               "--num_iterations", "2", "--save", ck, "--out_dir", out, nproc=2)
    log = run_script("parallel_train.py", *flags, "--num_iterations", "4", "--load", ck,
                     "--save", ck, "--out_dir", out, nproc=2).out
    assert (f"resuming from {ck} at iteration 2, from 2 to 1 model chunks per stage (virtual "
            "pipeline size)\n") in log, log
    stage = ck / "iter_0000004" / "mp_rank_00_001"
    shutil.rmtree(stage)
    missing = (f"error: {ck} names iteration 4, but {stage} is missing (an incomplete "
               "checkpoint")
    for tool, argv, nproc in (("parallel_train.py", [*flags, "--num_iterations", "6", "--load",
                                                     ck, "--out_dir", tmp_path / "again"], 2),
                              ("merge_checkpoint.py", [ck, "--out", tmp_path / "m.pt"], None)):
        run = run_script(tool, *argv, nproc=nproc, ok=False)
        assert run.stderr.startswith(missing) and run.out.count("error:") == 1, run.out
        assert "resuming" not in run.out


def test_adams_hyperparameters_given_replace_the_checkpoints_and_the_others_are_kept():
    """resumed_hyperparameters on Adam's groups (the runs above: SGD's): --adam_beta2 and
    --adam_eps given replace the saved ones in every group; --init_lr and --adam_beta1 left out
    keep the checkpoint's, and args takes them (config.json records args)."""
    import argparse

    from training.checkpointing import resumed_hyperparameters
    saved = [dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=w, params=[]) for w in
             (0.01, 0.0)]
    args = argparse.Namespace(optimizer="adam", init_lr=0.001, adam_beta1=0.9, adam_beta2=0.95,
                              adam_eps=1e-8, given_flags=["--adam_beta2", "--adam_eps"])
    groups, said = resumed_hyperparameters(saved, args)
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in groups] == [
        (0.01, (0.8, 0.95), 1e-8, 0.01), (0.01, (0.8, 0.95), 1e-8, 0.0)]
    assert (args.init_lr, args.adam_beta1, args.adam_beta2, args.adam_eps) == (0.01, 0.8, 0.95,
                                                                               1e-8)
    assert said == ["--init_lr 0.01 kept from the checkpoint (not given; give it to change it)",
                    "--adam_beta1 0.8 kept from the checkpoint (not given; give it to change it)",
                    "--adam_beta2 0.95 replaces the checkpoint's 0.99",
                    "--adam_eps 1e-08 replaces the checkpoint's 1e-06"]
