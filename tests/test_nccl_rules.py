"""NCCL's rules, held on every backend (communication._check): what gloo on CPU accepts and NCCL on
GPUs refuses, or silently gets wrong, is a one-line error here too."""

import pytest
import torch
import torch.distributed as dist

import communication as comm
from distributed import run_distributed
from mappings import copy_to_tensor_model_parallel_region


def _refused(call, *words):
    with pytest.raises(comm.CollectiveRuleError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message


def _check_rules():
    rank = dist.get_rank()
    transposed = torch.ones(2, 3).t()  # a view: gloo would sum its raw storage
    _refused(lambda: comm.all_reduce(transposed), "all_reduce: NCCL needs a contiguous tensor",
             "shape (3, 2), strides (1, 3)")
    _refused(lambda: comm.all_reduce(torch.ones(4, dtype=torch.int16)),
             "all_reduce: NCCL does not reduce torch.int16")
    # Shapes or dtypes that differ between ranks: NCCL would hang or read past the end.
    assert comm.CHECK_COLLECTIVES, "the suite runs with TP_CHECK_COLLECTIVES=1 (conftest.py)"
    _refused(lambda: comm.all_reduce(torch.ones(4 + rank)),
             "all_reduce: every rank must hand it the same shape and dtype",
             f"this rank has torch.float32 ({4 + rank},) and rank {1 - rank} of the group has "
             f"torch.float32 ({5 - rank},)")
    _refused(lambda: comm.all_gather(torch.ones(2, 3, dtype=[torch.float32, torch.float64][rank]),
                                   dim=0), "all_gather: every rank must hand it the same shape")
    # Within the rules, the collectives still work afterwards.
    t = torch.ones(3)
    comm.all_reduce(t)
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
