"""The discrete planning problem on one mesh: strategies per node, their costs, the cost of
every edge for each pair of (producer layout, consumer need), and memory terms.

Both planners read it: the propagation planner (level "fast") and the integer program
(level "full", :mod:`autopar.solver`); :meth:`Problem.evaluate` prices any assignment the same
way both objectives do, so plans from either can be compared.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from .cost import SAVES_NOTHING, CostModel, fraction
from .placement import Replicate, Shard, divides
from .plans import Cost
from .redistribute import plan_steps
from .rules import Strategy, out_vals, shape_of, strategies, tensor_inputs

# Checkpoints at which memory is constrained: every op up to this many, else evenly spaced.
MAX_MEMORY_CHECKPOINTS = 64


@dataclass
class Edge:
    """Value ``src`` feeding input ``slot`` of ``dst``; costs by (src key, dst key)."""

    src: Node
    dst: Node
    slot: int
    src_keys: list            # per src strategy: its output layout
    dst_keys: list            # per dst strategy: (needed layout, gradient-sum axes)
    cost: dict                # (src key, dst key) -> seconds, forward and backward


class LayoutIds:
    """Small ints standing for layouts: placements hash slowly, and edge tables hold
    hundreds of thousands of keys."""

    def __init__(self):
        self.ids, self.layouts = {}, []

    def __call__(self, layout) -> int:
        i = self.ids.get(layout)
        if i is None:
            i = self.ids[layout] = len(self.layouts)
            self.layouts.append(layout)
        return i


@dataclass
class Problem:
    mesh: object
    model: CostModel
    nodes: list                                   # placeholders, get_attr and call nodes
    options: dict = field(default_factory=dict)   # node -> [Strategy]
    node_s: dict = field(default_factory=dict)    # node -> [seconds] per strategy
    edges: list = field(default_factory=list)
    static_bytes: dict = field(default_factory=dict)   # node -> [bytes] (parameters)
    saved_bytes: dict = field(default_factory=dict)    # node -> [bytes] saved for backward
    out_bytes: dict = field(default_factory=dict)      # node -> [bytes] of its output
    last_use: dict = field(default_factory=dict)       # node -> index of its last reader
    outputs: list = field(default_factory=list)        # nodes returned by the graph
    layout_id: LayoutIds = field(default_factory=LayoutIds)
    _moves: dict = field(default_factory=dict)
    tied: dict = field(default_factory=dict)   # node -> its counterpart in a first instance

    def tie_blocks(self, blocks) -> int:
        """Tie every instance of each repeated block to the first one, node by node, where
        their strategies agree. Returns how many nodes were tied."""
        for cls in blocks:
            first = cls.instances[0].nodes
            for inst in cls.instances[1:]:
                pairs = list(zip(first, inst.nodes))
                if all(a in self.options and self.options[a] == self.options[b]
                       for a, b in pairs):
                    self.tied.update({b: a for a, b in pairs})
        return len(self.tied)

    def move_s(self, num_bytes: float, a: int, b: int, grad: bool) -> float:
        """Cached seconds to move a value between the layouts with ids ``a`` and ``b``."""
        key = (num_bytes, a, b, grad)
        if key not in self._moves:
            lay = self.layout_id.layouts
            self._moves[key] = self.model.redistribute_s(num_bytes, lay[a], lay[b], grad)
        return self._moves[key]

    def index(self) -> dict:
        return {n: i for i, n in enumerate(self.nodes)}

    # -- pricing an assignment -------------------------------------------------------------

    def evaluate(self, choice: dict) -> Cost:
        """The cost of ``choice`` (node -> strategy index): seconds and peak memory."""
        compute = sum(self.node_s[n][choice[n]] for n in self.nodes)
        comm = 0.0
        for e in self.edges:
            comm += e.cost[(e.src_keys[choice[e.src]], e.dst_keys[choice.get(e.dst, 0)])]
        return Cost(compute + comm, compute, comm, self.peak_memory(choice))

    def peak_memory(self, choice: dict) -> float:
        """The largest of :meth:`memory_at` over the forward pass, in one sweep."""
        static = sum(self.static_bytes[n][choice[n]] for n in self.nodes)
        ends = [0.0] * (len(self.nodes) + 1)
        held, peak = static, static
        for t, n in enumerate(self.nodes):
            c = choice[n]
            held += self.saved_bytes[n][c] - ends[t]
            end = self.last_use.get(n, -1)
            if end > t:
                held += self.out_bytes[n][c]
                ends[min(end, len(self.nodes))] += self.out_bytes[n][c]
            peak = max(peak, held)
        return peak

    def memory_at(self, choice: dict, t: int) -> float:
        """Bytes held by one device just after node ``t`` runs in the forward pass."""
        total = 0.0
        for i, n in enumerate(self.nodes):
            c = choice[n]
            total += self.static_bytes[n][c]
            if i <= t:
                total += self.saved_bytes[n][c]
                if self.last_use.get(n, -1) > t:
                    total += self.out_bytes[n][c]
        return total

    def pair_count(self) -> int:
        """How many (producer layout, consumer need) pairs the exact program would carry."""
        return sum(len(set(e.src_keys)) * len(set(e.dst_keys)) for e in self.edges
                   if len(e.src_keys) > 1 and len(e.dst_keys) > 1)

    def restrict(self, kept: dict) -> tuple:
        """A copy keeping only strategies ``kept[node]`` (indices), and per node the map from
        new indices back to the old."""
        new = Problem(self.mesh, self.model, self.nodes, outputs=self.outputs,
                      last_use=self.last_use, layout_id=self.layout_id, _moves=self._moves,
                      tied=self.tied)
        for n in self.nodes:
            idx = kept[n]
            new.options[n] = [self.options[n][i] for i in idx]
            for table in ("node_s", "static_bytes", "saved_bytes", "out_bytes"):
                getattr(new, table)[n] = [getattr(self, table)[n][i] for i in idx]
        for e in self.edges:
            src_keys = [e.src_keys[i] for i in kept[e.src]]
            dst_keys = e.dst_keys if e.dst not in kept else [e.dst_keys[i] for i in kept[e.dst]]
            new.edges.append(Edge(e.src, e.dst, e.slot, src_keys, dst_keys, e.cost))
        return new, kept

    def scores_near(self, seed: dict) -> dict:
        """Per node and strategy: its own seconds plus its edges' seconds when every
        neighbour keeps its ``seed`` choice; ranks the strategies worth keeping."""
        score = {n: list(v) for n, v in self.node_s.items()}
        for e in self.edges:
            if e.dst in score:
                ka = e.src_keys[seed[e.src]]
                for s, kb in enumerate(e.dst_keys):
                    score[e.dst][s] += e.cost[(ka, kb)]
            kb = e.dst_keys[seed.get(e.dst, 0)]
            for s, ka in enumerate(e.src_keys):
                score[e.src][s] += e.cost[(ka, kb)]
        return score

    def checkpoints(self) -> list:
        calls = [i for i, n in enumerate(self.nodes) if n.op in ("call_function", "call_method")]
        if len(calls) <= MAX_MEMORY_CHECKPOINTS:
            return calls
        step = len(calls) / MAX_MEMORY_CHECKPOINTS
        picked = {calls[int(k * step)] for k in range(MAX_MEMORY_CHECKPOINTS)} | {calls[-1]}
        return sorted(picked)


def build_problem(gm, mesh, model: CostModel, pinned: dict, blocks=()) -> Problem:
    """Enumerate strategies for every node of ``gm`` on ``mesh`` and price them.

    ``pinned`` maps parameter and input nodes to the only layout they may take. The nodes of
    repeated ``blocks`` (classes of structurally identical instances) reuse the strategies
    and prices of their counterpart in the first instance.
    """
    nodes = [n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr", "call_function",
                                                   "call_method")]
    prob = Problem(mesh, model, nodes)
    pos = prob.index()
    same = _counterparts(blocks, pinned, pos)
    for n in nodes:
        if n in same:
            prob.options[n] = prob.options[same[n]]
        elif n.op in ("placeholder", "get_attr"):
            prob.options[n] = _source_options(n, mesh, pinned)
        else:
            prob.options[n] = strategies(n, mesh.shape)
        for user in n.users:
            if user.op == "output":
                prob.outputs.append(n)
                prob.last_use[n] = len(nodes)
            elif user in pos:
                prob.last_use[n] = max(prob.last_use.get(n, -1), pos[user])
    for n in nodes:
        if n in same:
            for table in (prob.node_s, prob.static_bytes, prob.saved_bytes, prob.out_bytes):
                table[n] = table[same[n]]
        else:
            _price_node(prob, n)
    priced = {}  # edges of repeated blocks share one table of costs
    for n in nodes:
        if n.op in ("call_function", "call_method"):
            for slot, src in enumerate(tensor_inputs(n)):
                e = _edge(prob, src, n, slot)
                key = (same.get(src, src), same.get(n, n), slot)
                e.cost = priced.setdefault(key, e.cost)
                prob.edges.append(e)
    _price_outputs(prob)
    return prob


def _counterparts(blocks, pinned, pos) -> dict:
    """Node of a later instance -> the same node of its block's first instance, where both
    are planned nodes and no constraint pins either."""
    out = {}
    for cls in blocks:
        first = cls.instances[0].nodes
        for inst in cls.instances[1:]:
            for a, b in zip(first, inst.nodes):
                if a in pos and b in pos and a not in pinned and b not in pinned \
                        and pos[a] < pos[b]:
                    out[b] = a
    return out


def _source_options(node, mesh, pinned) -> list:
    """Layouts an input or a parameter may take (never Partial); pinned ones take one."""
    if node in pinned:
        return [Strategy((), pinned[node])]
    shape = shape_of(node)
    per_axis = [Replicate()] + [Shard(d) for d in range(len(shape))]
    out = []
    for layout in itertools.product(per_axis, repeat=mesh.ndim):
        if divides(shape, layout, mesh.shape):
            out.append(Strategy((), tuple(layout)))
    return out


def _value_bytes(node) -> float:
    return float(sum(v.numel() * v.element_size() for v in out_vals(node)
                     if isinstance(v, torch.Tensor)))


def _trainable(node) -> bool:
    val = node.meta["val"]
    return node.op == "get_attr" and isinstance(val, torch.Tensor) and val.requires_grad


def _floating(node) -> bool:
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in out_vals(node))


def _price_node(prob: Problem, n: Node):
    m, mesh = prob.model, prob.mesh
    num_bytes = _value_bytes(n)
    opts = prob.options[n]
    act = m.activation_scale
    if n.op in ("placeholder", "get_attr"):
        prob.node_s[n] = [0.0] * len(opts)
        prob.saved_bytes[n] = [0.0] * len(opts)
        prob.out_bytes[n] = [0.0] * len(opts)
        if n.op == "get_attr":
            elem = n.meta["val"].element_size()
            per = m.training.bytes_per_parameter(_trainable(n), elem) / elem
            prob.static_bytes[n] = [num_bytes * fraction(s.output, mesh) * per for s in opts]
            prob.node_s[n] = [m.optimizer_s(num_bytes * fraction(s.output, mesh),
                                            _trainable(n), elem) for s in opts]
        else:
            prob.static_bytes[n] = [0.0] * len(opts)
        return
    op = n.meta["autopar.op"]
    ins = tensor_inputs(n)
    saves = op not in SAVES_NOTHING
    prob.node_s[n] = [m.compute_s(op, s.spec.flops, s.spec.num_bytes, s.inputs, s.output)
                      for s in opts]
    prob.static_bytes[n] = [0.0] * len(opts)
    prob.out_bytes[n] = [num_bytes * act * fraction(s.output, mesh) for s in opts]
    saved = []
    for s in opts:
        b = 0.0
        if saves:
            for src, need in zip(ins, s.inputs):
                if not _floating(src):
                    continue
                if src.op == "get_attr" and len(prob.options[src]) == 1 and \
                        prob.options[src][0].output == need:
                    continue  # the parameter itself, already counted
                b += _value_bytes(src) * act * fraction(need, mesh)
        saved.append(b)
    prob.saved_bytes[n] = saved


def needs_grad(node: Node) -> bool:
    """Whether a gradient flows into this value (FakeTensor propagation tracks it)."""
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in out_vals(node))


def grad_sum_axes(src: Node, need, out_layout) -> tuple:
    """Axes on which a replicated input of split work needs its gradient summed."""
    if not needs_grad(src):
        return ()
    return tuple(a for a, (p, q) in enumerate(zip(need, out_layout))
                 if isinstance(p, Replicate) and not isinstance(q, Replicate))


def fused_axis(src_layout, need) -> int | None:
    """The axis whose gather ends the redistribution (its gradient sum becomes a
    reduce-scatter), if any."""
    steps = plan_steps(tuple(src_layout), tuple(need))
    return steps[-1].axis if steps and steps[-1].kind == "all_gather" else None


def _edge(prob: Problem, src: Node, dst: Node, slot: int) -> Edge:
    m, lid = prob.model, prob.layout_id
    lay = lid.layouts
    num_bytes = _value_bytes(src)
    grad = needs_grad(src)
    src_keys = [lid(s.output) for s in prob.options[src]]
    dst_keys = [(lid(s.inputs[slot]), grad_sum_axes(src, s.inputs[slot], s.output))
                for s in prob.options[dst]]
    is_tuple = isinstance(src.meta["val"], (tuple, list))
    bucketed = src.op == "get_attr"  # parameter gradients are summed in buckets

    def price(key):
        a, (need, axes) = key
        if is_tuple and a != need:
            return float("inf")  # a tuple is consumed in its own layout
        t = prob.move_s(num_bytes, a, need, grad)
        if axes:
            fused = fused_axis(lay[a], lay[need])
            for axis in axes:
                t += m.grad_sum_s(num_bytes, lay[need], axis, fused=axis == fused,
                                  bucketed=bucketed)
        return t

    return Edge(src, dst, slot, src_keys, dst_keys, _Priced(price))


class _Priced(dict):
    """Edge costs computed on first use: planners read only a fraction of all pairs."""

    def __init__(self, price):
        super().__init__()
        self.price = price

    def __missing__(self, key):
        value = self[key] = self.price(key)
        return value


def _price_outputs(prob: Problem):
    """Outputs come back replicated: an edge from each output to the graph's output node,
    which takes one fixed strategy (replicated inputs)."""
    r = tuple(Replicate() for _ in range(prob.mesh.ndim))
    for n in prob.outputs:
        out = next(u for u in n.users if u.op == "output")
        num_bytes = _value_bytes(n)
        keys = [prob.layout_id(s.output) for s in prob.options[n]]
        rid = prob.layout_id(r)
        cost = {(a, (rid, ())): prob.move_s(num_bytes, a, rid, needs_grad(n)) for a in set(keys)}
        prob.edges.append(Edge(n, out, 0, keys, [(rid, ())], cost))  # few keys: priced now
