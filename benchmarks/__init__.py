"""The benchmarks, run as modules from the repository root:

    python -m benchmarks.bench_step      what a step costs and buys, ours beside PyTorch DTensor
    python -m benchmarks.scaling         where tensor parallelism starts to pay
"""
