"""A user's torch.autograd.Function is one op of the plan: split like a pointwise op where its
forward and backward are elementwise, whole otherwise, and always run with the user's own
backward, so gradients are the ones the user defined (a straight-through estimator's
included), equal to one device's."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import autopar
from autopar import Replicate
from equivalence import check_training, twin
from test_e2e_simulated import slow_devices

MESHES = {"4": {"tp": 4}, "2x2": {"dp": 2, "tp": 2}}
ADAMW = dict(lr=1e-3, weight_decay=0.01, eps=1e-2)   # see test_vision.ADAMW


class TanhGelu(torch.autograd.Function):
    """GELU's tanh form with a hand-written backward (as BLOOM writes its own)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
        d = 0.5 * x * ((1 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + t)
        return d * grad


class StraightThrough(torch.autograd.Function):
    """Rounds in forward, passes the gradient through unchanged in backward: not the
    gradient autograd would derive, so only the user's backward gives it."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, grad):
        return grad


class RowScale(torch.autograd.Function):
    """Divides each row by its norm, with a hand-written backward: a reduction along the
    last dim, so it is not elementwise and runs whole."""

    @staticmethod
    def forward(ctx, x):
        norm = x.norm(dim=-1, keepdim=True)
        ctx.save_for_backward(x, norm)
        return x / norm

    @staticmethod
    def backward(ctx, grad):
        x, norm = ctx.saved_tensors
        y = x / norm
        return (grad - y * (grad * y).sum(-1, keepdim=True)) / norm


class Net(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)
        self.fn = fn

    def forward(self, x):
        return self.down(self.fn.apply(self.up(x))).square().mean()


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("fn", [TanhGelu, StraightThrough], ids=lambda f: f.__name__)
def test_elementwise_functions_split_and_run_their_own_backward(fn, mesh):
    torch.manual_seed(0)
    model, x = Net(fn), torch.randn(8, 16)
    ref = twin(model)
    axes = MESHES[mesh]
    pm = autopar.compile(model, slow_devices(math.prod(axes.values())), example_inputs=(x,),
                         mesh=axes, simulate=True)
    custom = [n for n in pm.plan.nodes.values() if n["op"] == "autograd_function"]
    assert len(custom) == 1 and any(p != Replicate() for p in custom[0]["output"])
    assert "autograd_function(" in pm.code and pm.plan.stats["fallback_ops"] == []
    assert check_training(pm, ref, (x,), adamw=ADAMW) <= 1e-5


def test_a_function_that_is_not_elementwise_runs_whole():
    torch.manual_seed(0)
    model, x = Net(RowScale), torch.randn(8, 16)
    ref = twin(model)
    pm = autopar.compile(model, slow_devices(4), example_inputs=(x,), mesh={"tp": 4},
                         simulate=True)
    custom = [n for n in pm.plan.nodes.values() if n["op"] == "autograd_function"]
    assert custom and all(p == Replicate() for n in custom for lay in
                          (*n["inputs"], n["output"]) for p in lay)
    assert check_training(pm, ref, (x,), adamw=ADAMW) <= 1e-5
