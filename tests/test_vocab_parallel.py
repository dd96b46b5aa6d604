"""The vocabulary split: VocabParallelEmbedding against nn.Embedding, vocab_parallel_cross_entropy
against F.cross_entropy; forward and backward, for TP 1, 2 and 4, with a vocabulary that 4 does
not divide (padded), and the collectives each issues.

Float64. The embedding's lookups are exact (each token's row comes from one rank, the others add
zeros): its output and weight gradient equal serial bitwise. The cross-entropy sums exp() over the
vocabulary in p partial sums: measured here at most 8.9e-16 absolute on losses of order 3, under
ATOL = 1e-14 as in test_layers.py.
"""

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from core import parallel_state as ps
from core import wire as comm
from core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from distributed import RankFailed, run_distributed
from parallel_layers import VocabParallelEmbedding
from test_layers import _with_broken_all_reduce, close
from training.checkpointing import gather_serial_state_dict, load_serial_state_dict

WIDTH, TOKENS = 6, (3, 5)  # a batch of 3 sequences of 5 tokens


def _tokens(vocab_size):
    g = torch.Generator().manual_seed(2)  # the same on every rank
    tokens = torch.randint(vocab_size, TOKENS, generator=g)
    tokens[0, :2] = torch.tensor([0, vocab_size - 1])  # both ends of the vocabulary
    return tokens


def _check_embedding():
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for vocab_size in (12, 10):  # 10: padded to 12 at TP 4
        torch.manual_seed(0)
        serial = nn.Embedding(vocab_size, WIDTH, dtype=torch.float64)
        torch.manual_seed(0)
        layer = VocabParallelEmbedding(vocab_size, WIDTH, dtype=torch.float64)
        padded = layer.num_embeddings_padded
        assert padded % tp == 0 and padded - vocab_size < tp
        # Master-weight init: this rank's rows of the same nn.Embedding, zeros for the padding.
        full = torch.cat([serial.weight.detach(), torch.zeros(padded - vocab_size, WIDTH,
                                                              dtype=torch.float64)])
        assert torch.equal(layer.weight, full.chunk(tp)[rank])

        tokens = _tokens(vocab_size)
        comm.reset_comm_stats()
        out = layer(tokens)
        assert torch.equal(out, serial(tokens)), "a lookup is one rank's row plus zeros: exact"
        assert dict(comm.comm_calls) == ({"all_reduce": 1} if tp > 1 else {})  # g
        assert comm.comm_bytes["all_reduce"] == (out.numel() * 8 if tp > 1 else 0)

        dy = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        out.backward(dy)
        serial(tokens).backward(dy)
        grad = torch.cat([serial.weight.grad, torch.zeros(padded - vocab_size, WIDTH,
                                                          dtype=torch.float64)])
        assert torch.equal(layer.weight.grad, grad.chunk(tp)[rank])
        assert comm.comm_calls["all_reduce"] == (tp > 1), "g's backward is the identity"

        # The serial state_dict has the unpadded table, in and out.
        state = gather_serial_state_dict(layer)
        assert torch.equal(state["weight"], serial.weight.detach())
        load_serial_state_dict(layer, {"weight": 2 * serial.weight.detach()})
        assert torch.equal(layer.weight, (2 * full).chunk(tp)[rank])


def _check_cross_entropy():
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(4)
    for vocab_size in (12, 10):
        padded = -(-vocab_size // tp) * tp
        logits = 3 * torch.randn(*TOKENS, vocab_size, dtype=torch.float64, generator=g)
        target = _tokens(vocab_size)
        # Padded entries get large logits: if they took any probability, the loss would show it.
        full = torch.cat([logits, torch.full((*TOKENS, padded - vocab_size), 50.0,
                                             dtype=torch.float64)], dim=-1)
        mine = full.chunk(tp, dim=-1)[rank].clone().requires_grad_()
        serial = logits.clone().requires_grad_()
        expected = F.cross_entropy(serial.flatten(0, 1), target.flatten(), reduction="none")

        comm.reset_comm_stats()
        loss = vocab_parallel_cross_entropy(mine, target, vocab_size)
        close(loss, expected.view(TOKENS), "per-token loss")
        # Two all-reduces of batch x sequence numbers (the max; the sum of exponentials and the
        # target's logit together), never batch x sequence x vocabulary.
        tokens = target.numel()
        assert dict(comm.comm_calls) == ({"all_reduce": 2} if tp > 1 else {})
        assert comm.comm_bytes["all_reduce"] == (3 * tokens * 8 if tp > 1 else 0)

        upstream = torch.rand(TOKENS, dtype=torch.float64, generator=g)
        loss.backward(upstream)
        expected.backward(upstream.flatten())
        serial_grad = torch.cat([serial.grad, torch.zeros(*TOKENS, padded - vocab_size,
                                                          dtype=torch.float64)], dim=-1)
        close(mine.grad, serial_grad.chunk(tp, dim=-1)[rank], "logits grad")
        assert comm.comm_calls["all_reduce"] == (2 if tp > 1 else 0), "the backward is local"


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("check", [_check_embedding, _check_cross_entropy],
                         ids=["embedding", "cross_entropy"])
def test_vocab_parallel_layers_match_serial(check, tp):
    run_distributed(check, tp)


# The first assertion each broken all-reduce trips.
WHAT_BREAKS = {"embedding": "a lookup is one rank's row plus zeros: exact",
               "cross_entropy": "per-token loss: max abs error"}


@pytest.mark.parametrize("kind", ["drop", "average"])
@pytest.mark.parametrize("check", [_check_embedding, _check_cross_entropy],
                         ids=["embedding", "cross_entropy"])
def test_vocab_checks_catch_a_broken_all_reduce(kind, check):
    what = WHAT_BREAKS[check.__name__.removeprefix("_check_")]
    with pytest.raises(RankFailed, match=f"AssertionError: {re.escape(what)}"):
        run_distributed(_with_broken_all_reduce, 2, kind, check)
