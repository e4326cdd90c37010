"""Models that update their own state in training: BatchNorm's running statistics and step
counter, a user's moving-average buffer. Each rank's copy of every buffer holds what one
device's holds after every step; with the batch split, statistics are the whole batch's
(SyncBatchNorm's semantics), so the program still computes the single-device function."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import autopar
from equivalence import check_buffers, check_steps, check_training, twin
from test_e2e_simulated import slow_devices

MESHES = {"2": {"dp": 2}, "4": {"dp": 4}, "2x2": {"dp": 2, "tp": 2}}
BATCH = 8


class BatchNormNet(nn.Module):
    """Two (convolution or linear, BatchNorm, ReLU) blocks and a linear head over the mean of
    the spatial dims, returning a loss; ``dims`` 1 takes (N, C) inputs, 2 and 3 images."""

    def __init__(self, dims: int, channels: int = 8):
        super().__init__()
        conv = {1: None, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        c_in = 12 if dims == 1 else 3
        if conv is None:
            self.a = nn.Linear(c_in, channels, bias=False)
            self.b = nn.Linear(channels, channels, bias=False)
        else:
            self.a = conv(c_in, channels, 3, padding=1, bias=False)
            self.b = conv(channels, channels, 3, padding=1, bias=False)
        self.norm_a, self.norm_b = norm(channels), norm(channels, momentum=0.3)
        self.head = nn.Linear(channels, 4)
        self.dims = dims

    def forward(self, x, target):
        y = torch.relu(self.norm_a(self.a(x)))
        y = torch.relu(self.norm_b(self.b(y)))
        if self.dims > 1:
            y = y.mean(tuple(range(2, y.dim())))
        return nn.functional.mse_loss(self.head(y), target)


def make_bn(dims: int, seed: int = 0):
    torch.manual_seed(seed)
    model = BatchNormNet(dims)
    shape = {1: (BATCH, 12), 2: (BATCH, 3, 6, 6), 3: (BATCH, 3, 4, 4, 4)}[dims]
    return model, (torch.randn(shape), torch.randn(BATCH, 4))


def batches(dims: int, count: int = 3):
    return [make_bn(dims, seed=s)[1] for s in range(1, count + 1)]


def batch_split(mesh: dict) -> dict:
    """The inputs split over the batch on every axis, the rest left to the planner."""
    return {"x": "S(0)" * len(mesh), "target": "S(0)" * len(mesh)}


@pytest.mark.parametrize("mesh_id", list(MESHES))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_batch_norm_trains_as_one_device_with_the_batch_split(dims, mesh_id):
    """Three SGD steps on three batches: loss, every gradient, every parameter and every
    buffer (running mean and variance, the step counter) equal to one device's."""
    mesh = MESHES[mesh_id]
    model, args = make_bn(dims)
    ref = twin(model)
    pm = autopar.compile(model, slow_devices(math.prod(mesh.values())),
                         example_inputs=args, mesh=mesh, constraints=batch_split(mesh),
                         simulate=True)
    worst, _ = check_steps(pm, ref, batches(dims), sgd=0.1)
    assert worst <= 1e-5
    assert int(pm.full_state_dict()["norm_a.num_batches_tracked"]) == 3


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_batch_norm_statistics_are_summed_over_the_split_batch(dims):
    """Each rank normalizes its rows by the whole batch's mean and variance: under data
    parallel, the sums behind them are partial sums over the axis the batch is split on,
    which a collective adds up before use."""
    model, args = make_bn(dims)
    pm = autopar.compile(model, slow_devices(2), example_inputs=args, mesh={"dp": 2},
                         constraints={"*": "R", "x": "S(0)", "target": "S(0)"},
                         simulate=True)
    sums = [line for line in pm.code.splitlines() if "torch.sum(" in line and ", True)" in line]
    assert len(sums) == 4 and all(line.endswith("# P") for line in sums), pm.code


@pytest.mark.parametrize("mesh_id", ["2", "2x2"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_batch_norm_in_eval_mode_uses_the_running_statistics(dims, mesh_id):
    """After training steps on one device, eval() normalizes by the running statistics:
    outputs and gradients equal to one device's, and no buffer changes."""
    mesh = MESHES[mesh_id]
    model, args = make_bn(dims)
    with torch.no_grad():
        for x, t in batches(dims):
            model(x, t)
    model.eval()
    ref = twin(model)
    pm = autopar.compile(model, slow_devices(math.prod(mesh.values())), example_inputs=args,
                         mesh=mesh, constraints=batch_split(mesh), simulate=True)
    assert "write_buffer" not in pm.code
    assert check_training(pm, ref, args, steps=("sgd",)) <= 1e-5
    check_buffers(pm.full_state_dict(), model, "eval")


def test_batch_norm_in_bfloat16_normalizes_in_fp32_as_torch_does():
    """torch's kernels compute a half or bfloat16 input's statistics and normalization in
    fp32: so does the split program (bfloat16 throughout would be an ulp, 4e-3, off)."""
    model, (x, t) = make_bn(1)
    model = model.bfloat16()
    ref = twin(model)
    x, t = x.bfloat16(), t.bfloat16()
    pm = autopar.compile(model, slow_devices(2), example_inputs=(x, t), mesh={"dp": 2},
                         constraints=batch_split({"dp": 2}), simulate=True)
    torch.testing.assert_close(pm(x, t), ref(x, t), rtol=1e-3, atol=0)


class MovingAverage(nn.Module):
    """A user's buffers: an exponential moving average of the activations' mean updated in
    place with mul_ then add_, a step counter, and a copy_ of the last batch's maximum."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("ema", torch.zeros(8))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("peak", torch.zeros(8))

    def forward(self, x):
        y = torch.tanh(self.proj(x))
        self.ema.mul_(0.9).add_(0.1 * y.detach().mean(0))
        self.steps += 1
        self.peak.copy_(y.detach().amax(0))
        return (y * self.ema).square().sum()


def train_split_batch(make, mesh_id: str, lr: float) -> dict:
    """Three SGD steps of ``make()`` with its batch of (8, 8) inputs split on every axis:
    losses, gradients, parameters and buffers checked against one device. Returns the
    full state after them."""
    mesh = MESHES[mesh_id]
    torch.manual_seed(0)
    model = make()
    ref = twin(model)
    x = torch.randn(BATCH, 8)
    pm = autopar.compile(model, slow_devices(math.prod(mesh.values())), example_inputs=(x,),
                         mesh=mesh, constraints={"x": "S(0)" * len(mesh)}, simulate=True)
    worst, _ = check_steps(pm, ref, [(torch.randn(BATCH, 8),) for _ in range(3)], sgd=lr)
    assert worst <= 1e-5
    return pm.full_state_dict()


@pytest.mark.parametrize("mesh_id", list(MESHES))
def test_user_buffers_written_in_place_match_one_device(mesh_id):
    assert int(train_split_batch(MovingAverage, mesh_id, lr=0.1)["steps"]) == 3


def test_micro_batches_are_refused_where_batch_statistics_or_buffer_writes_bind():
    """Statistics of the whole batch and once-a-step writes do not split into micro-batches:
    an explicit request names each op, and the planner keeps one micro-batch."""
    model, args = make_bn(2)
    with pytest.raises(autopar.PlanError, match=r"(?s)write_buffer.*writes a buffer.*"
                                                r"a sum over the batch"):
        autopar.plan(model, slow_devices(2), example_inputs=args, micro_batches=2)


class WritesByIndex(nn.Module):
    """A cache written in place through an indexed view (``buf[i].add_``), and a fresh
    tensor filled by slices (``out[..., :n].copy_``, as DeepSeek-V3 builds its keys)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(4, 8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        self.seen[0].add_(x.detach().sum(0))
        y = self.proj(x)
        both = y.new_empty(y.shape[0], 16)
        both[:, :8].copy_(y)
        both[:, 8:].copy_(torch.tanh(y))
        return (both * self.seen.sum()).square().sum()


@pytest.mark.parametrize("mesh_id", ["2", "2x2"])
def test_in_place_writes_through_an_indexed_view_reach_the_base(mesh_id):
    assert train_split_batch(WritesByIndex, mesh_id, lr=0.01)["seen"].abs().sum() > 0


def test_in_place_writes_into_other_views_read_later_are_refused():
    class Writes(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(4, 8))
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            self.seen.view(-1).add_(1.0)
            return self.proj(x).sum()

    with pytest.raises(autopar.CaptureError, match=r"view of buffer 'seen'.*copy_"):
        autopar.plan(Writes(), slow_devices(2), example_inputs=(torch.randn(4, 8),))

    class Transposed(nn.Module):
        def forward(self, x):
            x = x * 2
            x.t().mul_(3)
            return x.sum()

    with pytest.raises(autopar.CaptureError, match=r"mul_ writes into .*a view of .*read later"):
        autopar.plan(Transposed(), slow_devices(2), example_inputs=(torch.randn(4, 8),))
