"""View ops: reshape, transpose, expand, split and concatenate, indexing, padding.

A reshape keeps a split only on the leading dim of each group of dims it merges or splits,
where contiguous chunks stay contiguous; the size arguments of view, reshape and expand are
rewritten to the local shape by codegen through each spec's ``rewrite``.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..program.placement import Shard, StridedShard
from .core import (SEGMENTS, OpSpec, P, R, arg, einsum_options, io_bytes, norm_dim, out_vals,
                   register, shape_of, spec_for, tensor_inputs)


def reshape_labels(in_shape, out_shape):
    """Labels mapping a reshape's input dims to its output dims (``None``: never split)."""
    in_l = [None] * len(in_shape)
    out_l = [None] * len(out_shape)
    ins = [i for i, s in enumerate(in_shape) if s != 1]
    outs = [j for j, s in enumerate(out_shape) if s != 1]
    a = b = 0
    while a < len(ins) and b < len(outs):
        ga, gb = [ins[a]], [outs[b]]
        pa, pb = in_shape[ins[a]], out_shape[outs[b]]
        while pa != pb:
            if pa < pb:
                a += 1
                pa *= in_shape[ins[a]]
                ga.append(ins[a])
            else:
                b += 1
                pb *= out_shape[outs[b]]
                gb.append(outs[b])
        label = f"g{len(ga)}_{ga[0]}"
        in_l[ga[0]] = out_l[gb[0]] = label
        a += 1
        b += 1
    return in_l, out_l


def _rewrite_sizes(args, kwargs, local_shape):
    """``x.view(2, 3)`` / ``x.view((2, 3))`` / ``torch.reshape(x, (2, 3))`` -> local sizes."""
    if "size" in kwargs or "shape" in kwargs:
        key = "size" if "size" in kwargs else "shape"
        return args, {**kwargs, key: tuple(local_shape)}
    return (args[0], tuple(local_shape)), kwargs


def _spec(node, options, rewrite=None):
    return OpSpec(options, 0.0, io_bytes(node), rewrite=rewrite)


@register("view", "reshape", "flatten", "unsqueeze", "squeeze", "view_as", "ravel")
def reshape(node):
    ins = tensor_inputs(node)
    x = ins[0]
    in_l, out_l = reshape_labels(shape_of(x), shape_of(node))
    in_labels = [in_l] + [out_l] * (len(ins) - 1)  # view_as(other): other shaped as the output
    op = node.meta["autopar.op"]
    rewrite = _rewrite_sizes if op in ("view", "reshape") else None
    if op == "view" and len(node.args) == 2 and not isinstance(node.args[1], (int, list, tuple)):
        rewrite = None  # view(dtype)
    if op == "squeeze":
        rewrite = _squeeze_rewrite(node, shape_of(x))
    return _spec(node, einsum_options(in_labels, out_l, linear_in=(0,)), rewrite)


def _squeeze_rewrite(node, shape):
    """Name the dims squeezed globally: a split dim whose local size is 1 must stay."""
    dim = arg(node, 1, "dim")
    dims = range(len(shape)) if dim is None else dim if isinstance(dim, (list, tuple)) else [dim]
    kept = tuple(d for d in (norm_dim(d, len(shape)) for d in dims) if shape[d] == 1)
    return lambda args, kwargs, local_shape: ((args[0], kept), {})


@register("transpose", "permute", "t", "movedim", "adjoint")
def permute(node):
    x = tensor_inputs(node)[0]
    nd = len(shape_of(x))
    op = node.meta["autopar.op"]
    order = list(range(nd))
    if op == "permute":
        dims = node.args[1:] if len(node.args) > 2 else arg(node, 1, "dims")
        order = [norm_dim(d, nd) for d in dims]
    elif op in ("t", "adjoint") or op == "transpose":
        d0, d1 = (0, 1) if op == "t" else (arg(node, 1, "dim0"), arg(node, 2, "dim1"))
        if op == "adjoint":
            d0, d1 = -2, -1
        d0, d1 = norm_dim(d0, nd), norm_dim(d1, nd)
        order[d0], order[d1] = order[d1], order[d0]
    else:  # movedim(src, dst) with ints
        src, dst = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
        order.remove(src)
        order.insert(dst, src)
    in_l = [f"d{i}" for i in range(nd)]
    out_l = [in_l[i] for i in order]
    return _spec(node, einsum_options([in_l], out_l, linear_in=(0,)))


@register("expand", "expand_as", "broadcast_to")
def expand(node):
    ins = tensor_inputs(node)
    xs, out = shape_of(ins[0]), shape_of(node)
    out_l = [f"d{i}" for i in range(len(out))]
    off = len(out) - len(xs)
    in_l = [out_l[i + off] if s == out[i + off] else None for i, s in enumerate(xs)]
    in_labels = [in_l] + [out_l] * (len(ins) - 1)
    rewrite = _rewrite_sizes if node.meta["autopar.op"] in ("expand", "broadcast_to") else None
    return _spec(node, einsum_options(in_labels, out_l, linear_in=(0,)), rewrite)


@register("repeat", "tile")
def repeat(node):
    """``x.repeat(*times)`` tiles ``x``: a dim tiled once may be split (the times are counts,
    the same on a piece); tiled dims and the new leading ones stay whole. Linear."""
    ins = tensor_inputs(node)
    times = node.args[1:] if node.op == "call_method" else (arg(node, 1, "dims"),)
    if len(times) == 1 and isinstance(times[0], (list, tuple)):
        times = tuple(times[0])
    if len(ins) != 1 or not all(isinstance(t, int) for t in times):
        return _spec(node, ((tuple(R for _ in ins), R),))
    xs, out = shape_of(ins[0]), shape_of(node)
    off = len(out) - len(xs)
    times = (1,) * (len(out) - len(times)) + tuple(times)   # tile: fewer times than dims
    in_l = [f"d{i}" if times[i + off] == 1 else None for i in range(len(xs))]
    out_l = [None] * off + in_l
    return _spec(node, einsum_options([in_l], out_l, linear_in=(0,)))


@register("repeat_interleave")
def repeat_interleave(node):
    ins = tensor_inputs(node)
    dim = arg(node, 2, "dim")
    if len(ins) != 1 or dim is None:
        return _spec(node, ((tuple(R for _ in ins), R),))
    labels = [f"d{i}" for i in range(len(shape_of(ins[0])))]
    return _spec(node, einsum_options([labels], labels, linear_in=(0,)))


@register("split", "chunk", "unbind", "tensor_split", "split_with_sizes")
def split(node):
    x = tensor_inputs(node)[0]
    nd = len(shape_of(x))
    op = node.meta["autopar.op"]
    dim = norm_dim(arg(node, 1 if op == "unbind" else 2, "dim", 0), nd)
    in_l = [None if i == dim else f"d{i}" for i in range(nd)]
    out_l = [l for i, l in enumerate(in_l) if not (op == "unbind" and i == dim)]
    options = einsum_options([in_l], out_l, linear_in=(0,))
    strided = _cut_into_segments(node, x, dim)
    if strided is None:
        return _spec(node, options)
    # each piece is one segment of a strided shard: each comes out plainly sharded, and
    # the sizes the op names become the local pieces' sizes
    return _spec(node, options + (((strided,), Shard(dim)),), _local_split_sizes(node, dim))


def cut_sizes(node: Node, dim: int) -> list:
    """The sizes of the pieces a split-like node cuts along ``dim``."""
    return [int(v.shape[dim]) for v in out_vals(node)]


def _cut_into_segments(node, x, dim) -> StridedShard | None:
    """The strided shard of ``x`` whose segments are exactly the pieces ``node`` cuts."""
    ratios = (x.meta.get(SEGMENTS) or {}).get(dim)
    if ratios is None or node.meta["autopar.op"] not in ("split", "chunk", "split_with_sizes"):
        return None
    strided = StridedShard(dim, ratios)
    return strided if strided.sizes(shape_of(x)[dim]) == cut_sizes(node, dim) else None


def _local_split_sizes(node, dim):
    """A rewrite of ``split``'s sizes for pieces cut ``f`` ways on ``dim`` (``chunk``
    counts pieces: nothing to rewrite)."""
    whole = shape_of(node)[dim]

    def rewrite(args, kwargs, local_shape):
        f = whole // local_shape[dim]
        if f == 1 or node.meta["autopar.op"] == "chunk":
            return args, kwargs
        local = lambda s: s // f if isinstance(s, int) else [i // f for i in s]  # noqa: E731
        for key in ("split_size", "split_size_or_sections", "split_sizes"):
            if key in kwargs:
                return args, {**kwargs, key: local(kwargs[key])}
        return (args[0], local(args[1]), *args[2:]), kwargs

    return rewrite


@register("cat", "stack")
def cat(node):
    ins = tensor_inputs(node)
    nd = len(shape_of(ins[0]))
    op = node.meta["autopar.op"]
    out_nd = len(shape_of(node))
    dim = norm_dim(arg(node, 1, "dim", 0), out_nd)
    if op == "cat":
        in_l = [None if i == dim else f"d{i}" for i in range(nd)]
        out_l = in_l
    else:
        in_l = [f"d{i}" for i in range(nd)]
        out_l = in_l[:dim] + [None] + in_l[dim:]
    options = einsum_options([in_l] * len(ins), out_l) + (((P,) * len(ins), P),)
    return _spec(node, options)


@register("getitem")
def getitem(node):
    src, index = node.args
    if isinstance(src, Node) and isinstance(src.meta.get("val"), (tuple, list)):
        # a tuple is consumed in the layout it was made in: offer exactly the placements
        # its producer can make (not a split dim of split, not Partial for max's indices)
        made = []
        for _, o in spec_for(src).options:
            if o not in made:
                made.append(o)
        return _spec(node, tuple(((o,), o) for o in made))
    options = _index_options(node, src, index)
    segment = _slice_of_segment(node, src, index)
    if segment is None:
        return _spec(node, options)
    strided, out_dim, rewrite = segment
    return _spec(node, options + (((strided,), Shard(out_dim)),), rewrite)


def _slice_of_segment(node, src, index):
    """For ``x[..., a:b]`` taking exactly one segment of a strided shard of ``x`` (every
    other dim whole): (that strided shard, the dim of the result it lands on, a rewrite of
    the slice to the local piece's bounds); None otherwise."""
    segments = src.meta.get(SEGMENTS) if isinstance(src, Node) else None
    items = list(index) if isinstance(index, tuple) else [index]
    if not segments or len(tensor_inputs(node)) != 1 or any(isinstance(i, Node) for i in items):
        return None
    shape = shape_of(src)
    found = one_partial_slice(shape, items)
    if found is None or found[1] not in segments:
        return None
    items = expand_ellipsis(items, len(shape))
    k, d, out_dim = found
    strided = StridedShard(d, segments[d])
    bounds = [0]
    for size in strided.sizes(shape[d]):
        bounds.append(bounds[-1] + size)
    start, stop, _ = items[k].indices(shape[d])
    if not any((start, stop) == (a, b) for a, b in zip(bounds, bounds[1:])):
        return None
    whole = stop - start

    def rewrite(args, kwargs, local_shape):
        f = whole // local_shape[out_dim]
        if f == 1:
            return args, kwargs
        local = list(items)
        local[k] = slice(start // f, stop // f)
        return (args[0], tuple(local)), kwargs

    return strided, out_dim, rewrite


def one_partial_slice(shape, items) -> tuple | None:
    """For an index of slices, None and Ellipsis whose slices are whole but one, a step-1
    slice of part of its dim: (that slice's place among the index's items with Ellipsis
    expanded, the dim it slices, the dim of the result it lands on); None otherwise."""
    if any(not (i is None or i is Ellipsis or isinstance(i, slice)) for i in items):
        return None
    d, out_dim, found = 0, 0, None
    for k, item in enumerate(expand_ellipsis(list(items), len(shape))):
        if item is not None:
            if not full_slice(item, shape[d]):
                if found is not None or item.step not in (None, 1):
                    return None
                found = (k, d, out_dim)
            d += 1
        out_dim += 1
    return found


def _index_options(node, src, index):
    """Basic indexing: full slices keep a dim splittable, partial slices and ints do not.
    One integer tensor among full slices (``x[idx]``, ``x[:, idx]``) picks along its dim,
    which stays whole, while the index may be split; other tensor indices are replicated."""
    ins = tensor_inputs(node)
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, Node) for i in items):
        return _tensor_index_options(src, items, ins)
    if len(ins) != 1:
        return ((tuple(R for _ in ins), R),)
    in_l, out_l = basic_index_labels(shape_of(src), items)
    return einsum_options([in_l], out_l, linear_in=(0,))


def expand_ellipsis(items: list, ndim: int) -> list:
    explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        k = items.index(Ellipsis)
        return items[:k] + [slice(None)] * (ndim - explicit) + items[k + 1:]
    return items + [slice(None)] * (ndim - explicit)


def full_slice(item, size) -> bool:
    return isinstance(item, slice) and item.step in (None, 1) and item.start in (None, 0) \
        and (item.stop is None or item.stop >= size)


def basic_index_labels(shape, items) -> tuple:
    """(labels of the indexed tensor, labels of the result) for an index of slices, ints,
    None and Ellipsis: a dim is labelled (may be split) only where its slice is full."""
    in_l, out_l, d = [], [], 0
    for item in expand_ellipsis(list(items), len(shape)):
        if item is None:
            out_l.append(None)
            continue
        label = f"d{d}" if full_slice(item, shape[d]) else None
        in_l.append(label)
        if isinstance(item, slice):
            out_l.append(label)
        d += 1
    return in_l, out_l


def _tensor_index_options(src, items, ins):
    replicated_only = ((tuple(R for _ in ins), R),)
    shape = shape_of(src)
    if len(ins) != 2 or ins[0] is not src or None in items:
        return replicated_only
    items = expand_ellipsis(items, len(shape))
    where = [d for d, i in enumerate(items) if isinstance(i, Node)]
    idx = ins[1]
    if len(where) != 1 or idx.meta["val"].dtype in (torch.bool, torch.uint8) or \
            not all(full_slice(i, shape[d]) for d, i in enumerate(items) if d != where[0]):
        return replicated_only
    p = where[0]
    x_l = [None if d == p else f"d{d}" for d in range(len(shape))]
    idx_l = [f"i{k}" for k in range(len(shape_of(idx)))]
    return einsum_options([x_l, idx_l], x_l[:p] + idx_l + x_l[p + 1:], linear_in=(0,))


@register("pad")
def pad(node):
    """The padded dims stay whole, any other may be split. Zero padding and the reflecting
    and replicating modes are linear, so a Partial passes through them."""
    x = tensor_inputs(node)[0]
    nd = len(shape_of(x))
    widths = list(arg(node, 1, "pad"))
    padded = {nd - 1 - i // 2 for i, w in enumerate(widths) if w}
    labels = [None if d in padded else f"d{d}" for d in range(nd)]
    mode, value = arg(node, 2, "mode", "constant"), arg(node, 3, "value", None)
    linear = x.meta["val"].is_floating_point() and (mode != "constant" or not value)
    return _spec(node, einsum_options([labels], labels, linear_in=(0,) if linear else ()))
