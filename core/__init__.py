"""The mechanisms of Megatron's parallelism, laid out as megatron/core is, in miniature.

    parallel_state.py       the process groups (tensor, data, pipeline, embedding)
    tensor_parallel/        f and g, the vocabulary-parallel loss, dropout's streams,
                            recomputation, sequence parallelism
    pipeline_parallel/      the schedules (GPipe, 1F1B, interleaved) and point-to-point
    distributed/            what happens after backward: finalize_model_grads
    optimizer/              the distributed optimizer
    wire.py                 not Megatron's: every collective checked against NCCL's rules,
                            counted and staged, around the torch.distributed call

A reader holding a Megatron-core path finds ours by the same path (megatron/core/X -> core/X).
Nothing here imports training/ or a script; the model files at the root build on this package.
"""
