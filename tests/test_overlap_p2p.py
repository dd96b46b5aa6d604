"""--overlap_p2p_comm (issue 39, core/pipeline_parallel/schedules.py's _InterleavedOverlapped):
the interleaved schedule's exchanges posted without waiting, each waited for where its tensor is
used, move no arithmetic. A run with it is the run without it, bit for bit: the transformer in
two stages of two chunks each, four micro-batches (warm-up, steady state and cool-down all
run). Under TP_CHECK_COLLECTIVES (conftest) every send's header is checked against its receive,
so a send and a receive that no longer pair fail in one line; an exchange never waited for
fails the step in one line too (p2p_communication.check_nothing_in_flight). m = p (all
warm-up), m = 8, TP 2 with sequence parallelism and DP 2 were checked by hand the same way.
"""

from curves import assert_bitwise_same_run
from distributed import run_script

FLAGS = ["--model", "transformer", "--input_size", "32", "--hidden_size", "64",
         "--num_attention_heads", "4", "--num_layers", "4", "--batch_size", "8",
         "--micro_batch_size", "2", "--num_iterations", "2", "--eval_interval", "2",
         "--tensor_model_parallel_size", "1", "--pipeline_model_parallel_size", "2",
         "--virtual_pipeline_model_parallel_size", "2"]


def test_overlapped_exchanges_change_no_number(token_dir, tmp_path):
    flags = [*FLAGS, "--data_dir", token_dir]
    run_script("parallel_train.py", *flags, "--out_dir", tmp_path / "off", nproc=2)
    run_script("parallel_train.py", *flags, "--overlap_p2p_comm", "--out_dir", tmp_path / "on",
               nproc=2)
    assert_bitwise_same_run(str(tmp_path / "off"), str(tmp_path / "on"))
