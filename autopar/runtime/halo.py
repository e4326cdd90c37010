"""Convolutions split on a spatial dim: each rank holds a block of rows of the input and
computes the output rows that block starts, after taking from its neighbours along the mesh
axis the rows the kernel reaches across the cut (the halo).

With the input's ``size`` rows split in ``n`` blocks of ``B`` and the output's in blocks of
``B / stride``, rank ``c`` reads input rows ``c*B - lo`` to ``(c+1)*B + hi``: ``lo`` (the
padding) from the rank before and ``hi`` from the rank after, zeros past either end of the
whole (the convolution's zero padding). A negative ``hi`` leaves the last ``-hi`` rows of the
block unread. The convolution then runs on those rows with no padding along the dim.

In backward the gradient of the rows a rank took from a neighbour goes back to it and is added
into the gradient of its own rows: in a real run :func:`halo_rows` gathers every rank's edge
rows with :func:`~autopar.runtime.collectives.gather_shards`, whose backward reduce-scatters;
in a simulated run :func:`simulated_halo_rows` cuts the rows out of the neighbours' tensors,
and autograd sends their gradient back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import collectives as C

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}   # by the weight's number of dims


def halo_rows(input, *, dim: int, axis: str, lo: int, hi: int):
    """This rank's block of rows along ``dim`` (split over mesh axis ``axis``), widened by
    the ``lo`` rows before it and the ``hi`` rows after it: the neighbours' edge rows along
    ``axis``, zeros past the ends of the whole (see the module docstring)."""
    c, n = C._coord(axis), C._size(axis)
    rows, after_rows = input.shape[dim], max(hi, 0)
    edges = torch.cat([input.narrow(dim, 0, after_rows), input.narrow(dim, rows - lo, lo)], dim)
    every = C.gather_shards(edges, dim, axis)   # each rank's edges, in coordinate order
    width = after_rows + lo
    before = every.narrow(dim, (c - 1) * width + after_rows, lo) if c > 0 else None
    after = every.narrow(dim, (c + 1) * width, after_rows) if c < n - 1 else None
    return _widen(input, before, after, dim, lo, hi)


def simulated_halo_rows(named: list, groups: list) -> list:
    """:func:`halo_rows` over every rank's values at once (a simulated run): ``named`` holds
    each rank's arguments by name, ``groups`` the ranks along the axis in coordinate order."""
    out = [None] * len(named)
    for group in groups:
        first = named[group[0]]
        dim, lo, hi = first["dim"], first["lo"], first["hi"]
        xs = [named[r]["input"] for r in group]
        for c, rank in enumerate(group):
            before = xs[c - 1].narrow(dim, xs[c - 1].shape[dim] - lo, lo) if c > 0 else None
            after = xs[c + 1].narrow(dim, 0, max(hi, 0)) if c < len(group) - 1 else None
            out[rank] = _widen(xs[c], before, after, dim, lo, hi)
    return out


def _widen(x, before, after, dim: int, lo: int, hi: int):
    """``before``, ``x`` and ``after`` joined along ``dim``, zeros standing for a missing
    neighbour's rows; with ``hi`` < 0, ``x`` less its last ``-hi`` rows."""
    def zeros(count):
        shape = list(x.shape)
        shape[dim] = count
        return x.new_zeros(shape)

    own = x if hi >= 0 else x.narrow(dim, 0, x.shape[dim] + hi)
    before = zeros(lo) if before is None else before
    after = zeros(max(hi, 0)) if after is None else after
    return torch.cat([before, own, after], dim)


def conv_rows(input, weight, bias=None, *, stride: tuple, padding: tuple, dilation: tuple,
              groups: int):
    """The convolution of rows :func:`halo_rows` widened: ``padding`` holds 0 along the
    split dim, whose padding the widened rows already hold."""
    return _CONV[weight.dim()](input, weight, bias, stride, padding, dilation, groups)
