"""Local computations that depend on the rank's place on the mesh.

An op rule names one of these by its name here (``OpSpec.local``) for layouts whose local work
is not the op itself on the local pieces. Each takes the axes it depends on; it reads this rank's
coordinates from the active DeviceMesh, or, in a simulated run (all ranks in one process),
from ``coords`` (axis name -> (coordinate, size)), which the simulator passes.
"""

from __future__ import annotations

import torch


def rank_aware(fn):
    """Mark ``fn`` as reading the rank's coordinates: the simulator passes ``coords``."""
    fn.rank_aware = True
    return fn


def _place(axes: tuple, coords) -> tuple:
    """(index, count) of this rank's block when a dim is split over ``axes``, outer first."""
    if coords is None:
        from .collectives import _coord, _size
        coords = {a: (_coord(a), _size(a)) for a in axes}
    index, count = 0, 1
    for a in axes:
        c, n = coords[a]
        index, count = index * n + c, count * n
    return index, count


@rank_aware
def grouped_mm_local_experts(x, w, offs, *, axes: tuple, coords=None):
    """Expert parallel ``grouped_mm_fallback(x, w, offs)``: ``w`` holds this rank's experts
    (the weight split on its expert dim over ``axes``); the rows of those experts are
    computed, every other row is zero, and the sum over the ranks is the whole output.

    ``x`` (rows grouped by expert) and ``offs`` (each expert's cumulative row end) are whole.
    """
    index, _ = _place(axes, coords)
    per_rank = w.shape[0]
    first = index * per_rank
    ends = offs.tolist()
    start = ends[first - 1] if first else 0
    stop = ends[first + per_rank - 1]
    local = offs[first:first + per_rank] - start
    y = torch.ops.transformers.grouped_mm_fallback(x[start:stop], w, local.to(offs.dtype))
    zeros = y.new_zeros
    return torch.cat([zeros(start, y.shape[1]), y, zeros(x.shape[0] - stop, y.shape[1])])
