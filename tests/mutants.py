"""Bugs written into a copy of the repository, and the tests that fail because of them.

    python tests/mutants.py                 every mutant, against the tests listed with it
    python tests/mutants.py NAME ... --suite   those mutants, against the whole suite in its order
    python tests/mutants.py --list          the mutants, one line each

A mutant is one piece of source text replaced by another, as a mistake in the code would put it
there (it must occur exactly once, or the mutant no longer applies and says so). Each runs in a
clean copy of the tracked files, so the working tree is never touched, and the copy's suite runs
in its own order (-p no:randomly): a leak from one test into the next would show as a mutant the
suite misses. A mutant no test catches is SURVIVED and the exit status is 1.

docs/tests.md's table of mutants is this script's output.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (file, text, replacement, the tests run against it by default)
MUTANTS = {
    # The pool's isolation, switched off one at a time (tests/test_rank_pool.py).
    "pool_no_fork": (
        "tests/distributed.py",
        "        pid = os.fork()\n        if pid == 0:\n            os._exit(_child(index, conn, "
        "payload, logs))\n        _, status = os.waitpid(pid, 0)\n        conn.send((\"exit\", "
        "os.waitstatus_to_exitcode(status)))",
        "        conn.send((\"exit\", _child(index, conn, payload, logs)))  # in the zygote itself",
        ["tests/test_rank_pool.py"]),
    "pool_no_sys_path": (
        "tests/distributed.py", "    sys.path[:] = [os.getcwd() if module",
        "    sys.path[:] = sys.path or [os.getcwd() if module", ["tests/test_rank_pool.py"]),
    "pool_no_atexit": (
        "tests/distributed.py", "            atexit._run_exitfuncs()", "            pass",
        ["tests/test_rank_pool.py"]),
    "pool_no_agent_store": (
        "tests/distributed.py", 'TORCHELASTIC_USE_AGENT_STORE="True",', "",
        ["tests/test_rank_pool.py"]),
    "pool_rank_exit_status": (
        "tests/distributed.py",
        "code, stderr = 1, stderr + failure_line(script, failures) + \"\\n\"",
        "code = next(iter(failures.values()))", ["tests/test_rank_pool.py"]),
    "pool_harness_error_as_status": (
        "tests/distributed.py", 'if res.status == "error"]', 'if False]',
        ["tests/test_rank_pool.py"]),
    # The three the issue found hidden or unchecked.
    "dropout streams not restored on resume": (
        "training/checkpointing.py", "get_rng_tracker().states.update(tracker)", "pass",
        ["tests/test_transformer_train.py"]),
    "the RNG tracker's fork a no-op": (
        "core/tensor_parallel/random.py",
        "        set_default_generator_states(self.states[name])\n", "",
        ["tests/test_rng_tracker.py", "tests/test_transformer.py"]),
    "scaling's overheads from the wrong grid point": (
        "benchmarks/scaling.py", 'if pt["hidden_size"] == grid[0]}',
        'if pt["hidden_size"] == grid[-1]}',
        ["tests/test_scaling.py"]),
    # f and g (mappings.py), as tests/inject_bug.py injects them into a run.
    "g's all-reduce dropped": (
        "core/tensor_parallel/mappings.py",
        "    work = dist.all_reduce(input_, group=group, async_op=async_op)\n", "    work = None\n",
        ["tests/test_layers.py", "tests/test_model.py", "tests/test_end_to_end.py"]),
    "g's all-reduce averaged": (
        "core/tensor_parallel/mappings.py",
        "    work = dist.all_reduce(input_, group=group, async_op=async_op)\n",
        "    work = dist.all_reduce(input_, group=group, async_op=async_op)\n"
        "    input_ /= dist.get_world_size(group)\n",
        ["tests/test_layers.py", "tests/test_model.py", "tests/test_end_to_end.py"]),
    # Clipping (training/clip_grads.py).
    "replicated parameters counted TP times": (
        "training/clip_grads.py",
        "for p in (p for p in parameters if counted_once(p, sharded)):",
        "for p in parameters:", ["tests/test_precision.py"]),
    "the norm not all-reduced": (
        "training/clip_grads.py",
        "        _sum_squares(squares, ps.get_tensor_model_parallel_group())",
        "        pass",
        ["tests/test_precision.py"]),
    # Sequence parallelism's partial gradients (finalize_model_grads.py).
    "SP partial gradients not summed": (
        "core/distributed/finalize_model_grads.py",
        "    _allreduce_layernorm_grads(partial + ([loss] if loss_is_partial else []),",
        "    _allreduce_layernorm_grads(([loss] if loss_is_partial else []),",
        ["tests/test_sequence_parallel_train.py", "tests/test_transformer_train.py"]),
    # Checkpoints (training/reshard.py, training/checkpointing.py, training/mixed_precision.py).
    "reshard: offset dropped": (
        "training/reshard.py", "start = lo - shards.start * saved_rows", "start = 0",
        ["tests/test_reshard.py"]),
    "reshard: momentum zeroed": (
        "training/reshard.py", """pick=lambda shard: shard["optimizer"]["state"][i][key])""",
        """pick=lambda shard: shard["optimizer"]["state"][i][key] * 0)""",
        ["tests/test_reshard.py"]),
    # Activation recomputation (recompute.py).
    "recompute: random states not set": (
        "core/tensor_parallel/recompute.py",
        "_set_all_rng_states(ctx.rng_states)  # the masks", "pass  #",
        ["tests/test_recompute.py"]),
    "recompute: no recomputation": (
        "core/tensor_parallel/recompute.py",
        "return CheckpointFunction.apply(function, distribute_saved_activations, "
        "*args)", "return function(*args)", ["tests/test_recompute.py"]),
    "recompute: gradients returned in the wrong order": (
        "core/tensor_parallel/recompute.py", "return (None, None, *(x.grad for x in inputs))",
        "return (None, None, *reversed([x.grad for x in inputs]))", ["tests/test_recompute.py"]),
    "train.py: --recompute_granularity not passed to the model": (
        "train.py", "recompute_granularity=args.recompute_granularity,",
        "recompute_granularity=None,", ["tests/test_transformer_train.py"]),
    "Table 2's coefficient 34 changed": (
        "benchmarks/bench_recompute.py", "return s * b * h * (34 / t + core)",
        "return s * b * h * (35 / t + core)",
        ["tests/test_recompute.py", "tests/test_benchmark.py"]),
    # bf16 (training/mixed_precision.py's main parameters, parallel_train.py).
    "a bf16 checkpoint holds the bf16 model, not the fp32 main parameters": (
        "parallel_train.py", "main = main_model(model, optimizer)", "main = model",
        ["tests/test_precision.py"]),
    "the tied output layer's gradient made in bf16 (no gradient_accumulation_fusion)": (
        "transformer.py",
        "return linear_with_grad_accumulation(hidden.transpose(0, 1), word_embeddings_weight)",
        "return F.linear(hidden.transpose(0, 1), word_embeddings_weight)",
        ["tests/test_precision.py"]),
    "the reordered run's backward sums not split": (
        "training/reorder.py", "module.fc1.__class__, module.fc2.__class__ = SplitInputGradLinear,",
        "module.fc1.__class__, module.fc2.__class__ = nn.Linear,", ["tests/test_precision.py"]),
    # Pipeline parallelism (schedules.py, parallel_train.py, finalize_model_grads.py).
    "a micro-batch trained on another micro-batch's labels": (
        "parallel_train.py", "parts = list(zip(inputs.split(rows), targets.split(rows)))",
        "parts = list(zip(inputs.split(rows), targets.roll(rows, 0).split(rows)))",
        ["tests/test_pipeline.py"]),
    "a stage sends the previous micro-batch's activation": (
        "core/pipeline_parallel/schedules.py",
        "output_tensor_grad = p2p.send_forward_recv_backward(output_tensor, tensor_shape, dtype)",
        "output_tensor_grad = p2p.send_forward_recv_backward(\n"
        "            outputs[-1] if outputs else output_tensor, tensor_shape, dtype)",
        ["tests/test_pipeline.py"]),
    "a backward that uses a freed activation (the received input freed, not the sent output)": (
        "core/pipeline_parallel/schedules.py",
        "        output_tensor_grad = p2p.send_forward_recv_backward(output_tensor, tensor_shape, "
        "dtype)\n        deallocate_output_tensor(output_tensor)",
        "        output_tensor_grad = p2p.send_forward_recv_backward(output_tensor, tensor_shape, "
        "dtype)\n        deallocate_output_tensor(input_tensor)", ["tests/test_pipeline.py"]),
    "momentum lost when a checkpoint changes pipeline size": (
        "training/checkpointing.py",
        "                state[len(dims) - 1] = shard[\"optimizer\"][\"state\"][i]",
        "                pass", ["tests/test_pipeline.py"]),
    "the tied embedding's gradients not summed across stages": (
        "core/distributed/finalize_model_grads.py",
        "        _allreduce_embedding_grads(grads, ps.get_embedding_group())",
        "        pass", ["tests/test_pipeline.py"]),
    "the clipping norm of one stage's layers": (
        "training/clip_grads.py",
        "        _sum_squares_over_stages(squares, ps.get_pipeline_model_parallel_group())",
        "        pass", ["tests/test_pipeline.py"]),
    "the tied embedding counted twice in the norm": (
        "training/clip_grads.py",
        'if getattr(param, "shared_embedding", False) and ps.is_pipeline_last_stage(',
        'if False and ps.is_pipeline_last_stage(', ["tests/test_pipeline.py"]),
    # The distributed optimizer (distrib_optimizer.py).
    "a straddling parameter's boundary element stepped by two replicas": (
        "core/distributed/param_and_grad_buffer.py",
        "at, end = max(first, start), min(last, start + param.numel())",
        "at, end = max(first, start), min(last + 1, start + param.numel())",
        ["tests/test_distrib_optimizer.py"]),
    "the first element of each shard stepped by no replica": (
        "core/distributed/param_and_grad_buffer.py",
        "at, end = max(first, start), min(last, start + param.numel())",
        "at, end = max(first + 1, start), min(last, start + param.numel())",
        ["tests/test_distrib_optimizer.py"]),
    "the all-gather of the updated parameters skipped": (
        "core/optimizer/distrib_optimizer.py",
        "        for buffer in self.buffers:\n            buffer.all_gather_params()",
        "        pass", ["tests/test_distrib_optimizer.py"]),
    "the reduce-scatter averaging the next shard": (
        "core/distributed/param_and_grad_buffer.py", "then=lambda _: shard.div_(self.divisor)",
        "then=lambda _: self.grad_data[bucket.shard(self.rank)[1] % self.grad_data.numel():]"
        "[:bucket.shard_size].div_(self.divisor)", ["tests/test_distrib_optimizer.py"]),
    "the clipping norm of this replica's shard only": (
        "training/clip_grads.py",
        "        _sum_squares(squares, dist.group.WORLD)",
        "        _sum_squares(squares, ps.get_tensor_model_parallel_group())",
        ["tests/test_distrib_optimizer.py"]),
    "sequence parallelism's partial gradients not summed before the reduce-scatter": (
        "core/distributed/finalize_model_grads.py",
        "    if partial:\n"
        "        _allreduce_layernorm_grads(partial, ps.get_tensor_model_parallel_group())",
        "    if False:\n        pass", ["tests/test_distrib_optimizer.py"]),
    "bf16's gathered main model without its parameters' marks (model.pt TP rank 0's)": (
        "core/optimizer/distrib_optimizer.py",
        '            for attribute in (*INHERITED, "vocab_size"):',
        "            for attribute in ():", ["tests/test_distrib_optimizer.py"]),
    "the replicas' optimizer shards read as one replica's": (
        "training/checkpointing.py",
        "    files = [_load(distrib_optim_path(path, r), directory, iteration) for r in range(d)]",
        "    files = [_load(distrib_optim_path(path, r), directory, iteration) for r in range(1)]",
        ["tests/test_distrib_optimizer.py"]),
    # Weight decay's parameter groups (core/optimizer/__init__.py).
    "biases and LayerNorms decayed": (
        "core/optimizer/__init__.py",
        'return getattr(param, "no_weight_decay", param.dim() == 1)',
        'return getattr(param, "no_weight_decay", False)', ["tests/test_optimizers.py"]),
    "a distributed optimizer's piece grouped by its own shape (1-D: never decayed)": (
        "core/optimizer/distrib_optimizer.py",
        "main.no_weight_decay = no_weight_decay(param)",
        "main.no_weight_decay = no_weight_decay(main)", ["tests/test_distrib_optimizer.py"]),
    # Issue 37's kinds: in a pair of options no test ran together (the covering array,
    # tests/test_configurations.py), a path compared with itself, a helper its caller never calls
    # (tests/test_references.py).
    "interleaved x distributed optimizer: only the first chunk's parameters all-gathered": (
        "core/optimizer/distrib_optimizer.py",
        "        for buffer in self.buffers:\n            buffer.all_gather_params()",
        "        for buffer in self.buffers[:1]:\n            buffer.all_gather_params()",
        ["tests/test_configurations.py"]),
    "the distributed optimizer x clipping: the model's gradients clipped, not the optimizer's "
    "shards": (
        "parallel_train.py",
        "    params = optimized_parameters(optimizer)  # under bf16 the fp32 main parameters",
        "    params = list(model.parameters())  # under bf16 the fp32 main parameters",
        ["tests/test_configurations.py"]),
    "interleaved x clipping: the last stage's tied embedding counted again (its chunk asked)": (
        "training/clip_grads.py", "and ps.is_pipeline_last_stage(ignore_virtual=True):",
        "and ps.is_pipeline_last_stage():", ["tests/test_configurations.py"]),
    "pipeline x dropout: validation with the stages before the last in training mode": (
        "parallel_train.py",
        "    model.eval()\n    parts = microbatches(inputs, targets, args, chunk_rows, "
        "sequence_parallel=False, whole=True)",
        "    parts = microbatches(inputs, targets, args, chunk_rows, sequence_parallel=False, "
        "whole=True)",
        ["tests/test_configurations.py"]),
    "self-comparison: AdamW's decoupled decay built as Adam's L2": (
        "train.py", "adam = torch.optim.AdamW if wd else torch.optim.Adam",
        "adam = torch.optim.Adam", ["tests/test_references.py"]),
    "self-comparison: Adam's beta2 read from --adam_beta1": (
        "train.py", "betas=(args.adam_beta1, args.adam_beta2))",
        "betas=(args.adam_beta1, args.adam_beta1))", ["tests/test_references.py"]),
    "self-comparison: SGD's momentum dampened": (
        "train.py", "lr=args.init_lr, momentum=args.momentum)",
        "lr=args.init_lr, momentum=args.momentum, dampening=args.momentum)",
        ["tests/test_references.py"]),
    "uncalled helper: 1F1B's steady state keeps its sent outputs": (
        "core/pipeline_parallel/schedules.py",
        "        output_tensor_grad = p2p.send_forward_recv_backward(output_tensor, tensor_shape, "
        "dtype)\n        deallocate_output_tensor(output_tensor)  # not the last stage's: a 0-dim "
        "loss\n",
        "        output_tensor_grad = p2p.send_forward_recv_backward(output_tensor, tensor_shape, "
        "dtype)\n", ["tests/test_references.py"]),
    "uncalled helper: the interleaved steady state keeps its sent outputs": (
        "core/pipeline_parallel/schedules.py",
        "                output, input_grad, recv_prev, recv_next, self.shape, self.dtype)\n"
        "            deallocate_output_tensor(output)\n",
        "                output, input_grad, recv_prev, recv_next, self.shape, self.dtype)\n",
        ["tests/test_references.py"]),
    "a change of pipeline size alone: the decayed and undecayed groups swapped": (
        "training/checkpointing.py",
        'groups = groups_over(state["optimizer"]["param_groups"], [',
        'groups = groups_over(state["optimizer"]["param_groups"][::-1], [',
        ["tests/test_resume.py"]),
    # Context parallelism's attention (core/context_parallel/attention.py, issue 38).
    "context parallelism: a ring step skipped": (
        "core/context_parallel/attention.py", "    for step in range(size):",
        "    for step in range(size - 1):", ["tests/test_context_parallel.py"]),
    "context parallelism: the log-sum-exp merge without the max": (
        "core/context_parallel/attention.py",
        "    top = _finite(torch.maximum(lse1, lse2).detach())",
        "    top = torch.zeros_like(lse1)", ["tests/test_context_parallel.py"]),
    "context parallelism: K/V gradients not sent back (sent on, as the blocks)": (
        "core/context_parallel/attention.py",
        "_Exchange.apply(kv, group, _send_next_recv_prev, _send_prev_recv_next)",
        "_Exchange.apply(kv, group, _send_next_recv_prev, _send_next_recv_prev)",
        ["tests/test_context_parallel.py"]),
    "context parallelism: the load-balanced split with positions from the plain one": (
        "core/context_parallel/split.py",
        "    return get_positions_on_every_cp_rank(seq_length, cp, load_balanced), cp_comm_type",
        "    return get_positions_on_every_cp_rank(seq_length, cp, False), cp_comm_type",
        ["tests/test_context_parallel_train.py"]),
    "context parallelism: gradients averaged over DP only": (
        "core/distributed/finalize_model_grads.py",
        "        _average_over_data_parallel(grads[\"split\"],\n" + " " * 36 +
        "ps.get_data_parallel_group(with_context_parallel=True))",
        "        _average_over_data_parallel(grads[\"split\"], ps.get_data_parallel_group())",
        ["tests/test_context_parallel_train.py"]),
    "context parallelism: one dropout stream for every context rank": (
        "core/tensor_parallel/random.py", "seed + _CONTEXT_PARALLEL_SEED_OFFSET + cp_rank,",
        "seed + _CONTEXT_PARALLEL_SEED_OFFSET,", ["tests/test_context_parallel_train.py"]),
    # The data-parallel average overlapped with backward (core/distributed/
    # param_and_grad_buffer.py, issue 39).
    "overlap: a bucket launched before its last gradient (after the first micro-batch)": (
        "core/distributed/param_and_grad_buffer.py", "        if self.seen[i] == full:",
        "        if self.seen[i] == len(self.buckets[i]):", ["tests/test_overlap.py"]),
    "overlap: a bucket never waited for": (
        "core/distributed/param_and_grad_buffer.py", "        for wait in self.waits:\n"
        "            wait()", "        for wait in self.waits:\n            pass",
        ["tests/test_overlap.py"]),
    "overlap: the param gather waited for after the forward": (
        "core/optimizer/distrib_optimizer.py", "module.register_forward_pre_hook(\n"
        "                        lambda _module, _inputs, mine=mine:",
        "module.register_forward_hook(\n"
        "                        lambda _module, _inputs, _output, mine=mine:",
        ["tests/test_overlap.py"]),
    "overlap: a checkpoint written before the parameters' gathers landed": (
        "parallel_train.py", "    finish_param_sync(optimizer)\n    save_checkpoint(",
        "    save_checkpoint(", ["tests/test_overlap.py"]),
    # Mixture of experts (core/transformer/moe/, issue 40).
    "moe: the router's top-k in bf16": (
        "core/transformer/moe/moe_utils.py",
        "    logits = at_least_fp32(logits)\n    if use_pre_softmax:",
        "    logits = logits.bfloat16()\n    if use_pre_softmax:", ["tests/test_moe.py"]),
    "moe: tokens un-permuted in the wrong order": (
        "core/transformer/moe/moe_utils.py", "weights = probs.T.masked_select(routing_map.T)",
        "weights = probs.masked_select(routing_map)", ["tests/test_moe.py"]),
    "moe: the aux loss from one rank's tokens": (
        "core/transformer/moe/router.py",
        "            tokens_per_expert = _reduce_tokens_per_expert(tokens_per_expert, group)\n",
        "            pass\n", ["tests/test_expert_parallel.py"]),
    "moe: expert gradients averaged over all data-parallel ranks": (
        "core/distributed/finalize_model_grads.py",
        "    group = ps.get_expert_data_parallel_group()\n",
        "    group = ps.get_data_parallel_group(with_context_parallel=True)\n",
        ["tests/test_expert_parallel.py"]),
    "moe: split sizes from the previous micro-batch": (
        "core/transformer/moe/token_dispatcher.py",
        "ps.get_expert_tensor_and_model_parallel_group()).view(ep, etp, -1)\n",
        "ps.get_expert_tensor_and_model_parallel_group()).view(ep, etp, -1)\n"
        "        counts, self.last = getattr(self, 'last', None), counts\n"
        "        counts = self.last if counts is None else counts\n",
        ["tests/test_expert_parallel.py"]),
    # Operations (training/operations.py).
    "no watcher thread for a rank stuck in C code": (
        "training/operations.py", "        _leave_if_stuck_after_a_signal()\n", "        pass\n",
        ["tests/test_backends.py"]),
    # The vocabulary (cross_entropy.py).
    "padded logits not masked": (
        "core/tensor_parallel/cross_entropy.py",
        "and last > vocab_size:  # padded", "and False:  # padded",
        ["tests/test_vocab_parallel.py", "tests/test_transformer_train.py"]),
    # The interleaved schedule's exchanges overlapped with compute (core/pipeline_parallel/
    # schedules.py, --overlap_p2p_comm, issue 39): a backward takes the forward's exchange.
    "overlap: a p2p wait on the wrong tensor": (
        "core/pipeline_parallel/schedules.py",
        "output_grads[0] = output_grads[0].wait()[1]",
        "output_grads[0] = self.posted[\"F\"][0].wait()[1]", ["tests/test_overlap_p2p.py"]),
}


def copy_repository(into):
    """The tracked files and the untracked ones git does not ignore, as a clean clone has them."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for name in files:
        if os.path.isfile(os.path.join(REPO, name)):
            os.makedirs(os.path.dirname(os.path.join(into, name)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), os.path.join(into, name))


def apply(copy, name):
    path, old, new, _ = MUTANTS[name]
    with open(os.path.join(copy, path)) as f:
        source = f.read()
    if source.count(old) != 1:
        sys.exit(f"error: mutant {name!r}: the text it replaces occurs {source.count(old)} times "
                 f"in {path}; update tests/mutants.py")
    with open(os.path.join(copy, path), "w") as f:
        f.write(source.replace(old, new))


def failing_tests(name, suite):
    """The ids of the tests that fail with the mutant in, and the seconds the run took."""
    with tempfile.TemporaryDirectory(prefix="mutant_") as copy:
        copy_repository(copy)
        apply(copy, name)
        tests = [] if suite else MUTANTS[name][3]
        start = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p",
                              "no:cacheprovider", "-rfE", *tests], cwd=copy, capture_output=True,
                             text=True)
        failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", run.stdout, re.M)
        return failed, time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--suite", action="store_true", help="against the whole suite")
    parser.add_argument("--list", action="store_true", help="list the mutants")
    args = parser.parse_args()
    if unknown := [n for n in args.names if n not in MUTANTS]:
        parser.error(f"no mutant {unknown[0]!r}; --list names them")
    if args.list:
        for name, (path, *_) in MUTANTS.items():
            print(f"{name}  ({path})")
        return 0
    survived = 0
    print("| mutant | file | run against | tests that fail |\n| --- | --- | --- | --- |",
          flush=True)
    for name in args.names or MUTANTS:
        failed, seconds = failing_tests(name, args.suite)
        survived += not failed
        against = "the whole suite" if args.suite else ", ".join(
            os.path.basename(t) for t in MUTANTS[name][3])
        names = [f"`{t.split('/')[-1]}`" for t in failed]
        caught = (f"{len(names)}: " + ", ".join(names[:3]) + (f" and {len(names) - 3} more"
                                                               if len(names) > 3 else "")
                  if names else "**SURVIVED**")
        print(f"| {name} | `{MUTANTS[name][0]}` | {against} ({seconds:.0f} s) | {caught} |",
              flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
