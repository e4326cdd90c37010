"""The redistribution table: every pair of layouts on meshes (2,), (4,), (2, 2) and (2, 2, 2)
moves a value exactly, forward and backward, in simulated mode."""

from __future__ import annotations

import itertools

import pytest
import torch

from autopar.program.mesh import Mesh
from autopar.program.placement import (Partial, Replicate, Shard, StridedShard, divides,
                                       format_layout)
from autopar.program.redistribute import plan_steps
from autopar.runtime.collectives import step_call
from autopar.runtime.module import shard_tensor
from autopar.runtime.simulate import run_collective

PLACEMENTS = [Replicate(), Partial(), Shard(0), Shard(1)]
# strided shards: equal segments on dim 1, unequal ones (2 and 6 rows) on dim 0
STRIDED = [StridedShard(1, (1, 1)), StridedShard(0, (1, 3))]
SHAPE = (8, 8)


def pieces(full, layout, mesh, seed=0):
    """Per-rank values of ``full`` in ``layout``: shards, with Partial axes as random summands."""
    g = torch.Generator().manual_seed(seed)
    out = [shard_tensor(full, layout, mesh, mesh.coordinate(r)).clone() for r in range(mesh.size)]
    for a, p in enumerate(layout):
        if isinstance(p, Partial):
            for group in mesh.groups(a):
                # the first rank of each group holds the value less the others' summands
                noise = [torch.randn(out[group[0]].shape, generator=g) for _ in group[1:]]
                out[group[0]] = out[group[0]] - sum(noise)
                for r, z in zip(group[1:], noise):
                    out[r] = z
    return out


def combine(values, layout, mesh):
    """Inverse of :func:`pieces` (for checking): the full value the per-rank values stand for."""
    vals = list(values)
    for step in plan_steps(tuple(layout), (Replicate(),) * mesh.ndim):
        fn, extra = step_call(step, mesh.names)
        vals = run_collective(fn, vals, mesh, extra)
    return vals[0]


def cases():
    for shape in [(2,), (4,), (2, 2), (2, 2, 2)]:
        mesh = Mesh(tuple(f"a{i}" for i in range(len(shape))), shape)
        layouts = [l for l in itertools.product(PLACEMENTS, repeat=len(shape))
                   if divides(SHAPE, l, shape)]
        for src in layouts:
            for dst in layouts:
                if len(shape) == 3 and (src.count(Replicate()) + dst.count(Replicate())) < 3:
                    continue  # keep the 3-axis sweep to a representative part
                yield pytest.param(mesh, src, dst, id=f"{shape}-{format_layout(src)}->"
                                                      f"{format_layout(dst)}")


def strided_cases():
    """Every move into or out of a layout holding a strided shard, on (2,), (4,), (2, 2)."""
    for shape in [(2,), (4,), (2, 2)]:
        mesh = Mesh(tuple(f"a{i}" for i in range(len(shape))), shape)
        layouts = [l for l in itertools.product(PLACEMENTS + STRIDED, repeat=len(shape))
                   if divides(SHAPE, l, shape)]
        for src in layouts:
            for dst in layouts:
                if any(p in STRIDED for p in src + dst) and src != dst:
                    yield pytest.param(mesh, src, dst, id=f"{shape}-{format_layout(src)}->"
                                                          f"{format_layout(dst)}")


@pytest.mark.parametrize("mesh,src,dst", list(cases()) + list(strided_cases()))
def test_redistribute_moves_value_exactly(mesh, src, dst):
    torch.manual_seed(0)
    full = torch.randn(SHAPE)
    before = [v.requires_grad_() for v in pieces(full, src, mesh)]
    vals = list(before)
    for step in plan_steps(src, dst):
        fn, extra = step_call(step, mesh.names)
        vals = run_collective(fn, vals, mesh, extra)
    got = combine(vals, dst, mesh) if any(isinstance(p, Partial) for p in dst) else None
    want_pieces = [shard_tensor(full, dst, mesh, mesh.coordinate(r)) for r in range(mesh.size)]
    if got is None:
        for r, (v, w) in enumerate(zip(vals, want_pieces)):
            torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-5, msg=f"rank {r}")
    else:
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    # backward: a gradient consistent with dst (each rank's slice of one full gradient, or
    # the full gradient where dst is replicated or partial) comes back consistent with src
    grad_full = torch.randn(SHAPE)
    grads = [shard_tensor(grad_full, tuple(Replicate() if isinstance(p, Partial) else p
                                           for p in dst), mesh, mesh.coordinate(r))
             for r in range(mesh.size)]
    torch.autograd.backward(vals, grads)
    src_grad_layout = tuple(Replicate() if isinstance(p, Partial) else p for p in src)
    for r, v in enumerate(before):
        want = shard_tensor(grad_full, src_grad_layout, mesh, mesh.coordinate(r))
        torch.testing.assert_close(v.grad, want, rtol=1e-5, atol=1e-5, msg=f"grad rank {r}")
