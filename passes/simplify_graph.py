"""simplify_graph: fold size arithmetic into constants and rewrite ops into plannable pieces."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch.fx import Node

from autopar.program.graph import (as_constant, is_foldable_constant, replace_with_constant,
                                   write_buffer)
from autopar.rules import arg, is_tensor_like, norm_dim
from autopar.rules.names import canonical_name
from autopar.rules.reduction import ELEMENTWISE_LOSSES

from .annotate_shapes import annotate_new_nodes, annotate_shapes

_REDUCTION = {0: "none", 1: "mean", 2: "sum"}


def simplify_graph(gm, ctx):
    """Specialize and decompose, so that every remaining op has a simple rule.

    Reads ``node.meta["val"]`` and ``"autopar.op"``; rewrites the graph and re-annotates it.
    - Nodes computing Python values (``x.size(0)``, ``C // n_head``) become constants: the
      program is specialized to the planned shapes, and codegen rewrites sizes per rank.
    - ``mean`` becomes ``sum / count`` and ``cross_entropy(reduction="mean")`` becomes
      ``cross_entropy(reduction="sum") / (number of counted targets)``, so that a split batch
      or feature dim yields a Partial sum instead of a wrong local mean.
    - ``batch_norm`` becomes its reductions and pointwise ops (statistics of a split batch
      sum over ranks), its running statistics written back into their buffers.
    - ``x.T`` and ``x.mT`` (``getattr(x, "T")`` under Dynamo) become ``permute``.
    - ``x.type_as(y)`` and ``x.to(y)`` become ``x.to(dtype)``: ``y`` is read only for its dtype.
    - ``cat`` leaves out inputs of shape (0,), as torch does whatever the others' rank (an
      empty key-value cache a layer appends its first keys to): they hold nothing, and would
      read as a value the batch does not split.
    """
    changed, replaced = False, []   # replaced: (value of a rewritten node, node now computing it)
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        val = node.meta.get("val")
        if not is_tensor_like(val) and is_foldable_constant(val):
            replace_with_constant(node, as_constant(val))
            changed = True
            continue
        op = node.meta.get("autopar.op")
        rewrite = _REWRITES.get(op)
        out = rewrite(gm.graph, node) if rewrite is not None else None
        if out is not None:
            changed = True
            replaced.append((val, out))
    if changed:
        gm.graph.lint()
        gm.recompile()
        _annotate(gm, ctx, replaced)
    return gm


def _annotate(gm, ctx, replaced: list) -> None:
    """Annotate the nodes the rewrites made; where one computes a value that differs from the
    one it replaced in shape, dtype, strides or requires_grad, annotate the whole graph again
    (readers of the value may change too)."""
    if annotate_new_nodes(gm) and all(_same_tensor(val, out.meta.get("val"))
                                      for val, out in replaced):
        return
    annotate_shapes(gm, ctx)


def _same_tensor(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    return (a.shape, a.stride(), a.dtype, a.device, a.requires_grad) == \
        (b.shape, b.stride(), b.dtype, b.device, b.requires_grad)


def _insert(graph, before, target, args, kwargs=None):
    with graph.inserting_before(before):
        n = graph.call_function(target, tuple(args), kwargs or {})
    n.meta["autopar.op"] = canonical_name(n)
    if "nn_module_stack" in before.meta:
        n.meta["nn_module_stack"] = before.meta["nn_module_stack"]
    if "stack_trace" in before.meta:
        n.meta["stack_trace"] = before.meta["stack_trace"]
    return n


def _mean(graph, node):
    x = node.args[0]
    if node.kwargs.get("dtype") is not None or not isinstance(x.meta.get("val"), torch.Tensor) \
            or not x.meta["val"].is_floating_point():
        return None
    shape = tuple(x.meta["val"].shape)
    dim = arg(node, 1, "dim")
    keepdim = bool(arg(node, 2, "keepdim", False))
    if dim is None or dim == [] or dim == ():
        dims, s_args = list(range(len(shape))), (x,)
    else:
        dims = [norm_dim(d, len(shape)) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
        s_args = (x, dim, keepdim)
    count = math.prod(shape[d] for d in dims)
    total = _insert(graph, node, torch.sum, s_args)
    mean = _insert(graph, node, operator.truediv, (total, count))
    node.replace_all_uses_with(mean)
    graph.erase_node(node)
    return mean


def _cross_entropy(graph, node):
    if node.meta["autopar.op"] == "cross_entropy_loss":  # torch._C._nn spelling (Dynamo)
        logits, target, weight = node.args[0], node.args[1], arg(node, 2, "weight")
        reduction = _REDUCTION.get(arg(node, 3, "reduction", 1))
        ignore_index = arg(node, 4, "ignore_index", -100)
        smoothing = arg(node, 5, "label_smoothing", 0.0)
    else:
        logits, target, weight = node.args[0], arg(node, 1, "target"), arg(node, 2, "weight")
        reduction = arg(node, 6, "reduction", "mean")
        ignore_index = arg(node, 4, "ignore_index", -100)
        smoothing = arg(node, 7, "label_smoothing", 0.0)
        if arg(node, 3, "size_average") is not None or arg(node, 5, "reduce") is not None:
            return None
    tval = target.meta.get("val") if hasattr(target, "meta") else None
    if weight is not None or smoothing or not isinstance(tval, torch.Tensor) \
            or tval.is_floating_point():
        return None
    kw = {"ignore_index": ignore_index}
    if reduction != "mean":
        if node.meta["autopar.op"] == "cross_entropy":
            return None
        out = _insert(graph, node, F.cross_entropy, (logits, target), {**kw, "reduction": reduction})
    else:
        total = _insert(graph, node, F.cross_entropy, (logits, target), {**kw, "reduction": "sum"})
        counted = _insert(graph, node, torch.ne, (target, ignore_index))
        count = _insert(graph, node, torch.sum, (counted,))
        out = _insert(graph, node, operator.truediv, (total, count))
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return out


def _batch_norm(graph, node):
    """``batch_norm`` as the reductions and pointwise ops it is made of, so that a split batch
    sums its statistics over every rank (SyncBatchNorm's semantics, the sums' collectives
    priced like any other) and each running statistic's new value is written back into its
    buffer (:func:`~autopar.program.graph.write_buffer`), as one device updates it. Half
    and bfloat16 inputs are normalized in fp32 and the result cast back, as torch's kernels
    compute them."""
    if node.target is torch.batch_norm:   # (input, weight, bias, mean, var, training, m, eps, _)
        x, w, b, rm, rv = (node.args + (None,) * 5)[:5]
        training, momentum, eps = node.args[5:8]
    else:
        x, rm, rv = node.args[0], arg(node, 1, "running_mean"), arg(node, 2, "running_var")
        w, b = arg(node, 3, "weight"), arg(node, 4, "bias")
        training, momentum = arg(node, 5, "training", False), arg(node, 6, "momentum", 0.1)
        eps = arg(node, 7, "eps", 1e-5)
    val = x.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2 or isinstance(momentum, Node) or \
            any(isinstance(a, Node) for a in (training, eps)):
        return None
    shape = tuple(val.shape)
    per_channel = [1, shape[1]] + [1] * (len(shape) - 2)

    def insert(target, *args):
        return _insert(graph, node, target, args)

    def channels(v):  # a (C,) value, broadcast against x
        return insert(torch.reshape, v, per_channel)

    low = val.dtype in (torch.float16, torch.bfloat16)   # statistics in fp32, as torch's
    if low:
        x = insert(torch.Tensor.to, x, torch.float32)
    batch_stats = training or rm is None or rv is None
    if batch_stats:
        dims = [0] + list(range(2, len(shape)))
        count = math.prod(shape[d] for d in dims)
        mean = insert(operator.truediv, insert(torch.sum, x, dims, True), count)
        centered = insert(operator.sub, x, mean)
        squares = insert(operator.mul, centered, centered)
        var = insert(operator.truediv, insert(torch.sum, squares, dims, True), count)
    else:
        mean, var = channels(rm), channels(rv)
        centered = insert(operator.sub, x, mean)
    out = insert(operator.mul, centered, insert(torch.rsqrt, insert(operator.add, var, eps)))
    if w is not None:
        out = insert(operator.mul, out, channels(w))
    if b is not None:
        out = insert(operator.add, out, channels(b))
    if low:
        out = insert(torch.Tensor.to, out, val.dtype)
    if training and rm is not None and rv is not None:
        unbiased = count / max(count - 1, 1)
        for buffer, stat, scale in ((rm, mean, 1.0), (rv, var, unbiased)):
            new = insert(operator.add, insert(operator.mul, buffer, 1.0 - momentum),
                         insert(operator.mul, insert(torch.reshape, insert(torch.detach, stat),
                                                     [shape[1]]), momentum * scale))
            insert(write_buffer, buffer, new)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return out


def _elementwise_mean_loss(graph, node):
    """An elementwise loss's ``reduction="mean"`` as its sum divided by the element count,
    so that a split batch sums over ranks (a rank's mean is not its share of the mean)."""
    names = ELEMENTWISE_LOSSES[node.meta["autopar.op"]].split()
    bound = dict(zip(names, node.args)) | dict(node.kwargs)
    shapes = [getattr(bound.get(k), "meta", {}).get("val") for k in ("input", "target")]
    if bound.get("reduction", "mean") != "mean" or bound.get("size_average") is not None or \
            bound.get("reduce") is not None or bound.get("weight") is not None or \
            not all(isinstance(v, torch.Tensor) for v in shapes):
        return None
    node.args, node.kwargs = (), {**bound, "reduction": "sum"}
    count = math.prod(torch.broadcast_shapes(*(v.shape for v in shapes)))
    with graph.inserting_after(node):
        out = graph.call_function(operator.truediv, (node, count))
    out.meta["autopar.op"] = canonical_name(out)
    for key in ("nn_module_stack", "stack_trace"):
        if key in node.meta:
            out.meta[key] = node.meta[key]
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
    return out


def _tensor_attribute(graph, node):
    """``x.T``, ``x.mT`` (and ``.H``, ``.mH`` of a real tensor), which Dynamo records as
    ``getattr(x, "T")``, as the ``permute`` they are."""
    x, name = (node.args + (None,))[:2]
    val = getattr(x, "meta", {}).get("val")
    if not isinstance(val, torch.Tensor) or name not in ("T", "mT", "H", "mH") or \
            name in ("H", "mH") and val.is_complex() or val.dim() < 2 and name in ("mT", "mH"):
        return None
    nd = val.dim()
    dims = list(range(nd))[::-1] if name in ("T", "H") else [*range(nd - 2), nd - 1, nd - 2]
    out = _insert(graph, node, torch.permute, (x, dims))
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return out


def _type_as(graph, node):
    other = node.args[1] if len(node.args) > 1 else None
    if node.meta["autopar.op"] == "to" and not (hasattr(other, "meta") and
                                                isinstance(other.meta.get("val"), torch.Tensor)):
        return None
    if other is None or not isinstance(other.meta.get("val"), torch.Tensor):
        return None
    node.args = (node.args[0], other.meta["val"].dtype)
    node.kwargs = {}
    if node.op == "call_method":
        node.target = "to"
    node.meta["autopar.op"] = "to"
    return node


def _cat(graph, node):
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    if not isinstance(tensors, (list, tuple)):
        return None
    kept = [t for t in tensors if not _empty_vector(t)]
    if len(kept) == len(tensors) or not kept:
        return None
    if node.args:
        node.args = (kept, *node.args[1:])
    else:
        node.kwargs = {**node.kwargs, "tensors": kept}
    return node


def _empty_vector(value) -> bool:
    val = getattr(value, "meta", {}).get("val")
    return isinstance(val, torch.Tensor) and tuple(val.shape) == (0,)


# each rewrite returns the node that now computes the value, or None where it changes nothing
_REWRITES = {"mean": _mean, "batch_norm": _batch_norm, "cross_entropy": _cross_entropy,
             "cross_entropy_loss": _cross_entropy, "type_as": _type_as, "to": _type_as,
             "cat": _cat, "concat": _cat, "concatenate": _cat, "getattr": _tensor_attribute,
             **{name: _elementwise_mean_loss for name in ELEMENTWISE_LOSSES}}
