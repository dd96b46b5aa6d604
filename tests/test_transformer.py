"""Model level, the toy transformer: the tensor-parallel ToyTransformer against the serial one.

Loss and every gradient of a step, for TP 1, 2, 4, with a vocabulary that 4 divides and one it
does not (padded), two blocks; the collectives of a step counted against the paper's (Fig. 4:
two all-reduces per block in forward, two in backward; one for the embedding's lookups; the
cross-entropy's small ones and f on the hidden states), none of them vocabulary-wide; dropout's
masks from the tracker (TP=1 draws serial's masks; the replicated parameters' gradients stay
bitwise equal on every rank with dropout on).

Float64; sums split over ranks in a different order: ATOL 1e-14 as test_layers.py (measured
here at most 8.9e-16 on values of order 1).
"""

import pytest
import torch

from core import parallel_state as ps
from core import wire as comm
from core.tensor_parallel import random as rng_tracker
from distributed import RankFailed, all_ranks, run_distributed
from test_layers import _with_broken_all_reduce, close
from transformer import ToyTransformer

BATCH, SEQ, WIDTH, HIDDEN, HEADS, LAYERS = 3, 5, 8, 16, 4, 2
F64 = 8  # bytes


def _build(vocab_size, tensor_parallel, dropout=0.0):
    rng_tracker.model_parallel_manual_seed(0)
    return ToyTransformer(vocab_size, SEQ, WIDTH, HIDDEN, HEADS, LAYERS, tensor_parallel, dropout,
                          dtype=torch.float64)


def _batch(vocab_size):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(vocab_size, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _my_slice(param, full):
    """This rank's part of a serial tensor, as the parallel parameter holds it."""
    dim = getattr(param, "partition_dim", None)
    if dim is None:
        return full
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    padding = param.shape[0] * tp - full.shape[0] if hasattr(param, "vocab_size") else 0
    full = torch.cat([full, full.new_zeros(padding, *full.shape[1:])])
    return full.chunk(tp, dim=dim)[rank]


def _check_step():
    tp = ps.get_tensor_model_parallel_world_size()
    for vocab_size in (12, 10):
        serial, parallel = _build(vocab_size, False), _build(vocab_size, True)
        params = dict(parallel.named_parameters())
        for name, p in serial.named_parameters():
            assert torch.equal(params[name], _my_slice(params[name], p.detach())), name

        tokens, targets = _batch(vocab_size)
        serial_loss = serial.loss(serial(tokens), targets)
        serial_loss.backward()
        comm.reset_comm_stats()
        loss = parallel.loss(parallel(tokens), targets)
        forward = dict(comm.comm_calls)
        loss.backward()
        close(loss, serial_loss, "loss")
        for name, p in serial.named_parameters():
            close(params[name].grad, _my_slice(params[name], p.grad), f"{name} grad")

        if tp == 1:
            assert not comm.comm_calls
            continue
        # Forward: the embedding's g, the attention's and the MLP's g in each block, then the
        # cross-entropy's two (the max; the sum of exponentials with the target's logit).
        # Backward: each block's two f, and f on the hidden states before the output layer.
        assert forward == {"all_reduce": 1 + 2 * LAYERS + 2}, forward
        assert dict(comm.comm_calls) == {"all_reduce": 1 + 2 * LAYERS + 2 + 2 * LAYERS + 1}
        activations, tokens_only = BATCH * SEQ * WIDTH * F64, BATCH * SEQ * F64
        assert comm.comm_bytes["all_reduce"] == (2 + 4 * LAYERS) * activations + 3 * tokens_only
        # Replicated parameters (LayerNorms, positions, the row-parallel biases): same bits.
        for name, p in params.items():
            if getattr(p, "partition_dim", None) is None:
                assert (all_ranks(p.grad) == p.grad).all(), name


def _check_sequence_parallel_step():
    """Under sequence parallelism each rank holds 1/p of the sequence outside the split regions;
    the LayerNorms' and the row-parallel biases' gradients are partial, summed after backward."""
    from core.distributed.finalize_model_grads import allreduce_sequence_parallel_grads
    tp = ps.get_tensor_model_parallel_world_size()
    vocab_size = 10
    rng_tracker.model_parallel_manual_seed(0)
    serial = ToyTransformer(vocab_size, SEQ + 3, WIDTH, HIDDEN, HEADS, LAYERS,
                            dtype=torch.float64)
    rng_tracker.model_parallel_manual_seed(0)
    parallel = ToyTransformer(vocab_size, SEQ + 3, WIDTH, HIDDEN, HEADS, LAYERS,
                              tensor_parallel=True, sequence_parallel=True, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(vocab_size, (BATCH, SEQ + 4), generator=g)  # 8 tokens: TP 4 divides
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    hidden = parallel(inputs)
    assert hidden.shape[0] == (SEQ + 3) // tp, "this rank's rows of the sequence"
    loss = parallel.loss(hidden, targets)
    loss.backward()
    loss = allreduce_sequence_parallel_grads(parallel.parameters(), loss, loss_is_partial=False)
    serial_loss = serial.loss(serial(inputs), targets)
    serial_loss.backward()
    close(loss, serial_loss, "loss")
    params = dict(parallel.named_parameters())
    for name, p in serial.named_parameters():
        close(params[name].grad, _my_slice(params[name], p.grad), f"{name} grad")
        if getattr(params[name], "partition_dim", None) is None:
            assert (all_ranks(params[name].grad) == params[name].grad).all(), name


def _check_dropout():
    """Dropout on at any TP size: replicas stay identical, and masks are really drawn: the output
    is not the dropout-free one, and a second step draws new masks. (Without dropout the same
    model gives the same bits: any difference is a mask.)"""
    tp = ps.get_tensor_model_parallel_world_size()
    tokens, targets = _batch(12)
    without = _build(12, True, dropout=0.0)(tokens)
    parallel = _build(12, True, dropout=0.2)
    hidden = parallel(tokens)
    assert not torch.equal(hidden, without), "dropout drew no mask"
    assert not torch.equal(parallel(tokens), hidden), "a second step drew the first one's masks"
    loss = parallel.loss(hidden, targets)
    loss.backward()
    assert (all_ranks(loss.detach()) == loss.detach()).all(), "every rank's loss is the same"
    for name, p in parallel.named_parameters():
        if getattr(p, "partition_dim", None) is None:
            assert (all_ranks(p.grad) == p.grad).all(), f"{name}: replicas parted"
    if tp == 1:  # the same streams in the same order: serial's masks, serial's loss
        serial = _build(12, False, dropout=0.2)
        close(loss, serial.loss(serial(tokens), targets), "loss with dropout, TP=1")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_transformer_step_matches_serial(tp):
    run_distributed(_check_step, tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_transformer_sequence_parallel_step_matches_serial(tp):
    run_distributed(_check_sequence_parallel_step, tp)


@pytest.mark.parametrize("tp", [1, 2])
def test_transformer_dropout_keeps_replicas_identical(tp):
    run_distributed(_check_dropout, tp)


@pytest.mark.parametrize("kind", ["drop", "average"])
def test_transformer_check_catches_a_broken_all_reduce(kind):
    with pytest.raises(RankFailed, match="AssertionError: loss: max abs error"):
        run_distributed(_with_broken_all_reduce, 2, kind, _check_step)


def test_heads_must_divide_by_the_tensor_parallel_size():
    run_distributed(_check_heads_error, 2)


def _check_heads_error():
    rng_tracker.model_parallel_manual_seed(0)
    with pytest.raises(ps.ParallelConfigError, match="3 attention heads are not divisible by the "
                                                     "tensor-parallel size 2"):
        ToyTransformer(12, SEQ, 6, 12, 3, 1, tensor_parallel=True)
