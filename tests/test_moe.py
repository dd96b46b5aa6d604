"""Mixture of experts (issue 40): core/transformer/moe/moe_utils.py's arithmetic
against the same computed one token and one expert at a time in Python floats. The router's
numbers are fp32 (its softmax and top k, whatever the logits' dtype): within 1e-6 relative, a few
fp32 roundings of 6e-8 each; the permutation keeps the tokens' float64 and sums each token's
experts in the same order as the loop: equal."""

import contextlib
import math

import pytest
import torch

from core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
    get_capacity,
    permute,
    switch_load_balancing_loss_func,
    topk_routing_with_score_function,
    unpermute,
    z_loss_func,
)

T, E, K, H = 12, 4, 2, 3  # tokens, experts, top k, hidden


def _expert():
    """An expert: the toy model's MLP, width H, hidden 8, float64."""
    from model import MLP
    return MLP(H, 8, dtype=torch.float64)


def _logits(seed=0):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_each_token_goes_to_its_top_k_with_the_softmax_over_them():
    logits = _logits().float()
    probs, routing_map = topk_routing_with_score_function(logits, K)
    assert probs.dtype == torch.float32 and routing_map.sum(1).tolist() == [K] * T
    assert topk_routing_with_score_function(logits.bfloat16(), K)[0].dtype == torch.float32
    assert topk_routing_with_score_function(logits.double(), K)[0].dtype == torch.float64
    for t in range(T):
        chosen = sorted(range(E), key=lambda i: -logits[t, i].item())[:K]
        assert routing_map[t].nonzero().flatten().tolist() == sorted(chosen)
        z = sum(math.exp(logits[t, i].item()) for i in chosen)
        for i in range(E):
            expected = math.exp(logits[t, i].item()) / z if i in chosen else 0.0
            assert probs[t, i].item() == pytest.approx(expected, rel=1e-6)  # fp32's round-off
    pre, pre_map = topk_routing_with_score_function(logits, K, use_pre_softmax=True)
    assert torch.equal(pre_map, routing_map)  # the softmax keeps the order
    assert torch.allclose(pre, (torch.softmax(logits, -1) * routing_map).float())


def test_the_top_k_is_taken_in_fp32_not_in_the_logits_bf16():
    """Two experts 1/512 apart, below bf16's resolution near 1 (1/128): fp32 tells them apart,
    the bf16 logits round them to one value."""
    logits = torch.tensor([[1.0, 1.0 + 1 / 512, 0.0, -1.0]])
    _, routing_map = topk_routing_with_score_function(logits, 1)
    assert routing_map[0].tolist() == [False, True, False, False]
    assert logits.bfloat16()[0, 0] == logits.bfloat16()[0, 1]  # what bf16 would have seen


def test_the_load_balancing_loss_is_switch_s_sum_of_f_times_p():
    logits, coeff = _logits(1), 0.01
    routing_map, scores = compute_routing_scores_for_aux_loss(logits, K)
    tokens_per_expert = routing_map.sum(0)
    loss = switch_load_balancing_loss_func(scores, tokens_per_expert, T, K, E, coeff)
    f = [tokens_per_expert[i].item() / (T * K) for i in range(E)]
    p = [sum(scores[t, i].item() for t in range(T)) / T for i in range(E)]
    assert loss.item() == pytest.approx(coeff * E * sum(fi * pi for fi, pi in zip(f, p)),
                                        rel=1e-6)
    uniform = switch_load_balancing_loss_func(torch.full((T, E), 1 / E),
                                              torch.full((E,), T * K / E), T, K, E, coeff)
    assert uniform.item() == pytest.approx(coeff)  # balanced routing: the coefficient itself
    # Split over two ranks (each its tokens' probs, the counts global), the parts add up.
    halves = [switch_load_balancing_loss_func(scores[s], tokens_per_expert, T, K, E, coeff)
              for s in (slice(0, T // 2), slice(T // 2, T))]
    assert (halves[0] + halves[1]).item() == pytest.approx(loss.item(), rel=1e-6)


def test_the_z_loss_is_the_mean_squared_log_sum_exp():
    logits = _logits(2)
    expected = sum(math.log(sum(math.exp(v) for v in row.tolist())) ** 2 for row in logits) / T
    assert z_loss_func(logits, 1e-3).item() == pytest.approx(1e-3 * expected, rel=1e-6)


@pytest.mark.parametrize("drop_policy", ["probs", "position"])
def test_an_expert_over_capacity_drops_its_lowest_tokens(drop_policy):
    """Capacity factor 0.5: each expert keeps ceil(T K / E x 0.5) = 3 tokens; the ones it keeps
    are its highest-probability ones (or its first); every other pair dropped, counted."""
    probs, routing_map = topk_routing_with_score_function(_logits(3), K)
    capacity = get_capacity(T * K, E, 0.5)
    assert capacity == 3
    kept_probs, kept = apply_router_token_dropping(probs, routing_map, K, 0.5, drop_policy)
    dropped = 0
    for i in range(E):
        mine = [t for t in range(T) if routing_map[t, i]]
        order = sorted(mine, key=lambda t: -probs[t, i].item()) if drop_policy == "probs" else mine
        keep = set(order[:capacity])
        assert [t for t in range(T) if kept[t, i]] == sorted(keep), (i, drop_policy)
        dropped += len(mine) - len(keep)
    assert dropped == int(routing_map.sum() - kept.sum()) > 0
    assert torch.equal(kept_probs, probs * kept)
    assert apply_router_token_dropping(probs, routing_map, K, 4.0)[1] is routing_map  # fits


def test_permute_groups_tokens_by_expert_and_unpermute_weights_them_back():
    """permute, an expert's function applied to its rows, unpermute: each token's output the sum
    of its experts' outputs weighted by their probabilities."""
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    probs, routing_map = topk_routing_with_score_function(_logits(4), K)
    permuted, sorted_indices = permute(x, routing_map)
    counts = routing_map.sum(0).tolist()
    assert permuted.shape == (T * K, H)
    expert_of_row = [i for i in range(E) for _ in range(counts[i])]
    assert sorted_indices.tolist() == [t for i in range(E) for t in range(T) if routing_map[t, i]]
    expert = lambda i, rows: rows * (i + 1) + i  # expert i, a function of its rows
    out_rows = torch.stack([expert(expert_of_row[j], permuted[j]) for j in range(T * K)])
    out = unpermute(out_rows, sorted_indices, x.shape, probs, routing_map)
    for t in range(T):
        expected = sum(probs[t, i].double() * expert(i, x[t]) for i in range(E)
                       if routing_map[t, i])
        assert torch.equal(out[t], expected)


def test_the_moe_layer_is_each_token_through_its_experts_weighted():
    """MoELayer (router, permute, SequentialMLP, unpermute) against each token run through its
    own top-k experts one at a time, float64: outputs and every gradient (the router's through
    the probabilities and the load-balancing and z losses, injected in backward at the scale 1
    of one micro-batch) equal to round-off (measured 3.5e-16 of each tensor's largest element
    at most; the bound 3e-15), with a capacity that drops tokens too."""
    for capacity_factor in (None, 0.5):
        with _loss_scale(1.0):
            _layer_against_each_token(capacity_factor)


@contextlib.contextmanager
def _loss_scale(scale):
    """MoEAuxLossAutoScaler's scale inside the block (what the schedule sets), restored after."""
    from core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    saved = MoEAuxLossAutoScaler.main_loss_backward_scale
    MoEAuxLossAutoScaler.set_loss_scale(scale)
    try:
        yield
    finally:
        MoEAuxLossAutoScaler.set_loss_scale(saved)


def _layer_against_each_token(capacity_factor):
    """(test_the_moe_layer_is_each_token_through_its_experts_weighted, one capacity.)"""
    from core.transformer.moe.moe_layer import MoELayer
    torch.manual_seed(5)
    layer = MoELayer(H, E, K, _expert, aux_loss_coeff=0.01, z_loss_coeff=1e-3,
                     capacity_factor=capacity_factor, dtype=torch.float64)
    x = torch.randn(4, 3, H, dtype=torch.float64, requires_grad=True)  # (seq, batch, width)
    out = layer(x)
    out.square().sum().backward()  # (the losses' gradient injected: MoEAuxLossAutoScaler)
    got = [x.grad] + [p.grad for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    tokens = x.reshape(-1, H)
    kept = layer.router(tokens.detach())[1]  # what the capacity left (its own test above)
    assert capacity_factor is None or kept.sum() < tokens.shape[0] * K  # some dropped
    logits = tokens @ layer.router.weight.T
    top = torch.topk(logits, K, dim=1).indices
    rows = []
    for t in range(tokens.shape[0]):
        weights = torch.softmax(logits[t, top[t]], dim=-1)
        rows.append(sum((w * layer.experts.local_experts[str(i)](tokens[t])
                         for w, i in zip(weights, top[t].tolist())
                         if capacity_factor is None or kept[t, i]), torch.zeros(H)))
    expected = torch.stack(rows).view_as(x)
    assert (out - expected).abs().max() <= 3e-15 * expected.abs().max(), capacity_factor
    scores = torch.softmax(logits, dim=-1)
    counts = torch.zeros(E, dtype=torch.float64).scatter_add(
        0, torch.topk(scores, K, 1).indices.flatten(),
        torch.ones(tokens.shape[0] * K, dtype=torch.float64))
    aux = 0.01 * E * (counts / (tokens.shape[0] * K) * scores.mean(0)).sum()
    z = 1e-3 * torch.logsumexp(logits, -1).square().mean()
    (expected.square().sum() + aux + z).backward()
    want = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 3e-15 * b.abs().max(), capacity_factor


def test_the_aux_losses_gradient_is_scaled_as_the_loss_share():
    """Two micro-batches: the router's losses, injected in backward (MoEAuxLossAutoScaler at the
    scale the schedule sets, 1/2), train the model as adding half of each to the loss would, and
    are not in the value: the same gradients (measured: equal)."""
    from core.transformer.moe.moe_layer import MoELayer
    torch.manual_seed(6)
    layer = MoELayer(H, E, K, _expert, aux_loss_coeff=0.01, z_loss_coeff=1e-3,
                     dtype=torch.float64)
    x = torch.randn(2, 4, 3, H, dtype=torch.float64)  # two micro-batches of (seq, batch)
    with _loss_scale(1 / 2):
        for micro_batch in x:
            (layer(micro_batch).square().sum() / 2).backward()
    injected = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    with _loss_scale(0.0):  # nothing injected: the losses added by hand
        for micro_batch in x:
            out = layer(micro_batch)
            ((out.square().sum() + sum(layer.router.losses.values())) / 2).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(injected, layer.parameters()))


def test_the_flags_checks_are_one_line():
    """The routed model's flags (serial train.py; its runs: test_expert_parallel.py's references,
    its learning: docs/moe.md's load picture): each check one line."""
    from test_errors import flag_error
    flags = ["--model", "transformer", "--num_experts", "4"]
    assert "--moe_router_topk 5 of --num_experts 4" in flag_error(
        [*flags, "--moe_router_topk", "5"], 1, parallel=False)
    assert "the toy model is one MLP and fc" in flag_error(["--num_experts", "4"], 1,
                                                          parallel=False)
    assert "must be positive integers, got 4 and 0" in flag_error(
        [*flags, "--moe_ffn_hidden_size", "0"], 1, parallel=False)


def test_the_load_picture_draws_each_expert_s_share(tmp_path):
    """scripts/plot_moe_load.py: a panel per run from metrics.csv's tokens_expert_* columns, the
    imbalance (busiest over mean) in its title; a run without them is one line."""
    import io

    from scripts.plot_moe_load import imbalance, main
    for name, rows in (("even", [[5, 5, 5, 5]] * 30), ("skewed", [[10, 4, 3, 3]] * 30)):
        (tmp_path / name).mkdir()
        lines = ["iteration,train_loss,valid_loss," + ",".join(f"tokens_expert_{e}"
                                                                for e in range(4))]
        lines += [f"{i + 1},1.0,," + ",".join(map(str, r)) for i, r in enumerate(rows)]
        (tmp_path / name / "metrics.csv").write_text("\n".join(lines) + "\n")
    main([str(tmp_path / "even"), str(tmp_path / "skewed"), "--out", str(tmp_path / "load.png")])
    assert (tmp_path / "load.png").stat().st_size > 0
    assert imbalance(torch.tensor([[10.0, 4, 3, 3]]).numpy()) == 2.0
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as err:
        main([str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2 and len(err.getvalue().splitlines()) == 1
    assert "has no metrics.csv with tokens_expert_* columns" in err.getvalue()


def test_the_dispatch_example_walks_the_alltoall_steps(capsys):
    """scripts/moe_dispatch_example.py (docs/moe.md prints its output): the counts, each rank's
    splits (what rank j sends rank r is what rank r expects from j), and every token back."""
    from scripts.moe_dispatch_example import main
    main()
    out = capsys.readouterr().out
    assert "[[2, 2, 2, 2], [2, 1, 3, 2]]" in out
    assert "rank 0: input_splits [4, 4] (to rank 0, rank 1), output_splits [4, 3]" in out
    assert "rank 1: input_splits [3, 5] (to rank 0, rank 1), output_splits [4, 5]" in out
    assert out.count("every token back in its row, its own value: True") == 2
