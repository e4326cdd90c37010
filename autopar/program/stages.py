"""A program cut into pipeline stages: contiguous runs of its layers, each its own program.

The layers are the instances of the program's repeated blocks (``node.meta["autopar.block"]``,
found by folding), in graph order. A cut falls just before a layer's first op; ops outside the
layers go with the stage of the layer before them (those before the first layer with the first
stage). Since an fx graph is in topological order and every stage is a run of graph positions,
a value only ever flows to the same or a later stage.

Each stage is an ``fx.GraphModule`` of its own (nodes copied with their meta, so it is planned
without being traced again) whose placeholders are the program inputs it reads, then the values
it receives from the stage before: everything computed earlier that it or a later stage reads,
handed on stage to stage. A parameter read in two stages (a tied embedding and head) is read
by each from its own copy (see :attr:`StageGraph.params`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import PlanError

_CALLS = ("call_function", "call_method")


@dataclass
class Layers:
    """The layers of a program and where it may be cut."""

    paths: list          # module path of each layer, in order ("h.0", "h.1", ...)
    starts: list         # graph position of each layer's first op
    cuttable: list       # per layer j: whether a stage may start at layer j (j >= 1)
    nodes: list          # the program's nodes in graph order

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class StageGraph:
    """One stage's program and how it connects to the others."""

    gm: fx.GraphModule
    inputs: list          # per placeholder: ("input", i) program input i, or ("value", name)
    outputs: list         # value names handed to the next stage; the last: the program outputs
    layers: list          # module paths of its layers
    params: list = field(default_factory=list)   # the get_attr targets it reads
    input_names: list = field(default_factory=list)


def find_layers(gm: fx.GraphModule, blocks) -> Layers | None:
    """The program's layers: every instance of a class of repeated blocks, in graph order;
    None where there are fewer than two (nothing to cut between)."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    kept = _layer_spans(position, blocks)
    if len(kept) < 2:
        return None
    cuttable = [False] + [_crossing_ok(nodes, position, kept[j][0]) for j in range(1, len(kept))]
    return Layers([p for _, _, p in kept], [lo for lo, _, _ in kept], cuttable, nodes)


def count_layers(gm: fx.GraphModule, blocks) -> int:
    """How many layers :func:`find_layers` finds (0 where fewer than two), without asking
    where the program may be cut: the most stages it could be cut into."""
    kept = _layer_spans({n: i for i, n in enumerate(gm.graph.nodes)}, blocks)
    return len(kept) if len(kept) >= 2 else 0


def _layer_spans(position: dict, blocks) -> list:
    """(first position, last position, module path) of every layer, in graph order."""
    spans = []
    for cls in blocks or []:
        if len(cls.instances) < 2:
            continue
        for inst in cls.instances:
            calls = [position[n] for n in inst.nodes if n.op in _CALLS]
            if calls:
                spans.append((min(calls), max(calls), inst.path))
    spans.sort()
    # blocks found inside other blocks are not layers of their own
    kept = []
    for lo, hi, path in spans:
        if kept and lo <= kept[-1][1]:
            continue
        kept.append((lo, hi, path))
    return kept


def _crossing_ok(nodes, position, start: int) -> bool:
    """Whether every value computed before position ``start`` and read at or after it is a
    tensor (what a stage can hand to the next)."""
    for n in nodes[:start]:
        if n.op not in _CALLS:
            continue
        if any(position[u] >= start for u in n.users) and \
                not isinstance(n.meta.get("val"), torch.Tensor):
            return False
    return True


def check_split(layers: Layers, split) -> list:
    """``split``: layers per stage; returns the first layer of each stage. Raises a PlanError
    naming what would work where the split does not fit the program."""
    split = list(split)
    n = len(layers)
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in split) or \
            sum(split) != n:
        raise PlanError(f"stages={split}: give each stage a whole number >= 1 of layers, "
                        f"{n} in all ({', '.join(layers.paths[:3])}, ...)")
    firsts = [sum(split[:s]) for s in range(len(split))]
    for j in firsts[1:]:
        if not layers.cuttable[j]:
            raise PlanError(f"stages={split}: the program cannot be cut before layer "
                            f"{layers.paths[j]} (a value that is not a tensor crosses there); "
                            f"cut at other layers")
    return firsts


def cut(gm: fx.GraphModule, layers: Layers, firsts: list, input_names: list) -> list:
    """The stage programs of ``gm`` when stage s starts at layer ``firsts[s]``."""
    nodes = layers.nodes
    bounds = [0] + [layers.starts[j] for j in firsts[1:]] + [len(nodes)]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    out_node = nodes[-1]
    assert out_node.op == "output"

    p = len(firsts)
    stage = {n: s for s in range(p) for n in nodes[bounds[s]:bounds[s + 1]]}
    calls = [n for n in nodes if n.op in _CALLS]
    # the values each stage reads from earlier stages (or the output reads)
    last_read = {}
    for n in calls:
        s = stage[n]
        for a in n.all_input_nodes:
            if a.op in _CALLS and stage[a] < s:
                last_read[a] = max(last_read.get(a, 0), s)
    for a in out_node.all_input_nodes:
        if a.op in _CALLS and stage[a] < p - 1:
            last_read[a] = p - 1
    crossing = [a for a in calls if a in last_read]
    stages = []
    for s in range(p):
        received = [a for a in crossing if stage[a] < s <= last_read[a]]
        handed = [a for a in crossing if stage[a] <= s < last_read[a]]
        mine = [n for n in nodes[bounds[s]:bounds[s + 1]] if n.op in _CALLS]
        g = fx.Graph()
        env, inputs, names, params = {}, [], [], []
        reads = {a for n in mine for a in n.all_input_nodes}
        if s == p - 1:
            reads |= set(out_node.all_input_nodes)
        for i, ph in enumerate(placeholders):
            if ph in reads:
                env[ph] = g.placeholder(ph.name)   # without the default it may have
                env[ph].meta = dict(ph.meta)
                inputs.append(("input", i))
                names.append(input_names[i] if i < len(input_names) else ph.name)
        for a in received:
            ph = g.placeholder(a.name)
            ph.meta = {"autopar.op": "placeholder", "val": a.meta["val"],
                       "autopar.source": a.meta.get("autopar.source", "")}
            env[a] = ph
            inputs.append(("value", a.name))
            names.append(a.name)
        for n in nodes:
            if n.op == "get_attr" and n in reads:
                env[n] = g.node_copy(n)
                params.append(n.target)
        for n in mine:
            for a in n.all_input_nodes:
                if a not in env:  # a get_attr read only here
                    env[a] = g.node_copy(a)
                    params.append(a.target)
            env[n] = g.node_copy(n, lambda a: env[a])
        if s == p - 1:
            for a in out_node.all_input_nodes:
                if a not in env:
                    env[a] = g.node_copy(a)
            g.output(fx.node.map_arg(out_node.args[0], lambda a: env[a]))
            outputs = None
        else:
            g.output(tuple(env[a] for a in handed))
            outputs = [a.name for a in handed]
        stage_gm = fx.GraphModule(gm, g, f"Stage{s}")
        lo, hi = firsts[s], (firsts[s + 1] if s + 1 < p else len(layers))
        stages.append(StageGraph(stage_gm, inputs, outputs, layers.paths[lo:hi], params, names))
    return stages

