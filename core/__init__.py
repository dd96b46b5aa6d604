"""The mechanisms of Megatron's parallelism, laid out as megatron/core is, in miniature.

    parallel_state.py       the process groups (tensor, data, pipeline, embedding)
    tensor_parallel/        f and g, the vocabulary-parallel loss, dropout's streams,
                            recomputation, sequence parallelism
    pipeline_parallel/      the schedules (GPipe, 1F1B, interleaved) and point-to-point
    context_parallel/       the sequence split over ranks, attention around them
    distributed/            what happens after backward (finalize_model_grads) and during it
                            (param_and_grad_buffer: the buckets, their hooks and launches)
    optimizer/              the distributed optimizer
    wire.py                 not Megatron's: every collective checked against NCCL's rules,
                            counted and staged, around the torch.distributed call

A reader holding a Megatron-core path finds ours by the same path (megatron/core/X -> core/X)
for each file here; two of Megatron's live elsewhere: tensor_parallel/layers.py is the root's
parallel_layers.py (the original repository's file), and random.py's checkpoint is
tensor_parallel/recompute.py.
Nothing here imports training/ or a script; the model files at the root build on this package.
"""
