"""Context parallelism: the sequence split over the C ranks of a context-parallel group, and the
attention that lets each rank's queries see the keys of the others (issue 38).

    the papers' / Megatron's / Transformer Engine's name       here
    --------------------------------------------------------   ---------------------------------
    get_batch_on_this_cp_rank (megatron/core/utils.py): 2C     split.py:
      chunks, rank r keeps r and 2C-1-r (the causal load         get_batch_on_this_cp_rank,
      balance); the plain split: rank r keeps r of C             get_positions_on_this_cp_rank,
                                                                 get_positions_on_every_cp_rank
    --cp-comm-type (Megatron) / cp_comm_type (TE)              attention.py:
                                                                 context_parallel_attention
    "p2p": TE's AttnFuncWithCPAndKVP2P; Ring Attention         attention.py: ring_attention
      (Liu et al., 2023)                                         (_Exchange: the ring's step)
    "all_gather": TE's AttnFuncWithCPAndKVAllGather;           attention.py: all_gather_attention
      Llama 3 (Dubey et al., 2024)
    "a2a": TE's AttnFuncWithCPAndQKVOA2A; DeepSpeed-Ulysses    attention.py: a2a_attention
      (Jacobs et al., 2023)
    the online softmax; flash-attn's (out, softmax_lse) and    attention.py: merge, _block,
      TE's correction of out by lse                              attend

Every transfer goes through core/wire.py, counted under its name: cp_ring_send (K/V, forward),
cp_ring_send_grad (dK/dV, backward), cp_all_gather and cp_reduce_scatter (K/V
and their gradients), cp_all_to_all.
"""
