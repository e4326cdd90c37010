"""Reductions and normalizations: sum, mean, max, softmax, layer_norm, rms_norm, histc,
losses.

A reduced dim that is split leaves a Partial result only where the reduction is a sum;
``mean`` and ``cross_entropy(reduction="mean")`` are rewritten into sums divided by a count
before planning (``simplify_graph``), so they need no rule of their own for that case.
"""

from __future__ import annotations

import torch

from .core import (OpSpec, R, arg, broadcast_labels, einsum_options, io_bytes, norm_dim, register,
                   shape_of, tensor_inputs)
from .pointwise import pointwise


def _dims(node, ndim, index=1, name="dim"):
    dim = arg(node, index, name)
    if dim is None:
        return list(range(ndim))
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return [norm_dim(d, ndim) for d in dims]


def _reduce_options(in_shape, reduced, keepdim, sum_like):
    in_l = [f"d{i}" for i in range(len(in_shape))]
    out_l = []
    for i, l in enumerate(in_l):
        if i in reduced:
            if keepdim:
                out_l.append(None)
        else:
            out_l.append(l)
    if not sum_like:
        in_l = [None if i in reduced else l for i, l in enumerate(in_l)]
    return einsum_options([in_l], out_l, linear_in=(0,) if sum_like else ())


def _spec(node, options):
    ins = tensor_inputs(node)
    n = 1
    for s in shape_of(ins[0]):
        n *= s
    return OpSpec(options, float(n), io_bytes(node))


@register("sum", "mean", "nansum")
def sum_(node):
    shape = shape_of(tensor_inputs(node)[0])
    reduced = _dims(node, len(shape))
    keepdim = bool(arg(node, 2, "keepdim", False))
    sum_like = node.meta["autopar.op"] != "mean"
    return _spec(node, _reduce_options(shape, reduced, keepdim, sum_like))


@register("max", "min", "amax", "amin", "argmax", "argmin", "logsumexp", "var", "std",
          "norm", "prod", "any", "all", "median")
def reduce_(node):
    ins = tensor_inputs(node)
    if node.meta["autopar.op"] in ("max", "min") and len(ins) == 2:
        return pointwise(node)  # torch.max(x, y): the elementwise maximum
    shape = shape_of(ins[0])
    dim_pos = 2 if node.meta["autopar.op"] == "norm" else 1
    reduced = _dims(node, len(shape), dim_pos)
    keepdim = bool(arg(node, dim_pos + 1, "keepdim", False))
    return _spec(node, _reduce_options(shape, reduced, keepdim, sum_like=False))


@register("softmax", "log_softmax", "cumsum", "cumprod", "sort", "argsort", "topk", "flip",
          "roll", "narrow", "tril", "triu")
def along_dim(node):
    """Ops that mix values along some dims keep those dims whole."""
    op = node.meta["autopar.op"]
    shape = shape_of(tensor_inputs(node)[0])
    nd = len(shape)
    if op in ("tril", "triu"):
        fixed = [nd - 2, nd - 1]
    elif op == "topk":
        fixed = [norm_dim(arg(node, 2, "dim", -1), nd)]
    elif op in ("flip", "roll"):
        fixed = _dims(node, nd, 1 if op == "flip" else 2, "dims")
    else:
        dim = arg(node, 1, "dim", -1)
        # softmax(x) without a dim picks one from the input's rank (deprecated): keep all whole
        fixed = list(range(nd)) if dim is None else [norm_dim(dim, nd)]
    labels = [None if i in fixed else f"d{i}" for i in range(nd)]
    return _spec(node, einsum_options([labels], labels))


@register("diff")
def diff(node):
    """Differences of neighbours along ``dim`` (n times): that dim whole, the others split.
    Linear, so a Partial passes through. With ``prepend`` or ``append`` tensors, whole."""
    ins = tensor_inputs(node)
    nd = len(shape_of(ins[0]))
    if len(ins) != 1:
        return OpSpec(((tuple(R for _ in ins), R),), 0.0, io_bytes(node))
    dim = norm_dim(arg(node, 2, "dim", -1), nd)
    labels = [None if i == dim else f"d{i}" for i in range(nd)]
    return _spec(node, einsum_options([labels], labels, linear_in=(0,)))


@register("layer_norm", "rms_norm", "group_norm_last")
def layer_norm(node):
    x = tensor_inputs(node)[0]
    shape = shape_of(x)
    normalized = arg(node, 1, "normalized_shape")
    k = len(normalized) if isinstance(normalized, (list, tuple)) else 1
    x_l = [f"d{i}" for i in range(len(shape) - k)] + [None] * k
    in_labels = [x_l] + [[None] * len(shape_of(w)) for w in tensor_inputs(node)[1:]]
    return _spec(node, einsum_options(in_labels, x_l))


@register("cross_entropy", "nll_loss")
def cross_entropy(node):
    """Class dim whole; batch and extra dims split. reduction="sum" gives a Partial loss,
    "none" a split one; "mean" (where not rewritten) keeps everything replicated."""
    ins = tensor_inputs(node)
    logits, target = arg(node, 0, "input"), arg(node, 1, "target")
    reduction = node.kwargs.get("reduction", "mean")
    if len(ins) != 2 or reduction not in ("sum", "none") or ins[0] is not logits:
        return OpSpec(((tuple(R for _ in ins), R),), 0.0, io_bytes(node))
    ls, ts = shape_of(logits), shape_of(target)
    if len(ls) == 1 or len(ts) == len(ls):  # unbatched, or class probabilities
        return OpSpec(((tuple(R for _ in ins), R),), 0.0, io_bytes(node))
    rest = [f"e{i}" for i in range(len(ls) - 2)]
    l_l, t_l = ["n", None] + rest, ["n"] + rest
    out_l = t_l if reduction == "none" else []
    return _spec(node, einsum_options([l_l, t_l], out_l))


@register("histc")
def histc(node):
    """Counts over a split input add up: any dim may be split, the counts come out Partial.
    Without an explicit range (min == max) each piece would bin over its own min and max."""
    ins = tensor_inputs(node)
    lo, hi = arg(node, 2, "min", 0), arg(node, 3, "max", 0)
    if len(ins) != 1 or not lo < hi:
        return OpSpec(((tuple(R for _ in ins), R),), 0.0, io_bytes(node))
    labels = [f"d{i}" for i in range(len(shape_of(ins[0])))]
    return _spec(node, einsum_options([labels], []))


# elementwise losses: canonical name -> parameter names in signature order
ELEMENTWISE_LOSSES = {
    "mse_loss": "input target size_average reduce reduction weight",
    "l1_loss": "input target size_average reduce reduction weight",
    "smooth_l1_loss": "input target size_average reduce reduction beta",
    "huber_loss": "input target reduction delta weight",
    "binary_cross_entropy": "input target weight size_average reduce reduction",
    "binary_cross_entropy_with_logits":
        "input target weight size_average reduce reduction pos_weight",
}


@register(*ELEMENTWISE_LOSSES)
def elementwise_loss(node):
    """A loss per element, then reduced: "none" splits like a pointwise op, "sum" splits any
    dim and leaves a Partial sum. "mean" keeps everything whole: a rank's mean over its
    piece is not its share of the global mean."""
    ins = tensor_inputs(node)
    names = ELEMENTWISE_LOSSES[node.meta["autopar.op"]].split()
    bound = dict(zip(names, node.args)) | dict(node.kwargs)
    reduction = bound.get("reduction", "mean")
    legacy = bound.get("size_average") is not None or bound.get("reduce") is not None
    if reduction not in ("none", "sum") or legacy:
        return OpSpec(((tuple(R for _ in ins), R),), 0.0, io_bytes(node))
    shapes = [shape_of(x) for x in ins]
    in_labels, out_labels = broadcast_labels(shapes, tuple(torch.broadcast_shapes(*shapes)))
    return _spec(node, einsum_options(in_labels, out_labels if reduction == "none" else []))
