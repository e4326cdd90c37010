"""Gradient sums of parameters, once per step, in buckets overlapped with backward.

When every use of a replicated parameter sums its gradient over the same mesh axes (data
parallel), the sum runs on the parameter's whole gradient instead of once per use: a hook
takes each gradient as autograd produces it (handing autograd zeros to accumulate in its
place, so that no second copy of it stays alive), full buckets are all-reduced
asynchronously while backward goes on, and when backward ends the summed gradients are added
into ``.grad`` (so gradient accumulation over several steps stays exact).

A step of several micro-batches runs its backwards but the last inside :meth:`deferred`:
their contributions are held, and the last backward sums each parameter's held
contributions with its own, so a step all-reduces each bucket once, not once per
micro-batch.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

from .._torch import at_end_of_backward
from ..cost.model import BUCKET_BYTES
from . import faults


class _Sync:
    """Collects (parameter, this step's local gradient) pairs per set of axes."""

    def __init__(self):
        self._queued = False
        self._deferring = False
        self.held = {}  # key -> local contribution of the deferred backwards so far

    @contextlib.contextmanager
    def deferred(self):
        """Backwards run inside hold their local contributions instead of summing them;
        the next backward outside sums those with its own."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def _hold(self, key, g) -> bool:
        """Inside :meth:`deferred`, add ``g`` to what ``key`` holds (``g`` itself the first
        time: autograd is handed zeros instead, never ``g``)."""
        if not self._deferring:
            return False
        with torch.no_grad():
            self.held[key] = g.detach() if key not in self.held else self.held[key] + g
        return True

    def _with_held(self, key, g):
        """``g`` plus what earlier backwards of this step held for ``key``."""
        held = self.held.pop(key, None)
        return g.detach() if held is None else held + g.detach()

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
        self.params = {name: (p, tuple(axes)) for name, (p, axes) in params.items()}
        for name, (p, axes) in params.items():
            p.register_hook(functools.partial(self._on_grad, name))

    def _on_grad(self, name, g):
        if not self._hold(name, g):
            self._first_of_backward()
            self._add(name, self._with_held(name, g))
        return torch.zeros_like(g)   # what autograd adds into .grad; the sum comes at the end

    def _add(self, name, g):
        p, axes = self.params[name]
        self.pending.setdefault(axes, []).append((p, g))
        self.pending_bytes[axes] = self.pending_bytes.get(axes, 0) + g.numel() * g.element_size()
        if self.pending_bytes[axes] >= BUCKET_BYTES:
            self._launch(axes)

    def _launch(self, axes):
        items = self.pending.pop(axes)
        self.pending_bytes.pop(axes)
        flat = torch.cat([g.reshape(-1) for _, g in items])
        work = dist.all_reduce(flat, group=self.mesh.get_group(axes[0]), async_op=True)
        # the gradients themselves are let go: the bucket holds them
        self.launched.append((axes, work, flat, [p for p, _ in items]))

    def finish(self):
        for name in list(self.held):  # held by earlier backwards, not reached by the last
            self._add(name, self.held.pop(name))
        for axes in list(self.pending):
            self._launch(axes)
        for axes, work, flat, items in self.launched:
            try:
                work.wait()
                for axis in axes[1:]:
                    dist.all_reduce(flat, group=self.mesh.get_group(axis))
            except Exception as error:  # a peer's failure becomes RankFailed
                raise faults.explain(error, "in backward")  # noqa: B904 - explain chains it
            _add_sums(items, flat)
        self.launched = []


class SimulatedGradSync(_Sync):
    """The same sums over every rank's copy, inside one process, in the same buckets (one
    :meth:`_launch` per bucket, as the distributed sync launches one all-reduce)."""

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
        if not self._hold((name, rank), g):
            self._first_of_backward()
            self.got.setdefault(name, {})[rank] = self._with_held((name, rank), g)
        return torch.zeros_like(g)

    def finish(self):
        for name, rank in list(self.held):
            self.got.setdefault(name, {})[rank] = self.held.pop((name, rank))
        for axes, names in self._buckets():
            self._launch(axes, names)
        self.got = {}

    def _buckets(self) -> list:
        """(axes, names) per bucket: names in the order their gradients came, cut where a
        bucket reaches BUCKET_BYTES (rank 0's sizes, as every rank's are equal)."""
        out, open_ = [], {}
        for name, local in self.got.items():
            axes = tuple(self.params[name][1])
            names, size = open_.setdefault(axes, ([], [0]))
            g = next(iter(local.values()))
            names.append(name)
            size[0] += g.numel() * g.element_size()
            if size[0] >= BUCKET_BYTES:
                out.append((axes, open_.pop(axes)[0]))
        return out + [(axes, names) for axes, (names, _) in open_.items()]

    def _launch(self, axes, names):
        with torch.no_grad():
            local = {r: torch.cat([self.got[n][r].reshape(-1) for n in names])
                     for r in self.got[names[0]]}
            summed = dict(local)
            for axis in axes:
                for group in self.mesh.groups(self.mesh.names.index(axis)):
                    total = sum(summed[r] for r in group)
                    for r in group:
                        summed[r] = total
            for r in local:
                _add_sums([self.params[n][0][r] for n in names], summed[r])


def _add_sums(params, flat):
    """Each parameter's summed gradient of this step, held in ``flat`` in order, added into
    its ``.grad`` (where autograd accumulated zeros in its place)."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.grad.add_(flat[offset:offset + n].view_as(p.grad))
            offset += n
