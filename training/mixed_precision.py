"""bf16 training as Megatron's --bf16 does it: bf16 model, fp32 main parameters.

Micikevicius et al. (2018), "Mixed Precision Training"; Megatron-LM's
Float16OptimizerWithFloat16Params (megatron/core/optimizer/optimizer.py) and its
DDP's fp32 gradient buffers (`main_grad`, accumulate_allreduce_grads_in_fp32):

  * the model's parameters, and so its activations, are bf16;
  * each parameter has an fp32 "main" copy, which is what the optimizer updates,
    its SGD momentum in fp32 beside it: an update smaller than a bf16 ulp of the
    weight (lr x grad often is) is kept, not rounded away;
  * each bf16 gradient is added to its main parameter's fp32 gradient as soon as
    backward has produced it (a hook), so whatever sums gradients after backward
    (data-parallel averaging, sequence parallelism's partial sums, the clipping
    norm) works on fp32;
  * after the update the main parameters are rounded to bf16 into the model.

The loss is computed in fp32 by the models (model.py's caller, transformer.py).
Checkpoints and model.pt hold the main parameters (`main_model`), so resuming
restores the run bit for bit, and resharding and merging see fp32 tensors.
"""

import copy

import torch
import torch.nn as nn


class MixedPrecisionOptimizer:
    """`make_optimizer(main_params)` (e.g. SGD) over fp32 main copies of a model's parameters.

    `model` arrives in fp32 (built as the fp32 model is, the same initial weights) and leaves
    in bf16; `self.main` is its fp32 twin, same class, same parameter names and attributes.
    """

    def __init__(self, model: nn.Module, make_optimizer):
        self.model, self.main = model, copy.deepcopy(model)
        for param, main in zip(model.parameters(), self.main.parameters()):
            main.__dict__.update(param.__dict__)  # tensor_model_parallel, partition_dim, ...
            # Megatron's param.main_grad: a layer may add its fp32 weight gradient here itself
            # (parallel_layers.LinearWithGradAccumulation); the hook moves what autograd made.
            param.add_to_main_grad = _adder(main)
            param.register_post_accumulate_grad_hook(_accumulate_into_main_grad)
        model.to(torch.bfloat16)
        self.optimizer = make_optimizer(self.main.parameters())

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        self.optimizer.step()
        self.sync_model()

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        """The momentum. A checkpoint loads the main parameters first (into `main_model`), then
        this: the model takes them, rounded."""
        self.optimizer.load_state_dict(state_dict)
        self.sync_model()

    @torch.no_grad()
    def sync_model(self):
        for param, main in zip(self.model.parameters(), self.main.parameters()):
            param.copy_(main)  # rounded to the nearest bf16


def _adder(main: nn.Parameter):
    """Adds an fp32 gradient to the main parameter's."""
    def add_to_main_grad(grad):
        main.grad = grad if main.grad is None else main.grad.add_(grad)
    return add_to_main_grad


def _accumulate_into_main_grad(param):
    """The hook that moves a bf16 gradient onto its fp32 main parameter, as it is produced.
    (It runs with no gradient too: a pipeline's last stage uses its copy of the tied embeddings
    only in the output layer, which added its gradient to the main one itself.)"""
    if param.grad is not None:
        param.add_to_main_grad(param.grad.float())
        param.grad = None  # the bf16 gradient is not kept


def main_model(model: nn.Module, optimizer) -> nn.Module:
    """The module whose parameters the optimizer updates and checkpoints hold: the fp32 main
    copy under bf16, the model itself otherwise (and under the distributed optimizer, whose
    main parameters are its shards: distrib_optimizer.py)."""
    return optimizer.main if isinstance(optimizer, MixedPrecisionOptimizer) else model


def optimized_parameters(optimizer):
    """The parameters the optimizer updates, whose gradients are summed and clipped."""
    return [p for group in optimizer.param_groups for p in group["params"]]
