"""Pointwise ops: unary, binary with broadcasting, activations, casts, dropout.

Every output dim may be split, and inputs that broadcast along it stay replicated. Partial
values pass through ops that are linear in them: sums of Partials, a Partial times a
replicated factor, casts.
"""

from __future__ import annotations

import numbers
from dataclasses import replace

import torch
from torch.fx import Node

from .._torch import tree_leaves
from ..program.placement import is_shard
from .core import (OpSpec, P, R, broadcast_labels, einsum_options, io_bytes, register,
                   shape_of, tensor_inputs)

UNARY = [
    "relu", "gelu", "silu", "tanh", "sigmoid", "softplus", "elu", "leaky_relu", "hardtanh",
    "mish", "exp", "log", "log1p", "expm1", "sqrt", "rsqrt", "sin", "cos", "abs", "erf",
    "reciprocal", "square", "floor", "ceil", "round", "sign", "logical_not", "bitwise_not",
    "isnan", "isinf", "nan_to_num", "clamp", "clamp_min", "clamp_max", "relu6", "selu",
    "hardswish", "hardsigmoid", "logsigmoid", "dropout", "masked_fill", "where", "pow",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_xor",
    "bitwise_and", "bitwise_or", "maximum", "minimum", "fmod", "remainder", "floordiv",
    "bool", "int", "long", "zeros_like", "empty_like", "ones_like", "full_like", "rand_like",
    "randn_like", "atan2", "lerp", "copy_into", "bernoulli",
]
# Ops linear in all their tensor inputs together: Partial in, Partial out, when every
# tensor input is Partial and no scalar is added.
ADDITIVE = ["add", "sub", "neg", "pos", "rsub"]
# Ops linear in each input separately: one Partial input times replicated others.
CASTS = ["to", "type", "float", "half", "bfloat16", "double", "contiguous", "clone", "detach",
         "alias", "view_as_real", "positive"]
SCALING = ["mul", "div"]


def _labels(node):
    ins = tensor_inputs(node)
    out_shape = shape_of(node)
    in_labels, out_labels = broadcast_labels([shape_of(x) for x in ins], out_shape)
    return ins, in_labels, out_labels


def _has_scalar_operand(node) -> bool:
    return any(isinstance(a, numbers.Number) and not isinstance(a, bool)
               for a in list(node.args) + [v for k, v in node.kwargs.items() if k != "alpha"])


def _spec(node, options):
    out = node.meta["val"]
    return OpSpec(options, float(out.numel()) if isinstance(out, torch.Tensor) else 0.0,
                  io_bytes(node))


# Ops that draw random numbers: on a split value each rank draws what one device draws for
# the whole value and keeps its piece (runtime.local_ops), so masks are one device's.
WHOLE_DRAWS = {"dropout": "dropout_piece", "rand_like": "random_like_piece",
               "randn_like": "random_like_piece", "bernoulli": "bernoulli_piece"}


@register(*UNARY)
def pointwise(node):
    ins, in_labels, out_labels = _labels(node)
    op = node.meta["autopar.op"]
    if op == "bernoulli" and not isinstance(node.args[1] if len(node.args) > 1 else
                                            node.kwargs.get("p"), numbers.Number):
        # probabilities read from the input: each element's draw needs its own probability
        return _spec(node, ((tuple(R for _ in ins), R),))
    spec = _spec(node, einsum_options(in_labels, out_labels))
    if op not in WHOLE_DRAWS or not isinstance(node.meta["val"], torch.Tensor):
        return spec
    shape = shape_of(node)

    def local(in_layouts, out_layout, axis_names):
        shards = tuple((axis_names[a], p.dim, getattr(p, "segments", ()))
                       for a, p in enumerate(out_layout) if is_shard(p))
        if not shards:
            return None
        extra = {"shape": shape, "shards": shards}
        return WHOLE_DRAWS[op], extra if op in ("dropout", "bernoulli") else {**extra, "op": op}

    return replace(spec, local=local)


@register(*CASTS)
def cast(node):
    """Linear between floating-point dtypes; a cast to an integer dtype rounds each Partial
    piece separately, so it takes no Partial."""
    ins, in_labels, out_labels = _labels(node)
    out = node.meta["val"]
    floating = isinstance(out, torch.Tensor) and out.is_floating_point()
    return _spec(node, einsum_options(in_labels, out_labels,
                                      linear_in=range(len(ins)) if floating else ()))


@register(*ADDITIVE)
def additive(node):
    ins, in_labels, out_labels = _labels(node)
    options = einsum_options(in_labels, out_labels)
    if ins and not _has_scalar_operand(node):
        options += (((P,) * len(ins), P),)
    return _spec(node, options)


def _uses(node, x) -> int:
    return sum(1 for a in tree_leaves((node.args, node.kwargs)) if a is x)


@register(*SCALING)
def scaling(node):
    """mul is linear in either factor, div (without rounding) in its numerator only; neither
    is linear in a value that appears twice (``x * x``, ``x / x``)."""
    ins, in_labels, out_labels = _labels(node)
    if node.meta["autopar.op"] == "mul":
        linear = [i for i, x in enumerate(ins) if _uses(node, x) == 1]
    elif node.kwargs.get("rounding_mode") is not None:
        linear = []  # floor or trunc of each piece is not that of the sum
    else:
        first = node.args[0] if node.args else None
        linear = [0] if isinstance(first, Node) and ins and ins[0] is first \
            and _uses(node, first) == 1 else []
    return _spec(node, einsum_options(in_labels, out_labels, linear_in=linear))
