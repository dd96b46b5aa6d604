"""Pipeline parallelism (schedules.py, p2p_communication.py): Megatron's groups, sends that pair,
and every schedule equal to a serial run that sums the same micro-batches' gradients.

Measured (CPU, gloo, float64): the toy model in two stages, 1F1B and GPipe, is the serial run
bit for bit (the same operations on the same micro-batches, the gradients added in the same
order). The transformer differs in the last bits only: its tied embeddings' two gradients are
added in another order (each stage sums its own over the micro-batches, then the embedding
group adds the two) — 2.3e-16 relative in the loss over 10 iterations at P 2 and 4, GPipe,
1F1B and interleaved; bound 1e-12, the issue's.
"""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from distributed import RankFailed, comm_table, run_distributed, run_script
from test_errors import flag_error

TOY = ["--hidden_size", "256", "--num_iterations", "12", "--update_freq", "4",
       "--eval_interval", "6", "--dtype", "float64", "--micro_batch_size", "8"]
TRANSFORMER = ["--model", "transformer", "--input_size", "16", "--hidden_size", "32",
               "--num_attention_heads", "2", "--num_layers", "4", "--batch_size", "8",
               "--micro_batch_size", "2", "--num_iterations", "6", "--update_freq", "3",
               "--eval_interval", "3", "--dtype", "float64"]
RTOL = 1e-12  # measured 2.3e-16 (module docstring)


# ---------------------------------------------------------------------------
# The groups, in Megatron's rank order (TP fastest, then CP, then DP, then PP).

def _groups(tp, pp, expected, cp=1):
    from core import parallel_state as ps
    ps.initialize_model_parallel(tp, pp, context_parallel_size=cp)
    rank = dist.get_rank()
    getters = dict(tp=ps.get_tensor_model_parallel_group, dp=ps.get_data_parallel_group,
                   pp=ps.get_pipeline_model_parallel_group, embedding=ps.get_embedding_group,
                   stage=ps.get_tensor_and_data_parallel_group, cp=ps.get_context_parallel_group,
                   dp_cp=lambda: ps.get_data_parallel_group(with_context_parallel=True))
    got = {name: dist.get_process_group_ranks(getters[name]()) for name in expected}
    want = {name: next(g for g in groups if rank in g) for name, groups in expected.items()}
    assert got == want, (rank, got, want)
    if "pp" in expected:
        assert ps.is_pipeline_first_stage() == (rank in want["pp"][:1])
        assert ps.is_pipeline_last_stage() == (rank == want["pp"][-1])


LAYOUTS = [  # (tp, pp, the groups of 4 ranks, cp)
    (2, 2, dict(tp=[[0, 1], [2, 3]], dp=[[0], [1], [2], [3]], pp=[[0, 2], [1, 3]],
                embedding=[[0, 2], [1, 3]], stage=[[0, 1], [2, 3]]), 1),
    (1, 2, dict(tp=[[0], [1], [2], [3]], dp=[[0, 1], [2, 3]], pp=[[0, 2], [1, 3]],
                embedding=[[0, 2], [1, 3]], stage=[[0, 1], [2, 3]]), 1),
    # CP 2 x DP 2 (core/context_parallel): a sequence's two ranks, then the replicas, and the
    # gradients averaged over all four.
    (1, 1, dict(cp=[[0, 1], [2, 3]], dp=[[0, 2], [1, 3]], dp_cp=[[0, 1, 2, 3]]), 2)]


def _every_layout():
    for tp, pp, expected, cp in LAYOUTS:  # TP 2 x PP 2, DP 2 x PP 2, CP 2 x DP 2, in one world
        _groups(tp, pp, expected, cp)


def test_groups_in_megatrons_rank_order():
    run_distributed(_every_layout, 4)


# ---------------------------------------------------------------------------
# Point to point: what does not pair fails in one line, what a schedule sends pairs.

def _mismatched(what):
    from core import parallel_state as ps
    from core.pipeline_parallel import p2p_communication as p2p
    ps.initialize_model_parallel(1, 2)
    sent = torch.zeros(4, 8, dtype=torch.float64 if what == "dtype" else torch.float32)
    if ps.is_pipeline_first_stage():
        p2p.send_forward(sent)
    else:
        p2p.recv_forward((4, 9) if what == "shape" else (4, 8), torch.float32)


@pytest.mark.parametrize("what,message", [
    ("shape", "expected from rank 0 activation #1, torch.float32 (4, 9), but rank 0 sent "
              "activation #1, torch.float32 (4, 8)"),
    ("dtype", "expected from rank 0 activation #1, torch.float32 (4, 8), but rank 0 sent "
              "activation #1, torch.float64 (4, 8)")])
def test_a_send_and_a_receive_that_do_not_pair_fail_in_one_line(what, message):
    with pytest.raises(RankFailed) as failed:
        run_distributed(_mismatched, 2, what)
    assert "PipelineP2PError: pipeline: rank 1 " + message in str(failed.value)
    assert "(on NCCL this hangs)" in str(failed.value)


def _schedule_logs():
    """1F1B with m = 3, then GPipe with m = 2, in one world."""
    from core.pipeline_parallel import p2p_communication as p2p
    for schedule, m in (("1f1b", 3), ("gpipe", 2)):
        p2p.p2p_log.clear()
        _schedule_log(schedule, m)


def _schedule_log(schedule, m):
    """Three steps of the toy model's two stages; every rank's point-to-point log, gathered."""
    from core import parallel_state as ps
    from core.pipeline_parallel import p2p_communication as p2p
    from core.pipeline_parallel.schedules import get_forward_backward_func
    from model import ToyModel
    ps.initialize_model_parallel(1, 2)
    torch.manual_seed(0)
    model = [ToyModel(4, 8, tensor_parallel=True, pre_process=ps.is_pipeline_first_stage(),
                      post_process=ps.is_pipeline_last_stage())]
    step = lambda chunk, mb, x: (chunk.loss(chunk(x), mb[1]) if ps.is_pipeline_last_stage()
                                 else chunk(mb[0]))
    batches = [(torch.randn(2, 4), torch.randn(2)) for _ in range(m)]
    for _ in range(3):
        get_forward_backward_func(schedule)(step, batches, model, (2, 4), torch.float32)
    logs = [None, None]
    dist.all_gather_object(logs, p2p.p2p_log)
    sends, receives = ([(kind, shape, dtype) for op, _, kind, shape, dtype in log if op == want]
                       for log, want in ((logs[0], "send"), (logs[1], "recv")))
    assert sends == [("activation", (2, 4), torch.float32)] * 3 * m and sends == receives
    back = [e[2:] for e in logs[1] if e[0] == "send"], [e[2:] for e in logs[0] if e[0] == "recv"]
    assert back[0] == back[1] == [("gradient", (2, 4), torch.float32)] * 3 * m


def test_every_send_of_a_schedule_pairs_with_its_receive():
    run_distributed(_schedule_logs, 2)


def test_a_sent_output_is_freed_and_its_backward_is_unchanged():
    """Megatron's deallocate_output_tensor: the stage's output keeps one element, its graph
    stays, and backward from it with the next stage's gradient is the plain backward, bitwise."""
    from core.pipeline_parallel.schedules import custom_backward, deallocate_output_tensor
    from model import MLP
    torch.manual_seed(0)
    mlp = MLP(8, 32).double()
    x, grad = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    torch.autograd.backward(mlp(x), grad)
    expected = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad(set_to_none=True)
    output = mlp(x)
    deallocate_output_tensor(output)
    assert output.numel() == 1
    custom_backward(output, grad)
    assert all(torch.equal(p.grad, e) for p, e in zip(mlp.parameters(), expected))


# ---------------------------------------------------------------------------
# Equal to serial.

@pytest.fixture(scope="module")
def serial_toy(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("serial_toy_microbatches"))
    run_script("train.py", *TOY, "--data_dir", data_dir, "--out_dir", out)
    return out


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_the_toy_model_in_two_stages_is_the_serial_run_bit_for_bit(schedule, serial_toy, data_dir,
                                                                    tmp_path):
    from curves import assert_bitwise_same_run
    log = run_script("parallel_train.py", *TOY, "--data_dir", data_dir, "--out_dir", tmp_path,
                     "--tensor_model_parallel_size", "1", "--pipeline_model_parallel_size", "2",
                     "--pipeline_schedule", schedule, nproc=2).out
    assert_bitwise_same_run(serial_toy, str(tmp_path))
    # 4 micro-batches of 8 x 64 float64 activations forward, 4 gradients back; the loss once.
    assert comm_table(log)["pipeline_send"] == pytest.approx((4, 16.0, 16.0)), log
    assert "the first stage sends m (2v - 1) = 4 of them (4 micro-batches, 1 chunk(s)): 16.00 " \
           "KiB" in log  # the paper's count, beside
    assert "Rank 0 Iter 12 Train Loss" in log


def test_the_toy_model_in_two_stages_and_two_replicas_is_the_serial_run(serial_toy, data_dir,
                                                                         tmp_path):
    """PP 2 x DP 2: the last stage holds only fc, replicated, so no gradient of that stage is
    split; its replicas skip the split gradients' average alike (it crashed on an empty list)."""
    run_script("parallel_train.py", *TOY, "--data_dir", data_dir, "--out_dir", tmp_path,
               "--tensor_model_parallel_size", "1", "--pipeline_model_parallel_size", "2",
               nproc=4)
    assert_same_as_serial(serial_toy, str(tmp_path))  # the replicas add in another order


@pytest.mark.parametrize("m,dtype", [(1, "float64"), (8, "float64"), (2, "float32")])
def test_one_to_eight_micro_batches_and_float32(m, dtype, data_dir, tmp_path):
    """m = 1 (nothing to overlap) and m = 8 bit for bit at float64; float32 too (the same
    operations on the same micro-batches: bitwise, within compare_runs' 1e-5 a fortiori)."""
    from curves import assert_bitwise_same_run
    flags = [*TOY, "--micro_batch_size", str(32 // m), "--dtype", dtype, "--data_dir", data_dir]
    run_script("train.py", *flags, "--out_dir", tmp_path / "serial")
    run_script("parallel_train.py", *flags, "--out_dir", tmp_path / "pp",
               "--tensor_model_parallel_size", "1", "--pipeline_model_parallel_size", "2", nproc=2)
    assert_bitwise_same_run(str(tmp_path / "serial"), str(tmp_path / "pp"))


@pytest.fixture(scope="module")
def serial_transformer(token_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("serial_transformer_microbatches"))
    run_script("train.py", *TRANSFORMER, "--data_dir", token_dir, "--out_dir", out)
    return out


@pytest.mark.parametrize("nproc,flags", [
    (2, ["--pipeline_model_parallel_size", "2", "--pipeline_schedule", "gpipe"]),
    (4, ["--pipeline_model_parallel_size", "4", "--recompute_granularity", "full"]),
    (2, ["--pipeline_model_parallel_size", "2", "--virtual_pipeline_model_parallel_size", "2"]),
    (4, ["--pipeline_model_parallel_size", "2"]),  # with DP = 2
], ids=["pp2_gpipe", "pp4_1f1b_recompute", "pp2_interleaved_v2", "pp2_dp2"])
# (P 2 x V 2 x TP 2 + SP: the first run of the checkpoint test below.)
def test_the_transformer_through_every_schedule_is_the_serial_run(nproc, flags, serial_transformer,
                                                                  token_dir, tmp_path):
    tp = [] if "--tensor_model_parallel_size" in flags else ["--tensor_model_parallel_size", "1"]
    log = run_script("parallel_train.py", *TRANSFORMER, *flags, *tp, "--data_dir", token_dir,
                     "--out_dir", tmp_path, nproc=nproc).out
    assert_same_as_serial(serial_transformer, str(tmp_path))
    # What the first stage sends, measured, is the paper's count: m (2v - 1) activations and
    # gradients of sequence x micro-batch x width (/ TP under SP), float64.
    v = 2 if "--virtual_pipeline_model_parallel_size" in flags else 1
    pp = int(flags[flags.index("--pipeline_model_parallel_size") + 1])
    tp_size = 2 if "--tensor_model_parallel_size" in flags else 1
    m = 8 // (nproc // (tp_size * pp)) // 2  # batch 8 over the replicas, micro-batches of 2
    sent = comm_table(log)["pipeline_send"]
    rows = 16 // (2 if "--sequence_parallel" in flags else 1) * 2 * 16 * 8 / 1024
    assert sent == pytest.approx((m * (2 * v - 1), rows * m * (2 * v - 1), rows * m * (2 * v - 1)),
                                 abs=0.005), log


def test_interleaved_with_as_many_micro_batches_as_stages(token_dir, tmp_path):
    """m = p: Megatron's all-warm-up case of the interleaved schedule (no steady state)."""
    flags = [*TRANSFORMER, "--micro_batch_size", "4", "--data_dir", token_dir]
    run_script("train.py", *flags, "--out_dir", tmp_path / "serial")
    run_script("parallel_train.py", *flags, "--out_dir", tmp_path / "pp",
               "--tensor_model_parallel_size", "1", "--pipeline_model_parallel_size", "2",
               "--virtual_pipeline_model_parallel_size", "2", nproc=2)
    assert_same_as_serial(str(tmp_path / "serial"), str(tmp_path / "pp"))


def test_clipping_takes_the_norm_over_every_stage_and_the_tied_embedding_once(token_dir,
                                                                               tmp_path):
    """--clip_grad 0.5 (below the gradient norm all run): serial's norm and curve at P 2."""
    clip = ["--clip_grad", "0.5", "--data_dir", token_dir]
    run_script("train.py", *TRANSFORMER, *clip, "--out_dir", tmp_path / "serial")
    log = run_script("parallel_train.py", *TRANSFORMER, *clip, "--out_dir", tmp_path / "pp",
                     "--tensor_model_parallel_size", "1", "--pipeline_model_parallel_size", "2",
                     nproc=2).out
    assert_same_as_serial(str(tmp_path / "serial"), str(tmp_path / "pp"), ("grad_norm",))
    assert comm_table(log)["grad_norm_pipeline_all_reduce"][0] == 1, log


def assert_same_as_serial(serial_dir, piped_dir, more=()):
    """Loss curves (and `more` columns) and final weights within RTOL of serial's."""
    from training.metrics import read_metrics
    serial, piped = read_metrics(serial_dir), read_metrics(piped_dir)
    for column in ("train_loss", "valid_loss", *more):
        a, b = serial[column], piped[column]
        seen = ~np.isnan(a)
        assert np.array_equal(seen, ~np.isnan(b)) and seen.any()
        assert np.abs(a[seen] - b[seen]).max() <= RTOL * np.abs(a[seen]).max(), column
    wa, wb = (torch.load(f"{d}/model.pt") for d in (serial_dir, piped_dir))
    assert wa.keys() == wb.keys()
    for name in wa:  # the final weights, the tied embeddings' first-stage copy among them
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=RTOL * wa[name].abs().max()), name


# ---------------------------------------------------------------------------
# Checkpoints: Megatron's mp_rank_TT_PPP, resumed bit for bit, resharded, merged.

def test_a_pipeline_resumes_bit_for_bit_and_merges(serial_toy, data_dir, tmp_path):
    """The toy model in two stages, killed after its checkpoint at 10 and resumed: the
    uninterrupted run, every loss and weight; merge_checkpoint.py gives model.pt."""
    from curves import assert_bitwise_same_run
    from test_scale import killed_after
    run = ("parallel_train.py", *TOY, "--data_dir", data_dir, "--tensor_model_parallel_size",
           "1", "--pipeline_model_parallel_size", "2", "--save_interval", "5")
    ck, resumed = str(tmp_path / "ck"), str(tmp_path / "resumed")
    run_script(*run, "--out_dir", resumed, "--save", ck, nproc=2)
    assert sorted(os.listdir(f"{ck}/iter_0000010")) == ["mp_rank_00_000", "mp_rank_00_001"]
    killed_after(ck, 10)
    out = run_script(*run, "--out_dir", resumed, "--save", ck, "--load", ck, nproc=2).out
    assert "resuming from" in out and "at iteration 10" in out, out
    assert_bitwise_same_run(serial_toy, resumed)  # = the uninterrupted run (bitwise serial's)
    merged = run_script("merge_checkpoint.py", ck, "--out", tmp_path / "m.pt").out
    assert "merged 1 shards x 2 pipeline stages of iteration 12" in merged
    wa, wb = torch.load(f"{resumed}/model.pt"), torch.load(tmp_path / "m.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_checkpoint_resumes_across_pipeline_and_tensor_parallel_sizes(serial_transformer,
                                                                          token_dir, tmp_path):
    """PP 2 x V 2 x TP 2 with SP, saved at 2 -> resumed as PP 1 x TP 2 x DP 2 with the distributed
    optimizer, saved at 4 (a file per replica) -> resumed as PP 4 x TP 1 with the plain one: every
    stage's shards read as one by the parameters' names, momentum included.
    The run ends as the serial one does, curve and weights within RTOL (a lost momentum buffer
    moves them by 1e-3 and more)."""
    from test_scale import killed_after
    run = ("parallel_train.py", *TRANSFORMER, "--data_dir", token_dir, "--save_interval", "2")
    ck, out = str(tmp_path / "ck"), str(tmp_path / "out")
    run_script(*run, "--pipeline_model_parallel_size", "2",
               "--virtual_pipeline_model_parallel_size", "2", "--tensor_model_parallel_size", "2",
               "--sequence_parallel", "--out_dir", out, "--save", ck, nproc=4)
    assert_same_as_serial(serial_transformer, out)  # interleaved, with TP 2 and SP inside
    killed_after(ck, 2)  # (and from the plain optimizer to the distributed one, at DP 2)
    log = run_script(*run, "--tensor_model_parallel_size", "2", "--out_dir", out, "--save", ck,
                     "--load", ck, "--use_distributed_optimizer", nproc=4).out
    assert ("at iteration 2, from 2 pipeline stage(s) to 1, the optimizer's shards from the "
            "plain optimizer to 2") in log, log
    killed_after(ck, 4)
    log = run_script(*run, "--pipeline_model_parallel_size", "4", "--tensor_model_parallel_size",
                     "1", "--out_dir", out, "--save", ck, "--load", ck, nproc=4).out
    assert ("at iteration 4, resharded from tensor-parallel size 2 to 1, from 1 pipeline "
            "stage(s) to 4, the optimizer's shards from 2 data-parallel replicas to the plain "
            "optimizer") in log, log
    assert sorted(os.listdir(f"{ck}/iter_0000006")) == [f"mp_rank_00_00{s}" for s in range(4)]
    assert_same_as_serial(serial_transformer, out)


# ---------------------------------------------------------------------------
# One line for what cannot run.

@pytest.mark.parametrize("argv,world_size,message", [
    (["--pipeline_model_parallel_size", "4", "--tensor_model_parallel_size", "1"], 4,
     "--pipeline_model_parallel_size 4: the toy model has two stages (the MLP | fc)"),
    (["--micro_batch_size", "5"], 2,
     "--micro_batch_size 5 does not divide each replica's 32 rows of a batch"),
    (["--model", "transformer", "--num_layers", "3", "--pipeline_model_parallel_size", "2",
      "--tensor_model_parallel_size", "1"], 2,
     "--num_layers 3 cannot be split evenly into 2 pipeline chunks"),
    (["--model", "transformer", "--num_layers", "4", "--pipeline_model_parallel_size", "2",
      "--virtual_pipeline_model_parallel_size", "2", "--micro_batch_size", "32",
      "--tensor_model_parallel_size", "1"], 2,
     "the interleaved schedule runs micro-batches in groups of the pipeline size 2 (as "
     "Megatron's): 1 micro-batches are not"),
    (["--model", "transformer", "--num_layers", "4", "--pipeline_model_parallel_size", "2",
      "--virtual_pipeline_model_parallel_size", "2", "--pipeline_schedule", "gpipe",
      "--tensor_model_parallel_size", "1"], 2,
     "--virtual_pipeline_model_parallel_size runs the interleaved 1F1B schedule; leave out "
     "--pipeline_schedule gpipe"),
    (["--pipeline_model_parallel_size", "2", "--virtual_pipeline_model_parallel_size", "2",
      "--tensor_model_parallel_size", "1"], 2,
     "--virtual_pipeline_model_parallel_size 2 gives each of the transformer's pipeline stages"),
    (["--pipeline_model_parallel_size", "2"], 2,
     "world size 2 is not divisible by --tensor_model_parallel_size 2 x "
     "--pipeline_model_parallel_size 2"),
], ids=["toy_p4", "micro_batch", "layers", "interleaved_m", "interleaved_gpipe", "toy_virtual",
        "world"])
def test_pipeline_flags_that_cannot_run_are_one_line(argv, world_size, message):
    error = flag_error(argv, world_size)
    assert error is not None and message in error, error


# bf16 through the pipeline (P 2, interleaved, with TP, GPipe), and with the distributed optimizer:
# judged by the --noise verdict in the covering array (test_configurations.py).


def test_the_bubble_and_the_activations_kept_against_the_paper(tmp_path, monkeypatch):
    """benchmarks/bench_pipeline.py --quick: the micro-batches each stage keeps are the paper's
    count exactly (GPipe m, 1F1B p - s), in the timeline and in saved bytes; the bubble is at
    least (p - 1) / (v m) (the formula leaves out the point-to-point latency: measured 0.04 to
    0.13 above it); the picture has a row per stage for each schedule."""
    import json

    from benchmarks import bench_pipeline
    from figures import record_saved_figures
    from test_benchmark import run_driver
    saved = record_saved_figures(monkeypatch)
    run_driver(bench_pipeline, monkeypatch, "--quick", "--plot", tmp_path / "p.png", "--out",
               tmp_path / "p.json")
    report = json.loads((tmp_path / "p.json").read_text())
    results, memory = report["results"], report["memory"]
    # The real transformer's saved bytes (saved-tensor hooks): 1F1B holds, on stage s, p - s
    # micro-batches' worth of what GPipe holds per micro-batch (measured: exactly 2.0 and 1.0).
    assert memory["kept_microbatches"] == [memory["p"] - s for s in range(memory["p"])], memory
    for r in results:
        p, m, v = r["p"], r["m"], r["v"]
        if r["schedule"] == "gpipe":
            assert r["in_flight"] == [m] * p, r
        elif v == 1:
            assert r["in_flight"] == [p - s for s in range(p)], r
        if not r["real"]:
            assert r["formula"] == (p - 1) / (v * m) and r["bubble"] >= 0.95 * r["formula"], r
    fig = saved[0]
    assert len(fig.axes) == len(results)
    assert [ax.get_yticklabels()[0].get_text() for ax in fig.axes] == ["stage 0"] * len(results)


def test_the_stages_drawn_hold_megatrons_layers(tmp_path):
    """draw_diagram.py --pp: chunk c of stage r holds blocks (c P + r) L ...; the embeddings on
    stage 0, the output layer's copy and the loss on the last."""
    import draw_diagram
    texts = draw_diagram.main(["--model", "transformer", "--pp", "4", "--virtual", "2",
                               "--num_layers", "16", "--out", str(tmp_path / "s.png")])
    assert "chunk 0: embeddings\nblocks 0..1" in texts and "chunk 1: blocks 8..9" in texts
    assert "chunk 1: blocks 14..15\nLN_f, output layer\n(embeddings' copy), loss" in texts
    assert "stage 3" in texts and (tmp_path / "s.png").is_file()
    from test_tools import one_line_error
    code, line = one_line_error(draw_diagram, ["--pp", "3", "--out", str(tmp_path / "t.png")])
    assert code == 2 and "the toy model has two stages (the MLP | fc)" in line


# ---------------------------------------------------------------------------
# scripts/print_schedule.py: the schedules' order, printed without training.

PRINT = "scripts/print_schedule.py"
P2_V2_M4 = ["--pipeline_model_parallel_size", "2", "--virtual_pipeline_model_parallel_size", "2",
            "--num_microbatches", "4"]


class _Logged(torch.autograd.Function):
    """x unchanged; "F<label>" logged in forward, "B<label>" in backward."""

    @staticmethod
    def forward(ctx, x, label, log):
        ctx.label, ctx.log = label, log
        log.append(f"F{label}")
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(f"B{ctx.label}")
        return grad, None, None


def _real_orders(printed):
    """Each schedule run for real on 2 ranks (gloo, the real sends): chunks that log their
    forwards and backwards; this rank's log is the row print_schedule.py printed for it."""
    from core import parallel_state as ps
    from core.pipeline_parallel.schedules import get_forward_backward_func
    for (schedule, v), rows in printed.items():
        ps.initialize_model_parallel(1, 2, v if v > 1 else None)
        log, weights = [], [torch.ones(2, dtype=torch.float64, requires_grad=True)
                            for _ in range(v)]

        def step(chunk, mb, x):
            data = torch.full((2,), float(mb), dtype=torch.float64) if x is None else x
            out = _Logged.apply(data * weights[chunk], f"{mb + 1}" + f".{chunk}" * (v > 1), log)
            return out.sum() if ps.is_pipeline_last_stage() else out
        get_forward_backward_func(schedule)(step, list(range(4)), list(range(v)), (2,),
                                            torch.float64)
        assert " ".join(log) == rows[dist.get_rank()], (schedule, v, log, rows)


def _printed(*flags):
    """print_schedule.py's output and the rows of its "each stage's order"."""
    out = run_script(PRINT, *flags, env={"COLUMNS": "100"}).stdout
    block = out.split("each stage's order:\n")[1].split("\n\n")[0]
    return out, [line.split(": ", 1)[1] for line in block.splitlines()]


def test_the_printed_schedules_are_what_the_schedules_run():
    """p = 2, m = 4: GPipe, 1F1B and interleaved (v = 2) as print_schedule.py prints them from
    stub stages are the orders the schedules run on two real ranks; the interleaved table and
    its receives are docs/pipeline.md's, and its time steps hold the paper's bubble: (p - 1) /
    (v m) of the 16 steps of work, 2."""
    out, interleaved = _printed(*P2_V2_M4, "--receives")
    printed = {("1f1b", 2): interleaved}
    for schedule in ("1f1b", "gpipe"):
        printed[schedule, 1] = _printed(*P2_V2_M4[:2], *P2_V2_M4[4:], "--pipeline_schedule",
                                        schedule)[1]
    assert printed["gpipe", 1] == ["F1 F2 F3 F4 B1 B2 B3 B4"] * 2
    run_distributed(_real_orders, 2, printed)
    assert "\n  F4.0 B2.1  -> a F3.1, g B1.0\n" in out  # the steady state's two receives
    assert "step        1    2" in out and out.count("   18\n") == 1  # 16 steps + the bubble, 2
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs/pipeline.md")) as f:
        assert out in f.read(), "docs/pipeline.md's table is not what print_schedule.py prints"


@pytest.mark.parametrize("flags,message", [
    (P2_V2_M4[:4] + ["--num_microbatches", "3"],
     "the interleaved schedule runs micro-batches in groups of the pipeline size 2 (as "
     "Megatron's): --num_microbatches 3 is not a multiple of 2"),
    (["--pipeline_model_parallel_size", "0"],
     "--pipeline_model_parallel_size must be a positive integer, got 0")])
def test_print_schedule_refuses_what_cannot_run_in_one_line(flags, message):
    run = run_script(PRINT, *flags, ok=False)
    assert run.code == 2 and run.stdout == "" and len(run.stderr.splitlines()) == 1, run.out
    assert message in run.stderr and "Traceback" not in run.stderr, run.out
