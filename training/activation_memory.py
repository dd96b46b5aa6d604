"""What the pipeline's schedule held for backward: each stage's most micro-batches in flight
(core/pipeline_parallel/schedules.KEPT), printed by global rank 0. A micro-batch's activations are
the bulk of a stage's memory (Narayanan et al., 2021, Sec. 2.2): GPipe keeps all m, 1F1B at most
p - s on stage s, the interleaved schedule its warm-up plus one (in chunk micro-batches)."""

from core import parallel_state as ps
from core.pipeline_parallel.schedules import KEPT
from training.checkpointing import gather_over_pipeline


def report_activations_kept(args):
    peaks = gather_over_pipeline(KEPT.peak)  # every stage's, on the first stage
    if peaks is None or ps.get_data_parallel_rank() or ps.get_tensor_model_parallel_rank():
        return
    schedule = ("interleaved 1f1b" if args.virtual_pipeline_model_parallel_size else
                args.pipeline_schedule) if args.pipeline_model_parallel_size > 1 else "no pipeline"
    print(f"Activations kept for backward ({schedule}, {args.num_microbatches} micro-batches), "
          f"most micro-batches in flight per stage: {peaks}")
