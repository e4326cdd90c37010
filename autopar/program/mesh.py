"""The logical device mesh: devices arranged in named axes, ranks in row-major order."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping

from ..errors import PlanError


@dataclass(frozen=True)
class Mesh:
    """Named axes over ``size`` ranks; the last axis varies fastest (innermost)."""

    names: tuple
    shape: tuple

    @classmethod
    def from_dict(cls, axes: Mapping[str, int]) -> "Mesh":
        if not axes:
            raise PlanError("mesh is empty; give at least one axis, e.g. mesh={'dp': 4}")
        for name, size in axes.items():
            if not isinstance(name, str) or not isinstance(size, int) or size < 1:
                raise PlanError(f"mesh axis {name!r}: {size!r} is not a positive int size; "
                                "write the mesh as {'dp': 2, 'tp': 2}")
        return cls(tuple(axes), tuple(axes.values()))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def as_dict(self) -> dict:
        return dict(zip(self.names, self.shape))

    def axis_index(self, axis) -> int:
        if isinstance(axis, int):
            return axis
        return self.names.index(axis)

    def coordinate(self, rank: int) -> tuple:
        coord = []
        for n in reversed(self.shape):
            coord.append(rank % n)
            rank //= n
        return tuple(reversed(coord))

    def rank_of(self, coord) -> int:
        rank = 0
        for c, n in zip(coord, self.shape):
            rank = rank * n + c
        return rank

    def groups(self, axis) -> list:
        """Rank groups along ``axis``: each list holds the ranks that differ only there,
        ordered by their coordinate on that axis."""
        a = self.axis_index(axis)
        others = [range(n) for i, n in enumerate(self.shape) if i != a]
        out = []
        for rest in itertools.product(*others):
            group = []
            for c in range(self.shape[a]):
                coord = list(rest)
                coord.insert(a, c)
                group.append(self.rank_of(coord))
            out.append(group)
        return out

    def __str__(self) -> str:
        return "{" + ", ".join(f"{k}: {v}" for k, v in zip(self.names, self.shape)) + "}"
