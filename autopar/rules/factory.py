"""Factory ops (arange, zeros, ones, full, ...): made whole on every rank.

A consumer that wants a slice takes its own part locally, without communication. The
``new_*`` methods read only the dtype and device of their input, so any input layout does.
"""

from __future__ import annotations

from .core import OpSpec, P, R, Shard, register, shape_of, tensor_inputs

FACTORIES = ["arange", "zeros", "ones", "full", "empty", "tensor", "scalar_tensor", "eye",
             "linspace", "rand", "randn", "randint", "as_tensor"]


@register(*FACTORIES)
def factory(node):
    return OpSpec((((R,) * len(tensor_inputs(node)), R),))


@register("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor")
def new_like(node):
    ins = tensor_inputs(node)
    if not ins:
        return OpSpec((((), R),))
    ndim = len(shape_of(ins[0]))
    layouts = [R, P] + [Shard(d) for d in range(ndim)]
    return OpSpec(tuple(((p,) + (R,) * (len(ins) - 1), R) for p in layouts))
