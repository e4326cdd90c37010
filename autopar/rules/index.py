"""Ops that pick or place values by index: gather, scatter, index_select, one_hot, indexed
assignment, and the write of a buffer's new value.

The dim an index picks along stays whole in the tensor it picks from; the index itself may be
split, and so may every dim both tensors share with the same size. Picking is linear in the
values picked from, so a Partial passes through.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from .core import (OpSpec, P, R, arg, einsum_options, io_bytes, norm_dim, register, shape_of,
                   tensor_inputs)
from .shape import basic_index_labels


def _spec(node, options):
    return OpSpec(options, 0.0, io_bytes(node))


def _replicated(node):
    return _spec(node, ((tuple(R for _ in tensor_inputs(node)), R),))


@register("gather")
def gather(node):
    """``out[i][j] = x[index[i][j]][j]`` (dim 0): the index and the output share every dim;
    ``x`` shares a dim other than ``dim`` only where its size equals the index's (elsewhere
    a local position would name another element)."""
    ins = tensor_inputs(node)
    x, index = arg(node, 0, "input"), arg(node, 2, "index")
    if len(ins) != 2 or x is index or ins[0] is not x:
        return _replicated(node)
    xs, ids = shape_of(x), shape_of(index)
    dim = norm_dim(arg(node, 1, "dim"), len(xs))
    x_l = [f"d{d}" if d != dim and xs[d] == ids[d] else None for d in range(len(xs))]
    idx_l = ["g" if d == dim else x_l[d] for d in range(len(ids))]
    return _spec(node, einsum_options([x_l, idx_l], idx_l, linear_in=(0,)))


@register("scatter", "scatter_add", "scatter_reduce")
def scatter(node):
    """``out = x; out[index[i][j]][j] = src[i][j]`` (dim 0): ``dim`` stays whole everywhere;
    another dim may be split where ``x``, the index and ``src`` have the same size there.
    ``scatter_add`` adds into ``x``: linear in ``x`` and ``src`` together, so both Partial
    give a Partial."""
    ins = tensor_inputs(node)
    x, index = arg(node, 0, "input"), arg(node, 2, "index")
    src = arg(node, 3, "src", node.kwargs.get("value"))
    tensors = [x, index] + ([src] if isinstance(src, Node) else [])
    if ins != tensors or len(set(ins)) != len(ins):
        return _replicated(node)
    shapes = [shape_of(t) for t in ins]
    dim = norm_dim(arg(node, 1, "dim"), len(shapes[0]))
    same = [d for d in range(len(shapes[0]))
            if d != dim and len({s[d] if d < len(s) else None for s in shapes}) == 1]
    labels = [[f"d{d}" if d in same else None for d in range(len(s))] for s in shapes]
    options = einsum_options(labels, labels[0])
    if node.meta["autopar.op"] == "scatter_add" and len(ins) == 3:
        options += (((P, R, P), P),)
    return _spec(node, options)


@register("index_put")
def index_put(node):
    """``x[indices] = values`` out of place (``x.index_put(indices, values)``): the dims the
    index tensors pick stay whole; the dims after them may be split, with the matching
    trailing dims of ``values``. With ``accumulate`` it adds into ``x``: linear in ``x`` and
    ``values`` together, so both Partial give a Partial."""
    ins = tensor_inputs(node)
    x, indices, values = node.args[0], arg(node, 1, "indices"), arg(node, 2, "values")
    if not isinstance(indices, (tuple, list)) or not all(isinstance(i, Node) for i in indices) \
            or ins != [x, *indices, values] or len(set(ins)) != len(ins):
        return _replicated(node)
    xs, vs = shape_of(x), shape_of(values)
    x_l = [None] * len(indices) + [f"d{d}" for d in range(len(indices), len(xs))]
    v_l = [x_l[len(xs) - len(vs) + j] if len(xs) - len(vs) + j >= len(indices)
           and vs[j] == xs[len(xs) - len(vs) + j] else None for j in range(len(vs))]
    labels = [x_l] + [[None] * len(shape_of(i)) for i in indices] + [v_l]
    options = einsum_options(labels, x_l)
    if arg(node, 3, "accumulate", False):
        options += (((P,) + (R,) * len(indices) + (P,), P),)
    return _spec(node, options)


@register("index_select")
def index_select(node):
    """``x`` keeps its other dims splittable; the picked dim comes from the 1-d index."""
    ins = tensor_inputs(node)
    x, index = arg(node, 0, "input"), arg(node, 2, "index")
    if len(ins) != 2 or x is index or ins[0] is not x:
        return _replicated(node)
    nd = len(shape_of(x))
    dim = norm_dim(arg(node, 1, "dim"), nd)
    x_l = [None if d == dim else f"d{d}" for d in range(nd)]
    out_l = x_l[:dim] + ["i"] + x_l[dim + 1:]
    return _spec(node, einsum_options([x_l, ["i"]], out_l, linear_in=(0,)))


@register("one_hot")
def one_hot(node):
    """Every dim of the ids may be split; the class dim is new and whole. Without
    ``num_classes`` the class count is the largest id, which a piece cannot know."""
    ins = tensor_inputs(node)
    if len(ins) != 1 or arg(node, 1, "num_classes", -1) < 0:
        return _replicated(node)
    labels = [f"d{d}" for d in range(len(shape_of(ins[0])))]
    return _spec(node, einsum_options([labels], labels + [None]))


@register("setitem")
def setitem(node):
    """``x[index] = value`` out of place (see ``autopar.program.graph.setitem``). With an index
    of slices and ints, a dim of ``x`` fully sliced may be split, and the dims of ``value``
    that line up with it split alike; both Partial give a Partial. A tensor index is
    replicated."""
    ins = tensor_inputs(node)
    x, index, value = node.args
    items = list(index) if isinstance(index, tuple) else [index]
    if not ins or ins[0] is not x or x is value or any(isinstance(i, Node) for i in items):
        return _replicated(node)
    shape = shape_of(x)
    x_l, region_l = basic_index_labels(shape, items)
    if not isinstance(value, Node):
        return _spec(node, einsum_options([x_l], x_l))
    region = tuple(torch.empty(shape, device="meta")[index].shape)
    vs = shape_of(value)
    off = len(region) - len(vs)
    v_l = [region_l[j + off] if vs[j] == region[j + off] else None for j in range(len(vs))]
    return _spec(node, einsum_options([x_l, v_l], x_l) + (((P, P), P),))


@register("write_buffer")
def write_buffer(node):
    """A buffer's new value stored into it (``autopar.program.graph.write_buffer``): the value
    arrives in the buffer's own layout, so that each rank stores its own piece; never a
    Partial (each rank stores what one device would)."""
    buffer, value = node.args
    labels = [f"d{d}" for d in range(len(shape_of(buffer)))]
    return OpSpec(einsum_options([labels, labels], labels), 0.0, io_bytes(node))
