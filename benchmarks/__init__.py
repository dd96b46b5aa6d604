"""The benchmarks, run as modules from the repository root:

    python -m benchmarks.bench_step      what a step costs and buys, ours beside PyTorch DTensor
    python -m benchmarks.scaling         where tensor parallelism starts to pay
    python -m benchmarks.bench_recompute activation recomputation: memory against Table 2, time
    python -m benchmarks.precision       bug or round-off: the band table of docs/precision.md

docs/code-and-paper.md lists the files behind them, one concern each.
"""
