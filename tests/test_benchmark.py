"""The benchmark runs end to end, and its accounting matches the paper and the 1/TP theory exactly."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_accounting(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "benchmarks/bench_step.py", "--configs", "tiny", "--steps", "3", "--warmup", "1",
                    "--max_tp", "2", "--out", str(out), "--plot", str(tmp_path / "bench.png")],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    cfg = report["configs"]["tiny"]
    rows = {r["variant"]: r for r in report["results"]["tiny"]}
    assert set(rows) == {"serial-1t", "serial-2t", "ours-tp1", "ours-tp2", "dtensor-tp2"}
    assert (tmp_path / "bench.png").stat().st_size > 10_000

    # Megatron-LM Sec. 3: one all-reduce of batch x input in forward (g), one in backward (f).
    activation = cfg["batch_size"] * cfg["input_size"] * 4  # fp32 bytes
    comm = rows["ours-tp2"]["comm"]
    assert comm["input_grad"] == {"calls": {"all_reduce": 2}, "bytes": {"all_reduce": 2 * activation}}
    # The toy model's input is raw data: f's backward all-reduce has nothing to carry and is not sent.
    assert comm["no_input_grad"] == {"calls": {"all_reduce": 1}, "bytes": {"all_reduce": activation}}
    assert rows["ours-tp1"]["comm"]["input_grad"]["calls"] == {}  # one rank: no communication at all

    # Memory per rank: the MLP's weights, gradients and momentum are 1/TP of serial; fc stays whole.
    mlp = 2 * cfg["input_size"] * cfg["hidden_size"] * 4
    fc = cfg["input_size"] * 4
    assert rows["serial-1t"]["memory"]["params"] == mlp + fc
    for variant in ("ours-tp2", "dtensor-tp2"):
        memory = rows[variant]["memory"]
        assert memory["params"] == memory["grads"] == memory["optimizer"] == mlp // 2 + fc, variant
