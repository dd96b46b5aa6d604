"""benchmarks/scaling.py: the cost model's arithmetic, the crossover's interpolation, and a quick
run on tiny sizes that writes a valid JSON and picture."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks import scaling, scaling_model
from core import parallel_state as ps
from core import wire as comm
from distributed import run_distributed
from figures import lines, png_pixels, record_saved_figures
from model import ToyModel
from test_benchmark import run_driver


def _count_one_step(batch, inputs, hidden):
    torch.manual_seed(0)
    model = ToyModel(inputs, hidden, tensor_parallel=True)
    x, y = torch.randn(batch, inputs), torch.randn(batch)
    comm.reset_comm_stats()
    F.mse_loss(model(x)[:, 0], y).backward()
    tp = ps.get_tensor_model_parallel_world_size()
    expected = scaling_model.allreduce_bytes(tp, batch, inputs)
    assert dict(comm.comm_bytes) == ({"all_reduce": expected} if tp > 1 else {})


@pytest.mark.parametrize("tp", [1, 2])
def test_the_model_sends_what_a_step_sends(tp):
    """The bytes the model charges per step are the bytes the training step all-reduces."""
    run_distributed(_count_one_step, tp, 8, 16, 64)


def test_the_model_counts_the_steps_gemms():
    # fc1 forward, fc2 forward, fc2's input and weight gradients, fc1's weight gradient: five
    # (batch x input x width) multiply-adds; X needs no gradient, so fc1's input gradient is none.
    assert scaling_model.gemm_flops(1024, batch=32, inputs=64) == 5 * 2 * 32 * 64 * 1024
    costs = {1: {1024: 3.0}, 2: {512: 1.0}}  # C(w) of one rank among 1, among 2
    overheads = {1: 0.5, 2: 0.25}
    assert scaling_model.predict(costs, 0.1, 0.001, overheads, 1024, 1) == 3.5
    assert scaling_model.predict(costs, 0.1, 0.001, overheads, 1024, 2) == pytest.approx(
        0.25 + 1.0 + 0.1 + 0.001 * 32 * 64 * 4)


def test_crossover_is_interpolated_between_the_grid_points_around_it():
    # speed-up 0.5 at 1024, 2 at 4096: log-linear, so 1 at their geometric mean, 2048
    assert scaling_model.crossover([512, 1024, 4096], [0.25, 0.5, 2.0]) == pytest.approx(2048)
    assert scaling_model.crossover([512, 1024], [0.5, 0.9]) is None  # never pays in the grid
    assert scaling_model.crossover([512, 1024], [1.5, 2.0]) is None  # pays everywhere: no crossing


def test_alpha_beta_are_recovered_from_a_clean_sweep():
    sizes = [256, 4096, 65536, 1 << 20]
    alpha, beta = scaling_model.fit_alpha_beta(sizes, [3e-4 + 1e-9 * n for n in sizes])
    assert alpha == pytest.approx(3e-4) and beta == pytest.approx(1e-9)


def test_quick_sweep_writes_valid_files(tmp_path, monkeypatch):
    saved = record_saved_figures(monkeypatch)
    run_driver(scaling, monkeypatch, "--quick", "--grid", "16", "64", "--iterations", "20",
               "--warmup", "2", "--max_tp", "2", "--device", "cpu", "--out", tmp_path / "s.json",
               "--plot", tmp_path / "s.png")
    report = json.loads((tmp_path / "s.json").read_text())
    assert {(pt["hidden_size"], pt["variant"]) for pt in report["points"]} == {
        (16, "serial"), (16, "tp2"), (64, "serial"), (64, "tp2")}
    for pt in report["points"]:
        m = pt["measured"]
        assert 0 < m["p10"] <= m["median"] <= m["p90"] and pt["predicted"] > 0
    # The overheads are fitted at the smallest size: there the model equals the measurement
    # (the same numbers subtracted and added back: round-off of a few additions).
    for pt in report["points"]:
        if pt["hidden_size"] == 16:
            assert pt["predicted"] == pytest.approx(pt["measured"]["median"], rel=1e-12), pt
    # Every prediction is the JSON's own model, term by term (docs/benchmark.md's formula):
    # overhead + compute of one rank's width + the all-reduce's alpha + beta n at TP > 1.
    model = report["model"]
    for pt in report["points"]:
        tp = str(pt["tp"])
        compute = sum(model["compute_s"][tp][str(pt["hidden_size"] // pt["tp"])].values())
        comm = model["alpha_s"] + model["beta_s_per_byte"] * model["allreduce_bytes"]
        assert pt["predicted"] == pytest.approx(model["overhead_s"][tp] + compute
                                                + (comm if pt["tp"] > 1 else 0), rel=1e-12), pt
    within = sum(abs(pt["predicted"] / pt["measured"]["median"] - 1) <= 0.3
                 for pt in report["points"])
    assert report["targets"] == {"points_within_30_percent": within, "points": 4}
    assert model["alpha_s"] > 0 and model["beta_s_per_byte"] > 0
    assert model["allreduce_bytes"] == 32 * 64 * 4
    assert set(report["crossover_hidden_size"]["tp2"]) == {"measured", "predicted"}
    assert np.isfinite(report["targets"]["points_within_30_percent"])
    # The picture: each variant's measured medians (with p10-p90) and its cost model, in ms.
    assert len(saved) == 1 and png_pixels(tmp_path / "s.png") == saved[0].pixels
    top = saved[0].axes[0]
    for tp, name in ((1, "serial"), (2, "TP=2")):
        points = sorted((pt["hidden_size"], pt) for pt in report["points"] if pt["tp"] == tp)
        hidden = [h for h, _ in points]
        model_x, model_y = lines(top)[f"{name}, cost model"]
        assert list(model_x) == hidden
        assert model_y == pytest.approx([pt["predicted"] * 1e3 for _, pt in points], rel=1e-12)
        measured, = [c for c in top.containers if c.get_label() == f"{name}, measured (p10-p90)"]
        x, y = measured.lines[0].get_xdata(), measured.lines[0].get_ydata()
        assert list(x) == hidden
        assert list(y) == pytest.approx([pt["measured"]["median"] * 1e3 for _, pt in points],
                                        rel=1e-12)
