"""parallel_train.py on a torch without 2.13's names for the one-buffer collectives.

    torchrun ... tests/without_new_collective_names.py [parallel_train.py flags]

Torch 2.13 named them `all_gather_single` / `reduce_scatter_single`; every
earlier torch knows only `all_gather_into_tensor` / `reduce_scatter_tensor`.
Removing the new names makes this torch look like an older one to our code.
"""

import os
import runpy
import sys

import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

for name in ("all_gather_single", "reduce_scatter_single"):
    if hasattr(dist, name):
        delattr(dist, name)
    assert not hasattr(dist, name)
runpy.run_path(os.path.join(REPO, "parallel_train.py"), run_name="__main__")
