"""Convolutions split on image rows: a batch of one image through an all-convolution network,
each device its own rows of every activation, taking the kernel's halo from its neighbours.
Training matches one device in outputs, every gradient and parameters after SGD and AdamW."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import autopar
from autopar import Shard
from autopar.cost.model import CostModel
from autopar.passes import ANALYSIS, PassContext, run_passes
from autopar.program.capture import capture
from autopar.program.mesh import Mesh
from autopar.rules import strategies
from equivalence import check_training, twin
from test_e2e_simulated import slow_devices

MESHES = {"sp4": {"sp": 4}, "dp2xsp2": {"dp": 2, "sp": 2}}


class ConvNet(nn.Module):
    """Three 3x3 convolutions (padding 1) with ReLUs between, on 3-channel images."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.a = nn.Conv2d(3, width, 3, padding=1)
        self.b = nn.Conv2d(width, width, 3, padding=1)
        self.c = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def make_conv_net(seed: int = 0):
    """The network and one 3x32x32 image (a batch of one: the batch cannot split)."""
    torch.manual_seed(seed)
    return ConvNet(), (torch.randn(1, 3, 32, 32),)


def rows_split(mesh: dict) -> dict:
    """The image pinned split on its rows over the last mesh axis."""
    return {"x": "R" * (len(mesh) - 1) + "S(2)"}


@pytest.mark.parametrize("mesh", list(MESHES))
def test_conv_net_split_on_rows_trains_as_one_device(mesh):
    model, args = make_conv_net()
    ref = twin(model)
    axes = MESHES[mesh]
    pm = autopar.compile(model, slow_devices(math.prod(axes.values())), example_inputs=args,
                         simulate=True, mesh=axes, constraints=rows_split(axes))
    assert pm.code.count("halo_rows(") == 3 and "conv_rows(" in pm.code, pm.code
    worst = check_training(pm, ref, args)
    assert worst <= 1e-5


def test_halo_exchange_is_priced_by_the_rows_it_moves():
    """The planner pays for a split convolution's halo: every rank's edge rows (one before
    its block, one after, for a 3x3 kernel with padding 1) all-gathered forward, and their
    gradient reduce-scattered back, except for the image, which takes no gradient."""
    model, args = make_conv_net()
    captured = capture(model, args)
    run_passes(captured.gm, PassContext(example_inputs=captured.example_inputs,
                                        param_fqns=captured.param_fqns), ANALYSIS)
    convs = [n for n in captured.gm.graph.nodes if n.meta.get("autopar.op") == "conv2d"]
    mesh = Mesh(("sp",), (4,))
    cost = CostModel(slow_devices(4), mesh)
    for conv, channels, backward in zip(convs, (3, 32), (False, True)):
        split = [s for s in strategies(conv, mesh.shape) if s.inputs[0] == (Shard(2),)]
        assert len(split) == 1 and split[0].output == (Shard(2),)
        rows = 4 * 2 * channels * 32 * 4   # 4 ranks, 2 rows each, fp32
        want = cost.collective_s("all_gather", 0, rows) * (2 if backward else 1)
        assert split[0].spec.exchange(split[0].inputs, split[0].output, cost) == \
            pytest.approx(want) != 0
