"""Gradient sums of parameters, once per backward, in buckets overlapped with backward.

When every use of a replicated parameter sums its gradient over the same mesh axes (data
parallel), the sum runs on the parameter's whole gradient instead of once per use: a hook
collects each gradient as autograd produces it, full buckets are all-reduced asynchronously
while backward goes on, and when backward ends the summed gradients replace this backward's
local contribution (so gradient accumulation over several backwards stays exact).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

# DistributedDataParallel's default bucket size (bucket_cap_mb=25).
BUCKET_BYTES = 25 * 2**20


def at_end_of_backward(callback) -> None:
    """Run ``callback`` when the current backward pass finishes.

    ``Variable._execution_engine.queue_callback`` is private; it is how DDP and FSDP run code
    at the end of backward. Checked against torch 2.5 through 2.13.
    """
    torch.autograd.Variable._execution_engine.queue_callback(callback)


class _Sync:
    """Collects (parameter, this backward's gradient) pairs per set of axes."""

    def __init__(self):
        self._queued = False

    def _first_of_backward(self):
        if not self._queued:
            self._queued = True
            at_end_of_backward(self._end)

    def _end(self):
        self._queued = False
        self.finish()


class DistributedGradSync(_Sync):
    """Bucketed asynchronous all-reduces over the groups of a DeviceMesh."""

    def __init__(self, params: dict, device_mesh):
        """``params``: name -> (parameter, axis names to sum its gradient over)."""
        super().__init__()
        self.mesh = device_mesh
        self.pending, self.pending_bytes, self.launched = {}, {}, []
        for name, (p, axes) in params.items():
            p.register_hook(functools.partial(self._on_grad, p, tuple(axes)))

    def _on_grad(self, p, axes, g):
        self._first_of_backward()
        self.pending.setdefault(axes, []).append((p, g.detach()))
        self.pending_bytes[axes] = self.pending_bytes.get(axes, 0) + g.numel() * g.element_size()
        if self.pending_bytes[axes] >= BUCKET_BYTES:
            self._launch(axes)

    def _launch(self, axes):
        items = self.pending.pop(axes)
        self.pending_bytes.pop(axes)
        flat = torch.cat([g.reshape(-1) for _, g in items])
        work = dist.all_reduce(flat, group=self.mesh.get_group(axes[0]), async_op=True)
        self.launched.append((axes, work, flat, items))

    def finish(self):
        for axes in list(self.pending):
            self._launch(axes)
        for axes, work, flat, items in self.launched:
            work.wait()
            for axis in axes[1:]:
                dist.all_reduce(flat, group=self.mesh.get_group(axis))
            _replace_contributions(items, flat)
        self.launched = []


class SimulatedGradSync(_Sync):
    """The same sums over every rank's copy, inside one process."""

    def __init__(self, params: dict, mesh):
        """``params``: name -> (per-rank parameters, axis names)."""
        super().__init__()
        self.mesh = mesh
        self.got = {}
        self.params = params
        for name, (per_rank, _) in params.items():
            for r, p in enumerate(per_rank):
                p.register_hook(functools.partial(self._on_grad, name, r))

    def _on_grad(self, name, rank, g):
        self._first_of_backward()
        self.got.setdefault(name, {})[rank] = g.detach()

    def finish(self):
        with torch.no_grad():
            for name, local in self.got.items():
                per_rank, axes = self.params[name]
                summed = dict(local)
                for axis in axes:
                    for group in self.mesh.groups(self.mesh.names.index(axis)):
                        total = sum(summed[r] for r in group)
                        for r in group:
                            summed[r] = total
                for r, g in local.items():
                    per_rank[r].grad.add_(summed[r] - g)
        self.got = {}


def _replace_contributions(items, flat):
    """Each parameter's gradient: its local contribution of this backward replaced by the
    summed one held in ``flat``."""
    offset = 0
    with torch.no_grad():
        for p, g in items:
            n = g.numel()
            p.grad.add_(flat[offset:offset + n].view_as(g) - g)
            offset += n
