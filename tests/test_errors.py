"""Every mistake a user can make, and every fault, ends in one clear line: no traceback first, no
hang.

Flag checks run in-process (fast, and fuzzed); data checks on crafted files;
runs that fail the same way on every rank in the session's rank processes
(distributed.run_script); the failures that involve the launcher (one rank
failing or killed, Ctrl-C, torchrun's SIGTERM, a port in use) under a real
torchrun, each under a time limit far below a minute, though the runs are given
--distributed_timeout_minutes 1.
"""

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prepare_data
from distributed import run_script
from training.arguments import get_args_parser, get_parallel_args, parse_args
from training.data import DataError, load_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")  # a file where a directory is wanted
FAIL_FAST_S = 30  # multi-rank failures must end well inside the 60 s collective timeout
START_UP_S = 5  # a real launch's start-up on 2 cores (torchrun, then 2 ranks importing torch)


def flag_error(argv, world_size=2, parallel=True):
    """The one-line error for argv, or None if the flags are accepted."""
    stderr = io.StringIO()
    env = {"RANK": "0", "WORLD_SIZE": str(world_size)}
    try:
        with mock.patch.dict(os.environ, env), contextlib.redirect_stderr(stderr):
            get_parallel_args(argv) if parallel else parse_args(get_args_parser(), argv)
    except SystemExit as e:
        assert e.code == 2
        lines = stderr.getvalue().splitlines()
        assert len(lines) == 1, lines
        return lines[0]
    return None


@pytest.mark.parametrize("argv,world_size,message", [
    (["--hidden_size", "101"], 2, "--hidden_size 101 is not divisible by "
                                  "--tensor_model_parallel_size 2"),
    ([], 3, "world size 3 is not divisible by --tensor_model_parallel_size 2; "
            "launch a multiple of 2"),
    (["--tensor_model_parallel_size", "4"], 2,
     "--tensor_model_parallel_size 4 is larger than the 2 processes"),
    (["--tensor_model_parallel_size", "0"], 2,
     "--tensor_model_parallel_size must be a positive integer, got 0"),
    (["--input_size", "0"], 2, "--input_size must be a positive integer, got 0"),
    (["--hidden_size", "-8"], 2, "--hidden_size must be a positive integer, got -8"),
    (["--batch_size", "0"], 2, "--batch_size must be a positive integer, got 0"),
    (["--batch_size", "2.5"], 2, "argument --batch_size: invalid int value: '2.5'"),
    (["--num_iterations", "-1"], 2, "--num_iterations must be a positive integer, got -1"),
    (["--model", "transformer", "--distribute_saved_activations"], 2,
     "--distribute_saved_activations splits what full recomputation keeps: add "
     "--recompute_granularity full"),
    (["--model", "transformer", "--recompute_granularity", "full", "--sequence_parallel",
      "--distribute_saved_activations"], 2,
     "--distribute_saved_activations with --sequence_parallel: the block's input is this rank's "
     "rows already"),
    (["--dropout", "0.5"], 2, "--dropout 0.5 drops out in the transformer's blocks; the toy model "
                              "has no dropout"),
    (["--clip_grad", "1e-300"], 2, "--clip_grad 1e-300 is below the smallest normal float32 "
                                   "(1.2e-38): every update would round to 0"),
    (["--tp_reduce_dtype", "float32", "--dtype", "bfloat16", "--tensor_model_parallel_size", "1"],
     2, "--tp_reduce_dtype float32 widens the tensor-parallel sums; at "
        "--tensor_model_parallel_size 1 there are none"),
    (["--num_iterations", "99999999999999999999"], 2, "--num_iterations must be at most "
                                                      "1,000,000,000,000, got "
                                                      "99,999,999,999,999,999,999"),
    (["--init_lr", "0"], 2, "--init_lr must be a positive number, got 0.0"),
    (["--init_lr", "nan"], 2, "--init_lr must be a positive number, got nan"),
    (["--init_lr", "inf"], 2, "--init_lr must be a positive number, got inf"),
    (["--momentum", "1"], 2, "--momentum must be in [0, 1), got 1.0"),
    (["--update_freq", "0"], 2, "--update_freq must be a positive integer, got 0"),
    (["--eval_interval", "0"], 2, "--eval_interval must be a positive integer, got 0"),
    (["--distributed_timeout_minutes", "0"], 2,
     "--distributed_timeout_minutes must be a positive number"),
    (["--init_from", "no/such.pt"], 2, "--init_from no/such.pt: no such file"),
    (["--load", README], 2, f"--load {README}: {README} is a file; name a directory"),
    (["--load", "no/such/ck"], 2, "--load no/such/ck: no such directory (to restart a run from "
                                  "its own checkpoints whatever they are, pass the same directory "
                                  "to --save)"),
    (["--out_dir", "/sys/run"], 2, "--out_dir /sys/run: /sys cannot be written"),
    (["--save", "/sys/ck"], 2, "--save /sys/ck: /sys cannot be written"),
    (["--seed", str(2**64)], 2, f"--seed must be an integer from 0 to 2**63 - 1, got {2**64}"),
    (["--clip_grad", "0"], 2, "--clip_grad must be a positive finite number, got 0.0 (leave it "
                              "out to train without clipping)"),
    (["--clip_grad", "inf"], 2, "--clip_grad must be a positive finite number, got inf"),
    (["--reorder_seed", "1"], 2, "--reorder_seed is train.py's: a reordered run is the serial one"),
    (["--tp_reduce_dtype", "float32"], 2,
     "--tp_reduce_dtype float32 changes bfloat16 runs only; this one is --dtype float32"),
    (["--save", f"{README}/ck"], 2, f"--save {README}/ck: {README} is a file; name a directory"),
    (["--out_dir", README], 2, f"--out_dir {README}: {README} is a file; name a directory"),
])
def test_flag_errors(argv, world_size, message):
    error = flag_error(argv, world_size)
    assert error and error.startswith("parallel_train.py: error: ") and message in error, error


def test_under_a_bare_torchrun_the_line_says_torchruns_report_adds_nothing():
    """A bare torchrun prints its own 40-line report after a worker's error; the one line says
    that it adds nothing and which launcher leaves the line alone. scripts/launch.py's workers
    (TP_LAUNCHER) are not told."""
    bare = {"TORCHELASTIC_RUN_ID": "x"}
    with mock.patch.dict(os.environ, bare):  # put back as it was on leaving
        os.environ.pop("TP_LAUNCHER", None)
        assert flag_error(["--hidden_size", "101"]).endswith(
            "(see --help); torchrun's own report below says nothing more (python "
            "scripts/launch.py, or bash bash_parallel_train.sh, leaves this line alone)")
    with mock.patch.dict(os.environ, {**bare, "TP_LAUNCHER": "scripts/launch.py"}):
        assert flag_error(["--hidden_size", "101"]).endswith("(see --help)")


def test_plain_python_with_tensor_parallelism_says_how_to_launch():
    stderr = io.StringIO()
    with mock.patch.dict(os.environ), contextlib.redirect_stderr(stderr), pytest.raises(SystemExit):
        os.environ.pop("RANK", None)
        get_parallel_args(["--tensor_model_parallel_size", "2"])
    assert "launch with torchrun --nproc_per_node 2 parallel_train.py" in stderr.getvalue()


sizes = st.integers(min_value=-3, max_value=4096)


@settings(max_examples=300, deadline=None)
@given(input_size=sizes, hidden=st.none() | sizes, batch=sizes, iterations=sizes, update_freq=sizes,
       eval_interval=sizes, tp=st.integers(-2, 9), world_size=st.integers(1, 9))
def test_fuzz_size_checks(input_size, hidden, batch, iterations, update_freq, eval_interval, tp,
                          world_size):
    """Flags are accepted exactly when the sizes make sense; otherwise one line says which doesn't.
    """
    argv = ["--input_size", str(input_size), "--batch_size", str(batch), "--num_iterations",
            str(iterations),
            "--update_freq", str(update_freq), "--eval_interval", str(eval_interval),
            "--tensor_model_parallel_size", str(tp)] + ([] if hidden is None else ["--hidden_size",
                                                                                   str(hidden)])
    hidden_size = 32 * input_size if hidden is None else hidden
    valid = (min(input_size, hidden_size, batch, iterations, update_freq, eval_interval, tp) > 0
             and hidden_size % tp == 0 and world_size % tp == 0
             and batch % (world_size // tp) == 0)  # each data-parallel replica takes an equal share
    error = flag_error(argv, world_size)
    assert (error is None) == valid, (argv, world_size, error)


# ---------------------------------------------------------------------------
# Data files.

def write_data(path, input_size=4, num_samples=100, **replace):
    """A small valid data set in `path`, with some arrays replaced by the caller's."""
    path.mkdir(exist_ok=True)
    arrays = dict(zip(prepare_data.FILES, prepare_data.make_data(num_samples, input_size)))
    arrays.update(replace)
    for name, array in arrays.items():
        np.save(path / name, array)
    return path


def data_error(path, input_size=4, batch_size=32):
    with pytest.raises(DataError) as e:
        load_dataset(str(path), input_size, batch_size)
    return str(e.value)


def test_data_errors(tmp_path):
    assert ("not found; create the data with: python prepare_data.py --data_dir"
            in data_error(tmp_path / "none"))

    ints = write_data(tmp_path / "ints", xtrain=np.zeros((90, 4), np.int64))
    assert "train inputs have dtype int64, not floating-point numbers" in data_error(ints)
    flat = write_data(tmp_path / "flat", xtrain=np.zeros(2, np.float32))
    assert "train inputs have shape [2], not samples x inputs" in data_error(flat)
    empty = write_data(tmp_path / "empty", xvalid=np.zeros((0, 4), np.float32),
                       yvalid=np.zeros(0, np.float32))
    assert data_error(empty).startswith("the valid set has 0 samples, fewer than 1; make more "
                                        "data with prepare_data.py --num_samples")

    bad = write_data(tmp_path / "garbage")
    (bad / "xtrain.npy").write_bytes(b"not an array")
    assert "xtrain.npy is not a readable .npy array" in data_error(bad)

    bad = write_data(tmp_path / "truncated")
    content = (bad / "ytrain.npy").read_bytes()
    (bad / "ytrain.npy").write_bytes(content[: len(content) // 2])
    assert "ytrain.npy is not a readable .npy array" in data_error(bad)

    bad = write_data(tmp_path / "objects")
    np.save(bad / "xvalid.npy", np.array([{"a": 1}] * 10, dtype=object), allow_pickle=True)
    assert "xvalid.npy is not a readable .npy array" in data_error(bad)

    bad = write_data(tmp_path / "lengths", ytrain=np.zeros(89, np.float32))
    assert "the train set has 90 inputs but targets of shape [89]" in data_error(bad)

    assert "pass --input_size 4" in data_error(write_data(tmp_path / "size"), input_size=8)

    X = prepare_data.make_data(100, 4)[0]
    X[3, 2] = np.nan
    nan = write_data(tmp_path / "nan", xtrain=X)
    assert "train inputs contain 1 NaN or infinite values" in data_error(nan)

    assert "has 90 samples, fewer than 128 (one batch): lower --batch_size" in \
        data_error(write_data(tmp_path / "few"), batch_size=128)


# ---------------------------------------------------------------------------
# Whole runs, as a user starts them.

def launch(*args, script=("parallel_train.py",), nproc=2, timeout=FAIL_FAST_S):
    """torchrun through scripts/launch.py, as bash_parallel_train.sh does; (exit code, output,
    seconds).

    Flags given later in `args` (e.g. --data_dir) override earlier ones.
    """
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "scripts/launch.py", "--standalone", "--nproc_per_node",
                           str(nproc),
                           *script, "--tensor_model_parallel_size", str(nproc),
                           "--distributed_timeout_minutes", "1", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def first_problem(output):
    """The first line that reports a problem: what a user reads first."""
    for line in output.splitlines():
        if line.startswith(("error:", "Traceback", "rank ")) or "Error" in line.split(":")[0]:
            return line
    return None


def test_bad_data_under_torchrun_fails_once_and_fast(tmp_path):
    X = prepare_data.make_data(100, 64)[0]
    X[0, 0] = np.inf
    data = write_data(tmp_path / "data", input_size=64, xtrain=X)
    code, out, seconds = launch("--data_dir", str(data), "--out_dir", str(tmp_path / "run"))
    assert code != 0 and seconds < FAIL_FAST_S
    assert first_problem(out).startswith(
        "error: train inputs contain 1 NaN or infinite values"), out
    assert out.count("error:") == 1 and "Traceback" not in out


def test_bad_init_from_is_named_once(tmp_path, data_dir):
    torch.manual_seed(0)
    state = {"mlp.fc1.weight": torch.zeros(2048, 64), "mlp.fc2.weight": torch.zeros(64, 2048),
             "fc.weight": torch.zeros(1, 64), "fc.bias": torch.zeros(1)}
    torch.save(state, tmp_path / "extra.pt")
    code, out, _ = launch("--init_from", str(tmp_path / "extra.pt"), "--out_dir",
                          str(tmp_path / "run"),
                          "--data_dir", data_dir)
    assert code != 0
    assert first_problem(out) == ("error: state dict keys do not match the model: missing [], "
                                  "unexpected ['fc.bias']")
    assert out.count("error:") == 1 and "Traceback" not in out
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
    run = run_script("train.py", "--init_from", tmp_path / "garbage.pt", "--data_dir", data_dir,
                     "--out_dir", tmp_path / "serial", ok=False)
    assert run.code == 2
    assert run.stderr.startswith(f"error: --init_from {tmp_path / 'garbage.pt'} is not a "
                                 "state_dict saved with torch.save")


def test_diverging_run_stops_with_its_metrics_on_disk(tmp_path, data_dir):
    # --init_lr 1 makes the loss NaN at iteration 4 (measured); the agreement check must not mistake
    # NaN for a bug.
    # Stops well inside the collective timeout: the pooled ranks are started already, so the
    # limit is FAIL_FAST_S less a real launch's start-up (about 5 s on 2 cores).
    out = run_script("parallel_train.py", "--tensor_model_parallel_size", "2", "--init_lr", "1",
                     "--out_dir", tmp_path, "--data_dir", data_dir, nproc=2, ok=False,
                     timeout=FAIL_FAST_S - START_UP_S).out
    assert first_problem(out).startswith("error: the train loss is nan at iteration 4: training "
                                         "diverged; lower --init_lr (now 1)"), out
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[-1].startswith("4,nan,")
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("kind", ["raise", "die"])
def test_a_failing_rank_stops_every_rank_and_its_error_comes_first(kind, tmp_path, data_dir):
    # tests/inject_fault.py: rank 1 raises, or is killed, after receiving the batch of iteration 5.
    code, out, seconds = launch("--out_dir", str(tmp_path), "--data_dir", data_dir,
                                script=("tests/inject_fault.py", kind, "1", "5"))
    assert code != 0 and seconds < FAIL_FAST_S, (code, seconds)
    last = out.strip().splitlines()[-1]
    if kind == "raise":
        assert first_problem(out) == "rank 1 failed:", out
        assert "RuntimeError: injected fault on rank 1 at iteration 5" in out
        assert last.endswith("the first error above is the cause"), last
    else:
        assert "rank 1 killed by SIGKILL is the cause" in last, last
    assert "error: rank 0 lost a peer in a collective" in out  # one line, not a second traceback
    assert out.count("Traceback") == (kind == "raise")


def test_ctrl_c_stops_every_rank(tmp_path, data_dir):
    """SIGINT to the whole process group, as a terminal sends it."""
    proc = subprocess.Popen([sys.executable, "scripts/launch.py", "--standalone",
                             "--nproc_per_node", "2",
                             "parallel_train.py", "--tensor_model_parallel_size", "2",
                             "--num_iterations", "1000000",
                             "--update_freq", "10", "--out_dir", str(tmp_path), "--data_dir",
                             data_dir],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    # wait until rank 0, which writes metrics.csv, has recorded iteration 20
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Rank 0 Iter 20 Train Loss"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=FAIL_FAST_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ranks still running after Ctrl-C")
    out = "".join(lines) + rest
    assert proc.returncode != 0
    assert "Traceback" not in out, out
    with pytest.raises(ProcessLookupError):  # nothing of the job is left
        os.killpg(proc.pid, 0)
    assert (tmp_path / "metrics.csv").read_text().count("\n") > 20  # rows so far reached the disk


SLOW_SHUTDOWN = """
import atexit, time
from training.data import DataError
from training.operations import run_cli
atexit.register(time.sleep, 5)  # a slow interpreter shutdown, as on 2 busy cores

def main():
    raise DataError("no data")
run_cli(main)
"""


def test_sigterm_during_shutdown_keeps_the_exit_status_and_the_one_line():
    """torchrun stops the other ranks when one exits; a rank still shutting down must not then
    print a traceback from inside a finalizer (seen once in CI), nor change its exit status."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SHUTDOWN], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = proc.stdout.readline()  # said before the shutdown starts
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=FAIL_FAST_S)
    assert (first, rest, proc.returncode) == ("error: no data\n", "", 2)


STOPPED_WHILE_LEAVING = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from training import operations
from training.data import DataError
leaving_with = operations._leaving_with


def stopped_first(code):  # torchrun's SIGTERM arrives as the rank starts to leave
    os.kill(os.getpid(), signal.SIGTERM)
    leaving_with(code)


def main():
    if sys.argv[1] == "peer":  # a collective's error when the other end went away, as rank 0
        operations.dist.get_rank = lambda: 0
        try:
            raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection reset by peer. x")
        except RuntimeError as e:
            os.kill(os.getpid(), signal.SIGTERM)  # torchrun's, as the rank starts to say so
            operations.die_first_error_first(e)
    raise operations.QuietExit(2) if sys.argv[1] == "quiet" else DataError("no data")


operations._leaving_with = stopped_first
operations.run_cli(main)
"""


@pytest.mark.parametrize("error", ["quiet", "said", "peer"])
def test_sigterm_while_catching_the_error_keeps_the_exit_status_and_the_one_line(error,
                                                                                 tmp_path):
    """torchrun stops the other ranks when one exits; one stopped in the instant between catching
    its error and leaving printed a traceback and exited 1 (6 of 30 runs of a checkpoint shard
    missing on one rank, once the pool sent SIGTERM as torchrun does)."""
    (tmp_path / "stopped.py").write_text(STOPPED_WHILE_LEAVING.format(repo=REPO))
    run = run_script(str(tmp_path / "stopped.py"), error, ok=False)
    assert (run.code, run.stdout) == (1 if error == "peer" else 2, "")
    assert run.stderr == {"quiet": "", "said": "error: no data\n",
                          "peer": "error: rank 0 lost a peer in a collective (Connection reset by "
                                  "peer); another rank failed first\n"}[error]


SIGNALLED_AT_15 = """
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
from training import logbook
step, signum = logbook.Logbook.step, getattr(signal, sys.argv.pop(1))


def signalled_at_15(self, it, *rest):  # kill, torchrun stopping the job, or Ctrl-C
    step(self, it, *rest)
    if it == 15:
        os.kill(os.getpid(), signum)


logbook.Logbook.step = signalled_at_15
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(os.path.join({repo!r}, "train.py"), run_name="__main__")
"""


@pytest.mark.parametrize("signum,code,said", [("SIGTERM", 143, ""), ("SIGINT", 130,
                                                                      "interrupted\n")])
def test_a_stopped_run_says_what_is_on_disk_and_where_the_earlier_run_went(signum, code, said,
                                                                          tmp_path):
    data = write_data(tmp_path / "data", input_size=8, num_samples=400)
    out = tmp_path / "run"
    run = ["train.py", "--data_dir", data, "--input_size", "8", "--out_dir", out]
    run_script(*run, "--num_iterations", "3")  # the earlier run, set aside by the next
    (tmp_path / "stop.py").write_text(SIGNALLED_AT_15.format(repo=REPO))
    stopped = run_script(str(tmp_path / "stop.py"), signum, *run[1:], "--num_iterations", "40",
                         ok=False)
    assert stopped.code == code
    assert stopped.stderr == (f"stopped at iteration 15: {out / 'metrics.csv'} has its rows so "
                              f"far (the earlier run there is in {out / 'earlier_run'})\n"
                              + said), stopped.stderr
    assert (out / "metrics.csv").read_text().splitlines()[-1].startswith("15,")


def test_port_in_use_is_one_line(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(["bash", "bash_parallel_train.sh", "--out_dir", str(tmp_path)],
                              cwd=REPO,
                              capture_output=True, text=True, timeout=FAIL_FAST_S,
                              env={**os.environ, "MASTER_PORT": str(port),
                                   "PYTHON": sys.executable})
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: MASTER_PORT {port} is already in use (another run?); "
                                   "choose a free port, or on one node leave MASTER_PORT unset and "
                                   "torchrun picks one")


def test_rerun_into_the_same_out_dir_starts_afresh(tmp_path):
    data = write_data(tmp_path / "data", input_size=8, num_samples=400)
    run = ["train.py", "--data_dir", data, "--input_size", "8", "--out_dir", tmp_path / "run"]
    run_script(*run, "--num_iterations", "7")
    second = run_script(*run, "--num_iterations", "3")
    assert f"note: {tmp_path / 'run'} holds an earlier run" in second.stdout
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    # no rows of the first run
    assert [r.split(",")[0] for r in rows] == ["iteration", "1", "2", "3"]
    # no temp files, and the earlier run let go once this one had its model.pt
    assert sorted(os.listdir(tmp_path / "run")) == ["config.json", "metrics.csv", "model.pt"]


def test_a_new_run_that_fails_loses_nothing_of_the_earlier_one(tmp_path):
    """The earlier run's files move aside when a new run starts in its --out_dir, and stay there
    while the new run diverges; a run that then finishes lets them go."""
    data = write_data(tmp_path / "data", input_size=8, num_samples=400)
    out = tmp_path / "run"
    run = ["train.py", "--data_dir", data, "--input_size", "8", "--out_dir", out]
    run_script(*run, "--num_iterations", "7")
    first = {name: (out / name).read_bytes() for name in ("metrics.csv", "config.json",
                                                          "model.pt")}
    diverged = run_script(*run, "--init_lr", "1e6", ok=False)
    assert "training diverged" in diverged.stderr
    assert f"(the earlier run there is in {out / 'earlier_run'})" in diverged.stderr
    assert {name: (out / "earlier_run" / name).read_bytes() for name in first} == first
    assert (out / "metrics.csv").read_bytes() != first["metrics.csv"]  # the diverged run's rows
    assert not (out / "model.pt").exists()
    # Another try: the diverged run's files give way, the finished one stays aside until this
    # run has its model.pt.
    third = run_script(*run, "--num_iterations", "3")
    assert "holds an unfinished run" in third.stdout
    assert sorted(os.listdir(out)) == ["config.json", "metrics.csv", "model.pt"]


def test_scripts_delete_only_what_they_made(tmp_path):
    """scripts/change_tp_size.sh refuses a RUNS directory it did not make, before any work;
    merge_checkpoint.py refuses to overwrite a file unless told to."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    proc = subprocess.run(["bash", "scripts/change_tp_size.sh", "--no_such_flag"], cwd=REPO,
                          capture_output=True, text=True, timeout=FAIL_FAST_S,
                          env={**os.environ, "RUNS": str(mine), "PYTHON": sys.executable})
    assert proc.returncode == 2 and (mine / "notes.txt").read_text() == "mine"
    assert proc.stderr == (f"error: RUNS={mine} exists and was not made by "
                           "scripts/change_tp_size.sh; name a new directory (nothing was "
                           "changed)\n")
    (tmp_path / "precious.pt").write_text("not a state dict")
    run = run_script("merge_checkpoint.py", tmp_path / "ck", "--out", tmp_path / "precious.pt",
                     ok=False)
    assert run.code == 2 and (tmp_path / "precious.pt").read_text() == "not a state dict"
    assert run.stderr == (f"merge_checkpoint.py: error: --out {tmp_path / 'precious.pt'} exists; "
                          "name a new file, or pass --force to replace it (see --help)\n")


def test_rows_reach_the_disk_when_the_collective_at_a_log_point_fails(tmp_path, monkeypatch):
    """Losses stay on the device until a log point; if its collective fails (a peer is gone), the
    rows it was about to write, and those of steps after the last log point, still reach the
    disk."""
    from train import build_model, evaluate, make_optimizer, train
    from training.arguments import get_args
    from training.data import iterate_batches
    from training.logbook import Logbook
    from training.metrics import MetricsWriter, read_metrics
    args = get_args(["--input_size", "4", "--hidden_size", "8", "--batch_size", "2",
                     "--update_freq", "10", "--out_dir", str(tmp_path)])
    X, y = torch.randn(40, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(40)
    calls = []

    def peer_gone_at_second_log_point(self, losses):
        calls.append(len(losses))
        if len(calls) == 2:
            raise RuntimeError("Connection reset by peer")
        return losses[None]

    monkeypatch.setattr(Logbook, "_losses_of_every_rank", peer_gone_at_second_log_point)
    model = build_model(args, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="by peer"):
        with Logbook(args, lambda: evaluate(model, X, y), MetricsWriter(str(tmp_path), {}),
                     None) as logbook:
            train(model, make_optimizer(model, args), iterate_batches(X, y, 2), logbook, args)
    assert list(read_metrics(str(tmp_path))["iteration"]) == list(range(1, 21))


def test_save_into_another_runs_checkpoints_is_refused(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("20\n")
    assert flag_error(["--save", str(tmp_path)]).endswith(
        f"--save {tmp_path} holds a run's checkpoints already; resume that run with --load "
        f"{tmp_path}, or name a new directory (see --help)")
    assert flag_error(["--save", str(tmp_path), "--load", str(tmp_path)]) is None  # a restart


def test_a_model_too_big_for_the_machine_is_one_line(tmp_path, data_dir):
    run = run_script("train.py", "--data_dir", data_dir, "--hidden_size", "10000000000",
                     "--out_dir", tmp_path, ok=False)
    assert run.code == 2 and run.stderr.startswith("error: out of memory (")
    assert run.stderr.strip().endswith("lower --hidden_size, --batch_size or --num_layers, or "
                                       "use more ranks") and "Traceback" not in run.stderr


@pytest.mark.parametrize("env,script,message", [
    ({"MASTER_PORT": "abc"}, "bash_parallel_train.sh",
     "error: MASTER_PORT abc is not a port number (1 to 65535)"),
    ({"GPUS_PER_NODE": "0"}, "bash_parallel_train.sh",
     "error: GPUS_PER_NODE=0 must be a positive integer"),
    ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0.invalid"}, "bash_parallel_train.sh",
     "error: MASTER_ADDR node0.invalid does not resolve; set it to node 0's host name or address"),
    ({"FROM": "abc"}, "scripts/change_tp_size.sh", "error: FROM=abc must be a positive integer"),
    ({"RUNS": "/sys/runs"}, "scripts/change_tp_size.sh",
     "error: RUNS=/sys/runs cannot be made or written; name another directory"),
], ids=["port", "gpus", "address", "from", "runs"])
def test_the_bash_scripts_check_their_variables(env, script, message):
    proc = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True,
                          timeout=FAIL_FAST_S, env={**os.environ, "PYTHON": sys.executable, **env})
    assert (proc.returncode, proc.stderr) == (2, message + "\n")


# ---------------------------------------------------------------------------
# Issue 37.

@pytest.mark.parametrize("size", ["0", "-1"])
def test_issue_37_a_pipeline_size_below_1_is_one_line(size):
    """ISSUE 37, fixed in training/arguments.py by another change (was: a ZeroDivisionError for 0,
    a --micro_batch_size error for -1)."""
    assert flag_error(["--pipeline_model_parallel_size", size]) == (
        f"parallel_train.py: error: --pipeline_model_parallel_size must be a positive integer, "
        f"got {size} (see --help)")


def test_a_checkpoint_folder_without_its_tracker_is_refused(tmp_path):
    """Its iter_* folders were taken for no checkpoint: --save overwrote them without a word, and
    --load said "no checkpoint yet"."""
    ck, tracker = tmp_path / "ck", tmp_path / "ck" / "latest_checkpointed_iteration.txt"
    for it in (10, 20):
        (ck / f"iter_{it:07d}" / "mp_rank_00").mkdir(parents=True)
    found = (f"{ck} holds checkpoint folders (iter_0000010, iter_0000020) but no "
             "latest_checkpointed_iteration.txt")
    assert flag_error(["--save", str(ck)]) == (
        f"parallel_train.py: error: --save {found}, so this run would overwrite them; to go on "
        f"with that run, write its newest complete iteration into the tracker (echo 20 > "
        f"{tracker}) and add --load {ck}; or name a new directory (see --help)")
    for argv in (["--load", str(ck)], ["--load", str(ck), "--save", str(ck)]):
        assert flag_error(argv) == (
            f"parallel_train.py: error: --load {found}, the file that names the newest complete "
            f"one: write it (echo 20 > {tracker}) to resume from there, or name another "
            "directory (see --help)")
    tracker.write_text("20\n")
    assert flag_error(["--load", str(ck), "--save", str(ck)]) is None


@pytest.mark.parametrize("argv,note", [
    (["--optimizer", "adam", "--mom", "0.5"],  # (an abbreviation is the flag given)
     "note: --momentum 0.5 is SGD's: --optimizer adam does not use it (its momentum is "
     "--adam_beta1, now 0.9)"),
    (["--adam_beta1", "0.8", "--adam_eps=1e-6"],
     "note: --adam_beta1 and --adam_eps are Adam's: --optimizer sgd does not use them; add "
     "--optimizer adam to train with Adam"),
    (["--pipeline_schedule", "1f1b"],  # the default's value, given
     "note: --pipeline_schedule 1f1b orders the micro-batches through a pipeline's stages: "
     "without a pipeline (--pipeline_model_parallel_size 1) it changes nothing"),
    (["--optimizer", "adam", "--adam_beta2", "0.99", "--pipeline_model_parallel_size", "2",
      "--tensor_model_parallel_size", "1", "--pipeline_schedule", "gpipe"], None),
    (["--momentum", "0.5"], None),
    (["--model", "transformer", "--num_experts", "4", "--moe_token_dispatcher_type", "alltoall",
      "--tensor_model_parallel_size", "1"],
     "note: --moe_token_dispatcher_type alltoall takes the tokens to other ranks' experts: at "
     "--expert_model_parallel_size 1 (and --expert_tensor_parallel_size 1) every rank holds "
     "every expert and it changes nothing"),
])
def test_a_flag_that_does_nothing_here_says_so(argv, note, capsys):
    """One note on rank 0 for a flag the user gave (the default's value too) that this run does
    not use; nothing for the flags that it uses."""
    assert flag_error(argv) is None
    out = capsys.readouterr().out
    assert out == ("" if note is None else note + "\n"), out
    with mock.patch.dict(os.environ, {"RANK": "1", "WORLD_SIZE": "2"}):
        get_parallel_args(argv)
    assert capsys.readouterr().out == ""
