"""torch.distributed's one-buffer collectives, by the name this torch gives them, under Megatron's
names (`dist_all_gather_func`, `dist_reduce_scatter_func`, which Megatron defines in each module
that uses them; here once): torch 2.13 renamed
all_gather_into_tensor and reduce_scatter_tensor to all_gather_single and reduce_scatter_single
and warns on the old names; every earlier torch knows only the old ones. And `flag_off`, the
switch that validation turns sequence and context parallelism off with."""

from contextlib import contextmanager

import torch.distributed as dist

dist_all_gather_func = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
dist_reduce_scatter_func = getattr(dist, "reduce_scatter_single", None) or \
    dist.reduce_scatter_tensor


@contextmanager
def flag_off(model, flag):
    """The modules of `model` whose `flag` attribute is on, with it off inside the block."""
    modules = [m for m in model.modules() if getattr(m, flag, False)]
    for module in modules:
        setattr(module, flag, False)
    try:
        yield
    finally:
        for module in modules:
            setattr(module, flag, True)
