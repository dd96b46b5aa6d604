"""The alltoall token dispatcher, step by step, on a small example: 2 expert-parallel ranks of 4
tokens each, 4 experts (rank 0 holds experts 0 and 1, rank 1 experts 2 and 3), each token
routed to its top 2. Printed as core/transformer/moe/token_dispatcher.py's
MoEAlltoAllTokenDispatcher computes it, with its own functions (moe_utils.permute,
sort_chunks_by_idxs); only the two collectives are done by hand, in one process, so that both
ranks' sides show (docs/moe.md walks through the output).

    python scripts/moe_dispatch_example.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core.transformer.moe.moe_utils import permute, unpermute  # noqa: E402
from core.transformer.moe.token_dispatcher import sort_chunks_by_idxs  # noqa: E402

EP, E, T = 2, 4, 4
N = E // EP  # experts per rank
ROUTES = [  # each rank's tokens' two experts
    [(0, 2), (1, 3), (0, 1), (2, 3)],
    [(3, 0), (1, 2), (2, 3), (0, 2)],
]


def name(rank, t):
    return f"r{rank}t{t}"


def show(rows, names):
    return " ".join(names[int(i)] for i in rows)


def main():
    names = {r: [name(r, t) for t in range(T)] for r in range(EP)}
    maps = [torch.zeros(T, E, dtype=torch.bool) for _ in range(EP)]
    for r in range(EP):
        for t, experts in enumerate(ROUTES[r]):
            maps[r][t, list(experts)] = True
        print(f"rank {r}'s tokens -> experts: " + ", ".join(
            f"{names[r][t]}->{'+'.join(map(str, ROUTES[r][t]))}" for t in range(T)))
    # 1. The counts first: every rank's tokens per expert, all-gathered.
    counts = torch.stack([m.sum(0) for m in maps])  # [ranks, experts]
    print(f"\n1. counts[j, e], rank j's tokens for expert e (all-gathered, E = {E} integers "
          f"from each rank):\n{counts.tolist()}")
    arrived, sent = {}, {}
    for r in range(EP):
        input_splits = counts[r].view(EP, N).sum(1).tolist()
        local = counts[:, r * N:(r + 1) * N]
        output_splits = local.sum(1).tolist()
        tokens = torch.arange(T, dtype=torch.float64)[:, None] + 10 * r  # a token's "value"
        permuted, sorted_indices = permute(tokens, maps[r])
        sent[r] = [names[r][int(i)] for i in sorted_indices]
        print(f"\n   rank {r}: input_splits {input_splits} (to rank 0, rank 1), output_splits "
              f"{output_splits} (from rank 0, rank 1)")
        print(f"2. rank {r} permutes its tokens expert by expert (so rank by rank): "
              f"{' '.join(sent[r])}")
    for r in range(EP):  # 3. the all-to-all: rank j's chunk for rank r, in rank order
        chunks = []
        for j in range(EP):
            splits = counts[j].view(EP, N).sum(1).tolist()
            start = sum(splits[:r])
            chunks += sent[j][start:start + splits[r]]
        arrived[r] = chunks
        print(f"\n3. rank {r} receives, rank 0's chunk then rank 1's: {' '.join(chunks)}")
        local = counts[:, r * N:(r + 1) * N]
        by_expert = [j * N + e for e in range(N) for j in range(EP)]
        order = sort_chunks_by_idxs(torch.arange(len(chunks)), local.reshape(-1), by_expert)
        first, second = local.sum(0).tolist()
        print(f"4. sort_chunks_by_idxs, [rank][local expert] -> [local expert][rank]: "
              f"{' '.join(chunks[int(i)] for i in order)}  (expert {r * N} takes the first "
              f"{first}, expert {r * N + 1} the next {second})")
    print("\n5. the experts run on their rows; the outputs go back the same way reversed: "
          "unsorted to [rank][local expert], the all-to-all with the splits swapped, and on each "
          "rank unpermute adds each token's two outputs, weighted by its probabilities, into its "
          "row:")
    for r in range(EP):
        tokens = torch.arange(T, dtype=torch.float64)[:, None] + 10 * r
        permuted, sorted_indices = permute(tokens, maps[r])
        probs = maps[r].double() / 2  # equal weights, for the example
        back = unpermute(permuted, sorted_indices, tokens.shape, probs, maps[r])
        print(f"   rank {r}: every token back in its row, its own value: "
              f"{torch.equal(back, tokens)}")


if __name__ == "__main__":
    main()
