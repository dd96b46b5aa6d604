"""parallel_train.py with the all-reduce of the conjugate operators broken, as a bug would break it.

    torchrun --nproc_per_node 2 tests/break_all_reduce.py {drop,average} [parallel_train.py flags]
"""

import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import mappings  # noqa: E402

kind = sys.argv.pop(1)
reduce = mappings._reduce


def broken_reduce(input_):
    if kind == "drop":  # g forgets to sum the partial products
        return input_
    # "average": the mean instead of the sum, a classic mix-up with data parallelism
    return reduce(input_).div_(mappings.ps.get_tensor_model_parallel_world_size())


mappings._reduce = broken_reduce
runpy.run_path(os.path.join(REPO, "parallel_train.py"), run_name="__main__")
