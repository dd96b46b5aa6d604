"""What the benchmarks measure on: the model configurations, the seed, the machine's name.

bench_step.py times every configuration but the test-sized ones; bench_recompute.py the
transformers; scaling.py sweeps "original"'s hidden size.
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# lr 1e-5 for the compute-heavy size: at 1e-3 it diverges (inf by iteration 14); a finite run is
# timed.
CONFIGS = {
    "original": dict(input_size=64, hidden_size=2048, batch_size=32, lr=1e-3),
    "compute_heavy": dict(input_size=1024, hidden_size=32768, batch_size=32, lr=1e-5),
    "tiny": dict(input_size=8, hidden_size=64, batch_size=4, lr=1e-3),  # for the tests
    # The toy GPT of transformer.py at its defaults (train.py --model transformer, the bash
    # scripts' lr), and a small one for the tests: bench_transformer.py.
    "transformer": dict(model="transformer", vocab_size=50, seq_length=16, input_size=64,
                        hidden_size=2048, num_heads=4, num_layers=1, batch_size=32, lr=0.01),
    "tiny_transformer": dict(model="transformer", vocab_size=10, seq_length=8, input_size=16,
                             hidden_size=32, num_heads=4, num_layers=1, batch_size=4, lr=0.01),
    # For activation recomputation (bench_recompute.py): the attention core's share of a layer's
    # activations is GPT-3 175B's (5as/h = 80, Korthikanti et al., Sec. 4.1), the MLP 4h as GPT's.
    "long_sequence": dict(model="transformer", vocab_size=50, seq_length=256, input_size=64,
                          hidden_size=256, num_heads=4, num_layers=1, batch_size=2, lr=0.01),
}

SEED = 1234



def describe(cfg):
    if cfg.get("model") == "transformer":
        return (f"vocabulary {cfg['vocab_size']}, sequence {cfg['seq_length']}, width "
                f"{cfg['input_size']}, hidden {cfg['hidden_size']}, {cfg['num_heads']} heads, "
                f"{cfg['num_layers']} block, batch {cfg['batch_size']}")
    return f"input {cfg['input_size']}, hidden {cfg['hidden_size']}, batch {cfg['batch_size']}"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":",
                                   1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"
