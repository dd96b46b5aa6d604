"""A toy GPT: the rest of Megatron-LM's Sec. 3 — attention split by heads, the vocabulary split.

Tokens -> word + position embeddings -> `num_layers` pre-LayerNorm blocks
(causal self-attention, then ToyModel's MLP, each added to the residual
stream after dropout) -> a final LayerNorm -> logits through the word
embeddings again (tied) -> mean cross-entropy over every predicted token.

With tensor_parallel=True the same model is built with the parallel layers
swapped in, in the `__init__`s below, and one method branches on it: `ToyTransformer.loss`.
The output layer is no layer of its own but the word embeddings' weight again (tied), so
there is no layer to swap: under TP `loss` applies f, computes this rank's vocabulary slice
of the logits, and hands them to vocab_parallel_cross_entropy (F.cross_entropy needs the
whole vocabulary, which no rank holds). Sequence parallelism and recomputation (below)
branch at run time too, in `embed`, `dropout_outside`, `forward` and `loss`.

  * attention (Fig. 3b): query, key and value are one ColumnParallelLinear whose
    split falls on whole heads, so rank i computes heads i H/p ... (i+1) H/p - 1
    with no communication; the output projection is a RowParallelLinear whose
    g is the attention's one all-reduce in forward. Its f is the other, in
    backward: two per block each way, with the MLP's pair (Fig. 4).
  * the word embeddings are a VocabParallelEmbedding (rows split along the
    vocabulary, one all-reduce of the lookups), and the output layer uses the
    same rows: f on the hidden states, a local matmul giving this rank's slice
    of the logits (Megatron's `parallel_lm_logits`), and
    vocab_parallel_cross_entropy, so the batch x sequence x vocabulary logits
    are never gathered.
  * dropout outside the split regions draws the same mask on every rank,
    dropout of the attention probabilities (inside, this rank's heads) a mask
    of its own: core/tensor_parallel/random.py.
  * sequence_parallel (Korthikanti et al., 2022): outside the split regions
    each rank keeps 1/p of the sequence; the blocks' layers all-gather it and
    reduce-scatter their outputs (sequence_parallel.py), the sequence is
    gathered again before the output layer, and the LayerNorms' gradients,
    taken on 1/p of the tokens, are summed over the group after backward.
  * recompute_granularity (Korthikanti et al., 2022, Sec. 5; recompute.py), at
    any TP size and serially, in training only: "full" keeps each block's input
    and runs the block again in backward (ToyTransformer.forward, as Megatron's
    TransformerBlock), "selective" the attention core (SelfAttention.forward,
    as Megatron's checkpoint_core_attention). Full recomputation keeps each
    block's input whole, as Megatron does unless asked; with
    distribute_saved_activations (Megatron's flag) each rank keeps 1/p of it,
    and under sequence parallelism it is 1/p already (Megatron refuses the two
    together). Both branches are marked "Activation recomputation".

  * context_parallel (Megatron-core's --context-parallel-size; core/context_parallel/): each
    of the C ranks of a context-parallel group holds s/C tokens of every activation, the 2C-chunk
    load-balanced split's or the plain one's (`cp_positions`, every rank's row); `embed` looks
    up its positions, the attention core lets its queries meet the other ranks' keys by
    `cp_comm_type` (ring, all-gather, all-to-all), and `loss` is the mean over its tokens,
    averaged over the context ranks with the gradients (finalize_model_grads.py). Dropout
    outside the split regions draws from a stream per context rank, inside from one per
    tensor- and context-parallel rank (random.py).

The blocks work on (sequence, batch, width), Megatron's layout, so that the
sequence is the first dimension, the one sequence parallelism splits.

Pipeline parallelism (Narayanan et al., 2021): a stage (or, interleaved, a chunk of one) is
the same class holding some of the blocks (`layers`, numbered as in the whole model), the
embeddings if it is the first (pre_process, Megatron's name), the final LayerNorm, the output
layer and the loss if it is the last (post_process). The last stage's output layer is its own
copy of the word embeddings, equal to the first stage's at the start; their gradients are
summed before every step (finalize_model_grads.py), so the copies stay equal.

Position embeddings and LayerNorms are replicated on every rank.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from core import parallel_state as ps
from core.context_parallel.attention import context_parallel_attention
from core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from core.tensor_parallel.random import CONTEXT_PARALLEL_RNG, MODEL_PARALLEL_RNG, get_rng_tracker
from core.tensor_parallel.recompute import checkpoint
from core.tensor_parallel.sequence_parallel import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from core.transformer.moe.moe_layer import MoELayer
from core.transformer.moe.router import TopKRouter
from model import MLP
from parallel_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    linear_with_grad_accumulation,
)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention; with tensor_parallel, this rank's heads (Fig. 3b).

    Q, K and V come from one linear layer whose output rows are ordered head by
    head ([q_h, k_h, v_h] for h = 0, 1, ...), Megatron's layout: a contiguous
    1/p of the rows is whole heads with their three projections, so one
    ColumnParallelLinear (one f) splits the attention by heads.
    """

    def __init__(self, width, num_heads, tensor_parallel=False, dropout=0.0,
                 sequence_parallel=False, dtype=None, checkpoint_core_attention=False,
                 context_parallel=None):
        super().__init__()
        # (cp_positions, cp_comm_type) under context parallelism: every rank's positions, the
        # variant; `context_parallel` off (validation: every rank the whole sequence) runs serial.
        self.context_parallel, self.cp = context_parallel is not None, context_parallel
        tp = ps.get_tensor_model_parallel_world_size() if tensor_parallel else 1
        if width % num_heads != 0:
            raise ps.ParallelConfigError(f"--input_size {width} is not divisible by "
                                         f"--num_attention_heads {num_heads}")
        if num_heads % tp != 0:
            raise ps.ParallelConfigError(
                f"{num_heads} attention heads are not divisible by the tensor-parallel size {tp}; "
                "choose --num_attention_heads a multiple of it")
        self.heads_per_rank, self.head_dim = num_heads // tp, width // num_heads
        self.dropout, self.checkpoint_core_attention = dropout, checkpoint_core_attention
        if tensor_parallel:
            self.query_key_value = ColumnParallelLinear(
                width, 3 * width, gather_output=False, sequence_parallel=sequence_parallel,
                dtype=dtype)
            self.dense = RowParallelLinear(width, width, input_is_parallel=True,
                                           sequence_parallel=sequence_parallel, dtype=dtype)
        else:
            self.query_key_value = nn.Linear(width, 3 * width, dtype=dtype)
            self.dense = nn.Linear(width, width, dtype=dtype)

    def forward(self, x):
        qkv = self.query_key_value(x)  # (seq, batch, 3 width / p): the whole sequence
        seq, batch = qkv.shape[:2]
        qkv = qkv.view(seq, batch, self.heads_per_rank, 3, self.head_dim)
        q, k, v = qkv.permute(3, 1, 2, 0, 4)  # each (batch, heads, seq, head_dim)
        if self.checkpoint_core_attention and self.training:
            # Activation recomputation, selective (Korthikanti et al., Sec. 5): keep Q, K and V,
            # not the seq x seq scores, probabilities and masks; recompute.py.
            context = checkpoint(self.core_attention, False, q, k, v)
        else:
            context = self.core_attention(q, k, v)
        return self.dense(context)  # g: the sum over the ranks' heads

    def core_attention(self, q, k, v):
        """softmax(Q K^T / sqrt(d), causal), dropout, times V, for this rank's heads: the part
        whose activations grow with the sequence squared. Returns (seq, batch, width / p).
        Under context parallelism this rank's tokens' queries against every rank's keys."""
        batch, _, seq, _ = q.shape
        if self.context_parallel:
            positions, variant = self.cp
            with get_rng_tracker().fork():  # inside: this rank's heads and tokens, its own mask
                context = context_parallel_attention(
                    (q, k, v), positions.to(q.device), ps.get_context_parallel_group(), variant,
                    self.dropout if self.training else 0.0)
            return context.permute(2, 0, 1, 3).reshape(seq, batch, -1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
        if self.training and self.dropout > 0:
            # Inside the split region, this rank's heads: a mask of its own (the tracker's stream).
            with get_rng_tracker().fork():
                probs = F.dropout(probs, self.dropout)
        return (probs @ v).permute(2, 0, 1, 3).reshape(seq, batch, -1)


def dropout_outside(x, p, training, sequence_parallel, context_parallel=False):
    """Dropout outside the split regions. Every rank holds the same tensor there, and draws the
    same mask from the default stream; under sequence parallelism each holds its own rows, and
    draws from its own stream (as Megatron forks the tracker there); under context parallelism
    alone each context rank its own tokens, and draws from its context rank's stream."""
    if not training or p == 0:
        return x
    if not (sequence_parallel or context_parallel):
        return F.dropout(x, p)
    with get_rng_tracker().fork(MODEL_PARALLEL_RNG if sequence_parallel else CONTEXT_PARALLEL_RNG):
        return F.dropout(x, p)


class Block(nn.Module):
    """x + dropout(attention(LN(x))), then x + dropout(MLP(LN(x))): pre-LayerNorm, as GPT-2."""

    def __init__(self, width, hidden, num_heads, tensor_parallel=False, dropout=0.0,
                 sequence_parallel=False, dtype=None, checkpoint_core_attention=False,
                 context_parallel=None, moe=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, dtype=dtype)
        self.attention = SelfAttention(width, num_heads, tensor_parallel, dropout,
                                       sequence_parallel, dtype, checkpoint_core_attention,
                                       context_parallel)
        self.ln_2 = nn.LayerNorm(width, dtype=dtype)
        if moe is None:
            self.mlp = MLP(width, hidden, tensor_parallel, sequence_parallel, dtype=dtype)
        else:  # the routed MLP (core/transformer/moe/): E experts, each the toy MLP, a router
            expert = lambda: MLP(width, moe["ffn_hidden_size"], dtype=dtype)
            self.mlp = MoELayer(width, moe["num_experts"], moe["topk"], expert,
                                moe["aux_loss_coeff"], moe["z_loss_coeff"],
                                moe["capacity_factor"], dtype, moe["aux_loss_type"],
                                parallel=tensor_parallel, dispatcher=moe["dispatcher"])
        self.dropout, self.sequence_parallel = dropout, sequence_parallel
        self.context_parallel = context_parallel is not None

    def forward(self, x):
        drop = lambda t: dropout_outside(t, self.dropout, self.training, self.sequence_parallel,
                                         self.context_parallel)
        x = x + drop(self.attention(self.ln_1(x)))
        return x + drop(self.mlp(self.ln_2(x)))


class ToyTransformer(nn.Module):
    """Parameters, in the order they are drawn from the global generator:

        word_embeddings.weight        (vocab, width)   split along the vocabulary
        position_embeddings.weight    (seq, width)     replicated
        blocks.N.ln_1.{weight,bias}   (width,)         replicated
        blocks.N.attention.query_key_value.{weight (3 width, width), bias (3 width,)}
                                      rows [q_h; k_h; v_h] head after head: split by heads
        blocks.N.attention.dense.{weight (width, width), bias (width,)}
                                                       split by heads (columns); bias replicated
        blocks.N.ln_2.{weight,bias}   (width,)
        blocks.N.mlp.fc1.weight       (hidden, width)  as ToyModel's
        blocks.N.mlp.fc2.weight       (width, hidden)
                                      (with --num_experts, serial only so far: the block's
                                      mlp.router.weight (experts, width) and
                                      mlp.experts.local_experts.E.fc{1,2}.weight, each the toy
                                      MLP's: core/transformer/moe/, docs/moe.md)
        ln_f.{weight,bias}            (width,)

    The output layer is word_embeddings.weight again (tied). Seeding the
    global generator the same way gives the same model for every
    tensor-parallel size; the vocabulary is padded for TP inside
    VocabParallelEmbedding, never in the serial state_dict.
    """

    # The loss is over the whole sequence on every rank (sequence parallelism gathers it before
    # the output layer): never a partial sum (finalize_model_grads.py).
    loss_is_partial = False

    def __init__(self, vocab_size, seq_length, width=64, hidden=None, num_heads=4, num_layers=1,
                 tensor_parallel=False, dropout=0.0, sequence_parallel=False, dtype=None,
                 recompute_granularity=None, distribute_saved_activations=False,
                 pre_process=True, post_process=True, layers=None, context_parallel=None, moe=None):
        super().__init__()
        self.vocab_size, self.tensor_parallel, self.dropout = vocab_size, tensor_parallel, dropout
        self.sequence_parallel = sequence_parallel and tensor_parallel
        self.recompute_granularity = recompute_granularity  # None, "full" or "selective"
        # With "full" and distribute_saved_activations, each rank keeps 1/p of a block's input,
        # split here; under SP the input is this rank's rows, 1/p already.
        self.distribute_saved_activations = (distribute_saved_activations and tensor_parallel
                                             and not self.sequence_parallel)
        hidden = hidden or 32 * width  # as ToyModel's
        # Context parallelism: (every context rank's positions, the attention's variant), handed
        # to the blocks (core/context_parallel/split.py: context_parallel_setup); None without.
        self.cp, self.context_parallel = context_parallel, context_parallel is not None
        # N(0, 0.02), GPT-2's and Megatron's init_method_normal. With nn.Embedding's N(0, 1) the
        # tied output layer's first logits are ~12 wide, the first loss ~59, not log(vocab) 3.9.
        init = lambda weight: nn.init.normal_(weight, std=0.02)
        if tensor_parallel:
            self.word_embeddings = VocabParallelEmbedding(vocab_size, width, init, dtype=dtype)
        else:
            self.word_embeddings = nn.Embedding(vocab_size, width, dtype=dtype)
            init(self.word_embeddings.weight)
        self.position_embeddings = nn.Embedding(seq_length, width, dtype=dtype)
        init(self.position_embeddings.weight)
        blocks = [Block(width, hidden, num_heads, tensor_parallel, dropout, self.sequence_parallel,
                        dtype, checkpoint_core_attention=recompute_granularity == "selective",
                        context_parallel=self.cp,  # `moe`: every freq-th block's MLP routed
                        moe=moe if moe and i % moe["freq"] == 0 else None)
                  for i in range(num_layers)]
        # This stage's blocks, numbered as in the whole model (each stage drew all: serial's).
        layers = range(num_layers) if layers is None else layers
        self.blocks = nn.ModuleDict({str(i): blocks[i] for i in layers})
        self.ln_f = nn.LayerNorm(width, dtype=dtype)
        self._keep_this_stage(pre_process, post_process)
        for module in self.modules():  # their gradients come from 1/p of the tokens: summed
            if isinstance(module, (nn.LayerNorm, TopKRouter)):
                for p in module.parameters():
                    p.grad_is_partial = self.sequence_parallel

    def _keep_this_stage(self, pre_process, post_process):
        """A pipeline stage's part: the embeddings on the first stage (pre_process), the final
        LayerNorm and the output layer on the last (post_process), which ties its weight to the
        word embeddings: a copy of its own there, summed with the first stage's after backward."""
        self.pre_process, self.post_process = pre_process, post_process
        if not pre_process:
            del self.position_embeddings
            if not post_process:
                del self.word_embeddings
        if not post_process:
            del self.ln_f
        if pre_process != post_process:  # the first stage's or the last's copy: summed
            self.word_embeddings.weight.shared_embedding = True

    def forward(self, tokens):
        """The final hidden states, (seq, batch, width), or this rank's rows of the sequence
        under sequence parallelism; `loss` turns them into the loss. A stage after the first
        takes the previous stage's output instead of tokens, and one before the last returns
        its blocks' output."""
        x = self.embed(tokens) if self.pre_process else tokens
        for block in self.blocks.values():
            if self.recompute_granularity == "full" and self.training:
                # Activation recomputation, full (Korthikanti et al., Sec. 5): keep the block's
                # input (1/p of it on each rank), run the block again in backward; recompute.py.
                x = checkpoint(block, self.distribute_saved_activations, x)
            else:
                x = block(x)
        return self.ln_f(x) if self.post_process else x

    def embed(self, tokens):
        """Word + position embeddings, (seq, batch, width) (this rank's rows under SP). Under
        context parallelism `tokens` are this context rank's, at its positions."""
        if self.context_parallel:
            # (A copy: the lookup keeps its indices for backward, and a row's view, the table.)
            positions = self.cp[0][ps.get_context_parallel_rank()].to(tokens.device, copy=True)
        else:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.word_embeddings(tokens) + self.position_embeddings(positions)
        x = x.transpose(0, 1).contiguous()  # (seq, batch, width)
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x)
        return dropout_outside(x, self.dropout, self.training, self.sequence_parallel,
                               self.context_parallel)

    def shared_embedding_or_output_weight(self):
        """The tied weight: the word embeddings on the first stage, their copy, the output layer,
        on the last (Megatron's name); None on the stages between."""
        embeddings = getattr(self, "word_embeddings", None)
        return None if embeddings is None else embeddings.weight

    def loss(self, hidden, targets):
        """Mean cross-entropy of the next token (targets: (batch, seq)), through the tied output
        layer. Under context parallelism the mean over this rank's tokens (targets: theirs):
        the context ranks' losses and gradients are averaged after backward."""
        if not self.tensor_parallel:
            logits = _for_the_loss(output_layer(hidden, self.word_embeddings.weight))
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if self.sequence_parallel:  # the whole sequence again; the gather's backward sums, as f
            hidden = gather_from_sequence_parallel_region(hidden)
        else:  # f, as Megatron's parallel_lm_logits
            hidden = copy_to_tensor_model_parallel_region(hidden)
        # This rank's vocabulary slice of the logits, never gathered.
        logits_parallel = output_layer(hidden, self.word_embeddings.weight)
        return vocab_parallel_cross_entropy(_for_the_loss(logits_parallel), targets,
                                            self.vocab_size).mean()


def output_layer(hidden, word_embeddings_weight):
    """(batch, seq, vocabulary) logits through the tied word embeddings (under TP this rank's
    slice of the vocabulary). The weight's gradient joins the lookup's in fp32 under bf16, as
    Megatron's gradient_accumulation_fusion adds it: parallel_layers.LinearWithGradAccumulation."""
    return linear_with_grad_accumulation(hidden.transpose(0, 1), word_embeddings_weight)


def _for_the_loss(logits):
    """bf16 logits go to the cross-entropy in fp32, as Megatron's do (without
    --fp16-lm-cross-entropy): its exp and sums over the vocabulary keep their digits."""
    return logits.float() if logits.dtype == torch.bfloat16 else logits
