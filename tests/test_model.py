"""Model level: the tensor-parallel ToyModel is the serial ToyModel, split.

Float64, so that the only differences are the round-off of adding fc2's
partial sums in another order. Measured here (TP 2 and 4): loss, gradients
and weights after 20 SGD steps within 1.1e-16 of serial on values of order
1; ATOL = 1e-14 leaves ~100x for other BLAS kernels' summation orders.
"""

import pytest
import torch
import torch.nn as nn

from core import parallel_state as ps
from core import wire as comm
from distributed import all_ranks, run_distributed
from model import ToyModel
from training.checkpointing import StateDictError, gather_serial_state_dict, load_serial_state_dict

ATOL = 1e-14
INPUT, HIDDEN, BATCH = 8, 32, 16


def close(actual, expected, what):
    err = (actual - expected).abs().max().item()
    assert err <= ATOL, f"{what}: max abs error {err:.3e} > {ATOL:g}"


def _models(seed=0):
    torch.manual_seed(seed)
    serial = ToyModel(INPUT, HIDDEN, dtype=torch.float64)
    torch.manual_seed(seed)
    parallel = ToyModel(INPUT, HIDDEN, tensor_parallel=True, dtype=torch.float64)
    return serial, parallel


def _batch(step=0):
    g = torch.Generator().manual_seed(100 + step)  # the same batch on every rank
    return torch.randn(BATCH, INPUT, dtype=torch.float64,
                       generator=g), torch.randn(BATCH, dtype=torch.float64, generator=g)


def _step(model, x, y):
    loss = nn.functional.mse_loss(model(x)[:, 0], y)
    loss.backward()
    return loss


def _check_one_step():
    serial, parallel = _models()
    # Same seed, same full model, whatever the tensor-parallel size: bit for bit.
    gathered = gather_serial_state_dict(parallel)
    assert gathered.keys() == serial.state_dict().keys()
    for name, full in gathered.items():
        assert torch.equal(full, serial.state_dict()[name]), name

    for input_grad in (False, True):
        serial.zero_grad(), parallel.zero_grad()
        x, y = _batch()
        xs, xp = x.clone().requires_grad_(input_grad), x.clone().requires_grad_(input_grad)
        loss_s = _step(serial, xs, y)
        comm.reset_comm_stats()
        loss_p = _step(parallel, xp, y)
        close(loss_p, loss_s, "loss")
        grads = {n: p.grad for n, p in serial.named_parameters()}
        for name, param in parallel.named_parameters():
            dim = getattr(param, "partition_dim", None)
            expected = grads[name] if dim is None else grads[name].chunk(
                ps.get_tensor_model_parallel_world_size(), dim)[ps.get_tensor_model_parallel_rank()]
            close(param.grad, expected, f"grad of {name}")
        # One all-reduce per step when the data needs no gradient (g only), two when it does (g and
        # f).
        tp = ps.get_tensor_model_parallel_world_size()
        expected = 0 if tp == 1 else 1 + input_grad
        assert comm.comm_calls["all_reduce"] == expected, dict(comm.comm_calls)
        assert comm.comm_bytes["all_reduce"] == comm.comm_calls["all_reduce"] * BATCH * INPUT * 8
        if input_grad:
            close(xp.grad, xs.grad, "input grad")


def _check_training_keeps_replicas_identical():
    serial, parallel = _models()
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (serial, parallel)]
    for step in range(20):
        x, y = _batch(step)
        for model, opt in zip((serial, parallel), opts):
            opt.zero_grad()
            _step(model, x, y)
            opt.step()
    # fc is replicated: every rank must hold exactly the same weights after training.
    replicas = all_ranks(parallel.fc.weight.detach())
    assert torch.equal(replicas,
                       replicas[:1].expand_as(replicas)), "fc.weight differs between ranks"
    gathered = gather_serial_state_dict(parallel)
    assert gathered.keys() == serial.state_dict().keys()
    for name, full in gathered.items():
        close(full, serial.state_dict()[name], f"trained {name}")


def _check_load_serial_state_dict():
    serial, _ = _models(seed=0)
    _, parallel = _models(seed=1)  # different init, then overwritten
    load_serial_state_dict(parallel, serial.state_dict())
    gathered = gather_serial_state_dict(parallel)
    assert gathered.keys() == serial.state_dict().keys()
    for name, full in gathered.items():
        assert torch.equal(full, serial.state_dict()[name]), name

    bad = dict(serial.state_dict())
    bad["fc.bias"] = bad.pop("fc.weight")
    with pytest.raises(StateDictError, match=r"missing \['fc.weight'\], unexpected \['fc.bias'\]"):
        load_serial_state_dict(parallel, bad)
    bad = dict(serial.state_dict(), **{"mlp.fc1.weight": torch.zeros(HIDDEN + 4, INPUT)})
    with pytest.raises(StateDictError,
                       match=rf"mlp.fc1.weight has shape \[{HIDDEN + 4}, {INPUT}\], "
                             rf"the model needs \[{HIDDEN}, {INPUT}\]"):
        load_serial_state_dict(parallel, bad)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_one_step_matches_serial(tp):
    run_distributed(_check_one_step, tp)


def test_training_keeps_replicated_fc_identical_and_matches_serial():
    run_distributed(_check_training_keeps_replicas_identical, 2)


def test_serial_state_dict_loads_into_shards():
    run_distributed(_check_load_serial_state_dict, 2)


def _saved_outside_split_region(model, x, y, hidden_per_rank):
    """Bytes of activations autograd saves for backward outside the split region (fc1's input,
    fc's input, the loss's inputs): every saved tensor that is neither a parameter nor
    hidden-wide."""
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params and (t.dim() == 0 or t.shape[-1] != hidden_per_rank):
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nn.functional.mse_loss(model(x)[:, 0], y)
    return sum(saved)


def _check_sequence_parallel_saves_one_over_tp():
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    # Sizes chosen so no width outside the region (6, 1, the rows) equals the hidden width per rank.
    d, h, rows = 6, 48, 8
    torch.manual_seed(0)
    plain = ToyModel(d, h, tensor_parallel=True, dtype=torch.float64)
    torch.manual_seed(0)
    sp = ToyModel(d, h, tensor_parallel=True, sequence_parallel=True, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(rows, d, dtype=torch.float64,
                       generator=g), torch.randn(rows, dtype=torch.float64, generator=g)
    full = _saved_outside_split_region(plain, x, y, h // tp)
    mine = _saved_outside_split_region(sp, x.chunk(tp)[rank], y.chunk(tp)[rank], h // tp)
    assert full > 0 and mine * tp == full, (mine, full)


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_saves_one_over_tp_outside_the_split_region(tp):
    run_distributed(_check_sequence_parallel_saves_one_over_tp, tp)
