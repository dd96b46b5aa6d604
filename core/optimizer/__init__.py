"""Megatron's optimizers (megatron/core/optimizer/): the parameter groups of weight decay (here,
as its __init__.py's _get_param_groups makes them) and the distributed optimizer, ZeRO stage 1
(distrib_optimizer.py).

With weight decay the optimizer has two groups, [decayed, not decayed], marked as Megatron marks
them (`wd_mult` 1 and 0). Torch numbers its state by the groups' order; checkpoints here number
it by the parameters' own order (training/checkpointing.py, reshard.py), so the optimizer's
state_dict is renumbered to it, and a loaded one is put back in this optimizer's groups whatever
the saved ones held (another pipeline stage's parameters, another replica's pieces).
"""


def no_weight_decay(param) -> bool:
    """Megatron's default rule (no no_weight_decay_cond): biases and 1-D parameters, the
    LayerNorms' among them, are not decayed. Every bias here is 1-D, so the shape says it all.
    A piece of the distributed optimizer (1-D whatever its parameter) carries its parameter's
    answer (`no_weight_decay`, set by distrib_optimizer.py)."""
    return getattr(param, "no_weight_decay", param.dim() == 1)


def in_group(group, param) -> bool:
    """Does `param` belong to `group`: the decayed one (wd_mult 1) or the other (wd_mult 0)? A
    group without wd_mult (a run without weight decay has one group) holds every parameter."""
    return "wd_mult" not in group or bool(group["wd_mult"]) != no_weight_decay(param)


def get_param_groups(params, weight_decay) -> list:
    """[the decayed parameters (2 dims or more), the others (biases, norms)], each in the order
    of `params`; the second group's weight_decay is 0 (Megatron's wd_mult 0)."""
    groups = [dict(wd_mult=1.0, weight_decay=weight_decay), dict(wd_mult=0.0, weight_decay=0.0)]
    for group in groups:
        group["params"] = [p for p in params if in_group(group, p)]
    return groups


def optimizer_with_param_groups(optimizer_class, params, weight_decay, **hyperparameters):
    """`optimizer_class` (torch's SGD, Adam or AdamW) over `params`. Without weight decay, torch's
    optimizer over one group, as it always was. With it, get_param_groups's two (both kept, one
    maybe empty, so that every rank's optimizer has the same groups), and a state_dict numbered by
    the position in `params`, whose saved groups' hyperparameters a load puts on this optimizer's
    own groups (`regrouped`)."""
    params = list(params)
    if not weight_decay:
        return optimizer_class(params, **hyperparameters)
    optimizer = optimizer_class(get_param_groups(params, weight_decay), **hyperparameters)
    position = {id(p): i for i, p in enumerate(params)}

    def by_position(optimizer, state_dict):  # torch's numbers (the groups' order) -> ours
        order = [position[id(p)] for group in optimizer.param_groups for p in group["params"]]
        return dict(state_dict, state={order[k]: v for k, v in state_dict["state"].items()},
                    param_groups=[dict(group, params=[order[k] for k in group["params"]])
                                  for group in state_dict["param_groups"]])

    optimizer.register_state_dict_post_hook(by_position)
    optimizer.register_load_state_dict_pre_hook(lambda optimizer, state_dict: dict(
        state_dict, param_groups=regrouped(state_dict["param_groups"], optimizer, position)))
    return optimizer


def regrouped(saved_groups, optimizer, position) -> list:
    """The saved groups' hyperparameters (weight_decay, lr, ...) on `optimizer`'s groups, group for
    group, each listing its own parameters' positions (`position`: id(param) -> the number its
    state has in the state_dict): what torch's load_state_dict maps the state by."""
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"the saved optimizer has {len(saved_groups)} parameter groups, this one "
                         f"{len(groups)} (weight decay in one of them only)")
    return [dict(saved, params=[position[id(p)] for p in group["params"]])
            for saved, group in zip(saved_groups, groups)]
