"""Fused layers that a capture records as one op: ``torch.nn.MultiheadAttention``'s
``multi_head_attention_forward`` (Dynamo keeps it whole; its projections and attention are
not separate nodes the other rules could split), and a user's ``torch.autograd.Function``
(its forward and backward graphs, one op)."""

from __future__ import annotations

import torch

from .._torch import SET_GRAD_ENABLED
from .core import (OpSpec, R, arg, broadcast_labels, einsum_options, io_bytes, register,
                   shape_of, tensor_inputs)
from .names import canonical_name
from .pointwise import ADDITIVE, CASTS, SCALING, UNARY

# ops a custom Function's graphs may hold for it to split like a pointwise op (no draws:
# each rank would draw its own piece)
_ELEMENTWISE = (set(UNARY) | set(ADDITIVE) | set(SCALING) | set(CASTS)) - {
    "dropout", "rand_like", "randn_like"}

# multi_head_attention_forward's tensor arguments: name -> (position, the batch dim's place
# when the inputs are batched); the others (projection weights and biases, a 2-d mask, the
# added key and value biases) hold no batch dim. A 3-d attention mask and the static keys
# and values stack (batch, heads) batch-major along their first dim.
_BATCHED = {"query": (0, 1), "key": (1, 1), "value": (2, 1), "key_padding_mask": (14, 0),
            "attn_mask": (16, 0), "static_k": (21, 0), "static_v": (22, 0)}


@register("multi_head_attention_forward")
def multi_head_attention(node):
    """Split the batch (the ``N`` of ``(L, N, E)`` queries, keys and values, and of the
    masks that have one); heads and sequences stay whole: the op projects ``E`` into all
    heads at once from whole weights, so a rank cannot compute some heads alone. Whole
    where the attention weights are returned too (batch first, unlike the output: one
    layout cannot split both), where dropout draws a mask for the whole batch, or for
    unbatched inputs."""
    ins = tensor_inputs(node)
    query = arg(node, 0, "query")
    qs = shape_of(query)
    dropout = arg(node, 10, "dropout_p", 0.0) and arg(node, 13, "training", True)
    labels = {x: [None] * len(shape_of(x)) for x in ins}
    if len(qs) == 3 and not dropout and not arg(node, 15, "need_weights", True):
        for name, (index, dim) in _BATCHED.items():
            x = arg(node, index, name)
            if x in labels and len(shape_of(x)) == 3 - (name == "key_padding_mask"):
                labels[x][dim] = "n"
    out = [None, "n", None] if len(qs) == 3 else [None] * len(qs)
    options = einsum_options([labels[x] for x in ins], out)
    return OpSpec(options, _flops(qs, shape_of(arg(node, 1, "key"))), io_bytes(node))


def _flops(query_shape, key_shape) -> float:
    """The projections of queries, keys, values and output, and the two attention
    products."""
    length, width = query_shape[0], query_shape[-1]
    batch = query_shape[1] if len(query_shape) == 3 else 1
    keys = key_shape[0]
    return 2.0 * batch * width * (width * (2 * length + 2 * keys) + 2 * length * keys)


@register("autograd_function")
def autograd_function(node):
    """A user's ``torch.autograd.Function`` (``autopar.program.graph.autograd_function``):
    where every op of its forward and backward graphs is elementwise and its outputs have
    one shape, it splits like a pointwise op, each rank running the user's forward and
    backward on its piece; otherwise it runs whole on every rank."""
    ins = tensor_inputs(node)
    outs = node.meta["val"] if isinstance(node.meta["val"], (tuple, list)) else [node.meta["val"]]
    shape = shape_of(node)
    if all(_elementwise(g) for g in (node.target.forward_graph, node.target.backward_graph)) \
            and all(isinstance(v, torch.Tensor) and tuple(v.shape) == shape for v in outs):
        in_labels, out_labels = broadcast_labels([shape_of(x) for x in ins], shape)
        options = einsum_options(in_labels, out_labels)
    else:
        options = ((tuple(R for _ in ins), R),)
    return OpSpec(options, float(sum(v.numel() for v in outs)), io_bytes(node))


def _elementwise(gm) -> bool:
    return all(n.op not in ("call_function", "call_method", "call_module", "get_attr")
               or n.target is SET_GRAD_ENABLED
               or canonical_name(n) in _ELEMENTWISE for n in gm.graph.nodes)
