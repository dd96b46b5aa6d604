"""Every tool besides the training scripts fails the same way: one line, before any work, nothing
half-written left behind (docs/errors.md). In-process: each tool's main() with a user's flags."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import compare_runs
import draw_diagram
import merge_checkpoint
import plot_runs
import prepare_data
from benchmarks import bench_step, precision, scaling
from test_plots import fake_run


def one_line_error(tool, argv, reads_argv=False):
    """(exit status, the one line the tool said) when its main() refuses argv; None if it ran.
    sys.argv is the tool's, as a user's shell gives it."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), \
                mock.patch.object(sys, "argv", [os.path.basename(tool.__file__), *argv]):
            tool.main() if reads_argv else tool.main(argv)
    except SystemExit as e:
        said = stderr.getvalue() + ("" if isinstance(e.code, int) or e.code is None else e.code)
        lines = said.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in said, said
        return (e.code if isinstance(e.code, int) else 1), lines[0]
    return None


@pytest.fixture
def places(tmp_path):
    """A file, a directory, two comparable runs, and runs that cannot be compared with them."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    for name, ranks in (("serial", 1), ("parallel", 2), ("transformer", 2), ("bad_config", 1),
                        ("bad_header", 1), ("short", 1), ("bf16", 1), ("r1", 1), ("r1_again", 1),
                        ("r2_clipped", 1), ("r_tp", 2), ("r_other_data", 1), ("r_nan", 1),
                        ("r_no_config", 1), ("r_plain", 1)):
        fake_run(tmp_path / name, ranks, offset=1e-7 * (ranks - 1))
    for name, change in (("serial", {"clip_grad": None, "data_fingerprint": "aaaa"}),
                         ("r_other_data", {"reorder_seed": 5, "data_fingerprint": "bbbb"}),
                         ("r_nan", {"reorder_seed": 6}),
                         ("bf16", {"dtype": "bfloat16", "reorder_seed": 3}),
                         ("r1", {"reorder_seed": 1}), ("r1_again", {"reorder_seed": 1}),
                         ("r2_clipped", {"reorder_seed": 2, "clip_grad": 1.0}),
                         ("r_tp", {"reorder_seed": 4})):
        config = tmp_path / name / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    config = tmp_path / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model": "transformer"}))
    (tmp_path / "bad_config" / "config.json").write_text("{not json")
    (tmp_path / "r_no_config" / "config.json").unlink()
    (tmp_path / "bad_header" / "metrics.csv").write_text("step,loss\n1,0.5\n")
    rows = (tmp_path / "r_nan" / "metrics.csv").read_text().splitlines()
    rows[5] = ",".join(["5", "nan", *rows[5].split(",")[2:]])
    (tmp_path / "r_nan" / "metrics.csv").write_text("\n".join(rows) + "\n")
    rows = (tmp_path / "short" / "metrics.csv").read_text().splitlines()[:21]
    (tmp_path / "short" / "metrics.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


CASES = [
    # plot_runs.py
    (plot_runs, ["{p}/serial", "{p}/parallel", "--assets", "{p}/a_file"],
     "plot_runs.py: error: --assets {p}/a_file: {p}/a_file is a file; name a directory"),
    (plot_runs, ["{p}/serial", "{p}/parallel", "--comparison", "{p}/a_dir"],
     "plot_runs.py: error: --comparison {p}/a_dir is a directory; name a file"),
    (plot_runs, ["{p}/serial", "{p}/transformer", "--assets", "{p}/out"],
     "error: these runs cannot be drawn as one comparison: {p}/serial trained the toy model "
     "and {p}/transformer the transformer"),
    (plot_runs, ["{p}/serial", "{p}/bad_config", "--assets", "{p}/out"],
     "error: {p}/bad_config/config.json is not a config.json written by the training"),
    (plot_runs, ["{p}/serial", "{p}/bad_header", "--assets", "{p}/out"],
     "error: {p}/bad_header/metrics.csv is not a metrics.csv written by the training (its "
     "header is not iteration,train_loss,valid_loss,...)"),
    # compare_runs.py
    (compare_runs, ["{p}/serial", "{p}/transformer"],
     "error: these runs cannot be compared: {p}/serial trained the toy model and "
     "{p}/transformer the transformer"),
    (compare_runs, ["{p}/serial", "{p}/short"],
     "error: these runs cannot be compared: the runs have 30 and 20 iterations (did one stop "
     "early?)"),
    (compare_runs, ["{p}/serial", "{p}/nowhere"], "error: {p}/nowhere/metrics.csv not found"),
    (compare_runs, ["{p}/serial", "{p}/parallel", "--rtol", "-1"],
     "compare_runs.py: error: --rtol must be a positive number, got -1.0"),
    (compare_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/bf16"],
     "error: noise run {p}/bf16 was trained with --dtype bfloat16 and {p}/serial with float32"),
    (compare_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/r2_clipped"],
     "error: noise run {p}/r2_clipped was trained with --clip_grad 1.0 and {p}/serial with None"),
    (compare_runs, ["{p}/serial", "{p}/bf16", "--noise", "{p}/r1"],
     "error: {p}/bf16 was trained with --dtype bfloat16 and {p}/serial with float32"),
    (compare_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/r_plain"],
     "error: noise run {p}/r_plain has no --reorder_seed: train the reference's flags again with "
     "python train.py ... --reorder_seed K --out_dir {p}/r_plain"),
    (compare_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/r_tp"],
     "error: noise run {p}/r_tp is a tensor-parallel run; noise runs are serial"),
    (compare_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/r1", "{p}/r1_again"],
     "error: two runs have the same --reorder_seed: the same run twice; give each its own K"),
    (compare_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/r1", "{p}/nowhere"],
     "error: noise run {p}/nowhere has no metrics.csv: train the reference's flags again with "
     "python train.py ... --reorder_seed K --out_dir {p}/nowhere"),
    (compare_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/r1", "--rtol", "1e-3"],
     "compare_runs.py: error: --rtol and --noise: the verdict is against one or the other; "
     "give one"),
    (compare_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/short"],
     "error: these runs cannot be compared: the runs have 30 and 20 iterations (did one stop "
     "early?) (noise run {p}/short)"),
    (plot_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/r2_clipped", "--assets",
                 "{p}/out"],
     "error: noise run {p}/r2_clipped was trained with --clip_grad 1.0"),
    (compare_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/transformer"],
     "error: these runs cannot be compared: {p}/serial trained the toy model and "
     "{p}/transformer the transformer"),
    (compare_runs, ["{p}/serial", "{p}/parallel", "--noise"],
     "compare_runs.py: error: argument --noise: expected at least one argument"),
    # A band measured on other data is another band (it said MATCH for a real bug, 86x the band
    # measured on the reference's data); a diverged noise run would read as no spread at all.
    (compare_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/r_other_data"],
     "error: noise run {p}/r_other_data was trained with other data (fingerprint bbbb, "
     "{p}/serial's aaaa: another --data_dir?); the band is measured on the reference's own "
     "training"),
    (compare_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/r1", "{p}/serial/"],
     "error: noise run {p}/serial/ is the reference itself; noise runs are other runs: the "
     "reference's training again, python train.py ... --reorder_seed K --out_dir "
     "A_NEW_DIRECTORY"),
    (compare_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/parallel/metrics.csv"],
     "error: noise run {p}/parallel/metrics.csv is the compared run itself"),
    (compare_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/r_no_config"],
     "error: noise run {p}/r_no_config has no config.json: nothing says it is the reference's "
     "training again with --reorder_seed K"),
    (compare_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/r1", "{p}/r_nan"],
     "error: noise run {p}/r_nan diverged (its loss is not finite at iteration 5): it measures "
     "no round-off; train it again as the reference was"),
    (plot_runs, ["{p}/serial", "{p}/parallel", "--noise", "{p}/short", "--assets", "{p}/out"],
     "error: these runs cannot be drawn as one comparison: the runs have 30 and 20 iterations"),
    # draw_diagram.py
    (draw_diagram, ["--out", "{p}/a_dir"],
     "draw_diagram.py: error: --out {p}/a_dir is a directory; name a file"),
    (draw_diagram, ["--out", "{p}/d.jpg"],
     "draw_diagram.py: error: --out {p}/d.jpg: it is written as PNG; name a .png file"),
    (draw_diagram, ["--tp", "0", "--out", "{p}/d.png"],
     "draw_diagram.py: error: --tp must be a positive integer, got 0"),
    (draw_diagram, ["--model", "transformer", "--vocab_size", "0", "--out", "{p}/d.png"],
     "draw_diagram.py: error: --vocab_size must be a positive integer, got 0"),
    (draw_diagram, ["--virtual", "2", "--model", "transformer", "--out", "{p}/d.png"],
     "draw_diagram.py: error: --virtual draws the pipeline's stages: add --pp P (e.g. --pp 2 "
     "--virtual 2 --model transformer); without --pp the picture is the tensor-parallel split"),
    # merge_checkpoint.py
    (merge_checkpoint, ["{p}/a_dir", "--out", "{p}/a_dir"],
     "merge_checkpoint.py: error: --out {p}/a_dir exists; name a new file, or pass --force"),
    (merge_checkpoint, ["{p}/a_dir", "--out", "{p}/a_file/x.pt"],
     "merge_checkpoint.py: error: --out {p}/a_file/x.pt: {p}/a_file is a file; name a "
     "directory"),
]


@pytest.mark.parametrize("tool,argv,message", CASES,
                         ids=[f"{t.__name__}-{i}" for i, (t, _, _) in enumerate(CASES)])
def test_tools_fail_in_one_line_before_any_work(tool, argv, message, places):
    p = str(places)
    before = sorted(os.listdir(places))
    code, line = one_line_error(tool, [a.format(p=p) for a in argv])
    assert line.startswith(message.format(p=p)), line
    assert code in (1, 2)
    assert sorted(os.listdir(places)) == before, "it made something before refusing"
    assert not [f for f in os.listdir(places / "a_dir") if ".tmp" in f]


@pytest.mark.parametrize("tool,argv,message", [
    (bench_step, ["--max_tp", "-3"], "bench_step.py: error: --max_tp must be at least 1, got -3"),
    (bench_step, ["--out", "{p}/a_file/b.json"],
     "bench_step.py: error: --out {p}/a_file/b.json: {p}/a_file is a file; name a directory"),
    (scaling, ["--max_tp", "0"], "scaling.py: error: --max_tp must be at least 1, got 0"),
    (scaling, ["--plot", "{p}/a_dir"], "scaling.py: error: --plot {p}/a_dir is a directory"),
    (prepare_data, ["--noise", "-1", "--data_dir", "{p}/d"],
     "prepare_data.py: error: --noise must be a number at least 0, got -1.0"),
    (prepare_data, ["--data_dir", "/sys/no_data_here"],
     "prepare_data.py: error: --data_dir /sys/no_data_here: /sys cannot be written"),
    # benchmarks/precision.py: checked before its hours of training, not after them.
    (precision, ["--models", "gpt"], "precision.py: error: argument --models: invalid choice: "
                                     "'gpt'"),
    (precision, ["--dtypes", "bf16"], "precision.py: error: argument --dtypes: invalid choice: "
                                      "'bf16'"),
    (precision, ["--out", "{p}/a_file/runs"],
     "precision.py: error: --out {p}/a_file/runs: {p}/a_file is a file; name a directory"),
    (precision, ["--out", "{p}/runs", "--pictures", "{p}/a_file/pictures"],
     "precision.py: error: --pictures {p}/a_file/pictures: {p}/a_file is a file; name a "
     "directory"),
], ids=["bench_max_tp", "bench_out", "scaling_max_tp", "scaling_plot", "noise", "unwritable",
        "precision_models", "precision_dtypes", "precision_out", "precision_pictures"])
def test_tools_reading_sys_argv_fail_in_one_line(tool, argv, message, places):
    code, line = one_line_error(tool, [a.format(p=places) for a in argv], reads_argv=True)
    assert code == 2 and line.startswith(message.format(p=places)), line
    assert not (places / "d").exists()


# The tools' numbers, fuzzed as the training flags are (test_errors.py): accepted exactly when
# they make sense, otherwise one line. What would run after the checks is replaced by a no-op.

@settings(max_examples=150, deadline=None)
@given(tp=st.integers(-2, 9), input_size=st.integers(-2, 80),
       hidden=st.none() | st.integers(-2, 300), batch=st.integers(-2, 40),
       vocab=st.integers(-2, 60), heads=st.integers(-2, 9),
       transformer=st.booleans(), sequence_parallel=st.booleans())
def test_fuzz_diagram_sizes(tp, input_size, hidden, batch, vocab, heads, transformer,
                            sequence_parallel):
    argv = ["--tp", str(tp), "--input_size", str(input_size), "--batch_size", str(batch),
            "--vocab_size", str(vocab), "--num_attention_heads", str(heads),
            "--model", "transformer" if transformer else "toy", "--out", "/tmp/fuzz_diagram.png"]
    argv += ([] if hidden is None else ["--hidden_size", str(hidden)])
    argv += ["--sequence_parallel"] if sequence_parallel else []
    h = 32 * input_size if hidden is None else hidden
    valid = min(tp, input_size, batch, vocab, heads, h) > 0 and (
        heads % tp == 0 if transformer else h % tp == 0 and not (sequence_parallel and batch % tp))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(draw_diagram, "draw", lambda *a, **k: None)
        m.setattr(draw_diagram, "draw_transformer", lambda *a, **k: None)
        error = one_line_error(draw_diagram, argv)
    assert (error is None) == valid, (argv, error)


@settings(max_examples=100, deadline=None)
@given(rtol=st.floats(allow_nan=True, allow_infinity=True))
def test_fuzz_compare_tolerance(rtol, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    if not (runs / "a").exists():
        fake_run(runs / "a", 1)
        fake_run(runs / "b", 2, offset=1e-7)
    error = one_line_error(compare_runs, [str(runs / "a"), str(runs / "b"), "--rtol", repr(rtol)])
    assert (error is None) == (rtol > 0 and math.isfinite(rtol)), (rtol, error)


def test_a_run_named_by_its_metrics_csv_is_the_run(places):
    """compare_runs.py S T/metrics.csv compares T (it looked for T/metrics.csv/metrics.csv)."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert compare_runs.main([str(places / "serial"), str(places / "parallel" /
                                                              "metrics.csv")]) == 0
    assert "MATCH over 30 iterations" in text.getvalue()


@pytest.mark.parametrize("model", ["toy", "transformer"])
def test_the_precision_benchmark_without_data_says_how_to_make_it(model, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "REPO", str(tmp_path))  # a clone without data/
    code, line = one_line_error(precision, ["--models", model, "--out", str(tmp_path / "runs")],
                                reads_argv=True)
    made_by = ("python prepare_data.py --data_dir data" if model == "toy" else
               "python prepare_data.py --model transformer --data_dir data_transformer")
    assert code == 2 and line.endswith(f"not found; create the data with: {made_by} (see --help)")
    assert not (tmp_path / "runs").exists()


def test_the_precision_benchmark_reuses_only_runs_it_finished(tmp_path, monkeypatch, capsys):
    """A directory holding a metrics.csv (an interrupted run) is trained again, not judged as it
    stands ("DIFFER (stopped after 159)" for a correct mode); a run it finished is reused, said."""
    out, launched = tmp_path / "run", []

    def run(cmd, **_):
        launched.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(precision.subprocess, "run", run)
    out.mkdir()
    (out / "metrics.csv").write_text("iteration,train_loss,valid_loss\n1,1.0,\n")
    assert precision.launch(str(out), "toy", "float32", []) and len(launched) == 1
    assert precision.launch(str(out), "toy", "float32", []) and len(launched) == 1
    assert f"ok (reused: run earlier into {out})" in capsys.readouterr().out


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_bf16_comparison_beyond_rtol_says_what_would_measure_it(dropout, tmp_path):
    """Without --noise, bf16 fails any fixed --rtol: the note says to use --noise, except with
    --dropout, whose reordered reruns are refused: there it says so, not --noise."""
    for name, ranks, offset in (("a", 1, 0.0), ("b", 2, 0.5)):
        fake_run(tmp_path / name, ranks, offset=offset)
        config = tmp_path / name / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "dtype": "bfloat16",
                                      "dropout": dropout}))
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    said = text.getvalue()
    assert ("measure it for this run with --noise" in said) == (dropout == 0), said
    assert ("--noise cannot measure it here: its reordered reruns refuse --dropout" in said) == \
        (dropout > 0), said


@pytest.mark.parametrize("offset,dropout,note", [
    (1e-4, 0.0, "note: round-off grows with longer sums (pipelines, data-parallel averages, more "
                "layers) and can pass --rtol 1e-05; --noise tells round-off from a bug: retrain "
                "the reference's flags with python train.py ... --reorder_seed K"),
    (1e-4, 0.1, "note: round-off grows with longer sums (pipelines, data-parallel averages, more "
                "layers) and can pass --rtol 1e-05; --noise, which measures it, refuses "
                "--dropout"),
    (1.0, 0.0, None),  # 0.85 relative: no round-off
], ids=["near", "near_dropout", "far"])
def test_a_float32_comparison_beyond_rtol_says_what_tells_round_off_from_a_bug(offset, dropout,
                                                                              note, tmp_path):
    """A transformer at PP 2 x DP 2 against serial in float32 differs by 2.2e-5 (round-off of
    longer sums): DIFFER, with the way to tell (it said nothing); far apart, no such note."""
    for name, ranks, shift in (("a", 1, 0.0), ("b", 2, offset)):
        fake_run(tmp_path / name, ranks, offset=shift)
        config = tmp_path / name / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "dropout": dropout}))
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    lines = text.getvalue().splitlines()
    assert lines[-1].endswith("DIFFER over 30 iterations"), lines
    notes = [line for line in lines if line.startswith("note:")]
    assert (notes[0].startswith(note) and len(notes) == 1) if note else notes == [], notes


def test_the_pipeline_picture_says_what_it_leaves_out(tmp_path, monkeypatch, capsys):
    """draw_diagram.py --pp draws stages only: --tp and --sequence_parallel given with it are
    said to be left out (they were dropped without a word); --virtual without --pp is refused
    (CASES)."""
    monkeypatch.setattr(draw_diagram, "draw_stages", lambda *a, **k: None)
    draw_diagram.main(["--pp", "2", "--tp", "4", "--sequence_parallel", "--out",
                       str(tmp_path / "p.png")])
    assert capsys.readouterr().out == (
        "note: --pp draws the pipeline's stages only (one row per stage, its chunks and blocks); "
        "--tp and --sequence_parallel are left out of it: draw the tensor-parallel picture "
        "without --pp\n")
    draw_diagram.main(["--pp", "2", "--out", str(tmp_path / "p.png")])
    assert capsys.readouterr().out == ""
