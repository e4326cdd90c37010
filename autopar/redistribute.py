"""Moving a value between layouts: the one table every edge of the program goes through.

Per mesh axis (the design's table):

    from -> to      forward             backward
    S(i) -> R       all_gather(i)       take own slice of the replicated gradient
    R -> S(i)       take own slice      all_gather(i) of gradient slices
    P -> R          all_reduce          identity
    P -> S(i)       reduce_scatter(i)   all_gather(i)
    S(i) -> S(j)    all_to_all          all_to_all back
    R -> P          keep on coordinate 0, zeros elsewhere     identity

A dim split over several axes is split outer axis first (as DTensor does), so gathers run
innermost axis first and an axis is only unsharded after every inner axis splitting the same
dim has been.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .placement import Replicate, is_partial, is_shard

R = Replicate()


@dataclass(frozen=True)
class Step:
    """One collective (or local) step on one mesh axis."""

    kind: str        # all_gather | all_reduce | reduce_scatter | all_to_all | shard | to_partial
    axis: int
    dim: int = -1    # the tensor dim gathered, sliced or scattered
    dim2: int = -1   # all_to_all: the dim split before the exchange (becomes sharded)


@functools.lru_cache(maxsize=None)
def plan_steps(src: tuple, dst: tuple) -> tuple:
    """The steps that take a value from layout ``src`` to layout ``dst``."""
    if src == dst:
        return ()
    n = len(src)
    cur = list(src)
    unshard = {i for i in range(n) if src[i] != dst[i]}
    # an axis may only split or unsplit dim d once every later (inner) axis splitting d has
    # been undone; those are gathered here and split again afterwards
    changed = True
    while changed:
        changed = False
        for i in sorted(unshard):
            dims = {p.dim for p in (src[i], dst[i]) if is_shard(p)}
            for j in range(i + 1, n):
                if j not in unshard and is_shard(src[j]) and src[j].dim in dims:
                    unshard.add(j)
                    changed = True
    steps = []
    for i in sorted(unshard, reverse=True):
        s, d = cur[i], dst[i]
        others = [cur[j] for j in range(n) if j != i] + [dst[j] for j in range(n) if j != i]
        if is_shard(s):
            if is_shard(d) and d != s and _free(d.dim, others) and \
                    _free(s.dim, others):
                steps.append(Step("all_to_all", i, s.dim, d.dim))
                cur[i] = d
                continue
            steps.append(Step("all_gather", i, s.dim))
            cur[i] = R
        elif is_partial(s):
            if is_shard(d) and _free(d.dim, others):
                steps.append(Step("reduce_scatter", i, d.dim))
                cur[i] = d
                continue
            steps.append(Step("all_reduce", i))
            cur[i] = R
    for i in range(n):
        if cur[i] == dst[i]:
            continue
        if is_shard(dst[i]):
            steps.append(Step("shard", i, dst[i].dim))
        elif is_partial(dst[i]):
            steps.append(Step("to_partial", i))
        cur[i] = dst[i]
    return tuple(steps)


def _free(dim: int, placements) -> bool:
    """No other axis splits ``dim`` (so a single-axis collective on it is exact)."""
    return not any(is_shard(p) and p.dim == dim for p in placements)


def step_bytes(step: Step, num_bytes_local: float, axis_size: int) -> float:
    """Bytes one rank sends in ``step`` (ring algorithms), given its local bytes before it."""
    n = axis_size
    if step.kind == "all_gather":
        return num_bytes_local * (n - 1)
    if step.kind == "all_reduce":
        return 2 * num_bytes_local * (n - 1) / n
    if step.kind in ("reduce_scatter", "all_to_all"):
        return num_bytes_local * (n - 1) / n
    return 0.0


def local_bytes_after(step: Step, num_bytes_local: float, axis_size: int) -> float:
    if step.kind == "all_gather":
        return num_bytes_local * axis_size
    if step.kind in ("reduce_scatter", "shard"):
        return num_bytes_local / axis_size
    return num_bytes_local
