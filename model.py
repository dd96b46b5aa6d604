"""The toy regression model: Linear -> ReLU -> Linear, then a Linear to one output.

`mlp` is the MLP block of Megatron-LM (Shoeybi et al., 2019), Fig. 3a, with
ReLU for GeLU and no dropout. With tensor_parallel=True the same model is
built with fc1 split by columns and fc2 by rows; `fc` stays replicated on
every rank. The swap happens in `MLP.__init__` and nowhere else.

With pipeline parallelism (Narayanan et al., 2021) the model is two stages, the MLP | fc:
the first stage keeps `mlp` (pre_process, Megatron's name), the last keeps `fc` and the loss
(post_process); schedules.py moves the activations between them.
"""

import torch.nn as nn
import torch.nn.functional as F

from core import parallel_state as ps
from parallel_layers import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    def __init__(self, input_size, hidden_size, tensor_parallel=False, sequence_parallel=False,
                 dtype=None):
        super().__init__()
        if tensor_parallel:
            # X -> f -> X A_i -> ReLU -> Y_i B_i -> g: one all-reduce in forward, one in backward.
            fc1 = ColumnParallelLinear(input_size, hidden_size, bias=False, gather_output=False,
                                       sequence_parallel=sequence_parallel, dtype=dtype)
            fc2 = RowParallelLinear(hidden_size, input_size, bias=False, input_is_parallel=True,
                                    sequence_parallel=sequence_parallel, dtype=dtype)
        else:
            fc1 = nn.Linear(input_size, hidden_size, bias=False, dtype=dtype)
            fc2 = nn.Linear(hidden_size, input_size, bias=False, dtype=dtype)
        self.fc1, self.relu, self.fc2 = fc1, nn.ReLU(), fc2

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


class ToyModel(nn.Module):
    """Parameters `mlp.fc1.weight` (hidden, input), `mlp.fc2.weight` (input, hidden),
    `fc.weight` (1, input).

    Parameters are drawn in that order from the global generator, by nn.Linear's
    own init; seeding it the same way gives the same model for every
    tensor-parallel size. sequence_parallel (Korthikanti et al., 2022) is passed
    to the parallel layers, as Megatron does: see sequence_parallel.py.
    """

    def __init__(self, input_size=64, hidden_size=None, tensor_parallel=False,
                 sequence_parallel=False, dtype=None, pre_process=True, post_process=True):
        super().__init__()
        hidden_size = hidden_size or 32 * input_size
        self.mlp = MLP(input_size, hidden_size, tensor_parallel, sequence_parallel, dtype=dtype)
        self.fc = nn.Linear(input_size, 1, bias=False, dtype=dtype)
        # Under sequence parallelism fc sees this rank's rows only: its gradient is partial,
        # summed after backward (as Megatron marks its LayerNorm weights).
        self.fc.weight.grad_is_partial = sequence_parallel
        self.sequence_parallel = (sequence_parallel and tensor_parallel
                                  and ps.get_tensor_model_parallel_world_size() > 1)
        # A pipeline stage keeps its part; both drew the whole model, so both hold serial's.
        if not pre_process:
            self.mlp = None
        if not post_process:
            self.fc = None

    def forward(self, x):
        """The stage's part: the MLP on the data, fc on the MLP's output (the whole model when
        there is one stage)."""
        if self.mlp is not None:
            x = self.mlp(x)
        return x if self.fc is None else self.fc(x)

    def loss(self, outputs, targets):
        """Mean squared error over the batch's rows, in the targets' dtype (fp32 under bf16, as
        Megatron computes the loss). Under sequence parallelism this rank holds 1/TP of the rows:
        its share of the mean, finished after backward (finalize_model_grads.py)."""
        rows = len(targets) * (ps.get_tensor_model_parallel_world_size()
                               if self.loss_is_partial else 1)
        return F.mse_loss(outputs[:, 0].to(targets.dtype), targets, reduction="sum") / rows

    @property
    def loss_is_partial(self):
        """True under sequence parallelism (not while validation switches it off,
        sequence_parallel.sequence_parallel_disabled): each rank's loss is over its own rows."""
        return self.sequence_parallel
