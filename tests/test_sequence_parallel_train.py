"""--sequence_parallel end to end: the same loss curve as serial, for TP 2 and 4, alone and with DP.

Measured here over the default 200 iterations: float32 within 1.2e-6 relative (TP=4), float64 within
4.4e-15 (TP=2) and 3.7e-15 (DP=2 x TP=2); bounds as in test_end_to_end.py. The 4-rank runs stop at
50, against the serial run's first 50 (4 ranks on 2 cores: the suite's time; their curves over
200 iterations are the ones measured above).
"""

import pytest

from curves import assert_same_curve, rows_after
from distributed import comm_table, run_script


@pytest.mark.parametrize("nproc,tp,dtype",
                         [(2, 2, "float64"), (4, 4, "float32"), (4, 2, "float64")])
def test_sequence_parallel_matches_serial(nproc, tp, dtype, data_dir, serial_runs, tmp_path):
    iterations = 200 if nproc == 2 else 50
    log = run_script("parallel_train.py", "--tensor_model_parallel_size", tp,
                     "--sequence_parallel", "--data_dir", data_dir, "--dtype", dtype, "--out_dir",
                     tmp_path / "sp", "--num_iterations", iterations, nproc=nproc).out
    serial = rows_after(serial_runs[dtype])
    serial = {k: v[serial["iteration"] <= iterations] for k, v in serial.items()}
    assert_same_curve(serial, str(tmp_path / "sp"), dtype)
    # Per step: forward all-gather + reduce-scatter; backward all-gather (fc1's rows again) and
    # all-gather (the reduce-scatter's backward); dL/dX's reduce-scatter skipped (X needs no grad);
    # one small all-reduce of fc's gradient and the loss (64 + 1 values). Each all-gather or
    # reduce-scatter of a replica's rows x 64 sends (TP-1)/TP of it per rank in a ring, half an
    # all-reduce.
    elem = {"float32": 4, "float64": 8}[dtype]
    kib, small = 32 // (nproc // tp) * 64 * elem / 1024, 65 * elem / 1024
    share = (tp - 1) / tp
    table = comm_table(log)
    assert table["all_gather"] == pytest.approx((3, 3 * kib / tp, 3 * share * kib), abs=0.005), log
    assert table["reduce_scatter"] == pytest.approx((1, kib, share * kib), abs=0.005), log
    if nproc == tp:
        assert table["all_reduce"] == pytest.approx((1, small, 2 * share * small), abs=0.005), log
    # with data parallelism it goes over all ranks, averaged over replicas
    # (finalize_model_grads.average_replicated)
    else:
        world_share = (nproc - 1) / nproc
        assert "all_reduce" not in table
        assert table["replicated_all_reduce"] == pytest.approx((1, small, 2 * world_share * small),
                                                               abs=0.005), log


def test_batch_rows_must_split_over_tensor_parallel_ranks(data_dir, tmp_path):
    out = run_script("parallel_train.py", "--sequence_parallel", "--batch_size", "33",
                     "--data_dir", data_dir, "--out_dir", tmp_path, nproc=2, ok=False).out
    assert ("--sequence_parallel splits each replica's 33 rows between 2 tensor-parallel ranks"
            in out)
