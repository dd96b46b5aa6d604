"""The toy transformer trained end to end (--model transformer): serial against TP 2 (TP 4 with a
vocabulary 4 does not divide, 50 -> 52, resumed and merged into the unpadded serial state_dict:
test_context_parallel_train.py; DP x TP and sequence parallelism: the covering array); the
communication table; an exact resume with dropout on; activation recomputation changing no bit
in either script; merging the shards into the serial state_dict; one-line errors.

Float64, 30 iterations: measured here 3.9e-16 relative at most (TP 2, TP 4, DP x TP; 200
iterations at TP 2: 3.9e-16); bound 5e-14, as for the ToyModel (test_scale.py). Float32 runs are
not compared here: their curves part by up to 2.6e-4 relative over 200 iterations (see
docs/transformer.md), while float64 agrees to 1e-16, so the model is right and float32's
round-off is what grows.
"""

import os
import shutil

import numpy as np
import pytest
import torch

from curves import assert_bitwise_same_run, assert_same_curve
from distributed import comm_table, run_script
from test_errors import flag_error
from test_scale import killed_after, launch
from training.data import DataError, load_token_dataset

COMMON = ["--model", "transformer", "--dtype", "float64", "--num_iterations", "30",
          "--update_freq", "10", "--init_lr", "0.01"]


@pytest.fixture(scope="module")
def serial(token_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("transformer_serial"))
    run_script("train.py", *COMMON, "--data_dir", token_dir, "--out_dir", out)
    return out


# DP 2 x TP 2, sequence parallelism alone and with DP 2: in the covering array
# (test_configurations.py), with every other option.
def test_transformer_curve_equals_serial(token_dir, serial, tmp_path):
    log = launch(2, *COMMON, "--data_dir", token_dir, "--tensor_model_parallel_size", "2",
                 "--out_dir", str(tmp_path))
    assert_same_curve(serial, str(tmp_path), "float64")
    # Embedding g; attention g, MLP g; cross-entropy's 2; backward: attention f, MLP f, and f
    # before the output layer: 6 of 32x16x64 float64 (256 KiB) and 3 x 32x16 numbers (12 KiB).
    assert comm_table(log) == {"all_reduce": (8, 1548.0, 1548.0)}
    assert "instead of gathering 200.00 KiB of logits" in log


@pytest.fixture(scope="module")
def with_dropout(token_dir, tmp_path_factory):
    """TP=2 with dropout 0.1, 20 iterations: (its flags, its --out_dir)."""
    common = [*COMMON, "--data_dir", token_dir, "--dropout", "0.1", "--num_iterations", "20"]
    out = str(tmp_path_factory.mktemp("transformer_dropout"))
    launch(2, *common, "--out_dir", out)
    return common, out


def test_transformer_resumes_exactly_with_dropout_and_merges(with_dropout, tmp_path):
    common, full = with_dropout
    ck = str(tmp_path / "ck")
    launch(2, *common, "--num_iterations", "15", "--save", ck, "--save_interval", "10",
           "--out_dir", str(tmp_path / "resumed"))
    killed_after(ck, 10)
    log = launch(2, *common, "--save", ck, "--save_interval", "10", "--load", ck,
                 "--out_dir", str(tmp_path / "resumed"))
    assert "resuming from" in log and "at iteration 10" in log
    assert_bitwise_same_run(full, str(tmp_path / "resumed"))
    run_script("merge_checkpoint.py", ck, "--out", tmp_path / "merged.pt")
    merged = torch.load(tmp_path / "merged.pt")
    final = torch.load(os.path.join(full, "model.pt"))
    assert merged["word_embeddings.weight"].shape == (50, 64)
    assert merged.keys() == final.keys()
    assert all(torch.equal(merged[k], final[k]) for k in final)


@pytest.mark.parametrize("distribute", [False, True])
def test_parallel_train_recomputes_without_changing_a_bit(with_dropout, distribute, tmp_path):
    """--recompute_granularity full at TP=2 with dropout: each rank keeps each block's input
    (with --distribute_saved_activations its half, gathered to run the block again); every loss
    and weight is the same bit for bit."""
    common, plain = with_dropout
    flags = ["--distribute_saved_activations"] if distribute else []
    log = launch(2, *common, "--recompute_granularity", "full", *flags, "--out_dir",
                 str(tmp_path))
    assert_bitwise_same_run(plain, str(tmp_path))
    # The recomputed forward's 2 all-reduces (attention's g, the MLP's g: 256 KiB of float64 each)
    # beside the step's 8, and with the input distributed the all-gather of each rank's half.
    assert comm_table(log) == {"all_reduce": (10, 2060.0, 2060.0),
                               **({"all_gather": (1, 128.0, 128.0)} if distribute else {})}
    assert ("(--distribute_saved_activations)" in log) == distribute


def test_train_recomputes_without_changing_a_bit(token_dir, serial, tmp_path):
    run_script("train.py", *COMMON, "--recompute_granularity", "selective", "--data_dir",
               token_dir, "--out_dir", tmp_path)
    assert_bitwise_same_run(serial, str(tmp_path))


# TP 4 (the vocabulary padded 50 -> 52) resumed at another size and merged into the serial model:
# test_context_parallel_train.py's resume across C 2 -> TP 4 -> C 4.


@pytest.mark.parametrize("args,message", [
    (["--num_attention_heads", "3", "--input_size", "63"],
     "--num_attention_heads 3 is not divisible by --tensor_model_parallel_size 2"),
    (["--sequence_parallel", "--seq_length", "15"],
     "--sequence_parallel splits the 15 tokens of a sequence between 2 tensor-parallel ranks"),
    (["--num_attention_heads", "5"], "--input_size 64 is not divisible by --num_attention_heads 5"),
])
def test_transformer_flag_errors_are_one_line(args, message):
    assert message in flag_error(["--model", "transformer", *args])


def test_token_data_that_does_not_fit_is_one_line(token_dir):
    with pytest.raises(DataError, match="has tokens up to 49 but --vocab_size is 20; pass "
                                        "--vocab_size 50"):
        load_token_dataset(token_dir, 20, 16, 32)
    with pytest.raises(DataError, match="sequences of 16 \\+ 1 tokens but --seq_length is 8"):
        load_token_dataset(token_dir, 50, 8, 32)


def test_token_data_advice_that_holds(token_dir, tmp_path):
    """No advice that then fails: a negative token is not a vocabulary size, and a validation set
    whose sequences differ from the training set's cannot be fixed by --seq_length."""
    for name in ("tokens_train.npy", "tokens_valid.npy"):
        shutil.copy(os.path.join(token_dir, name), tmp_path / name)
    valid = np.load(tmp_path / "tokens_valid.npy")
    np.save(tmp_path / "tokens_valid.npy", valid[:, :-1])
    with pytest.raises(DataError, match="has sequences of 15 \\+ 1 tokens and tokens_train.npy "
                                        "of 16 \\+ 1; recreate the data with"):
        load_token_dataset(str(tmp_path), 50, 16, 32)
    valid[0, 0] = -1
    np.save(tmp_path / "tokens_valid.npy", valid)
    with pytest.raises(DataError, match="has a negative token \\(-1\\); tokens are indices from "
                                        "0 to --vocab_size - 1"):
        load_token_dataset(str(tmp_path), 50, 16, 32)
