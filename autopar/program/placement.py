"""Placements and layouts.

A placement says how one tensor is held across one mesh axis; it reuses DTensor's public
values so that plans export to DTensor and DCP. A layout is a tuple with one placement per
mesh axis, printed tersely: ``S(0)R`` is sharded on dim 0 across the first axis and
replicated across the second.

A strided shard (:class:`StridedShard`, printed ``S(2)*3`` or ``S(2)*(4,1,1)``) splits a dim
that is the concatenation of segments (a fused projection's query, key and value columns):
each rank holds its piece of every segment, side by side, so that cutting the dim into its
segments leaves each piece split evenly. It is DTensor's ``_StridedShard`` where the segments
are equal.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from ..errors import PlanError

__all__ = ["Shard", "Replicate", "Partial", "Placement", "StridedShard", "Layout",
           "format_layout", "parse_layout", "local_shape", "is_shard", "is_partial",
           "is_replicate", "replicated"]

Layout = tuple  # tuple[Placement, ...], one per mesh axis

R = Replicate()
P = Partial()


@dataclass(frozen=True)
class StridedShard:
    """Sharded on ``dim`` within each segment: the dim is the concatenation of segments
    whose sizes are in the ratios ``segments`` (``(1, 1, 1)``: three equal ones), and the
    rank at coordinate k holds the k-th piece of every segment, in segment order.

    Cutting such a value into its segments (``split``, ``chunk``, slices) leaves each
    segment plain-sharded on ``dim``; ops that treat the dim element by element (a linear
    layer's output features, a bias add) compute on the pieces as on a plain shard.
    """

    dim: int
    segments: tuple

    def __post_init__(self):
        ratios = tuple(int(r) for r in self.segments)
        if len(ratios) < 2 or min(ratios) < 1:
            raise PlanError(f"StridedShard({self.dim}, {self.segments!r}): give two or more "
                            "positive segment sizes, e.g. (1, 1, 1)")
        g = math.gcd(*ratios)
        object.__setattr__(self, "segments", tuple(r // g for r in ratios))

    def sizes(self, size: int) -> list:
        """The segments' sizes in a dim of ``size`` elements."""
        total = sum(self.segments)
        return [size * r // total for r in self.segments]

    def splits_evenly(self, size: int, pieces: int) -> bool:
        total = sum(self.segments)
        return size % total == 0 and all(s % pieces == 0 for s in self.sizes(size))

    def piece(self, t: torch.Tensor, pieces: int, k: int) -> torch.Tensor:
        """Coordinate ``k``'s piece of the whole ``t`` cut ``pieces`` ways."""
        parts = t.split(self.sizes(t.shape[self.dim]), self.dim)
        return torch.cat([p.chunk(pieces, self.dim)[k] for p in parts], self.dim)

    def join(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """The whole tensor from every coordinate's piece, in coordinate order."""
        cut = [p.split(self.sizes(p.shape[self.dim]), self.dim) for p in pieces]
        return torch.cat([c[i] for i in range(len(self.segments)) for c in cut], self.dim)

    def rank_major(self, t: torch.Tensor, pieces: int) -> torch.Tensor:
        """``t`` reordered so that each coordinate's piece is one contiguous chunk: a plain
        split of the result is this strided split of ``t``."""
        return torch.cat([self.piece(t, pieces, k) for k in range(pieces)], self.dim)


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


_SHARD = _subclasses(Shard) | {StridedShard}
_PARTIAL, _REPLICATE = _subclasses(Partial), _subclasses(Replicate)


def is_shard(p: Placement) -> bool:
    return type(p) in _SHARD


def is_partial(p: Placement) -> bool:
    return type(p) in _PARTIAL


def is_replicate(p: Placement) -> bool:
    return type(p) in _REPLICATE


def replicated(num_axes: int) -> Layout:
    return (R,) * num_axes


def is_strided(p) -> bool:
    return type(p) is StridedShard


def format_placement(p: Placement) -> str:
    if is_strided(p):
        equal = len(set(p.segments)) == 1
        return f"S({p.dim})*" + (str(len(p.segments)) if equal else
                                 "(" + ",".join(map(str, p.segments)) + ")")
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
        elif m := _SHARD_TEXT.match(text, i):
            dim, equal, ratios = m.groups()
            if equal or ratios:
                segments = (1,) * int(equal) if equal else tuple(int(r) for r in ratios.split(","))
                out.append(StridedShard(int(dim), segments))
            else:
                out.append(Shard(int(dim)))
            i = m.end()
        else:
            raise PlanError(f"cannot parse layout {text!r} at position {i}; write placements "
                            "as R, P, S(dim) or S(dim)*segments, e.g. 'S(0)R' or 'RS(1)*3'")
    return tuple(out)


_SHARD_TEXT = re.compile(r"S\((-?\d+)\)(?:\*(?:(\d+)|\(([\d,]+)\)))?")


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
    if not all(s % c == 0 for s, c in zip(shape, counts)):
        return False
    strided = [p for p in layout if is_strided(p)]
    # a strided dim is split by no other axis, and each of its segments splits evenly
    return all(counts[p.dim] == n and p.splits_evenly(shape[p.dim], n)
               for p, n in zip(layout, mesh_shape) if is_strided(p)) \
        and len({p.dim for p in strided}) == len(strided)


def shard_fraction(layout: Sequence[Placement], mesh_shape: Sequence[int]) -> float:
    """The share of a tensor's elements one rank holds."""
    return 1.0 / math.prod(n for p, n in zip(layout, mesh_shape) if is_shard(p)) \
        if any(is_shard(p) for p in layout) else 1.0
