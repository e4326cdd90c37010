"""Placements and layouts.

A placement says how one tensor is held across one mesh axis; it reuses DTensor's public
values so that plans export to DTensor and DCP. A layout is a tuple with one placement per
mesh axis, printed tersely: ``S(0)R`` is sharded on dim 0 across the first axis and
replicated across the second.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from ..errors import PlanError

__all__ = ["Shard", "Replicate", "Partial", "Placement", "Layout", "format_layout",
           "parse_layout", "local_shape", "is_shard", "is_partial", "is_replicate",
           "replicated"]

Layout = tuple  # tuple[Placement, ...], one per mesh axis

R = Replicate()
P = Partial()


# Placement kinds by type: isinstance against DTensor's placement classes goes through a
# metaclass and costs microseconds, and planning asks millions of times.
def _subclasses(cls) -> frozenset:
    out, todo = {cls}, [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in out:
                out.add(sub)
                todo.append(sub)
    return frozenset(out)


_SHARD, _PARTIAL, _REPLICATE = _subclasses(Shard), _subclasses(Partial), _subclasses(Replicate)


def is_shard(p: Placement) -> bool:
    return type(p) in _SHARD


def is_partial(p: Placement) -> bool:
    return type(p) in _PARTIAL


def is_replicate(p: Placement) -> bool:
    return type(p) in _REPLICATE


def replicated(num_axes: int) -> Layout:
    return (R,) * num_axes


def format_placement(p: Placement) -> str:
    if is_shard(p):
        return f"S({p.dim})"
    if is_partial(p):
        return "P"
    return "R"


def format_layout(layout: Sequence[Placement]) -> str:
    """``(Shard(0), Replicate())`` -> ``'S(0)R'``."""
    return "".join(format_placement(p) for p in layout)


def parse_layout(text: str) -> Layout:
    """``'S(0)R'`` -> ``(Shard(0), Replicate())``; the inverse of :func:`format_layout`."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "R":
            out.append(R)
            i += 1
        elif text[i] == "P":
            out.append(P)
            i += 1
        elif text.startswith("S(", i):
            j = text.index(")", i)
            out.append(Shard(int(text[i + 2:j])))
            i = j + 1
        else:
            raise PlanError(f"cannot parse layout {text!r} at position {i}; "
                             "write placements as R, P or S(dim), e.g. 'S(0)R'")
    return tuple(out)


def shards_per_dim(layout: Sequence[Placement], mesh_shape: Sequence[int], ndim: int) -> list[int]:
    """How many pieces each tensor dim is cut into under ``layout``."""
    counts = [1] * ndim
    for p, n in zip(layout, mesh_shape):
        if is_shard(p):
            counts[p.dim] *= n
    return counts


def local_shape(shape: Sequence[int], layout: Sequence[Placement], mesh_shape: Sequence[int]) -> tuple:
    """The shape one rank holds of a tensor of global ``shape`` (even splits only)."""
    counts = shards_per_dim(layout, mesh_shape, len(shape))
    return tuple(s // c for s, c in zip(shape, counts))


def divides(shape: Sequence[int], layout: Sequence[Placement], mesh_shape: Sequence[int]) -> bool:
    """True when every sharded dim of ``shape`` splits evenly under ``layout``."""
    for p in layout:
        if is_shard(p) and not 0 <= p.dim < len(shape):
            return False
    counts = shards_per_dim(layout, mesh_shape, len(shape))
    return all(s % c == 0 for s, c in zip(shape, counts))


def shard_fraction(layout: Sequence[Placement], mesh_shape: Sequence[int]) -> float:
    """The share of a tensor's elements one rank holds."""
    return 1.0 / math.prod(n for p, n in zip(layout, mesh_shape) if is_shard(p)) \
        if any(is_shard(p) for p in layout) else 1.0
