"""The toy transformer in the benchmark: its batches, its step, and PyTorch DTensor's plan for it.

bench_step.py times the transformer (transformer.py, `--model transformer`) as
it times the ToyModel: the same step (zero_grad, forward, loss, backward, SGD
step), the same collectives, memory and saved-activation accounting. Compared:

  ours     ToyTransformer(tensor_parallel=True): QKV and fc1 ColumnParallelLinear,
           dense and fc2 RowParallelLinear, VocabParallelEmbedding, the tied output
           layer's vocabulary slice and vocab_parallel_cross_entropy (Sec. 3).
  dtensor  the serial ToyTransformer under parallelize_module with the plan
           PyTorch's tutorials give a GPT block: ColwiseParallel for QKV and fc1,
           RowwiseParallel for dense and fc2 and (input replicated) for the
           embedding, and the tied output layer's logits left sharded along the
           vocabulary for `loss_parallel`'s cross-entropy.
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F

import prepare_data
from core.distributed.finalize_model_grads import allreduce_sequence_parallel_grads
from transformer import ToyTransformer


def make_token_batches(cfg, n, device):
    """n fixed batches of (tokens, next tokens), prepare_data.py's task (seed 7) for every
    variant."""
    train, valid = prepare_data.make_tokens(n * cfg["batch_size"], cfg["seq_length"],
                                            cfg["vocab_size"], seed=7)
    tokens = torch.from_numpy(np.concatenate([train, valid])).to(device)  # n whole batches
    return [(t[:, :-1], t[:, 1:]) for t in tokens.chunk(n)]


def build(cfg, tensor_parallel=False, sequence_parallel=False, dropout=0.0,
          recompute_granularity=None, distribute_saved_activations=False):
    return ToyTransformer(cfg["vocab_size"], cfg["seq_length"], cfg["input_size"],
                          cfg["hidden_size"], cfg["num_heads"], cfg["num_layers"],
                          tensor_parallel=tensor_parallel, dropout=dropout,
                          sequence_parallel=sequence_parallel,
                          recompute_granularity=recompute_granularity,
                          distribute_saved_activations=distribute_saved_activations)


class TransformerStep:
    """The loss of train.py / parallel_train.py, and under sequence parallelism the sum of the
    LayerNorms' partial gradients after backward (the loss itself is whole: the sequence is
    gathered before the output layer)."""

    def __init__(self, model):
        self.model = model

    def loss(self, tokens, targets):
        return self.model.loss(self.model(tokens), targets)

    def backward(self, loss):
        loss.backward()
        if self.model.sequence_parallel:
            allreduce_sequence_parallel_grads(self.model.parameters(), loss, loss_is_partial=False)


def parallelize_with_dtensor(model, mesh):
    """PyTorch's own tensor parallelism on the serial model: parallelize_module's plan."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    tp = mesh.size()
    plan = {"word_embeddings": RowwiseParallel(input_layouts=Replicate())}
    for i, block in model.blocks.items():
        plan.update({f"blocks.{i}.attention.query_key_value": ColwiseParallel(),
                     f"blocks.{i}.attention.dense": RowwiseParallel(),
                     f"blocks.{i}.mlp.fc1": ColwiseParallel(),
                     f"blocks.{i}.mlp.fc2": RowwiseParallel()})
        # QKV's rows are [q_h; k_h; v_h] head after head: a rank's contiguous shard is whole heads.
        block.attention.heads_per_rank //= tp
    return parallelize_module(model, mesh, plan)


class DTensorTransformerStep(TransformerStep):
    """The tied output layer on DTensors: the hidden states enter as replicated, the logits come
    out sharded along the vocabulary, and loss_parallel's cross-entropy never gathers them."""

    def __init__(self, model, mesh):
        super().__init__(model)
        self.mesh = mesh

    def loss(self, tokens, targets):
        from torch.distributed.tensor import DTensor, Replicate
        from torch.distributed.tensor.parallel import loss_parallel
        hidden = DTensor.from_local(self.model(tokens), self.mesh, [Replicate()])
        logits = F.linear(hidden.transpose(0, 1), self.model.word_embeddings.weight)
        with loss_parallel():
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def backward(self, loss):
        from torch.distributed.tensor.parallel import loss_parallel
        with loss_parallel():
            loss.backward()


def paper_count(cfg, tp, elem=4):
    """Megatron-LM Sec. 3 (Fig. 4) per step, as logbook.py prints it: per block 2 all-reduces of
    batch x sequence x width in forward (g) and 2 in backward (f); the embedding's lookups 1 in
    forward; the output layer's f 1 in backward; the cross-entropy 2 of batch x sequence numbers
    (the max; the sum of exponentials with the target's logit). Bytes each rank sends in a ring."""
    tokens = cfg["batch_size"] * cfg["seq_length"]
    width = tokens * cfg["input_size"] * elem
    big = 4 * cfg["num_layers"] + 2
    ring = lambda n: 2 * (tp - 1) * n // tp
    return dict(tensor_parallel=dict(calls=dict(all_reduce=big + 2),
                                     ring_bytes=big * ring(width) + ring(tokens * elem)
                                     + ring(2 * tokens * elem)),
                logits_gathered_instead=tokens * cfg["vocab_size"] * elem)


if __name__ == "__main__":
    sys.exit("error: benchmarks/bench_transformer.py is a part of the benchmark, not a script; run "
             "python -m benchmarks.bench_step --configs transformer")
