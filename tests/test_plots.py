"""The pictures: plot_runs.py and draw_diagram.py write legible PNGs from a run's files."""

import argparse
import csv
import json
import os
from unittest import mock

import matplotlib.image
import numpy as np
import pytest
import torch

import draw_diagram
import plot_runs
from figures import lines, png_pixels, record_saved_figures, words
from training.metrics import MetricsWriter, read_metrics, run_config


def fake_run(out_dir, num_ranks, offset=0.0, run_id="run-a"):
    """A 30-iteration run on disk, as train.py / parallel_train.py write it."""
    args = argparse.Namespace(input_size=64, hidden_size=2048, batch_size=32, dtype="float32",
                              init_lr=0.001, run_id=run_id,
                              tensor_model_parallel_size=num_ranks, torch_dtype=torch.float32)
    extra = {"backend": "gloo", "device": "cpu"} if num_ranks > 1 else {"device": "cpu"}
    writer = MetricsWriter(str(out_dir), run_config(args, **extra), num_ranks=num_ranks)
    losses = 50 * np.exp(-np.arange(1, 31) / 8) + offset
    rows = [[it, float(loss), float(loss) if it % 10 == 0 else None, None] for it,
            loss in zip(range(1, 31), losses)]
    writer.write(rows, torch.tensor(losses).expand(num_ranks, -1))
    writer.close()


def png_shape(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return matplotlib.image.imread(path).shape


def test_plot_runs_draws_the_runs_losses(tmp_path, monkeypatch):
    """Each picture shows the runs' own numbers, read back from the figure that was written."""
    fake_run(tmp_path / "serial", 1)
    fake_run(tmp_path / "parallel", 2, offset=1e-3)
    saved = record_saved_figures(monkeypatch)
    plot_runs.main([str(tmp_path / "serial"), str(tmp_path / "parallel"), "--assets",
                    str(tmp_path / "assets")])
    names = ("non_parallel.png", "tensor_parallel.png", "comparison.png")
    assert len(saved) == len(names)
    for name, fig in zip(names, saved):
        height, width = png_pixels(tmp_path / "assets" / name)
        assert (height, width) == fig.pixels and width >= 700 and height >= 450, name
    assert not list((tmp_path / "assets").glob("*.tmp.png"))  # written atomically
    serial, parallel = (read_metrics(str(tmp_path / d)) for d in ("serial", "parallel"))
    train, valid = serial["train_loss"], serial["valid_loss"]
    every = np.arange(1, 31)
    # The serial run: its train loss at every iteration, its validation loss where it was taken.
    drawn = lines(saved[0].axes[0])
    assert np.array_equal(drawn["train loss (each iteration)"][0], every)
    assert np.array_equal(drawn["train loss (each iteration)"][1], train)
    assert np.array_equal(drawn["validation loss"][0], [10, 20, 30])
    assert np.array_equal(drawn["validation loss"][1], valid[[9, 19, 29]])
    assert "Serial ToyModel" in words(saved[0]) and "MSE loss (log scale)" in words(saved[0])
    # The parallel run: one curve per rank, and whether they agree bit for bit.
    drawn = lines(saved[1].axes[0])
    assert sorted(drawn) == ["rank 0 train loss", "rank 1 train loss"]
    for r in (0, 1):
        assert np.array_equal(drawn[f"rank {r} train loss"][1], parallel[f"train_loss_rank{r}"])
    assert "2 ranks' losses bitwise equal: yes" in words(saved[1])
    # The comparison: both curves on top, their difference below, its maximum named.
    top, bottom = saved[2].axes
    assert np.array_equal(lines(top)["serial"][1], train)
    assert np.array_equal(lines(top)["tensor-parallel"][1], parallel["train_loss"])
    (x, diff), = [xy for label, xy in lines(bottom).items() if label.startswith("|serial")]
    assert np.array_equal(x, every) and np.array_equal(diff, np.abs(train - parallel["train_loss"]))
    assert f"max {diff.max():.2e} at iteration {int(x[np.argmax(diff)])}" in words(saved[2])


def test_comparison_draws_the_round_off_band(tmp_path):
    for name, offset in (("serial", 0), ("parallel", 1e-6), ("r1", 1e-6), ("r2", -2e-6)):
        fake_run(tmp_path / name, 1 if name != "parallel" else 2, offset=offset)
    for k in (1, 2):  # the noise runs are reordered reruns of serial
        config = tmp_path / f"r{k}" / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "reorder_seed": k}))
    with mock.patch.object(plot_runs, "draw_band", wraps=plot_runs.draw_band) as band:
        plot_runs.main([str(tmp_path / "serial"), str(tmp_path / "parallel"), "--noise",
                        str(tmp_path / "r1"), str(tmp_path / "r2"), "--comparison",
                        str(tmp_path / "c.png")])
    (ax, iterations, drawn, floor, counted), _ = band.call_args
    # The band in absolute terms: the largest difference among serial, r1 and r2 so far (r1 - r2).
    assert drawn[0] == pytest.approx(3e-6, rel=1e-3) and drawn[-1] == pytest.approx(3e-6, rel=1e-3)
    assert "MATCH" in ax.get_title()
    assert png_shape(tmp_path / "c.png")[1] >= 700


def test_plot_runs_draws_runs_whose_config_lacks_keys(tmp_path, monkeypatch):
    """A config.json without input_size and with "init_lr": null (an older or hand-edited one):
    the titles say "?" there, instead of a KeyError."""
    for name, ranks in (("serial", 1), ("parallel", 2)):
        fake_run(tmp_path / name, ranks)
        config = tmp_path / name / "config.json"
        edited = {k: v for k, v in json.loads(config.read_text()).items() if k != "input_size"}
        config.write_text(json.dumps({**edited, "init_lr": None}))
    saved = record_saved_figures(monkeypatch)
    plot_runs.main([str(tmp_path / "serial"), str(tmp_path / "parallel"), "--assets",
                    str(tmp_path / "assets")])
    assert "input ?, hidden 2048, batch 32, float32, lr ?" in words(saved[0])


def test_the_legends_leave_the_last_points_in_sight(tmp_path, monkeypatch):
    """A difference that grows to the end of the run ends at the top right, where a legend fixed
    there hid it: every legend of the comparison leaves the last five points uncovered."""
    fake_run(tmp_path / "serial", 1)
    fake_run(tmp_path / "parallel", 2)
    path = tmp_path / "parallel" / "metrics.csv"
    rows = [row.split(",") for row in path.read_text().splitlines()]
    for row in rows[1:]:
        row[1] = repr(float(row[1]) * (1 + 1e-6 * int(row[0]) ** 3))
    path.write_text("\n".join(",".join(row) for row in rows) + "\n")
    saved = record_saved_figures(monkeypatch)
    plot_runs.main([str(tmp_path / "serial"), str(tmp_path / "parallel"), "--assets",
                    str(tmp_path / "assets")])
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = saved[-1]
    fig.set_dpi(110)  # drawn again as it was saved (plot_runs.save: 110 dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        box = ax.get_legend().get_window_extent(renderer)
        for x, y in (xy for xs, ys in lines(ax).values() for xy in list(zip(xs, ys))[-5:]):
            assert not box.contains(*ax.transData.transform((x, y))), (ax.get_title(), x, y)


def test_plot_runs_needs_runs(tmp_path):
    with pytest.raises(SystemExit, match="run the training first"):
        plot_runs.main([str(tmp_path / "nothing"), str(tmp_path / "nothing"), "--assets",
                        str(tmp_path)])


def test_diagram_for_any_tensor_parallel_size(tmp_path):
    heights = []
    for tp in (1, 2, 4):
        out = tmp_path / f"toy{tp}.png"
        draw_diagram.main(["--tp", str(tp), "--out", str(out)])
        height, width, _ = png_shape(out)
        assert width >= 1500, width
        heights.append(height)
    assert heights == sorted(heights) and len(set(heights)) == 3  # a row per rank


def test_diagram_refuses_a_split_that_does_not_divide(tmp_path):
    with pytest.raises(SystemExit):
        draw_diagram.main(["--tp", "3", "--out", str(tmp_path / "x.png")])


def test_sequence_parallel_diagram_shows_rows_per_rank(tmp_path):
    out = tmp_path / "sp.png"
    said = "\n".join(draw_diagram.main(["--sequence_parallel", "--tp", "4", "--batch_size", "32",
                                        "--out", str(out)]))
    assert png_shape(out)[1] >= 1500
    # batch / TP rows each, in rank order
    for rank, rows in enumerate(("0..7", "8..15", "16..23", "24..31")):
        assert f"X{rank + 1}\n8x64\n(rows {rows})" in said, said
    assert "all-\ngather\nrows" in said and "reduce-\nscatter\nrows" in said
    plain = "\n".join(draw_diagram.main(["--tp", "4", "--batch_size", "32", "--out",
                                         str(tmp_path / "tp.png")]))
    assert "X\n32x64\n(replicated)" in plain
    assert "rows 0..7" not in plain and "all-\ngather" not in plain


def test_sequence_parallel_diagram_refuses_rows_that_do_not_split(tmp_path, capsys):
    with pytest.raises(SystemExit):
        draw_diagram.main(["--sequence_parallel", "--batch_size", "33", "--out",
                           str(tmp_path / "x.png")])
    assert "choose a --batch_size divisible by --tp" in capsys.readouterr().err


def test_transformer_diagram_shows_heads_and_vocabulary_per_rank(tmp_path, capsys):
    out = tmp_path / "transformer.png"
    said = "\n".join(draw_diagram.main(["--model", "transformer", "--tp", "4", "--out", str(out)]))
    assert png_shape(out)[1] >= 1500
    assert "vocabulary 50 (padded to 52)" in said
    for rank, rows in enumerate(("0..12", "13..25", "26..38", "39..49\n+2 padded")):
        assert f"E_{rank}: vocab rows\n{rows}" in said, said
        assert f"head {rank}\nQKV" in said
    assert said.count("all-\nreduce\nmax,") == 1 and "never the 32x16x50 logits" in said
    with pytest.raises(SystemExit):
        draw_diagram.main(["--model", "transformer", "--tp", "3", "--out", str(tmp_path / "x.png")])
    assert "--num_attention_heads 4 must be divisible by --tp 3" in capsys.readouterr().err


@pytest.mark.parametrize("before,after", [(2, 4), (4, 1)])
def test_a_run_resumed_at_another_size_keeps_its_earlier_rows(tmp_path, before, after):
    """metrics.csv of a run whose tensor-parallel size changed at iteration 20: the rows before
    it, with the earlier ranks' columns; the rows after it, with the new ranks'."""
    fake_run(tmp_path / "run", before)
    args = argparse.Namespace(tensor_model_parallel_size=after, run_id="run-a")
    writer = MetricsWriter(str(tmp_path / "run"), run_config(args), num_ranks=after,
                           resume_from=20)
    writer.write([[21, 1.5, None, None]], torch.full((after, 1), 1.5) if after > 1 else None)
    writer.close()
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.reader(f))
    ranks = max(before, after)
    assert rows[0] == ["iteration", "train_loss", "valid_loss",
                       *[f"train_loss_rank{r}" for r in range(ranks)]]
    assert [int(row[0]) for row in rows[1:]] == list(range(1, 22))
    assert all(len(row) == 3 + ranks for row in rows)
    assert rows[20][3:3 + before] == [rows[20][1]] * before  # iteration 20, as it was written
    written = after if after > 1 else 0  # a run of one rank writes no rank columns
    assert rows[21][3:] == ["1.5"] * written + [""] * (ranks - written)


@pytest.mark.parametrize("clipped_before", [True, False])
def test_a_run_resumed_with_clipping_switched_keeps_each_value_under_its_name(tmp_path,
                                                                              clipped_before):
    """--clip_grad adds a grad_norm column before the ranks': resumed with it switched on or off,
    the earlier rows keep each value under its own column."""
    args = lambda clip: argparse.Namespace(tensor_model_parallel_size=2, clip_grad=clip,
                                           run_id="run-a")
    first = MetricsWriter(str(tmp_path), run_config(args(1.0 if clipped_before else None)),
                          num_ranks=2)
    first.write([[1, 3.0, None, 7.0], [2, 2.0, None, 6.0]], torch.tensor([[3.0, 2.0]] * 2))
    first.close()
    resumed = MetricsWriter(str(tmp_path), run_config(args(None if clipped_before else 1.0)),
                            num_ranks=2, resume_from=2)
    resumed.write([[3, 1.0, None, 5.0]], torch.tensor([[1.0]] * 2))
    resumed.close()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["train_loss_rank1"] for row in rows] == ["3.0", "2.0", "1.0"]
    assert [row["grad_norm"] for row in rows] == (["7.0", "6.0", ""] if clipped_before else
                                                  ["", "", "5.0"])


def test_a_resume_into_another_runs_directory_sets_that_run_aside(tmp_path, capsys):
    """--load ck --out_dir D, where D holds another run (another run id): that run is set aside
    as a fresh run sets it aside, and the resumed run's rows never follow its rows."""
    fake_run(tmp_path, 2, run_id="another")
    before = {name: (tmp_path / name).read_bytes() for name in ("metrics.csv", "config.json")}
    args = argparse.Namespace(tensor_model_parallel_size=2, run_id="mine")
    writer = MetricsWriter(str(tmp_path), run_config(args), num_ranks=2, resume_from=20)
    writer.write([[21, 1.5, None, None]], torch.full((2, 1), 1.5))
    writer.close()
    assert {name: (tmp_path / "earlier_run" / name).read_bytes() for name in before} == before
    with open(tmp_path / "metrics.csv") as f:
        assert [row["iteration"] for row in csv.DictReader(f)] == ["21"]
    assert "holds no record of this run: its metrics.csv starts at iteration 21" in \
        capsys.readouterr().out


def test_a_resumed_run_drops_the_stopped_runs_last_validation(tmp_path):
    """The stopped run validated at its last iteration (25); the uninterrupted run validates at
    every --eval_interval (10) only: resumed from 25, that row's validation goes."""
    args = argparse.Namespace(tensor_model_parallel_size=1, run_id="mine", eval_interval=10)
    first = MetricsWriter(str(tmp_path), run_config(args))
    first.write([[it, 1.0, 2.0 if it % 10 == 0 or it == 25 else None, None]
                 for it in range(1, 26)], None)
    first.close()
    resumed = MetricsWriter(str(tmp_path), run_config(args), resume_from=25)
    resumed.write([[26, 1.0, None, None]], None)
    resumed.close()
    with open(tmp_path / "metrics.csv") as f:
        valid = {int(row["iteration"]) for row in csv.DictReader(f) if row["valid_loss"]}
    assert valid == {10, 20}


def test_plot_runs_compares_any_two_runs_under_their_names(tmp_path):
    fake_run(tmp_path / "stayed", 2)
    fake_run(tmp_path / "changed", 2, offset=1e-7)
    plot_runs.main([str(tmp_path / "stayed"), str(tmp_path / "changed"), "--labels", "stayed",
                    "changed", "--comparison", str(tmp_path / "pictures" / "change.png")])
    assert os.listdir(tmp_path / "pictures") == ["change.png"]
    height, width, _ = png_shape(tmp_path / "pictures" / "change.png")
    assert width >= 700 and height >= 450
