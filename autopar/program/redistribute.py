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

A strided shard (:class:`~autopar.program.placement.StridedShard`) is a plain shard of its
value reordered so each rank's pieces are contiguous: its steps are the plain ones with the
segments named (a gather reorders after, a slice takes the piece of every segment, a
reduce-scatter reorders before). No other axis splits its dim.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .placement import Partial, StridedShard, is_partial, is_shard, is_strided

_SUM = Partial()


@dataclass(frozen=True)
class Step:
    """One collective (or local) step on one mesh axis."""

    kind: str        # all_gather | all_reduce | reduce_scatter | all_to_all | shard | to_partial
    axis: int
    dim: int = -1    # the tensor dim gathered, sliced or scattered
    dim2: int = -1   # all_to_all: the dim split before the exchange (becomes sharded)
    segments: tuple = ()   # a strided shard's segments (all_gather, shard, reduce_scatter)


@functools.lru_cache(maxsize=None)
def plan_steps(src: tuple, dst: tuple) -> tuple:
    """The steps that take a value from layout ``src`` to layout ``dst``."""
    if src == dst:
        return ()
    return coded_steps(layout_code(src), layout_code(dst))


REPLICATED, _PARTIAL = -1, -2
# A strided shard's code: STRIDED * (1 + the id of its segments) + its dim (so >= 0, as a
# shard's); dims stay below STRIDED.
STRIDED = 1 << 12
_SEGMENTS: dict = {}   # segments -> id
_SEGMENTS_BY_ID: list = []


def strided_of(code: int) -> StridedShard | None:
    """The strided shard a layout code stands for, or None for another placement."""
    if code < STRIDED:
        return None
    return StridedShard(code % STRIDED, _SEGMENTS_BY_ID[code // STRIDED - 1])


def layout_code(layout) -> tuple:
    """A layout as ints, one per mesh axis: the dim a Shard splits, or REPLICATED, or a
    negative code for a Partial sum."""
    code = tuple(_code(p) for p in layout)
    if None in code:
        raise ValueError(f"no redistribution of layout {layout}: only Shard, Replicate and "
                         "Partial (a sum) are moved")
    return code


def _code(p) -> int | None:
    """A placement as an int: the dim a Shard splits, or REPLICATED, or _PARTIAL (sums);
    None for a Partial that is not a sum."""
    if is_strided(p):
        if p.segments not in _SEGMENTS:
            _SEGMENTS[p.segments] = len(_SEGMENTS_BY_ID)
            _SEGMENTS_BY_ID.append(p.segments)
        return STRIDED * (1 + _SEGMENTS[p.segments]) + p.dim
    if is_shard(p):
        return p.dim
    if is_partial(p):
        return _PARTIAL if p == _SUM else None
    return REPLICATED


@functools.lru_cache(maxsize=None)
def coded_steps(src: tuple, dst: tuple) -> tuple:
    """:func:`plan_steps` over layouts as :func:`layout_code` writes them."""
    if max(src + dst, default=0) < STRIDED:
        return _plain_steps(src, dst)
    # a strided axis that changes is gathered first (reordered to the whole value); an
    # axis that becomes strided is planned as a plain shard of its dim (a slice or a
    # reduce-scatter, which take the segments) unless it is already sharded plainly there
    first, cur, target, become = [], list(src), list(dst), {}
    for i, (s, d) in enumerate(zip(src, dst)):
        if s >= STRIDED and s != d:
            p = strided_of(s)
            first.append(Step("all_gather", i, p.dim, segments=p.segments))
            cur[i] = REPLICATED
    for i, d in enumerate(dst):
        if d >= STRIDED and cur[i] != d:
            p = become[i] = strided_of(d)
            target[i] = REPLICATED if 0 <= cur[i] < STRIDED else p.dim
    steps = list(first)
    for step in _plain_steps(tuple(cur), tuple(target)):
        p = become.get(step.axis)
        if p is not None and step.kind in ("shard", "reduce_scatter") and step.dim == p.dim:
            step = Step(step.kind, step.axis, step.dim, segments=p.segments)
            del become[step.axis]
        steps.append(step)
    for i, p in become.items():   # gathered whole above (it was sharded plainly): slice it
        if target[i] != REPLICATED:
            raise ValueError(f"no strided redistribution from {src} to {dst}")
        steps.append(Step("shard", i, p.dim, segments=p.segments))
    return tuple(steps)


def _plain_steps(src: tuple, dst: tuple) -> tuple:
    n = len(src)
    cur = list(src)
    unshard = {i for i in range(n) if src[i] != dst[i]}
    # an axis may only split or unsplit dim d once every later (inner) axis splitting d has
    # been undone; those are gathered here and split again afterwards
    changed = True
    while changed:
        changed = False
        for i in sorted(unshard):
            dims = {d for d in (src[i], dst[i]) if d >= 0}
            for j in range(i + 1, n):
                if j not in unshard and src[j] >= 0 and src[j] in dims:
                    unshard.add(j)
                    changed = True
    steps = []
    for i in sorted(unshard, reverse=True):
        s, d = cur[i], dst[i]
        if s == REPLICATED:
            continue
        # a single-axis collective on a dim is exact only where no other axis splits it,
        # now or at the end
        split = {cur[j] for j in range(n) if j != i} | {dst[j] for j in range(n) if j != i}
        if s >= 0:
            if d >= 0 and d != s and d not in split and s not in split:
                steps.append(Step("all_to_all", i, s, d))
                cur[i] = d
                continue
            steps.append(Step("all_gather", i, s))
            cur[i] = REPLICATED
        else:
            if d >= 0 and d not in split:
                steps.append(Step("reduce_scatter", i, d))
                cur[i] = d
                continue
            steps.append(Step("all_reduce", i))
            cur[i] = REPLICATED
    for i in range(n):
        if cur[i] == dst[i]:
            continue
        if dst[i] >= 0:
            steps.append(Step("shard", i, dst[i]))
        elif dst[i] == _PARTIAL:
            steps.append(Step("to_partial", i))
        cur[i] = dst[i]
    return tuple(steps)


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
