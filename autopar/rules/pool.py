"""Pooling: max, average, power-average and adaptive pooling over 1, 2 or 3 spatial dims.

``*lead, *spatial -> *lead, *pooled``: the leading dims (batch and channels, or channels
alone unbatched) may be split, each plane pooled on its own; the spatial dims stay whole (a
split would need the neighbours' halo, and an adaptive pool's windows depend on the whole
size). Averages are linear, so a Partial passes through them; maxima are not. The
``*_with_indices`` spellings, and a max pool asked for its indices, return the pooled values
and their indices, one shape, laid out alike; an index counts within its own plane, so it
is the same on a split plane.
"""

from __future__ import annotations

import math

from .core import (OpSpec, arg, einsum_options, io_bytes, register, replicated_options, shape_of,
                   tensor_inputs)

# canonical name -> (spatial dims, linear in the input)
_POOLS = {}
for _k in (1, 2, 3):
    _POOLS.update({f"max_pool{_k}d": (_k, False), f"max_pool{_k}d_with_indices": (_k, False),
                   f"adaptive_max_pool{_k}d": (_k, False),
                   f"adaptive_max_pool{_k}d_with_indices": (_k, False),
                   f"avg_pool{_k}d": (_k, True), f"adaptive_avg_pool{_k}d": (_k, True),
                   f"lp_pool{_k}d": (_k, False)})


@register(*_POOLS)
def pool(node):
    ins = tensor_inputs(node)
    if len(ins) != 1:
        return OpSpec(replicated_options(len(ins)), 0.0, io_bytes(node))
    k, linear = _POOLS[node.meta["autopar.op"]]
    shape = shape_of(ins[0])
    labels = [f"d{i}" for i in range(len(shape) - k)] + [None] * k
    options = einsum_options([labels], labels, linear_in=(0,) if linear else ())
    return OpSpec(options, _flops(node, shape, k), io_bytes(node))


def _flops(node, in_shape, k: int) -> float:
    """One operation per element of each window: the input's size for an adaptive pool
    (its windows tile the input), the output's times the window's for a fixed kernel."""
    if node.meta["autopar.op"].startswith("adaptive"):
        return float(math.prod(in_shape))
    kernel = arg(node, 2 if node.meta["autopar.op"].startswith("lp") else 1, "kernel_size", 1)
    window = math.prod(kernel) if isinstance(kernel, (list, tuple)) else kernel ** k
    return float(math.prod(shape_of(node)) * window)
