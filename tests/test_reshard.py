"""Cutting a checkpoint for another tensor-parallel size (reshard.py), on hand-made shards.

A shard set saved at TP = a, cut for TP = c, must equal the shard set saved at
TP = c directly, bit for bit, weights and momentum alike, with a vocabulary
whose padding changes with the size; and each rank must read only the saved
shards that overlap its rows. (That a resumed run continues the curve is
tests/test_scale.py's.)
"""

import contextlib
import inspect
import io
import itertools
import os
import types

import pytest
import torch

from parallel_layers import vocab_size_with_padding
from training import reshard as reshard_module
from training.reshard import overlapping_shards

VOCAB, WIDTH, HIDDEN = 10, 3, 12  # a vocabulary that 3 and 4 do not divide


def full_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"embedding": torch.randn(VOCAB, WIDTH, generator=g, dtype=torch.float64),
            "fc1": torch.randn(HIDDEN, WIDTH, generator=g, dtype=torch.float64),
            "fc2": torch.randn(WIDTH, HIDDEN, generator=g, dtype=torch.float64),
            "ln": torch.randn(WIDTH, generator=g, dtype=torch.float64)}


DIMS = {"embedding": 0, "fc1": 0, "fc2": 1, "ln": None}


def saved_at(tp, optimizer="sgd"):
    """The shards a run at TP = tp writes (as checkpointing.save_checkpoint), the optimizer's
    state for all but fc2 (a parameter that has not stepped yet has none): SGD's momentum, or
    Adam's two moments and its step count."""
    weights, momentum, second = full_state(0), full_state(1), full_state(2)
    shards = []
    for rank in range(tp):
        def local(name, t):
            dim = DIMS[name]
            if dim is None:
                return t.clone()
            if name == "embedding":  # zero rows that no token looks up
                t = torch.cat([t, t.new_zeros(vocab_size_with_padding(VOCAB, tp) - VOCAB, WIDTH)])
            return t.chunk(tp, dim)[rank].clone()
        state = {i: ({"momentum_buffer": local(n, momentum[n])} if optimizer == "sgd" else
                     {"step": torch.tensor(5.0), "exp_avg": local(n, momentum[n]),
                      "exp_avg_sq": local(n, second[n].abs())})
                 for i, n in enumerate(DIMS) if n != "fc2"}
        shards.append(dict(iteration=7, model={n: local(n, t) for n, t in weights.items()},
                           optimizer=dict(state=state, param_groups=[dict(params=[0, 1, 2, 3])]),
                           sizes=dict(tensor_model_parallel_size=tp, hidden_size=HIDDEN),
                           partition_dims=DIMS, vocab_sizes={"embedding": VOCAB},
                           rng=dict(torch=torch.tensor([rank]), tracker={"s": rank})))
    return shards


SIZES = [(a, c) for a, c in itertools.product((1, 2, 3, 4, 6), repeat=2) if a != c]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("a,c", SIZES)
def test_cut_for_another_size_equals_saved_at_that_size(a, c, optimizer):
    check_cut(a, c, reshard_module, optimizer)


def check_cut(a, c, module, optimizer="sgd"):
    saved, wanted = saved_at(a, optimizer), saved_at(c, optimizer)
    for rank in range(c):
        reads = []
        read = lambda j: reads.append(j) or saved[j]
        got = module.reshard(read, a, c, rank)
        assert got["model"].keys() == set(DIMS)
        for name in DIMS:
            assert torch.equal(got["model"][name], wanted[rank]["model"][name]), (name, rank)
        assert got["optimizer"]["state"].keys() == wanted[rank]["optimizer"]["state"].keys()
        for i, s in wanted[rank]["optimizer"]["state"].items():
            assert got["optimizer"]["state"][i].keys() == s.keys(), (i, rank)
            for key in s:
                assert torch.equal(got["optimizer"]["state"][i][key], s[key]), (i, key, rank)
        assert got["sizes"]["tensor_model_parallel_size"] == c and got["iteration"] == 7
        assert "tracker" not in got["rng"]  # the saved streams were the old split's
        # Only the shards that hold some of this rank's rows (of fc1's, and the embedding's).
        needed = set(overlapping_shards(HIDDEN // a, a, HIDDEN // c, rank))
        rows = vocab_size_with_padding(VOCAB, a) // a
        needed |= set(overlapping_shards(rows, a, vocab_size_with_padding(VOCAB, c) // c, rank))
        assert set(reads) == needed, (rank, reads)
        assert len(needed) <= -(-a // c) + 1


# The check must be able to fail: reshard.py with a bug written in, as a bug would be.
MUTANTS = {
    # every rank's rows taken from the start of the shards it reads, not from its own offset
    "offset dropped": ("start = lo - shards.start * saved_rows", "start = 0"),
    # the momentum buffers cut to the right shape, but their values lost
    "momentum zeroed": ("""pick=lambda shard: shard["optimizer"]["state"][i][key])""",
                        """pick=lambda shard: shard["optimizer"]["state"][i][key] * 0)"""),
}


# Size pairs each mutant fails, measured: the offset is not needed where every new shard starts
# on a saved shard's boundary (5 pairs, as 4 -> 2); a lost momentum shows at every pair.
MIN_CAUGHT = {"offset dropped": 15, "momentum zeroed": 20}


@pytest.mark.parametrize("mutant", MUTANTS)
def test_the_check_catches_a_broken_cut(mutant):
    old, new = MUTANTS[mutant]
    source = inspect.getsource(reshard_module)
    assert source.count(old) == 1, f"the line the mutant changes is gone: {old}"
    module = types.ModuleType(f"reshard with {mutant}")
    exec(compile(source.replace(old, new), module.__name__, "exec"), module.__dict__)
    caught = 0
    for a, c in SIZES:
        try:
            check_cut(a, c, module)
        except AssertionError:
            caught += 1
    assert caught >= MIN_CAUGHT[mutant], f"{mutant}: caught in {caught} of {len(SIZES)} pairs"


def test_rows_past_the_saved_end_are_padding():
    # TP 1 -> 4 with 10 rows: 12 padded, rank 3 holds rows 9, 10, 11: one real, two zero.
    assert overlapping_shards(saved_rows=10, saved_tp=1, rows=3, rank=3) == range(0, 1)
    # TP 4 (12 padded, 3 per shard) -> 6 (12, 2 each): rank 5 holds rows 10, 11, padding in shard 3
    assert overlapping_shards(saved_rows=3, saved_tp=4, rows=2, rank=5) == range(3, 4)


# ---------------------------------------------------------------------------
# merge_checkpoint.py --save: the same cut offline, and a damaged checkpoint named in one line.

def write_checkpoint(directory, shards, iteration=7):
    from training.checkpointing import TRACKER, shard_path
    for rank, shard in enumerate(shards):
        path = shard_path(str(directory), iteration, rank)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(shard, path)
    (directory / TRACKER).write_text(f"{iteration}\n")
    return directory


def merge_checkpoint(*argv):
    """(exit message or None, stdout) of merge_checkpoint.py in-process."""
    import merge_checkpoint as script
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            script.main([str(a) for a in argv])
    except SystemExit as e:
        return str(e.code), out.getvalue()
    return None, out.getvalue()


def test_offline_cut_writes_the_checkpoint_a_run_at_that_size_would(tmp_path):
    from training.checkpointing import load_shards
    source = write_checkpoint(tmp_path / "tp4", saved_at(4))
    error, out = merge_checkpoint(source, "--tensor_model_parallel_size", "3", "--save",
                                  tmp_path / "tp3")
    assert error is None and "momentum included" in out
    got, wanted = load_shards(str(tmp_path / "tp3"), 7), saved_at(3)
    for g, w in zip(got, wanted, strict=True):
        assert g["model"].keys() == w["model"].keys() == set(DIMS)
        assert all(torch.equal(g["model"][n], w["model"][n]) for n in DIMS)
        assert g["optimizer"]["state"].keys() == w["optimizer"]["state"].keys()
        assert all(torch.equal(g["optimizer"]["state"][i]["momentum_buffer"], s["momentum_buffer"])
                   for i, s in w["optimizer"]["state"].items())
    # A directory that holds a checkpoint is not overwritten.
    error, _ = merge_checkpoint(source, "--tensor_model_parallel_size", "2", "--save",
                                tmp_path / "tp3")
    assert error == f"error: {tmp_path / 'tp3'} holds a checkpoint already; choose a new --save " \
                    "directory"
    error, _ = merge_checkpoint(source, "--tensor_model_parallel_size", "5", "--save",
                                tmp_path / "tp5")
    assert error == "error: its hidden size 12 is not divisible by --tensor_model_parallel_size 5"
    assert not (tmp_path / "tp5").exists()


def damage(kind, directory):
    """A checkpoint of 4 shards at iteration 7, damaged as a user's disk or hands might."""
    from training.checkpointing import TRACKER, shard_path
    write_checkpoint(directory, saved_at(4))
    shard = lambda rank, it=7: shard_path(str(directory), it, rank)
    if kind in ("missing shard", "missing last shard"):
        rank = 1 if kind == "missing shard" else 3
        os.remove(shard(rank))
        os.rmdir(os.path.dirname(shard(rank)))
        return (f"{directory} names iteration 7, but {shard(rank)} is missing (an incomplete "
                "checkpoint)")
    if kind == "shards of two sizes":
        other = saved_at(2)[1]
        torch.save(other, shard(2))
        return (f"{shard(2)} was saved at tensor-parallel size 2, {shard(0)} at 4: shards of two "
                "checkpoints are mixed")
    if kind == "truncated shard":
        data = open(shard(2), "rb").read()
        open(shard(2), "wb").write(data[:len(data) // 2])
        return (f"{shard(2)} cannot be read (RuntimeError); it is truncated or not a checkpoint "
                "shard")
    if kind == "mixed iterations":
        other = saved_at(4)[2]
        other["iteration"] = 5
        torch.save(other, shard(2))
        return f"{shard(2)} holds iteration 5, not 7: shards of two checkpoints are mixed"
    if kind == "not a shard":
        torch.save({"a": 1}, shard(1))
        return (f"{shard(1)} is not a checkpoint shard written by parallel_train.py (no "
                "iteration, model, optimizer and sizes in it)")
    if kind == "tracker names a missing iteration":
        (directory / TRACKER).write_text("9\n")
        return (f"{directory / TRACKER} names iteration 9, but "
                f"{os.path.dirname(os.path.dirname(shard(0, 9)))} is missing (saved there: 7)")
    if kind == "tracker gone":  # (merge_checkpoint.py said "no checkpoint in ...")
        (directory / TRACKER).unlink()
        return (f"{directory} holds checkpoint folders (iter_0000007) but no {TRACKER}: name one "
                f"with --iteration N, or write the tracker (echo 7 > {directory / TRACKER})")
    if kind == "--iteration names a missing one":
        return (f"asked for iteration 15, but {os.path.dirname(os.path.dirname(shard(0, 15)))} "
                "is missing (saved there: 7)")
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing shard", "missing last shard", "truncated shard",
                                  "mixed iterations", "shards of two sizes",
                                  "not a shard", "tracker names a missing iteration",
                                  "--iteration names a missing one", "tracker gone"])
def test_a_damaged_checkpoint_is_named_in_one_line_and_nothing_is_written(kind, tmp_path):
    expected = damage(kind, tmp_path / "ck")
    asked = ["--iteration", "15"] if kind.startswith("--iteration") else []
    for argv in (["--out", tmp_path / "merged.pt"],
                 ["--tensor_model_parallel_size", "2", "--save", tmp_path / "tp2"]):
        error, _ = merge_checkpoint(tmp_path / "ck", *asked, *argv)
        assert error == f"error: {expected}"
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_a_file_named_as_the_checkpoint_directory(tmp_path):
    (tmp_path / "ck").write_text("not a directory")
    error, _ = merge_checkpoint(tmp_path / "ck", "--out", tmp_path / "merged.pt")
    assert error == f"error: {tmp_path / 'ck'} is a file; name the --save directory of a run"


def test_a_pipelines_missing_last_stage_is_named(tmp_path):
    """A PP 3 checkpoint without its last stage's folder: its folders' names say 2 stages, its
    shards 3; the missing one is named (issue 37: a stage folder gone read "holds no shards")."""
    from training.checkpointing import TRACKER, shard_path
    ck = tmp_path / "ck"
    for stage in (0, 1):
        shard = dict(saved_at(1)[0], sizes=dict(tensor_model_parallel_size=1, hidden_size=HIDDEN,
                                                 pipeline_model_parallel_size=3))
        path = shard_path(str(ck), 7, 0, stage)
        os.makedirs(os.path.dirname(path))
        torch.save(shard, path)
    (ck / TRACKER).write_text("7\n")
    error, _ = merge_checkpoint(ck, "--out", tmp_path / "merged.pt")
    assert error == (f"error: {ck} names iteration 7, but {ck}/iter_0000007/mp_rank_00_002 is "
                     "missing (an incomplete checkpoint of 3 pipeline stages)")
    assert not (tmp_path / "merged.pt").exists()
