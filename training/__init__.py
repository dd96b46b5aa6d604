"""What running the training takes, none of it tensor parallelism (Megatron-LM keeps the same split:
megatron/core for the model's parallel pieces, megatron/training for the rest).

    arguments.py         the flags of train.py and parallel_train.py, checked before any work
    initialize.py        joining the job: one backend and one device for every rank
    data.py              the data sets, read and checked
    logbook.py           the log points: losses, validation, the ranks' agreement, checkpoints
    metrics.py           metrics.csv, config.json, model.pt
    checkpointing.py     Megatron-layout checkpoints, and the shards put back together
    reshard.py           a checkpoint cut for another tensor-parallel size
    mixed_precision.py   --dtype bfloat16: a bf16 model, fp32 main parameters (Megatron's --bf16)
    clip_grads.py        --clip_grad: the global gradient norm over every rank's shards
    optimizer_memory.py  the bytes the model and its optimizer hold on one rank, counted
    activation_memory.py the micro-batches each pipeline stage kept for backward, at most
    reorder.py           train.py --reorder_seed: the serial model's sums in another order
    operations.py        one-line errors, signals, launch quirks
"""
