"""fold_repeated_blocks: find the repeated blocks of a program and group identical ones.

A block is a set of nodes that one layer of the model computes; blocks with the same structure
form a class, which later phases plan once. Candidates come from the module hierarchy: every
call and get_attr node whose module path has a numeric component belongs to the block named by
the path up to that component (``h.0.attn.c_attn`` -> ``h.0``; Dynamo's ``layers[0]`` is read
as ``layers.0``). A program with no such hierarchy, or whose hierarchy repeats nothing, falls
back to repeated runs of its op sequence (see :func:`_find_runs`).

Two blocks are put in one class only if they are identical: the same nodes in the same order,
each with the same op, output shapes and dtypes, parameter shapes and non-tensor arguments,
reading the same internal nodes and boundary inputs position by position, and exposing the
same nodes as boundary outputs. A Weisfeiler-Lehman hash of the block's labelled graph
(networkx) keys each class; an exact comparison of that structure decides (see
:func:`_classify`).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
from torch.fx import Node

from autopar.program.graph import module_path

_CALLS = ("call_function", "call_method", "call_module")
_WL_ITERATIONS = 3           # enough rounds to separate blocks that differ one op deep
_MIN_RUN_NODES = 2           # a repeated "block" of one op is not worth planning apart
_RUN_CANDIDATES = 32         # repeated runs tried, best first, before giving up


@dataclass
class BlockInstance:
    """One occurrence of a block: its nodes and the values that cross its boundary."""

    path: str          # module path of the block ("h.0"); in run mode the nodes' common prefix
    nodes: list        # its call and get_attr nodes, in graph order
    inputs: list       # nodes defined outside and read inside, in order of first reading
    outputs: list      # its nodes read outside, in graph order


@dataclass
class BlockClass:
    """Identical blocks: ``instances[i].nodes[j]`` play the same part in every instance."""

    key: str                                   # the Weisfeiler-Lehman hash of the structure
    instances: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.instances[0].nodes)


def fold_repeated_blocks(gm, ctx):
    """Find repeated blocks and group structurally identical ones into classes.

    Reads ``node.meta["autopar.op"]``, ``"val"`` and ``"nn_module_stack"``, and
    ``ctx.param_fqns`` and ``ctx.options`` (its constraints and storage) (a parameter pinned to a layout in some layers
    only, or to different layouts, makes those layers differ). Writes ``node.meta["autopar.block"] = (class id,
    instance index)`` on every node of a block (class ids count from 0 in order of first
    appearance), sets ``ctx.blocks`` to the list of :class:`BlockClass`, and
    ``ctx.stats["block_classes"]`` to a JSON summary.
    """
    nodes = list(gm.graph.nodes)
    for node in nodes:
        node.meta.pop("autopar.block", None)
    labeler = _Labeler(set(ctx.param_fqns), ctx.options)
    method = "module_hierarchy"
    classes = _classify(_module_blocks(nodes), labeler)
    if not any(len(c.instances) > 1 for c in classes):
        # lists of lists (levels of layers, as TransGAN's): the layers one level down
        deeper = _classify(_module_blocks(nodes, depth=2), labeler)
        if any(len(c.instances) > 1 for c in deeper):
            classes = deeper
    if not any(len(c.instances) > 1 for c in classes):
        method, classes = "repeated_runs", _find_runs(nodes, labeler)
    if not classes:
        method = "none"
    for class_id, cls in enumerate(classes):
        for index, inst in enumerate(cls.instances):
            for node in inst.nodes:
                node.meta["autopar.block"] = (class_id, index)
    ctx.blocks = classes
    ctx.stats["block_classes"] = {
        "method": method,
        "classes": len(classes),
        "instances": [len(c.instances) for c in classes],
        "nodes_per_block": [c.size for c in classes],
        "folded_nodes": sum(c.size * len(c.instances) for c in classes),
        "paths": [c.instances[0].path for c in classes],
    }
    return gm


# -- candidates from the module hierarchy ------------------------------------------------------

_INDEX = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")            # layers[0], _modules['0']
_GETATTR = re.compile(r"getattr\(([^()]*?), *['\"]([^'\"]+)['\"]\)")  # getattr(L['self'].h, '0')


def program_key(gm, ctx) -> tuple:
    """Everything planning ``gm`` looks at, as one hashable value (the labels and arguments
    two blocks are compared by, over the whole program, with what the user pinned of its
    inputs): programs of equal keys are one program under other names (the same nodes in the
    same order) and plan alike."""
    labeler = _Labeler(set(ctx.param_fqns), ctx.options)
    nodes = list(gm.graph.nodes)
    index = {n: _Ref(("n", j)) for j, n in enumerate(nodes)}
    names = iter(ctx.input_names)
    out = []
    for n in nodes:
        label = labeler.node_label(n)
        if n.op == "placeholder":
            label += tuple(str(layout) for layout in ctx.options.pins_of(next(names, n.name)))
        out.append((label, _canon(n.args, index), _canon(n.kwargs, index)))
    return tuple(out)


def block_prefix(path: str, depth: int = 1) -> str:
    """The path up to and including its first (``depth``-th) numeric component, or "" if it
    has none.

    >>> block_prefix("h.0.attn.c_attn"), block_prefix("L['self'].layers[12].w1")
    ('h.0', 'layers.12')
    >>> block_prefix("levels.1.2.qkv", depth=2)
    'levels.1.2'
    """
    path = path.replace("L['self']", "")
    while "getattr(" in path:
        path, n = _GETATTR.subn(r"\1.\2", path)
        if not n:
            break
    path = _INDEX.sub(r".\1", path).replace("._modules.", ".")
    parts = [p for p in path.split(".") if p and p != "_modules"]
    seen = 0
    for i, part in enumerate(parts):
        if part.isdigit():
            seen += 1
            if seen == depth:
                return ".".join(parts[:i + 1])
    return ""


def _module_blocks(nodes, depth: int = 1) -> list:
    """Blocks named by module path (up to its ``depth``-th numeric component), in graph
    order; those whose call nodes are not contiguous (another block's or a top-level call in
    between) are left out: they are not one segment of the program."""
    members, call_pos = {}, {}
    calls = [n for n in nodes if n.op in _CALLS]
    for pos, node in enumerate(calls):
        call_pos[node] = pos
    prefixes = {}   # module path -> block prefix: a model has far fewer paths than nodes
    for node in nodes:
        if node.op in _CALLS or node.op == "get_attr":
            path = module_path(node)
            prefix = prefixes.get(path)
            if prefix is None:
                prefix = prefixes[path] = block_prefix(path, depth)
            if prefix:
                members.setdefault(prefix, []).append(node)
    blocks = []
    for prefix, block_nodes in members.items():
        positions = [call_pos[n] for n in block_nodes if n in call_pos]
        if not positions or positions[-1] - positions[0] + 1 != len(positions):
            continue
        blocks.append((positions[0], prefix, block_nodes))
    blocks.sort(key=lambda b: b[0])
    return [_instance(prefix, block_nodes) for _, prefix, block_nodes in blocks]


def _instance(path: str, block_nodes: list) -> BlockInstance:
    inside = set(block_nodes)
    inputs, seen = [], set()
    for node in block_nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in seen:
                seen.add(arg)
                inputs.append(arg)
    outputs = [n for n in block_nodes if any(u not in inside for u in n.users)]
    return BlockInstance(path, block_nodes, inputs, outputs)


# -- structural identity -----------------------------------------------------------------------

class _Labeler:
    """Labels of nodes and of whole blocks, for the WL hash and the exact comparison."""

    def __init__(self, param_fqns: set, options):
        self.param_fqns = param_fqns
        self.options = options   # what the user pinned
        self._described = {}   # id(value) -> (value, its description)

    def describe(self, val):
        """:func:`_describe`, once per value object (copies of a layer share their values); the
        value is kept so that its id stays its own."""
        known = self._described.get(id(val))
        if known is None:
            known = self._described[id(val)] = (val, _describe(val))
        return known[1]

    def node_label(self, node: Node) -> tuple:
        val = self.describe(node.meta.get("val"))
        if node.op == "get_attr":
            # the layouts it is pinned to, not which globs
            pinned = tuple(str(layout) for layout in self.options.pins_of(node.target))
            return ("get_attr", val, node.target in self.param_fqns,
                    bool(getattr(node.meta.get("val"), "requires_grad", False)), pinned)
        return (node.op, node.meta.get("autopar.op"), val)

    def structure(self, inst: BlockInstance) -> tuple:
        """Everything the exact comparison looks at, as one hashable value."""
        index = {n: _Ref(("n", j)) for j, n in enumerate(inst.nodes)}
        index.update({n: _Ref(("in", k)) for k, n in enumerate(inst.inputs)})
        body = tuple((self.node_label(n), _canon(n.args, index), _canon(n.kwargs, index))
                     for n in inst.nodes)
        boundary = tuple((self.describe(n.meta.get("val")), n.op == "get_attr")
                         for n in inst.inputs)
        outputs = tuple(index[n].where[1] for n in inst.outputs)
        return body, boundary, outputs

    def wl_hash(self, inst: BlockInstance, structure: tuple) -> str:
        body, boundary, outputs = structure
        g = nx.DiGraph()
        out = set(outputs)
        for j, (label, args, kwargs) in enumerate(body):
            masked = (_canon(args, {}, mask=True), _canon(kwargs, {}, mask=True))
            g.add_node(("n", j), label=repr((label, masked, j in out)))
        for k, desc in enumerate(boundary):
            g.add_node(("in", k), label=repr(("input", desc)))
        for j, (_, args, kwargs) in enumerate(body):
            for pos, ref in enumerate(_refs((args, kwargs))):
                edge = g.get_edge_data(ref, ("n", j))
                g.add_edge(ref, ("n", j), pos=f"{edge['pos']},{pos}" if edge else str(pos))
        with warnings.catch_warnings():  # networkx >= 3.5 notes that directed hashes changed
            warnings.filterwarnings("ignore", message="The hashes produced for directed graphs")
            return nx.weisfeiler_lehman_graph_hash(g, node_attr="label", edge_attr="pos",
                                                   iterations=_WL_ITERATIONS)


def _describe(val):
    """Shapes and dtypes of a value: a tensor, a tuple of them, or a Python value's type."""
    if isinstance(val, torch.Tensor):
        return ("T", tuple(d if isinstance(d, int) else str(d) for d in val.shape),
                str(val.dtype))
    if isinstance(val, (tuple, list)):
        return tuple(_describe(v) for v in val)
    return ("V", type(val).__name__)


@dataclass(frozen=True)
class _Ref:
    """A node argument, by its place: ("n", j) the block's j-th node, ("in", k) its k-th input."""

    where: tuple


_PLAIN = frozenset({type(None), bool, int, str, torch.dtype, torch.device, torch.memory_format,
                    torch.layout})


def _canon(arg, index: dict, mask: bool = False):
    """An argument as a hashable value: nodes by their place in the block (``index`` maps
    them to their :class:`_Ref`), constants as is."""
    if type(arg) in _PLAIN:   # most arguments: checked first, by exact type
        return arg
    if isinstance(arg, Node):
        return "*" if mask else index[arg]
    if isinstance(arg, (tuple, list)):
        return (type(arg).__name__,) + tuple([_canon(a, index, mask) for a in arg])
    if isinstance(arg, dict):
        return ("dict",) + tuple((k, _canon(v, index, mask)) for k, v in arg.items())
    if isinstance(arg, torch.Tensor):
        return ("tensor", tuple(arg.shape), str(arg.dtype))
    if isinstance(arg, float):
        return ("float", repr(arg))  # repr: nan equals nan, -0.0 differs from 0.0
    if isinstance(arg, slice):
        return ("slice", _canon((arg.start, arg.stop, arg.step), index, mask))
    if arg is None or isinstance(arg, (bool, int, str, torch.dtype, torch.device,
                                       torch.memory_format, torch.layout)):
        return arg
    return (type(arg).__name__, repr(arg))


def _refs(canon) -> list:
    """The node references in a canonical argument, in argument order."""
    if isinstance(canon, _Ref):
        return [canon.where]
    if isinstance(canon, tuple):
        return [r for c in canon for r in _refs(c)]
    return []


def _classify(instances: list, labeler: _Labeler) -> list:
    """Group instances (in graph order) into classes of identical blocks, in first-appearance
    order.

    Structures are compared exactly, through a dict keyed by the structure (its hash is the
    first filter, equality confirms). The WL hash is a function of the structure alone, so it
    is computed once per distinct structure, not per block: it costs about 2 ms per block of
    60 nodes, more than the exact comparison, and would otherwise grow with depth. It names the
    class with a key that is the same in every process (Python's own hash is salted per
    process), and two classes with one WL hash stay apart when their structures differ.
    """
    by_structure, classes = {}, []
    for inst in instances:
        structure = labeler.structure(inst)
        cls = by_structure.get(structure)
        if cls is None:
            cls = BlockClass(labeler.wl_hash(inst, structure), [])
            by_structure[structure] = cls
            classes.append(cls)
        cls.instances.append(inst)
    return classes


# -- fallback: repeated runs of the op sequence ------------------------------------------------

def _find_runs(nodes, labeler: _Labeler) -> list:
    """Classes from the longest back-to-back repetition of the call-op sequence.

    For every period p, positions where op[i] == op[i + p] form stretches; a stretch of t
    such positions is p-periodic over t + p ops, i.e. (t + p) // p back-to-back runs. The
    candidate covering the most ops (shortest period on ties) is cut into runs at the phase
    whose runs exchange the fewest values, and must form a chain (each run reads a value of
    the one before); it is then confirmed exactly like module blocks, and classes with a single
    run are dropped. Limits: only one repeated region is folded (the largest), runs are judged
    by op names before shapes, and a loop body whose ops are reordered between iterations is
    not found.
    """
    calls = [n for n in nodes if n.op in _CALLS]
    order = {n: i for i, n in enumerate(nodes)}
    codes = {}
    ops = np.array([codes.setdefault(n.meta.get("autopar.op", n.target), len(codes))
                    for n in calls], dtype=np.int64)
    for start, period, length in _periodic_stretches(ops)[:_RUN_CANDIDATES]:
        runs = _best_phase(calls, order, start, period, length)
        if runs is None:
            continue
        classes = [c for c in _classify(runs, labeler) if len(c.instances) > 1]
        if classes:
            return classes
    return []


def _periodic_stretches(ops: np.ndarray) -> list:
    """(start, period, length) of maximal p-periodic stretches holding >= 2 runs, best first."""
    n, found = len(ops), []
    for p in range(_MIN_RUN_NODES, n // 2 + 1):
        same = np.concatenate(([False], ops[:-p] == ops[p:], [False]))
        edges = np.flatnonzero(np.diff(same.astype(np.int8)))
        starts, ends = edges[0::2], edges[1::2]
        for s, t in zip(starts.tolist(), (ends - starts).tolist()):
            if t >= p:
                found.append((s, p, t + p))
    found.sort(key=lambda c: (-((c[2] // c[1]) * c[1]), c[1], c[0]))
    return found


def _best_phase(calls, order, start, period, length):
    """The runs of one periodic stretch, cut at the chained phase with the fewest crossings."""
    count = length // period
    best = None
    for offset in range(length - count * period + 1):
        runs = []
        for r in range(count):
            first = start + offset + r * period
            runs.append(_run_instance(calls[first:first + period], order))
        if not all(set(b.inputs) & set(a.outputs) for a, b in zip(runs, runs[1:])):
            continue
        crossings = sum(len(r.inputs) + len(r.outputs) for r in runs)
        if best is None or crossings < best[0]:
            best = (crossings, runs)
    return None if best is None else best[1]


def _run_instance(run_calls: list, order: dict) -> BlockInstance:
    """A run's call nodes plus the get_attr nodes read by no one else, in graph order."""
    inside = set(run_calls)
    attrs = {a for n in run_calls for a in n.all_input_nodes
             if a.op == "get_attr" and all(u in inside for u in a.users)}
    members = sorted(inside | attrs, key=order.__getitem__)
    paths = [module_path(n) for n in run_calls]
    common = paths[0].split(".") if paths else []
    for p in paths[1:]:
        parts = p.split(".")
        while common and parts[:len(common)] != common:
            common.pop()
    return _instance(".".join(common), members)
