"""scaling.py's cost model: what a step of the ToyModel computes and sends, the prediction
from those terms, the crossover, and the all-reduce's alpha and beta fitted to a message-size
sweep. Pure arithmetic (tests/test_scaling.py checks it by hand).

    serial:  T_1(H) = o_1 + C(H)
    TP = p:  T_p(H) = o_p + C(H / p) + alpha + beta n
"""

import numpy as np

INPUT, BATCH, ELEM = 64, 32, 4  # the original's sizes, float32


def gemm_flops(width, batch=BATCH, inputs=INPUT):
    """FLOPs of one rank's five GEMMs in a step at MLP width `width` (= H / p)."""
    return 5 * 2 * batch * inputs * width


def allreduce_bytes(tp, batch=BATCH, inputs=INPUT, elem=ELEM):
    """Bytes each rank all-reduces per step: g's output, batch x input; none at TP = 1."""
    return batch * inputs * elem if tp > 1 else 0


def predict(width_costs, alpha, beta, overheads, hidden, tp):
    """Seconds per iteration at hidden size `hidden` and tensor-parallel size `tp`;
    width_costs[tp][w]: C(w) of one rank among tp."""
    comm = alpha + beta * allreduce_bytes(tp) if tp > 1 else 0.0
    return overheads[tp] + width_costs[tp][hidden // tp] + comm


def crossover(hidden, speedup):
    """The hidden size where speedup (serial / TP) first crosses 1 upwards, interpolated linearly
    in log(hidden) and log(speedup) between the two grid points around it; None if it never
    does."""
    for (h0, s0), (h1, s1) in zip(zip(hidden, speedup), zip(hidden[1:], speedup[1:])):
        if s0 < 1 <= s1:
            f = -np.log(s0) / (np.log(s1) - np.log(s0))
            return float(np.exp(np.log(h0) + f * (np.log(h1) - np.log(h0))))
    return None


def fit_alpha_beta(sizes, seconds):
    """Least squares of seconds = alpha + beta bytes, each point weighted by 1/seconds (relative
    error: the small messages count as much as the large)."""
    n, t = np.array(sizes, float), np.array(seconds, float)
    a = np.stack([np.ones_like(n), n], 1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    return float(alpha), float(beta)
