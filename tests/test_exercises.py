"""docs/exercises.md: each exercise of scripts/exercise.py run through the entry point that
`python scripts/exercise.py NAME` takes (run_exercise), its runs in the session's rank processes
(distributed.run_script: the copy's own modules imported, the script's folder first on sys.path),
and what the page says catches the bug checked to catch it. The data sets are the session's, the
reference runs made once for the module (on unmodified code, before the edit): each exercise
still passes alone and in any order, making what it lacks."""

import os
import re

import pytest

from distributed import REPO, comm_table, load_script, run_script

exercise = load_script("scripts/exercise.py")


def pool_launcher(copy, script, args, nproc=None, env=None):
    """The launcher scripts/exercise.py is given here: the command in the rank processes, as
    `python script` or scripts/launch.py (torchrun) would run it in the copy."""
    run = run_script(os.path.join(copy, script), *args, nproc=nproc, ok=None, env=env)
    return run.code, run.out


@pytest.fixture(scope="module")
def shared(data_dir, token_dir, tmp_path_factory):
    """What the exercises share: the session's data sets, and the reference runs as made."""
    return {"dir": str(tmp_path_factory.mktemp("exercise_references")), "data_toy": data_dir,
            "data_transformer": token_dir}


def _differ(runs, label="compare", iterations=24):
    code, out = runs[label]
    assert code == 1 and f": DIFFER over {iterations} iterations" in out, out


def _disagree(out):
    assert "error: tensor-parallel ranks disagree on the loss by iteration 4:" in out, out


def check_g_skipped(runs):
    code, out = runs["tp2"]
    assert code == 1
    _disagree(out)  # the first check, at --update_freq 4
    _differ(runs, iterations=4)
    assert "tp2 stopped after 4 iterations" in runs["compare"][1]


def check_f_backward_dropped(runs):
    code, out = runs["toy_tp2"]
    assert code == 0 and comm_table(out)["all_reduce"][0] == 1, out  # g's only: f has no work
    code, out = runs["toy_compare"]
    assert code == 0 and ": MATCH over 24 iterations" in out, out
    code, out = runs["transformer_tp2"]
    assert code == 0 and "Rank 1 Iter 24 Train Loss" in out, out  # the ranks agree to the end
    assert comm_table(out)["all_reduce"][0] == 7, out  # 12 in the correct run: f's 5 are gone
    _differ(runs, "transformer_compare")


def check_one_f_one_b_warmup(runs):
    code, out = runs["compare"]
    assert code == 0 and "train_loss  max abs diff 0.000e+00" in out, out  # bit for bit
    kept = re.search(r"p=2, m=4: \[([\d., ]+)\] micro-batches", runs["memory"][1])
    assert [float(k) for k in kept[1].split(",")] == [3.0, 2.0], runs["memory"]  # not [2, 1]


def check_tied_embedding_not_summed(runs):
    code, out = runs["pp2"]
    assert code == 0 and "embedding_all_reduce" not in comm_table(out), out
    assert "pipeline_send" in comm_table(out), out
    _differ(runs)


def check_sp_grads_not_summed(runs):
    code, out = runs["sp"]
    # The loss alone (4 bytes) where fc's 64 floats and the loss would be; the ranks agree.
    assert code == 0 and comm_table(out)["all_reduce"][1] == pytest.approx(4 / 1024, abs=1e-4), out
    _differ(runs)


def check_distributed_optimizer_no_all_gather(runs):
    code, out = runs["dp2"]
    table = comm_table(out)
    assert code == 0 and "dp_reduce_scatter" in table and "dp_all_gather" not in table, out
    assert "Memory of rank 0's model and optimizer (sgd, float32, distributed over 2" in out
    _differ(runs)


def check_clip_norm_of_one_rank(runs):
    code, out = runs["tp2"]
    assert code == 1
    _disagree(out)


def check_curve_only(runs):
    code, out = runs["parallel"]
    assert code == 0 and "Rank 0 Iter 24 Train Loss" in out, out
    _differ(runs)
    assert "leave the band at iteration" in runs["compare"][1] or \
        "the runs stay apart" in runs["compare"][1]


def check_pipeline_shape_under_sp(runs):
    code, out = runs["checked"]
    assert code == 1 and "PipelineP2PError: pipeline: rank " in out, out
    # Stage 1's ranks (2, 3) each wait for 8 rows from their peer on stage 0 (0, 1), which sends 4.
    assert re.search(r"expected from rank ([01]) activation #1, torch.float32 \(8, 64\), but "
                     r"rank \1 sent activation #1, torch.float32 \(4, 64\)", out), out
    code, out = runs["unchecked"]  # gloo takes the half message; the loss's shapes fail later
    assert code == 1 and "RuntimeError: The size of tensor a (8) must match the size of tensor " \
                         "b (4)" in out, out


def check_cp_positions_plain(runs):
    code, out = runs["compare_transformer"]  # period 4: the relabelled sequence is the same
    assert code == 0 and ": MATCH over" in out, out
    code, out = runs["compare_transformer_period_5"]
    assert code == 1 and ": DIFFER over" in out, out


def check_expert_grads_over_dp(runs):
    _differ(runs)
    code, out = runs["ep2"]  # EP 2 on 2 ranks: each expert on one rank, no sum to run
    assert code == 0 and "expert_dp_all_reduce" in comm_table(out), out


CHECKS = {"g-skipped": check_g_skipped, "f-backward-dropped": check_f_backward_dropped,
          "one-f-one-b-warmup": check_one_f_one_b_warmup,
          "tied-embedding-not-summed": check_tied_embedding_not_summed,
          "sp-grads-not-summed": check_sp_grads_not_summed,
          "distributed-optimizer-no-all-gather": check_distributed_optimizer_no_all_gather,
          "clip-norm-of-one-rank": check_clip_norm_of_one_rank,
          "dp-grads-summed": check_curve_only, "g-averaged": check_curve_only,
          "own-seed-init": check_curve_only,
          "pipeline-shape-under-sp": check_pipeline_shape_under_sp,
          "cp-positions-plain": check_cp_positions_plain,
          "expert-grads-over-dp": check_expert_grads_over_dp}


@pytest.mark.parametrize("name", list(exercise.EXERCISES))
def test_the_exercise_is_caught_as_the_page_says(name, shared, tmp_path):
    printed = []
    runs = exercise.run_exercise(name, pool_launcher, str(tmp_path / "copy"), shared,
                                 echo=printed.append)
    text = "\n".join(printed)
    assert text.startswith(f"== {name} ==") and "\nanswer: " in text and "\n+++ b/" in text
    CHECKS[name](runs)


def test_every_exercise_is_on_the_page_and_its_edit_applies():
    """Each exercise's one command is in docs/exercises.md, and its text occurs in its file once
    (the exercise says so loudly where not); the page names no exercise that is gone."""
    page = open(os.path.join(REPO, "docs", "exercises.md")).read()
    assert set(re.findall(r"python scripts/exercise\.py ([a-z][\w-]*)", page)) == \
        set(exercise.EXERCISES) == set(CHECKS)
    for name, e in exercise.EXERCISES.items():
        path, old, _ = e.edit
        with open(os.path.join(REPO, path)) as f:
            assert f.read().count(old) == 1, f"exercise {name!r}: its text is gone from {path}"


def test_an_edit_that_no_longer_applies_says_so_and_a_bad_name_is_one_line(tmp_path):
    with pytest.raises(exercise.ExerciseError, match="EXERCISE 'x' NO LONGER APPLIES: the text "
                                                      "it replaces occurs 0 times in README.md"):
        (tmp_path / "README.md").write_text("nothing\n")
        exercise.apply_edit(str(tmp_path), "x", ("README.md", "something", "else"))
    out = run_script("scripts/exercise.py", "no-such-exercise", ok=False).out
    assert out == "exercise.py: error: no exercise 'no-such-exercise'; --list names them " \
                  "(see --help)\n", out
