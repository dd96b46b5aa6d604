"""NCCL's rules, held on every backend (core/wire.py's _check): what gloo on CPU accepts and NCCL on
GPUs refuses, or silently gets wrong, is a one-line error here too."""

import ast
import glob
import os

import pytest
import torch
import torch.distributed as dist

from core import wire as comm
from core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from distributed import REPO, run_distributed

# torch.distributed's calls that move tensors or objects, by the names this repo could use.
MOVES_DATA = {"all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_to_all",
              "all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor",
              "all_gather_single", "reduce_scatter_single", "send", "recv", "isend", "irecv",
              "P2POp", "batch_isend_irecv", "gather", "scatter", "reduce", "gather_object",
              "all_gather_object", "broadcast_object_list", "scatter_object_list",
              "dist_all_gather_func", "dist_reduce_scatter_func"}
# The functions that call one without @wire.collective, and why that is right.
AROUND_THE_WIRE = {
    "core/wire.py:_check_same_on_every_rank",  # the check's own all-gather of shapes
    "core/wire.py:check_splits",  # the check's own all-gather of an all-to-all's split sizes
    "training/checkpointing.py:gather_over_experts",  # state_dicts as objects, on the CPU
    "training/checkpointing.py:with_every_expert",  # the experts' and their state, as objects
    "training/checkpointing.py:with_peers_expert_pieces",  # the optimizer's pieces, as objects
    "core/pipeline_parallel/p2p_communication.py:_communicate",  # wire.point_to_point_wire
    "core/pipeline_parallel/p2p_communication.py:_announce",  # the check's headers
    "training/checkpointing.py:gather_over_pipeline",  # state_dicts as objects, on the CPU
    "training/checkpointing.py:context_parallel_trackers",  # RNG states as objects, on the CPU
    "benchmarks/bench_pipeline.py:worker",  # the measurements, as objects
    "benchmarks/step_workers.py:dtensor_loop",  # torch's DTensor baseline, not this repo's code
}
SOURCES = ("core/**/*.py", "training/*.py", "*.py", "benchmarks/*.py", "scripts/*.py")


def _sources():
    return sorted({os.path.relpath(p, REPO) for pattern in SOURCES
                   for p in glob.glob(os.path.join(REPO, pattern), recursive=True)})


def _marked(fn):
    return any(ast.unparse(d).startswith(("wire.collective(", "collective("))
               for d in fn.decorator_list)


def _unwired_calls():
    """(file:function, call) for every call that moves data outside a @wire.collective, whether
    written dist.X, torch.distributed.X or X imported from torch.distributed."""
    for path in _sources():
        with open(os.path.join(REPO, path)) as f:
            tree = ast.parse(f.read())
        imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and n.module == "torch.distributed" for a in n.names}
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef) or _marked(fn):
                continue
            for node in ast.walk(fn):
                call = ast.unparse(node.func) if isinstance(node, ast.Call) else ""
                name = call.removeprefix("torch.distributed.").removeprefix("dist.")
                if name in MOVES_DATA and (name != call or call in imported
                                           or call.startswith("dist_")):
                    yield f"{path}:{fn.name}", call


def test_no_collective_goes_around_the_wire():
    """Every torch.distributed call that moves data sits in a function marked @wire.collective,
    so NCCL's rules are checked and the call counted in every run and test; the exceptions are
    listed with their reasons."""
    found = {where for where, _ in _unwired_calls()}
    assert found == AROUND_THE_WIRE, sorted(set(_unwired_calls()))
    with open(os.path.join(REPO, "core/pipeline_parallel/p2p_communication.py")) as f:
        assert "dist.P2POp(dist.isend, wire.point_to_point_wire(" in f.read()


def test_every_marked_function_is_registered():
    """The functions marked in the source are the wire's COLLECTIVES once a run's modules are
    imported (tests/test_backends.py hands each of them a tensor on the wrong device)."""
    import core.context_parallel.attention  # noqa: F401  (not on a run's path yet: issue 38)
    import parallel_train  # noqa: F401
    marked = set()
    for path in _sources():
        with open(os.path.join(REPO, path)) as f:
            tree = ast.parse(f.read())
        module = path[:-3].replace(os.sep, ".")
        marked |= {f"{module}.{fn.name}" for fn in tree.body
                   if isinstance(fn, ast.FunctionDef) and _marked(fn)}
    assert marked == set(comm.COLLECTIVES) and len(marked) >= 18, sorted(marked)


def _refused(call, *words):
    with pytest.raises(comm.CollectiveRuleError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message


def _check_rules():
    rank = dist.get_rank()
    transposed = torch.ones(2, 3).t()  # a view: gloo would sum its raw storage
    _refused(lambda: comm.all_reduce(transposed, dist.group.WORLD),
             "all_reduce: NCCL needs a contiguous tensor", "shape (3, 2), strides (1, 3)")
    _refused(lambda: comm.all_reduce(torch.ones(4, dtype=torch.int16), dist.group.WORLD),
             "all_reduce: NCCL does not reduce torch.int16")
    # Shapes or dtypes that differ between ranks: NCCL would hang or read past the end.
    assert comm.CHECK_COLLECTIVES, "the suite runs with TP_CHECK_COLLECTIVES=1 (conftest.py)"
    _refused(lambda: comm.all_reduce(torch.ones(4 + rank), dist.group.WORLD),
             "all_reduce: every rank must hand it the same shape and dtype",
             f"this rank has torch.float32 ({4 + rank},) and rank {1 - rank} of the group has "
             f"torch.float32 ({5 - rank},)")
    _refused(lambda: comm.all_gather(torch.ones(2, 3, dtype=[torch.float32, torch.float64][rank]),
                                     dist.group.WORLD),
             "all_gather: every rank must hand it the same shape")
    # Within the rules, the collectives still work afterwards.
    t = torch.ones(3)
    comm.all_reduce(t, dist.group.WORLD)
    assert torch.equal(t, torch.full((3,), 2.0))


def test_collectives_refuse_what_nccl_would():
    run_distributed(_check_rules, 2)


def _check_f_with_a_transposed_gradient():
    """The transformer's case: f's output is transposed before use, so the gradient reaching f's
    backward is a transposed view. f must all-reduce a contiguous copy (NCCL refuses the view)."""
    x = torch.arange(6, dtype=torch.float64).reshape(2, 3).requires_grad_()
    y = copy_to_tensor_model_parallel_region(x)
    weights = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    (y.t() * weights).sum().backward()  # dL/dy = weights.t(), handed over as a view
    assert torch.equal(x.grad, 2 * weights.t()), "the sum over both ranks' (equal) gradients"


def test_f_reduces_a_transposed_gradient():
    run_distributed(_check_f_with_a_transposed_gradient, 2)
