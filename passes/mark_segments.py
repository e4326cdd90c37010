"""mark_segments: find values that the program cuts into segments, where a strided shard
keeps a split through the cut.

A fused projection (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``, a fused gate and up
projection) computes one tensor whose last dim the model then cuts into pieces (``split``,
``chunk``, or slices that together cover the dim). A plain column split of the weight gives
each rank a contiguous run of that dim, which straddles the pieces; a strided shard gives
each rank its piece of every segment, so every piece comes out split and the heads or gates
after it stay split. This pass records, per value, the dims that may take such a shard and
their segments; the rules then offer strided twins of their options on them
(:func:`autopar.rules.core.candidates`), and the solver weighs them like any other.
"""

from __future__ import annotations

import math

from torch.fx import Node

from autopar.program.placement import Shard
from autopar.rules.core import SEGMENTS, shape_of, spec_for, tensor_inputs
from autopar.rules.shape import cut_sizes, expand_ellipsis, one_partial_slice

# How far back from a cut the segments are carried (through views, pointwise ops, the
# projection itself and on to its weight and bias).
MAX_DEPTH = 8
_CUTS = ("split", "chunk", "split_with_sizes")


def mark_segments(gm, ctx):
    """Write ``node.meta["autopar.segments"]`` ({dim: segment ratios}) on every value cut
    into two or more segments along a dim, and on the values it is computed from element by
    element along that dim (its producers, as far as their rules carry a split of the dim
    straight through), where those reach a weight."""
    for node in gm.graph.nodes:
        node.meta.pop(SEGMENTS, None)
    for src, dim, sizes in _cuts(gm):
        g = math.gcd(*sizes)
        ratios = tuple(s // g for s in sizes)
        found = {}
        _reach(src, dim, ratios, MAX_DEPTH, found)
        # only a cut that leads back to a weight (a fused projection's) is worth strided
        # layouts; others (rotary embeddings' halves of a head) would only widen the search
        if any(node.op == "get_attr" for node, _ in found):
            for node, d in found:
                node.meta.setdefault(SEGMENTS, {})[d] = ratios
    return gm


def _cuts(gm) -> list:
    """(value, dim, piece sizes) for every split-like node and every set of slices that
    together cut a value's dim into consecutive pieces."""
    found, slices = [], {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        op = node.meta.get("autopar.op")
        if op in _CUTS and isinstance(node.meta.get("val"), (tuple, list)):
            x = tensor_inputs(node)[0]
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            dim = dim + len(shape_of(x)) if dim < 0 else dim
            sizes = cut_sizes(node, dim)
            if len(sizes) > 1 and min(sizes) > 0:
                found.append((x, dim, sizes))
        elif op == "getitem" and isinstance(node.args[0], Node):
            piece = _sliced_dim(node)
            if piece is not None:
                slices.setdefault((node.args[0], piece[0]), set()).add(piece[1:])
    for (x, dim), bounds in slices.items():
        ordered = sorted(bounds)
        starts = [a for a, _ in ordered]
        stops = [b for _, b in ordered]
        if len(ordered) > 1 and starts[0] == 0 and stops[-1] == shape_of(x)[dim] \
                and starts[1:] == stops[:-1]:
            found.append((x, dim, [b - a for a, b in ordered]))
    return found


def _sliced_dim(node) -> tuple | None:
    """(dim, start, stop) for ``x[..., a:b, ...]`` slicing one dim of a tensor in part."""
    src, index = node.args
    val = src.meta.get("val")
    if isinstance(val, (tuple, list)) or not hasattr(val, "shape"):
        return None
    items = list(index) if isinstance(index, tuple) else [index]
    shape = shape_of(src)
    found = one_partial_slice(shape, items)
    if found is None:
        return None
    k, d, _ = found
    item = expand_ellipsis(items, len(shape))[k]
    start, stop, _ = item.indices(shape[d])
    return (d, start, stop) if stop > start else None


def _reach(node, dim: int, ratios: tuple, depth: int, found: dict) -> None:
    """Add to ``found`` the (node, dim) pairs that carry ``node``'s dim ``dim`` element by
    element, from ``node`` back through its producers."""
    if (node, dim) in found or depth == 0 or node.op == "placeholder":
        return
    found[node, dim] = None
    if node.op not in ("call_function", "call_method") or \
            isinstance(node.meta.get("val"), (tuple, list)):
        return
    size = shape_of(node)[dim]
    ins = tensor_inputs(node)
    for in_layouts, out in spec_for(node).options:
        if type(out) is not Shard or out.dim != dim:
            continue
        for x, p in zip(ins, in_layouts):
            if type(p) is Shard and not isinstance(x.meta.get("val"), (tuple, list)) \
                    and shape_of(x)[p.dim] == size:
                _reach(x, p.dim, ratios, depth - 1, found)
