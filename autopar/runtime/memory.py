"""What a training step really holds on this rank, to set beside ``plan.cost``.

:func:`measure_step` runs ``pm.step(*inputs)`` under :class:`LiveTensors`, a dispatch mode that
sees every op's outputs (backward's too: autograd runs them below it) and follows each
storage until it is freed, starting from the parameters, their gradients and the
optimizer's states. It works on any device, CPU included, where ``torch.cuda``'s peak
statistics do not.

    >>> held, saved, peak = measure_step(pm, optimizer, *batch)   # doctest: +SKIP
    >>> saved / pm.plan.cost.activation_bytes                     # doctest: +SKIP

TorchDispatchMode lives in a private module, as does the graph task id that tells backward
from forward; both are checked with torch 2.13.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

import torch

from .._torch import TorchDispatchMode, in_backward, tree_leaves


class LiveTensors(TorchDispatchMode):
    """Bytes of the storages alive: ``now``, ``peak`` (the most at any point), and
    ``at_backward`` (what was alive when backward first ran an op)."""

    def __init__(self):
        super().__init__()
        self._alive, self.now, self.peak = {}, 0, 0
        self.at_backward = None

    def hold(self, t) -> None:
        """Follow ``t``'s storage (once) from now on."""
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except RuntimeError:   # a tensor without storage of its own (a wrapper subclass)
            return
        if key in self._alive or size == 0:
            return
        self._alive[key] = size
        self.now += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._freed, key)

    def _freed(self, key) -> None:
        self.now -= self._alive.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.at_backward is None and in_backward():
            self.at_backward = self.now
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self.hold(t)
        return out


@dataclass(frozen=True)
class StepMemory:
    """Bytes one rank held over a step: ``held`` before it (parameters, gradients,
    optimizer states), ``saved`` beyond that when the first backward began (the activations
    saved for it, as ``cost.activation_bytes`` predicts), ``peak`` at its most (as
    ``cost.memory_bytes_per_device`` predicts)."""

    held: int
    saved: int
    peak: int


def measure_step(pm, optimizer, *inputs, **kwargs) -> StepMemory:
    """Run ``pm.step(*inputs, **kwargs)`` (forward and backward of every micro-batch, no optimizer
    step) and measure what this rank holds. Take it after a step of ``optimizer`` has made
    its states, with gradients zeroed in place (``zero_grad(set_to_none=False)``): the plan's
    memory counts them held."""
    live = LiveTensors()
    # without the cycle collector, which frees what reference cycles hold at moments that
    # vary from run to run: what a step holds is then the same on every run
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with live:
            for p in pm.parameters():
                live.hold(p)
                live.hold(p.grad)
            for state in (optimizer.state.values() if optimizer is not None else ()):
                for v in state.values():
                    live.hold(v)
            held = live.now
            pm.step(*inputs, **kwargs)
    finally:
        if enabled:
            gc.enable()
    at_backward = live.at_backward if live.at_backward is not None else live.now
    return StepMemory(held, at_backward - held, live.peak)
