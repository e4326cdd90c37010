"""Compare a parallel module with the single-device model: outputs, gradients, and parameters
after optimizer steps. Shared by the simulated and the multi-process tests."""

from __future__ import annotations

import copy

import torch
from torch.utils._pytree import tree_leaves

# fp32: every compared tensor within this relative error of the single-device value
RTOL = 1e-5


# A gradient that is mathematically zero (a key bias: softmax ignores a shift shared by a row)
# is float noise on both sides, and a bias initialized at zero holds only an optimizer step or
# two; gradients and parameters are measured against at least this share of the model's
# largest gradient or parameter entry.
GRAD_FLOOR = 1e-2


def rel_error(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """max |got - want| / max(max |want|, floor) (absolute where both are zero)."""
    diff = (got.detach().double() - want.detach().double()).abs().max().item()
    scale = max(want.detach().double().abs().max().item(), floor)
    return diff / scale if scale > 0 else diff


def assert_close(got, want, what: str, floor: float = 0.0):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_error(got, want, floor)
    assert err <= RTOL, f"{what}: relative error {err:.2e} > {RTOL:.0e}"
    return err


def loss_of(out, probe_seed=1):
    """A scalar from any output: the output itself if scalar, else a fixed random projection."""
    leaves = [x for x in tree_leaves(out) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if len(leaves) >= 1 and leaves[0].dim() == 0:
        return leaves[0]
    g = torch.Generator().manual_seed(probe_seed)
    return sum((x * torch.randn(x.shape, generator=g)).sum() for x in leaves)


def check_training(pm, ref: torch.nn.Module, inputs, kwargs=None, steps=("sgd", "adamw"),
                   adamw=None):
    """Forward, backward, then one step of each optimizer in ``steps`` (``adamw``: AdamW's
    options, ADAMW by default); after each, compare outputs, every gradient and every
    parameter. Returns the worst relative error seen."""
    kwargs = kwargs or {}
    worst = 0.0
    for i, name in enumerate(steps):
        out, want = pm(*inputs, **kwargs), ref(*inputs, **kwargs)
        for a, b in zip(tree_leaves(out), tree_leaves(want)):
            if isinstance(b, torch.Tensor):
                worst = max(worst, assert_close(a, b, f"step {i} output"))
        loss_of(out).backward()
        loss_of(want).backward()
        grads = pm.full_grad_dict()
        floor = GRAD_FLOOR * max(p.grad.abs().max().item() for p in ref.parameters()
                                 if p.grad is not None)
        for fqn, p in ref.named_parameters():
            if p.grad is not None:
                worst = max(worst, assert_close(grads[fqn], p.grad, f"step {i} grad {fqn}",
                                                floor))
        opt_cls = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
        # AdamW's first step is about lr * sign(g) wherever |g| >> eps, so an entry whose true
        # gradient is zero (a key bias: softmax ignores a shift shared by a row) would turn
        # float rounding into an lr-sized step on either side; eps keeps such entries still.
        opt_args = dict(lr=0.1) if name == "sgd" else adamw or ADAMW
        opt, ref_opt = opt_cls(pm.parameters(), **opt_args), opt_cls(ref.parameters(), **opt_args)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        state = pm.full_state_dict()
        floor = GRAD_FLOOR * max(p.detach().abs().max().item() for p in ref.parameters())
        for fqn, p in ref.named_parameters():
            worst = max(worst, assert_close(state[fqn], p, f"{name} step: parameter {fqn}",
                                            floor))
        worst = max(worst, check_buffers(state, ref, f"{name} step"))
    return worst


def check_buffers(state: dict, ref: torch.nn.Module, what: str) -> float:
    """Every buffer of ``ref`` the program holds (running statistics, counters) equal to the
    one device's: floating-point ones within RTOL (measured against at least GRAD_FLOOR of
    the largest buffer entry: a running mean of values whose true mean is zero is float
    noise on both sides), others exactly. Returns the worst error."""
    worst = 0.0
    floats = [b.detach().abs().max().item() for b in ref.buffers()
              if b.is_floating_point() and b.numel()]
    floor = GRAD_FLOOR * max(floats, default=0.0)
    for fqn, b in ref.named_buffers():
        if fqn not in state:
            continue
        if b.is_floating_point():
            worst = max(worst, assert_close(state[fqn], b, f"{what}: buffer {fqn}", floor))
        else:
            assert torch.equal(state[fqn], b), f"{what}: buffer {fqn} {state[fqn]} != {b}"
    return worst


class Whole:
    """What :func:`check_training` reads of a ParallelModule, for a module holding whole
    parameters run through ``run`` (``torch.compile(model, backend=...)``)."""

    def __init__(self, run, model: torch.nn.Module):
        self.run, self.model = run, model

    def __call__(self, *args, **kwargs):
        return self.run(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()

    def full_grad_dict(self) -> dict:
        return {fqn: p.grad for fqn, p in self.model.named_parameters()}

    def full_state_dict(self) -> dict:
        return dict(self.model.named_parameters())


def twin(model):
    """An independent copy, so the parallel module and the reference start equal."""
    return copy.deepcopy(model)


ADAMW = dict(lr=1e-3, weight_decay=0.01, eps=1e-5)  # eps: see check_training


def count_launches(pm) -> list:
    """Make ``pm``'s bucketed gradient sync count its all-reduce launches (one per bucket)
    into the returned list's single entry; a list of 0 where it has no sync."""
    count = [0]
    for stage in getattr(pm, "stages", None) or [pm]:   # a pipeline: every stage's
        sync = stage._grad_sync
        if sync is None:
            continue
        launch = sync._launch

        def counted(*args, launch=launch):
            count[0] += 1
            return launch(*args)

        sync._launch = counted
    return count


def check_steps(pm, ref: torch.nn.Module, batches, kwargs=None, adamw=None, sgd=None):
    """``loss = pm.step(*batch)`` against the single-device model, one AdamW step per batch
    (``adamw``: its options, ADAMW by default; ``sgd``: a learning rate for SGD instead): the
    loss and every gradient after each step's backward, every parameter and buffer after each
    optimizer step. Returns (worst relative error, gradient all-reduce launches per step)."""
    kwargs, adamw = kwargs or {}, adamw or ADAMW
    worst, launches = 0.0, []
    count = count_launches(pm)
    opt_cls, opt_args = (torch.optim.SGD, dict(lr=sgd)) if sgd else (torch.optim.AdamW, adamw)
    opt, ref_opt = opt_cls(pm.parameters(), **opt_args), opt_cls(ref.parameters(), **opt_args)
    for i, batch in enumerate(batches):
        before = count[0]
        loss = pm.step(*batch, **kwargs)
        launches.append(count[0] - before)
        assert not loss.requires_grad, f"step {i}: pm.step returned a loss with autograd"
        want = loss_of(ref(*batch, **kwargs))
        want.backward()
        worst = max(worst, assert_close(loss, want.detach(), f"step {i} loss"))
        grads = pm.full_grad_dict()
        floor = GRAD_FLOOR * max(p.grad.abs().max().item() for p in ref.parameters()
                                 if p.grad is not None)
        for fqn, p in ref.named_parameters():
            if p.grad is not None:
                worst = max(worst, assert_close(grads[fqn], p.grad, f"step {i} grad {fqn}",
                                                floor))
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        state = pm.full_state_dict()
        floor = GRAD_FLOOR * max(p.detach().abs().max().item() for p in ref.parameters())
        for fqn, p in ref.named_parameters():
            worst = max(worst, assert_close(state[fqn], p, f"step {i}: parameter {fqn}",
                                            floor))
        worst = max(worst, check_buffers(state, ref, f"step {i}"))
    return worst, launches


def uneven_targets(targets: torch.Tensor, micro_batches: int, ignore_index: int = -100):
    """A copy of ``targets`` with most tokens of the first micro-batch ignored and one of the
    last: a mean per micro-batch would weigh them wrongly."""
    out = targets.clone()
    rows = out.shape[0] // micro_batches
    out[:rows, 1:] = ignore_index
    out[-1, 0] = ignore_index
    return out
