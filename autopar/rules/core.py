"""The core of the op rules: what a rule says (:class:`OpSpec`), the registry, the facts
about nodes the rules read, and the combination of per-axis options into whole-mesh
strategies. The rules themselves are in this package's op-family modules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.fx import Node
from torch.fx.immutable_collections import immutable_dict, immutable_list

from .._torch import tree_leaves
from ..program.placement import Partial, Replicate, Shard, StridedShard, is_shard, is_strided

R = Replicate()
P = Partial()

_RULES: dict = {}


@dataclass(frozen=True)
class OpSpec:
    """What one op admits on one mesh axis, and what it costs on one device.

    options: ``(input placements, output placement)`` pairs; one input placement per tensor
        input of the node, in the order of :func:`tensor_inputs`.
    flops, num_bytes: work and memory traffic of the whole (unsplit) op, forward only.
    rewrite: ``(args, kwargs, local_out_shape) -> (args, kwargs)`` for ops whose arguments
        hold sizes that must become this rank's local sizes (view, reshape, expand).
    local: ``(input layouts, output layout, axis names) -> (name in runtime.local_ops, extra
        kwargs) | None``
        for ops whose local computation under some layouts is not the op itself on the
        local pieces (it depends on the rank's place on the mesh): the rank program calls
        ``function(*args, **kwargs, **extra)`` instead; the function reads the rank's coordinates from
        the active mesh, or from its ``coords`` keyword in simulated runs.
    once: options that at most one mesh axis may take, no other axis splitting the dims
        they split (their local computation exchanges values over that axis).
    exchange: ``(input layouts, output layout, cost model) -> seconds`` of the communication
        a strategy's local computation does itself (forward and backward), for ops whose
        ``local`` exchanges values between ranks.
    max_ranks: ``(option, ranks)`` pairs: options no mesh axis of more ranks may take (the
        pieces they cut must stay large enough for their local computation).
    """

    options: tuple
    flops: float = 0.0
    num_bytes: float = 0.0
    rewrite: Callable | None = None
    fallback: bool = False
    local: Callable | None = None
    once: tuple = ()
    exchange: Callable | None = None
    max_ranks: tuple = ()


@dataclass(frozen=True)
class Strategy:
    """One admissible choice for a node on a whole mesh: a layout per input and the output's."""

    inputs: tuple
    output: tuple
    spec: OpSpec = field(compare=False, repr=False, default=None)


def register(*names: str):
    """Register ``rule`` under canonical op names: ``@register("relu", "gelu")``."""

    def deco(fn):
        for name in names:
            _RULES[name] = fn
        return fn

    return deco


def rule_for(op: str):
    return _RULES.get(op)


def known_ops() -> list:
    return sorted(_RULES)


# -- facts about nodes -------------------------------------------------------------------------

def is_tensor_like(val) -> bool:
    """A tensor, or a tuple or list of tensors, where some entries may be None (outputs an
    op leaves out: multi-head attention's weights unless asked for)."""
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val) \
        and all(v is None or isinstance(v, torch.Tensor) for v in val)


def tensor_inputs(node: Node) -> list:
    """The node's inputs that carry tensors, in flattened (args, kwargs) order, once each."""
    found: dict = {}
    _collect_nodes((node.args, node.kwargs), found)
    return [a for a in found if is_tensor_like(a.meta.get("val"))]


# Argument containers flattened here as torch's pytree flattens them, without its per-leaf
# overhead (planning asks for a node's inputs tens of thousands of times); values of other
# types go through pytree itself, so that what counts as a leaf stays pytree's.
_SEQUENCES = frozenset({tuple, list, immutable_list})
_MAPPINGS = frozenset({dict, immutable_dict})
_ATOMS = frozenset({int, float, bool, str, type(None), type(...), slice, torch.dtype,
                    torch.device, torch.layout, torch.memory_format})


def _collect_nodes(tree, found: dict) -> None:
    """Add the Nodes among ``tree``'s pytree leaves to ``found``, in order of first appearance."""
    kind = type(tree)
    if kind in _SEQUENCES:
        for x in tree:
            _collect_nodes(x, found)
    elif kind in _MAPPINGS:
        for x in tree.values():
            _collect_nodes(x, found)
    elif isinstance(tree, Node):
        found[tree] = None
    elif kind not in _ATOMS:
        for leaf in tree_leaves(tree):
            if isinstance(leaf, Node):
                found[leaf] = None


def shape_of(node_or_val) -> tuple:
    val = node_or_val.meta["val"] if isinstance(node_or_val, Node) else node_or_val
    if isinstance(val, (tuple, list)):
        val = next(v for v in val if v is not None)
    return tuple(int(s) for s in val.shape)


def out_vals(node: Node) -> list:
    val = node.meta["val"]
    return list(val) if isinstance(val, (tuple, list)) else [val]


def num_bytes_of(nodes_or_vals) -> float:
    total = 0
    for x in nodes_or_vals:
        vals = out_vals(x) if isinstance(x, Node) else [x]
        for v in vals:
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return float(total)


def io_bytes(node: Node) -> float:
    return num_bytes_of(tensor_inputs(node)) + num_bytes_of([node])


def arg(node: Node, index: int, name: str, default=None):
    """A node argument given positionally or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


# -- option builders ---------------------------------------------------------------------------

def replicated_options(num_inputs: int) -> tuple:
    return (((R,) * num_inputs, R),)


def einsum_options(in_dims: Sequence, out_dims: Sequence, linear_in: Sequence[int] = ()) -> tuple:
    """Options of an einsum-like op given per-input dim labels.

    ``in_dims[i]`` labels input i's dims (``None`` marks a broadcast size-1 dim that is never
    split); ``out_dims`` labels the output's. Splitting a label shared by the output shards it;
    splitting a contracted label (absent from the output) leaves the output ``Partial``. An input
    in ``linear_in`` may itself be Partial while the others are replicated.
    """
    opts = [(tuple(R for _ in in_dims), R)]
    labels = []
    for dims in list(in_dims) + [out_dims]:
        labels += [d for d in dims if d is not None and d not in labels]
    for label in labels:
        ins = []
        for dims in in_dims:
            ins.append(Shard(list(dims).index(label)) if label in dims else R)
        if label in out_dims:
            if list(out_dims).count(label) != 1:
                continue
            opts.append((tuple(ins), Shard(list(out_dims).index(label))))
        else:
            opts.append((tuple(ins), P))
    for i in linear_in:
        opts.append((tuple(P if j == i else R for j in range(len(in_dims))), P))
    return tuple(opts)


def einsum_flops(in_dims: Sequence, shapes: Sequence) -> float:
    sizes = {}
    for dims, shape in zip(in_dims, shapes):
        for d, s in zip(dims, shape):
            if d is not None:
                sizes[d] = max(sizes.get(d, 1), s)
    return 2.0 * math.prod(sizes.values())


def broadcast_labels(shapes: Sequence, out_shape: Sequence) -> tuple:
    """Label dims of broadcasting inputs against the output: equal sizes share a label,
    size-1 dims broadcast to a larger size get ``None``."""
    out_labels = [f"d{i}" for i in range(len(out_shape))]
    in_labels = []
    for shape in shapes:
        offset = len(out_shape) - len(shape)
        labels = []
        for j, s in enumerate(shape):
            k = j + offset
            labels.append(out_labels[k] if s == out_shape[k] else None)
        in_labels.append(labels)
    return in_labels, out_labels


# -- combining axes ----------------------------------------------------------------------------

def spec_for(node: Node) -> OpSpec:
    """The node's spec from its rule, or the replicated fallback when it has none."""
    op = node.meta.get("autopar.op")
    rule = _RULES.get(op)
    n_in = len(tensor_inputs(node))
    if rule is None:
        return OpSpec(replicated_options(n_in), 0.0, io_bytes(node), fallback=True)
    return rule(node)


def candidates(node: Node) -> tuple:
    """What :func:`strategies` reads of ``node`` whatever the mesh: its spec, its options as
    one placement per tensor (the inputs' then the output's; equal options would only
    repeat strategies), and the shapes of its inputs and output."""
    spec = spec_for(node)
    ins = tensor_inputs(node)
    shapes = [[shape_of(v) for v in out_vals(a) if v is not None] for a in ins]
    shapes.append([tuple(v.shape) for v in out_vals(node) if isinstance(v, torch.Tensor)])
    columns = list(dict.fromkeys(
        tuple(o[0][i] for i in range(len(ins))) + (o[1],)
        for o in _without_boolean_partials(node, ins, spec.options)))
    segments = node.meta.get(SEGMENTS)
    if segments:
        # an option one axis alone may take exchanges plain blocks: it has no strided twin
        plain = [c for c in columns if (tuple(c[:-1]), c[-1]) not in spec.once]
        columns += [c for c in (_strided(c, segments, shapes) for c in plain)
                    if c is not None and c not in columns]
    return spec, columns, shapes


# node.meta key: {output dim: segments} of the strided shards a node's output may take
# (passes.mark_segments finds them where the value is later cut into those segments)
SEGMENTS = "autopar.segments"


def _strided(column: tuple, segments: dict, shapes: list) -> tuple | None:
    """The strided twin of an option that shards the output plainly on a segmented dim:
    the same option with every input sharded on a dim of that size strided alike (a
    dim carried element by element from input to output); None where there is none."""
    out = column[-1]
    if type(out) is not Shard or out.dim not in segments or len(shapes[-1]) != 1:
        return None
    ratios = segments[out.dim]
    size = shapes[-1][0][out.dim]
    twin = []
    for p, tensor_shapes in zip(column[:-1], shapes[:-1]):
        if is_strided(p):
            return None
        if is_shard(p):
            if any(s[p.dim] != size for s in tensor_shapes):
                return None
            p = StridedShard(p.dim, ratios)
        twin.append(p)
    return tuple(twin) + (StridedShard(out.dim, ratios),)


def strategies(node: Node, mesh_shape: Sequence[int], found_candidates=None) -> list:
    """Every layout choice for ``node`` on a mesh: the product of per-axis options, keeping
    only those whose sharded dims split evenly on every input and output.
    ``found_candidates``: :func:`candidates` of ``node``, where already known."""
    found = found_candidates or candidates(node)
    return make_strategies(found, even_combos(found, mesh_shape))


def make_strategies(found_candidates, combos) -> list:
    """The strategies of :func:`even_combos`' ``combos`` of options (:func:`candidates`)."""
    spec, columns, shapes = found_candidates
    out = []
    for combo in combos:
        # a column per mesh axis, transposed into a layout per tensor
        *in_layouts, out_layout = zip(*(columns[i] for i in combo)) if combo \
            else [()] * len(shapes)
        out.append(Strategy(tuple(in_layouts), out_layout, spec))
    return out


def even_combos(found_candidates, mesh_shape: Sequence[int]) -> tuple:
    """The tuples of options (by index in :func:`candidates`' columns), one per mesh axis, in
    ``itertools.product`` order, under which every tensor's sharded dims split evenly and no
    axis has more ranks than its option allows (``OpSpec.max_ranks``).

    A prefix whose dims do not split evenly is dropped before it grows: more axes on a dim
    only cut it into more pieces.
    """
    spec, columns, shapes = found_candidates
    usable = [(i, cut) for i, column in enumerate(columns)
              if (cut := _cuts(column, shapes)) is not None]
    once = {i for i, column in enumerate(columns)
            if (tuple(column[:-1]), column[-1]) in spec.once}
    most = dict(spec.max_ranks)
    most = {i: most[key] for i, column in enumerate(columns)
            if (key := (tuple(column[:-1]), column[-1])) in most}
    prefixes = [((), {})]  # (column indices, (tensor, dim) -> pieces)
    for n in mesh_shape:
        longer = []
        for prefix, pieces in prefixes:
            for i, cut in usable:
                if n > most.get(i, n):
                    continue
                grown = _split(pieces, cut, n, shapes, alone=i in once)
                if grown is not None:
                    longer.append((prefix + (i,), grown))
        prefixes = longer
    return tuple(prefix for prefix, _ in prefixes)


def _cuts(column: tuple, shapes: list) -> list | None:
    """The ``(tensor, dim, strided shard or None)`` triples ``column`` shards, or None when
    a sharded dim is out of range for one of the tensor's shapes."""
    out = []
    for j, p in enumerate(column):
        if is_shard(p):
            if not all(0 <= p.dim < len(s) for s in shapes[j]):
                return None
            out.append((j, p.dim, p if is_strided(p) else None))
    return out


def _split(pieces: dict, cut: list, n: int, shapes: list, alone: bool = False) -> dict | None:
    """``pieces`` after one more mesh axis of size ``n`` cuts the dims in ``cut``, or None
    when a dim no longer splits evenly. A dim cut strided, or by an option that at most one
    axis may take (``alone``), is cut by no other axis, and a strided dim's segments must
    each split evenly."""
    if not cut:
        return pieces
    grown = dict(pieces)
    for j, dim, strided in cut:
        before = grown.get((j, dim), 1)
        count = before * n
        if any(s[dim] % count for s in shapes[j]):
            return None
        if strided is not None or alone or (j, dim, "strided") in grown:
            if before != 1 or strided is not None and not all(
                    strided.splits_evenly(s[dim], n) for s in shapes[j]):
                return None
            grown[j, dim, "strided"] = True
        grown[j, dim] = count
    return grown


def _is_boolean(node: Node) -> bool:
    return any(isinstance(v, torch.Tensor) and v.dtype == torch.bool for v in out_vals(node))


def _without_boolean_partials(node: Node, ins: list, options) -> tuple:
    """The options that hold no boolean value Partial: rules that pass a Partial through a
    view or a copy say so whatever the dtype, but booleans do not add up to a boolean."""
    bool_in = [_is_boolean(a) for a in ins]
    bool_out = _is_boolean(node)
    return tuple(o for o in options
                 if not (bool_out and o[1] == P)
                 and not any(b and p == P for b, p in zip(bool_in, o[0])))


