"""Layer level: each parallel layer equals the matching slices of a serial nn.Linear.

Forward output, input gradient, weight and bias gradients, and the collectives
issued, for tensor-parallel sizes 1, 2 and 4 and every flag setting.
Float64 throughout: the split layers add the same products in a different
order, so results differ from serial by round-off only. Measured here: at most
4.4e-16 absolute on values of order 1; ATOL = 1e-14 leaves a margin of ~20x
and is 10 orders of magnitude below what a missing or wrong all-reduce gives.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from core import parallel_state as ps
from core import wire as comm
from core.tensor_parallel import cross_entropy, mappings
from distributed import RankFailed, all_ranks, run_distributed
from parallel_layers import ColumnParallelLinear, RowParallelLinear

ATOL = 1e-14
IN, OUT, ROWS = 8, 16, 6


def close(actual, expected, what):
    err = (actual - expected).abs().max().item()
    assert err <= ATOL, f"{what}: max abs error {err:.3e} > {ATOL:g}"


def _data(out_features, rows=ROWS):
    g = torch.Generator().manual_seed(1)  # same on every rank
    return (torch.randn(rows, IN, dtype=torch.float64, generator=g),
            torch.randn(rows, out_features, dtype=torch.float64, generator=g))


def _check_column_parallel():
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    mine = lambda t: t.chunk(tp, dim=0)[rank]  # this rank's outputs: rows of W, entries of b
    for gather_output in (True, False):
        for async_allreduce in (True, False):
            for input_grad in (True, False):
                torch.manual_seed(0)
                serial = nn.Linear(IN, OUT, dtype=torch.float64)
                torch.manual_seed(0)
                layer = ColumnParallelLinear(IN, OUT, gather_output=gather_output,
                                             async_tensor_model_parallel_allreduce=async_allreduce,
                                             dtype=torch.float64)
                # Master-weight init: this rank's slice of the very same nn.Linear, bit for bit.
                assert torch.equal(layer.weight,
                                   mine(serial.weight)) and torch.equal(layer.bias,
                                                                        mine(serial.bias))

                x, dy = _data(OUT)
                xs, xp = x.clone().requires_grad_(input_grad), x.clone().requires_grad_(input_grad)
                ys = serial(xs)
                comm.reset_comm_stats()
                yp = layer(xp)
                close(yp, ys if gather_output else ys.chunk(tp, dim=-1)[rank], "output")
                assert comm.comm_calls["all_gather"] == (gather_output and tp > 1)
                assert comm.comm_calls["all_reduce"] == 0  # f is the identity in forward

                ys.backward(dy)
                yp.backward(dy if gather_output else dy.chunk(tp, dim=-1)[rank])
                close(layer.weight.grad, mine(serial.weight.grad), "weight grad")
                close(layer.bias.grad, mine(serial.bias.grad), "bias grad")
                # f's backward all-reduce runs only when the input needs a gradient.
                assert comm.comm_calls["all_reduce"] == (input_grad and tp > 1), \
                    dict(comm.comm_calls)
                if input_grad:
                    close(xp.grad, xs.grad, "input grad")


def _check_row_parallel():
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    mine = lambda t: t.chunk(tp, dim=-1)[rank]  # this rank's inputs: columns of W and of X
    for input_is_parallel in (True, False):
        for bias in (True, False):
            torch.manual_seed(0)
            serial = nn.Linear(IN, OUT, bias=bias, dtype=torch.float64)
            torch.manual_seed(0)
            layer = RowParallelLinear(IN, OUT, bias=bias, input_is_parallel=input_is_parallel,
                                      dtype=torch.float64)
            assert torch.equal(layer.weight, mine(serial.weight))
            if bias:  # added once, after the all-reduce: replicated, not split
                assert torch.equal(layer.bias, serial.bias)

            x, dy = _data(OUT)
            xs = x.clone().requires_grad_()
            xp = (mine(x) if input_is_parallel else x).clone().requires_grad_()
            ys = serial(xs)
            comm.reset_comm_stats()
            yp = layer(xp)
            close(yp, ys, "output")
            assert comm.comm_calls["all_reduce"] == (tp > 1)  # g

            ys.backward(dy)
            yp.backward(dy)
            close(layer.weight.grad, mine(serial.weight.grad), "weight grad")
            close(xp.grad, mine(xs.grad) if input_is_parallel else xs.grad, "input grad")
            if bias:
                close(layer.bias.grad, serial.bias.grad, "bias grad")
            assert comm.comm_calls["all_reduce"] == (tp > 1)  # g's backward is the identity
            # scatter's backward
            assert comm.comm_calls["all_gather"] == (not input_is_parallel and tp > 1)


def _check_sequence_parallel():
    """Outside the split region each rank holds its rows only (Korthikanti et al., 2022, Sec.
    4.2.2)."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    rows = 8  # divisible by every tensor-parallel size tested
    my_rows = lambda t: t.chunk(tp, dim=0)[rank]
    my_cols = lambda t: t.chunk(tp, dim=-1)[rank]
    x, dy = _data(OUT, rows)
    for input_grad in (False, True):
        torch.manual_seed(0)
        serial = nn.Linear(IN, OUT, dtype=torch.float64)
        torch.manual_seed(0)
        layer = ColumnParallelLinear(IN, OUT, gather_output=False, sequence_parallel=True,
                                     dtype=torch.float64)
        xs, xp = x.clone().requires_grad_(input_grad), my_rows(x).clone().requires_grad_(input_grad)
        ys = serial(xs)
        comm.reset_comm_stats()
        yp = layer(xp)
        close(yp, my_cols(ys), "column output: every row, this rank's columns")
        assert comm.comm_calls["all_gather"] == (tp > 1)  # the rows, in place of f's identity
        ys.backward(dy)
        yp.backward(my_cols(dy))
        close(layer.weight.grad, serial.weight.grad.chunk(tp, dim=0)[rank], "column weight grad")
        close(layer.bias.grad, my_cols(serial.bias.grad), "column bias grad")
        # Backward gathers the rows again (only this rank's were saved); dL/dX is reduce-scattered
        # if needed.
        assert comm.comm_calls["all_gather"] == 2 * (tp > 1), dict(comm.comm_calls)
        assert comm.comm_calls["reduce_scatter"] == (input_grad and tp > 1), dict(comm.comm_calls)
        assert comm.comm_calls["all_reduce"] == 0
        if input_grad:
            close(xp.grad, my_rows(xs.grad), "column input grad")

    torch.manual_seed(0)
    serial = nn.Linear(IN, OUT, dtype=torch.float64)
    torch.manual_seed(0)
    layer = RowParallelLinear(IN, OUT, input_is_parallel=True, sequence_parallel=True,
                              dtype=torch.float64)
    xs, xp = x.clone().requires_grad_(), my_cols(x).clone().requires_grad_()
    ys = serial(xs)
    comm.reset_comm_stats()
    yp = layer(xp)
    close(yp, my_rows(ys), "row output: this rank's rows")
    # g, as a reduce-scatter
    assert dict(comm.comm_calls) == ({"reduce_scatter": 1} if tp > 1 else {})
    ys.backward(dy)
    yp.backward(my_rows(dy))
    close(layer.weight.grad, my_cols(serial.weight.grad), "row weight grad")
    close(xp.grad, my_cols(xs.grad), "row input grad")
    # The bias was added to this rank's rows only: the ranks' gradients sum to the serial one.
    close(all_ranks(layer.bias.grad).sum(0), serial.bias.grad, "row bias grad, summed over ranks")
    assert dict(comm.comm_calls) == ({"reduce_scatter": 1, "all_gather": 1} if tp > 1 else {})


def _check_overlapped_f_computes_what_f_does():
    """async_tensor_model_parallel_allreduce=True (mappings.LinearWithAsyncAllreduce) against the
    default, f then F.linear: the same output and gradients, and the same one all-reduce of
    dL/dX."""
    results = []
    for overlap in (False, True):
        torch.manual_seed(0)
        layer = ColumnParallelLinear(IN, OUT, gather_output=False, dtype=torch.float64,
                                     async_tensor_model_parallel_allreduce=overlap)
        x, dy = _data(OUT)
        x.requires_grad_()
        comm.reset_comm_stats()
        y = layer(x)
        y.backward(dy.chunk(ps.get_tensor_model_parallel_world_size(),
                            dim=-1)[ps.get_tensor_model_parallel_rank()])
        results.append((y, x.grad, layer.weight.grad, layer.bias.grad, dict(comm.comm_calls)))
    (*f, f_calls), (*fused, fused_calls) = results
    for what, a, b in zip(("output", "input grad", "weight grad", "bias grad"), f, fused):
        close(b, a, what)
    assert f_calls == fused_calls == {"all_reduce": 1}


def _check_default_run_meets_f_and_g():
    """The default tensor-parallel ToyModel calls f and g of mappings.py, once each per forward."""
    import parallel_layers
    from core.tensor_parallel import mappings
    from model import ToyModel
    calls = []
    for name in ("copy_to_tensor_model_parallel_region",
                 "reduce_from_tensor_model_parallel_region"):
        op = getattr(mappings, name)
        setattr(parallel_layers, name, lambda t, op=op, name=name: calls.append(name) or op(t))
    ToyModel(IN, OUT, tensor_parallel=True)(torch.randn(ROWS, IN))
    assert calls == ["copy_to_tensor_model_parallel_region",
                     "reduce_from_tensor_model_parallel_region"]


def test_overlapped_f_computes_what_f_does():
    run_distributed(_check_overlapped_f_computes_what_f_does, 2)


def test_default_run_meets_f_and_g():
    run_distributed(_check_default_run_meets_f_and_g, 2)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_sequence_parallel_layers_match_serial(tp):
    run_distributed(_check_sequence_parallel, tp)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_parallel_linear_matches_serial(tp):
    run_distributed(_check_column_parallel, tp)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_parallel_linear_matches_serial(tp):
    run_distributed(_check_row_parallel, tp)


# The checks above must be able to fail: break the all-reduce the way a bug would.

def _with_broken_all_reduce(kind, check):
    def broken(tensor, group, async_op=False):  # the sums of f, g and the vocabulary loss
        # counted like the real one (2 ranks): only the numbers can tell
        comm._count("all_reduce", tensor.dtype, tensor.numel(), ring_share=1)
        if kind == "average":  # mean instead of sum: a classic mix-up with data parallelism
            dist.all_reduce(tensor, group=group)
            tensor /= dist.get_world_size(group)
        return (lambda: tensor) if async_op else tensor  # "drop": the tensor is left as it was

    mappings._reduce = cross_entropy._all_reduce_sum = broken  # (test_vocab_parallel.py's too)
    check()


# Where each layer's all-reduce shows first: f's is in backward (the input's gradient), g's in
# forward (the output).
@pytest.mark.parametrize("kind", ["drop", "average"])
@pytest.mark.parametrize("check,what", [(_check_column_parallel, "input grad"),
                                        (_check_row_parallel, "output")],
                         ids=["column", "row"])
def test_layer_checks_catch_a_broken_all_reduce(kind, check, what):
    with pytest.raises(RankFailed, match=f"AssertionError: {what}: max abs error"):
        run_distributed(_with_broken_all_reduce, 2, kind, check)
