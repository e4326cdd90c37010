"""Matrix ops: linear, matmul, bmm, mm, addmm, baddbmm, einsum, attention, embedding,
convolution, grouped (per-expert) matmul.

Each is written as an einsum-like labelling of its operands' dims; splitting a contracted
label gives a Partial output (Megatron's row-parallel linear), splitting a kept label a
sharded one (column-parallel linear, data parallel on a batch label).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from .core import (OpSpec, P, R, Shard, arg, broadcast_labels, einsum_flops, einsum_options,
                   io_bytes, is_shard, num_bytes_of, register, replicated_options, shape_of,
                   tensor_inputs)


def _batch_labels(ndim: int, prefix: str = "b") -> list:
    return [f"{prefix}{i}" for i in range(ndim)]


def _with_bias(options, out_labels, bias_labels):
    """Give an added bias the placement its output takes: sharded with the output where it
    has that dim, Partial when the output is Partial, else replicated."""
    out = []
    for ins, o in options:
        if isinstance(o, Shard) and out_labels[o.dim] in bias_labels:
            b = Shard(bias_labels.index(out_labels[o.dim]))
        elif o == P:
            b = P
        else:
            b = R
        out.append(((b,) + tuple(ins), o))
    return tuple(out)


def _fallback(node):
    return OpSpec(replicated_options(len(tensor_inputs(node))), 0.0, io_bytes(node), fallback=True)


@register("linear")
def linear(node):
    ins = tensor_inputs(node)
    x, w = arg(node, 0, "input"), arg(node, 1, "weight")
    b = arg(node, 2, "bias")
    if x is w or (b is not None and len(ins) != 3):
        return _fallback(node)
    xs, ws = shape_of(x), shape_of(w)
    batch = _batch_labels(len(xs) - 1)
    x_l, w_l, out_l = batch + ["k"], ["n", "k"], batch + ["n"]
    options = einsum_options([x_l, w_l], out_l, linear_in=(0, 1))
    flops = einsum_flops([x_l, w_l], [xs, ws])
    if b is not None:
        # the bias is the node's third tensor input; keep input order (x, w, b)
        options = tuple((ins_[1:] + ins_[:1], o) for ins_, o in _with_bias(options, out_l, ["n"]))
    return OpSpec(options, flops, io_bytes(node))


def _matmul_labels(a_shape, b_shape, out_shape):
    if len(a_shape) == 1 and len(b_shape) == 1:
        return ["k"], ["k"], []
    if len(a_shape) == 1:
        batch = _batch_labels(len(b_shape) - 2)
        return ["k"], batch + ["k", "n"], batch + ["n"]
    if len(b_shape) == 1:
        batch = _batch_labels(len(a_shape) - 2)
        return batch + ["m", "k"], ["k"], batch + ["m"]
    (a_b, b_b), out_b = broadcast_labels([a_shape[:-2], b_shape[:-2]], out_shape[:-2])
    return a_b + ["m", "k"], b_b + ["k", "n"], out_b + ["m", "n"]


@register("matmul", "bmm", "mm")
def matmul(node):
    ins = tensor_inputs(node)
    if len(ins) != 2:
        return _fallback(node)
    a, b = ins
    a_l, b_l, out_l = _matmul_labels(shape_of(a), shape_of(b), shape_of(node))
    options = einsum_options([a_l, b_l], out_l, linear_in=(0, 1))
    return OpSpec(options, einsum_flops([a_l, b_l], [shape_of(a), shape_of(b)]), io_bytes(node))


@register("addmm", "baddbmm", "addbmm")
def addmm(node):
    ins = tensor_inputs(node)
    if len(ins) != 3:
        return _fallback(node)
    bias, a, b = ins
    out_shape = shape_of(node)
    a_l, b_l, out_l = _matmul_labels(shape_of(a), shape_of(b), out_shape)
    (bias_l,), _ = broadcast_labels([shape_of(bias)], out_shape)
    bias_l = [out_l[len(out_l) - len(bias_l) + i] if l is not None else None
              for i, l in enumerate(bias_l)]
    options = _with_bias(einsum_options([a_l, b_l], out_l, linear_in=(0, 1)), out_l, bias_l)
    return OpSpec(options, einsum_flops([a_l, b_l], [shape_of(a), shape_of(b)]), io_bytes(node))


@register("einsum")
def einsum(node):
    equation = node.args[0]
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    ins = tensor_inputs(node)
    if not isinstance(equation, str) or "..." in equation or "->" not in equation \
            or len(ins) != len(operands):
        return _fallback(node)
    lhs, out = equation.replace(" ", "").split("->")
    in_labels = [list(t) for t in lhs.split(",")]
    if any(len(set(t)) != len(t) for t in in_labels + [list(out)]):
        return _fallback(node)
    options = einsum_options(in_labels, list(out), linear_in=range(len(in_labels)))
    flops = einsum_flops(in_labels, [shape_of(x) for x in ins])
    return OpSpec(options, flops, io_bytes(node))


@register("scaled_dot_product_attention")
def attention(node):
    """Split batch and head dims together, or the queries' sequence (context parallel: each
    rank its rows of the queries against whole keys and values, which the planner gathers;
    a causal mask becomes this rank's rows of one device's). Key sequence and feature dims
    stay whole."""
    q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    mask = arg(node, 3, "attn_mask")
    ins = tensor_inputs(node)
    if len({q, k, v}) != 3:
        return _fallback(node)
    qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
    nb = len(qs) - 2
    batch = _batch_labels(nb)
    labels = {q: batch + ["sq", None], k: batch + [None, None], v: batch + [None, None]}
    if mask is not None:
        # the mask broadcasts against (*batch, q_len, k_len): its batch dims take the batch
        # labels of q, k and v, its query rows the queries' label, its key columns stay whole
        ms = shape_of(mask)
        scores = qs[:-1] + (ks[-2],)
        (ml,), out_l = broadcast_labels([ms], scores)
        names = batch + ["sq", None]
        labels[mask] = [names[out_l.index(l)] if l is not None else None for l in ml]
    in_labels = [labels[x] for x in ins]
    options = einsum_options(in_labels, batch + ["sq", None])
    n = 1
    for s in qs[:-1]:
        n *= s
    flops = 2.0 * n * ks[-2] * (qs[-1] + vs[-1])
    q_slot = ins.index(q)
    causal = bool(arg(node, 5, "is_causal", False))

    def local(in_layouts, out_layout, axis_names):
        axes = tuple(axis_names[a] for a, p in enumerate(in_layouts[q_slot])
                     if p == Shard(nb))
        return ("attention_query_rows", {"axes": axes}) if axes and causal else None

    return OpSpec(options, flops, io_bytes(node), local=local)


@register("embedding")
def embedding(node):
    """ids may be split on any dim; the table on its feature dim (the vocab dim would need a
    masked lookup, which this rule does not offer)."""
    ins = tensor_inputs(node)
    if len(ins) != 2:
        return _fallback(node)
    ids, weight = (ins if not ins[0].meta["val"].is_floating_point() else ins[::-1])
    id_l = _batch_labels(len(shape_of(ids)), "i")
    w_l = [None, "d"]
    in_labels = [id_l if x is ids else w_l for x in ins]
    options = einsum_options(in_labels, id_l + ["d"])
    return OpSpec(options, 0.0, io_bytes(node))


@register("conv1d", "conv2d", "conv3d")
def conv(node):
    """``n c *spatial, o c *kernel -> n o *spatial``: split the batch, the output channels
    (weight and bias split with them) or the input channels (a Partial output); grouped
    convolutions split no channels (a split would have to fall on group boundaries).

    Or split the input and the output on a spatial dim where the input holds ``stride`` rows
    per output row, so that each rank's output rows start at its own input rows: each rank
    then computes its output rows after taking from its neighbours the rows the kernel
    reaches across the cut (the halo, :mod:`autopar.runtime.halo`), whose gradient goes back
    in backward. Dims that need no halo (no padding, a kernel no wider than the stride) split
    like a batch. Of those that need one, the outermost splits, on one mesh axis of no more
    ranks than leave each a block of at least the halo's rows (the halo comes from the next
    rank alone)."""
    ins = tensor_inputs(node)
    x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
    if len({x, w}) != 2 or ins[:2] != [x, w] or len(ins) != 2 + (b is not None):
        return _fallback(node)
    xs, ws = shape_of(x), shape_of(w)
    spatial = [None] * (len(ws) - 2)
    batch = ["n"] if len(xs) == len(ws) else []
    groups = arg(node, 6, "groups", 1)
    if groups == 1:
        x_l, w_l, out_l = batch + ["c"] + spatial, ["o", "c"] + spatial, batch + ["o"] + spatial
    else:
        x_l, w_l, out_l = batch + [None] + spatial, [None, None] + spatial, batch + [None] + spatial
    options = einsum_options([x_l, w_l], out_l, linear_in=(0, 1))
    if b is not None:
        options = tuple((ins_[1:] + ins_[:1], o) for ins_, o in _with_bias(options, out_l, ["o"]))
    out = shape_of(node)
    flops = 2.0 * math.prod(out) * math.prod(ws[1:])
    geometry = _conv_geometry(node, ws)
    halos = _halos(xs, ws, out, geometry) if geometry else []
    rest = (R,) * (len(ins) - 1)   # weight and bias whole
    options += tuple(((Shard(h.dim),) + rest, Shard(h.dim)) for h in halos if h.free)
    wide = next((h for h in halos if not h.free and h.ranks(xs) >= 2), None)
    if wide is None:
        return OpSpec(options, flops, io_bytes(node))
    split = ((Shard(wide.dim),) + rest, Shard(wide.dim))
    rows = _HaloRows(wide, geometry, groups, len(xs) - len(spatial),
                     num_bytes_of([x]) / xs[wide.dim], x.meta["val"].requires_grad)
    return OpSpec(options + (split,), flops, io_bytes(node), local=rows.local, once=(split,),
                  exchange=rows.exchange, max_ranks=((split, wide.ranks(xs)),))


class _Halo(NamedTuple):
    """A spatial dim a convolution may split on: each rank reads ``lo`` rows before its own
    and ``hi`` after them (where ``hi`` < 0, leaves its last ``-hi`` rows unread)."""

    dim: int
    lo: int
    hi: int

    @property
    def free(self) -> bool:
        """Whether each rank reads only its own rows."""
        return self.lo == 0 and self.hi <= 0

    def ranks(self, input_shape) -> int:
        """The most ranks whose blocks of rows each hold the halo."""
        return input_shape[self.dim] // max(self.lo, self.hi, 1)


@dataclass(frozen=True)
class _HaloRows:
    """A convolution split on ``halo.dim`` with its halo: the local computation and the
    price of the rows it exchanges. ``first``: the input's first spatial dim."""

    halo: _Halo
    geometry: tuple        # stride, padding, dilation: one int per spatial dim
    groups: int
    first: int
    row_bytes: float       # of one row of the whole input
    grad: bool             # whether a gradient flows into the input

    def axis(self, in_layouts, out_layout) -> int | None:
        """The mesh axis that splits the input and the output on the dim, if one does."""
        cut = Shard(self.halo.dim)
        return next((a for a, (p, o) in enumerate(zip(in_layouts[0], out_layout))
                     if p == o == cut), None)

    def local(self, in_layouts, out_layout, axis_names):
        """``OpSpec.local``: ``halo_rows`` then ``conv_rows`` where an axis splits the dim."""
        a = self.axis(in_layouts, out_layout)
        if a is None:
            return None
        stride, padding, dilation = self.geometry
        split = self.halo.dim - self.first
        padding = tuple(0 if i == split else p for i, p in enumerate(padding))  # in the halo
        return ("conv_halo", {"dim": self.halo.dim, "axis": axis_names[a], "lo": self.halo.lo,
                              "hi": self.halo.hi, "stride": stride, "padding": padding,
                              "dilation": dilation, "groups": self.groups})

    def exchange(self, in_layouts, out_layout, model) -> float:
        """Every rank's edge rows all-gathered along the axis, their gradients
        reduce-scattered back; each rank holds its share of the input's other dims."""
        a = self.axis(in_layouts, out_layout)
        if a is None:
            return 0.0
        others = math.prod(model.mesh.shape[c] for c, p in enumerate(in_layouts[0])
                           if c != a and is_shard(p))
        edge_rows = self.halo.lo + max(self.halo.hi, 0)
        gathered = edge_rows * self.row_bytes / others * model.activation_scale \
            * model.mesh.shape[a]
        there = model.collective_s("all_gather", a, gathered)
        back = model.collective_s("reduce_scatter", a, gathered) if self.grad else 0.0
        return (there + back) * model.micro_batches


def _halos(xs, ws, out, geometry) -> list:
    """The spatial dims of the input holding ``stride`` rows per output row, with their halos.

    With ``n`` ranks, rank ``r``'s outputs start at input row ``r*H/n - p``; its last reads
    row ``(r+1)*H/n - s - p + d*(k-1)``, so it reads ``hi = d*(k-1) + 1 - p - s`` rows past its
    own, whatever ``n``."""
    stride, padding, dilation = geometry
    first = len(xs) - len(stride)
    return [_Halo(first + i, p, d * (k - 1) + 1 - p - s)
            for i, (s, p, d, k) in enumerate(zip(stride, padding, dilation, ws[2:]))
            if xs[first + i] == out[first + i] * s]


def _conv_geometry(node, ws) -> tuple | None:
    """(stride, padding, dilation) of a convolution, one int per spatial dim; None where
    padding "same" pads one side more than the other, or an argument is not ints."""
    count = len(ws) - 2
    stride = _per_dim(arg(node, 3, "stride", 1), count)
    dilation = _per_dim(arg(node, 5, "dilation", 1), count)
    padding = arg(node, 4, "padding", 0)
    if padding == "valid":
        padding = 0
    elif padding == "same" and dilation is not None:
        totals = [d * (k - 1) for d, k in zip(dilation, ws[2:])]
        padding = None if any(t % 2 for t in totals) else [t // 2 for t in totals]
    padding = _per_dim(padding, count)
    if None in (stride, padding, dilation):
        return None
    return stride, padding, dilation


def _per_dim(value, count: int) -> tuple | None:
    """A convolution's int or ints, one per spatial dim (one int stands for every dim)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * count
    if isinstance(value, (tuple, list)) and len(value) in (1, count) \
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value) * (count // len(value))
    return None


@register("grouped_mm_fallback")
def grouped_mm(node):
    """Per-expert matmul over rows grouped by expert (a mixture-of-experts layer):
    ``input (s, k)``, ``weight (e, k, n)``, cumulative row counts ``offs (e,)`` -> ``(s, n)``.
    Each expert's linear splits like a linear layer: ``n`` (column-parallel, the weight split
    on dim 2) or ``k`` (row-parallel, a Partial output). Rows and experts stay whole: the
    offsets index rows of the whole input and every expert of the whole weight."""
    ins = tensor_inputs(node)
    x, w, offs = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "offs")
    if len({x, w, offs}) != 3 or len(ins) != 3 or len(shape_of(x)) != 2 \
            or len(shape_of(w)) != 3:
        return _fallback(node)
    labels = {x: [None, "k"], w: [None, "k", "n"], offs: [None]}
    options = einsum_options([labels[t] for t in ins], [None, "n"],
                             linear_in=[ins.index(x), ins.index(w)])
    # expert parallel: each rank holds some experts and computes their rows (zeros for the
    # others), so the output is a sum over ranks
    experts = tuple(Shard(0) if t is w else R for t in ins)
    options += ((experts, P),)
    # expert parallel with dispatch: each rank holds a run of the rows (sorted by expert)
    # and some experts; rows travel to their experts' ranks and back (all_to_all, every
    # row kept), the output split as the rows are
    dispatch = (tuple(Shard(0) if t in (x, w) else R for t in ins), Shard(0))
    options += (dispatch,)
    (rows, k), n = shape_of(x), shape_of(w)[2]
    w_slot, x_slot = ins.index(w), ins.index(x)
    item = x.meta["val"].element_size()

    def local(in_layouts, out_layout, axis_names):
        routed = [a for a, (p, q, o) in enumerate(zip(in_layouts[w_slot], in_layouts[x_slot],
                                                     out_layout))
                  if p == Shard(0) and q == Shard(0) and o == Shard(0)]
        if routed:
            return ("grouped_mm_dispatch", {"axis": axis_names[routed[0]], "rows": rows})
        axes = tuple(axis_names[a] for a, (p, o) in enumerate(zip(in_layouts[w_slot], out_layout))
                     if p == Shard(0) and o == P)
        return ("grouped_mm_local_experts", {"axes": axes}) if axes else None

    def exchange(in_layouts, out_layout, model):
        """Rows there and results back, forward and backward: four all_to_alls, each rank
        sending the rows of its own run (1/n of the group's) that belong elsewhere."""
        total = 0.0
        for a, (p, q, o) in enumerate(zip(in_layouts[w_slot], in_layouts[x_slot], out_layout)):
            if p == q == o == Shard(0):
                others = 1
                for b, pb in enumerate(in_layouts[x_slot]):
                    if b != a and pb == Shard(0):
                        others *= model.mesh.shape[b]
                share = rows * item / others / model.mesh.shape[a] * model.activation_scale
                there, back = (model.collective_s("all_to_all", a, share * width)
                               for width in (k, n))
                total += 2 * (there + back) * model.micro_batches
        return total

    return OpSpec(options, 2.0 * rows * k * n, io_bytes(node), local=local, once=(dispatch,),
                  exchange=exchange)
