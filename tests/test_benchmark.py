"""The benchmark runs end to end, and its accounting matches the paper and the 1/TP theory exactly.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_accounting(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "benchmarks/bench_step.py", "--configs", "tiny", "--steps", "3",
                    "--warmup", "1",
                    "--max_tp", "2", "--device", "cpu", "--out", str(out), "--plot",
                    str(tmp_path / "bench.png")],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    cfg = report["configs"]["tiny"]
    rows = {r["variant"]: r for r in report["results"]["tiny"]}
    assert set(rows) == {"serial-1t", "serial-2t", "ours-tp1", "ours-tp2", "ours-sp-tp2",
                         "dtensor-tp2"}
    assert (tmp_path / "bench.png").stat().st_size > 10_000

    # Megatron-LM Sec. 3: one all-reduce of batch x input in forward (g), one in backward (f).
    # A ring all-reduce of n bytes over 2 ranks sends 2 (2-1)/2 n = n per rank.
    activation = cfg["batch_size"] * cfg["input_size"] * 4  # fp32 bytes
    comm = rows["ours-tp2"]["comm"]
    assert comm["input_grad"] == {"calls": {"all_reduce": 2},
                                  "bytes": {"all_reduce": 2 * activation},
                                  "ring_bytes": {"all_reduce": 2 * activation}}
    # The toy model's input is raw data: f's backward all-reduce has nothing to carry and is not
    # sent.
    assert comm["no_input_grad"] == {"calls": {"all_reduce": 1},
                                     "bytes": {"all_reduce": activation},
                                     "ring_bytes": {"all_reduce": activation}}
    # one rank: no communication at all
    assert rows["ours-tp1"]["comm"]["input_grad"]["calls"] == {}

    # Sequence parallelism (Korthikanti et al., 2022, Sec. 4.2.2): forward all-gather +
    # reduce-scatter, backward all-gather (dL/dZ) + all-gather (fc1's input again) + reduce-scatter
    # (dL/dX, only with input grad); each sends (2-1)/2 of batch x input per rank: g's and f's
    # all-reduces' bytes, plus the re-gather. Plus one all-reduce of fc's partial gradient and the
    # loss (input + 1 floats).
    half, small = activation // 2, (cfg["input_size"] + 1) * 4
    for case, scatters in (("no_input_grad", 1), ("input_grad", 2)):
        assert rows["ours-sp-tp2"]["comm"][case] == {
            "calls": {"all_gather": 3, "reduce_scatter": scatters, "all_reduce": 1},
            "bytes": {"all_gather": 3 * half, "reduce_scatter": scatters * activation,
                      "all_reduce": small},
            "ring_bytes": {"all_gather": 3 * half, "reduce_scatter": scatters * half,
                           "all_reduce": small}}, case
    assert report["papers"]["tiny"]["sequence_parallel"]["ring_bytes"] == 5 * half
    assert report["papers"]["tiny"]["tensor_parallel"]["ring_bytes"] == 2 * activation

    # Memory per rank: the MLP's weights, gradients and momentum are 1/TP of serial; fc stays whole.
    mlp = 2 * cfg["input_size"] * cfg["hidden_size"] * 4
    fc = cfg["input_size"] * 4
    assert rows["serial-1t"]["memory"]["params"] == mlp + fc
    for variant in ("ours-tp2", "ours-sp-tp2", "dtensor-tp2"):
        memory = rows[variant]["memory"]
        assert memory["params"] == memory["grads"] == memory["optimizer"] == mlp // 2 + fc, variant

    # Activations saved for backward: inside the split region 1/TP with tensor parallelism; outside
    # it (fc1's input, fc's input, the loss's inputs) 1/TP only with sequence parallelism.
    serial = rows["serial-1t"]["memory"]["activations"]
    # ReLU's output, saved once for fc2
    assert serial["inside"] == cfg["batch_size"] * cfg["hidden_size"] * 4
    for variant, outside in (("ours-tp2", serial["outside"]), ("dtensor-tp2", serial["outside"]),
                             ("ours-sp-tp2", serial["outside"] // 2)):
        assert rows[variant]["memory"]["activations"] == {"inside": serial["inside"] // 2,
                                                          "outside": outside}, variant
