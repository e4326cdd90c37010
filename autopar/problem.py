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
from .placement import Replicate, Shard, divides, is_replicate
from .plans import Cost
from .redistribute import plan_steps
from .rules import Strategy, out_vals, shape_of, strategies, tensor_inputs

# Checkpoints at which memory is constrained: every op up to this many, else evenly spaced.
MAX_MEMORY_CHECKPOINTS = 64


@dataclass
class Edge:
    """Value ``src`` feeding input ``slot`` of ``dst``; costs by (src key, dst key).

    In a folded problem one edge stands for ``weight`` edges of the program: the same edge in
    every instance of a repeated block."""

    src: Node
    dst: Node
    slot: int
    src_keys: list            # per src strategy: its output layout
    dst_keys: list            # per dst strategy: (needed layout, gradient-sum axes)
    cost: dict                # (src key, dst key) -> seconds, forward and backward, one edge
    weight: int = 1

    def seconds(self, src_choice: int, dst_choice: int) -> float:
        """Seconds of every edge this one stands for, given both ends' strategies."""
        return self.weight * self.cost[(self.src_keys[src_choice], self.dst_keys[dst_choice])]


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
class Held:
    """Memory one node holds over part of the forward pass: ``mult`` x ``table[node][s]``
    bytes after every node ``t`` with ``start <= t < end`` (positions in ``Problem.nodes``)."""

    node: Node
    table: str          # "static_bytes", "saved_bytes" or "out_bytes"
    start: int
    end: int
    mult: int = 1


@dataclass
class Problem:
    """Strategies and prices of the nodes of a program on one mesh.

    Folded: of each class of repeated blocks, some instances are planned and each stands
    for a run of instances after it (:func:`fold_groups`); the nodes of those are left out. ``weight[n]`` counts the instances a node stands for (its seconds count that
    many times), ``rep`` maps a left-out node to the node standing for it, and memory is
    held as where it peaks, late in the chain: activations saved by the instances a node
    stands for are held from the first block's start on.
    """

    mesh: object
    model: CostModel
    nodes: list                                   # placeholders, get_attr and call nodes
    options: dict = field(default_factory=dict)   # node -> [Strategy]
    node_s: dict = field(default_factory=dict)    # node -> [seconds] per strategy, one instance
    edges: list = field(default_factory=list)
    static_bytes: dict = field(default_factory=dict)   # node -> [bytes] (parameters)
    saved_bytes: dict = field(default_factory=dict)    # node -> [bytes] saved for backward
    out_bytes: dict = field(default_factory=dict)      # node -> [bytes] of its output
    held: list = field(default_factory=list)           # [Held]: when each table counts
    outputs: list = field(default_factory=list)        # nodes returned by the graph
    weight: dict = field(default_factory=dict)         # node -> instances it stands for
    rep: dict = field(default_factory=dict)            # left-out node -> node standing for it
    layout_id: LayoutIds = field(default_factory=LayoutIds)
    _moves: dict = field(default_factory=dict)

    def move_s(self, num_bytes: float, a: int, b: int, grad: bool) -> float:
        """Seconds to move a value between the layouts with ids ``a`` and ``b``: a line in
        bytes, cached per pair of layouts."""
        line = self._moves.get((a, b, grad))
        if line is None:
            lay = self.layout_id.layouts
            line = self._moves[(a, b, grad)] = (0.0, 0.0) if a == b else \
                self.model.redistribute_line(lay[a], lay[b], grad)
        return line[0] + line[1] * num_bytes

    def fused_axis(self, a: int, b: int):
        """:func:`fused_axis` of the layouts with ids ``a`` and ``b``, cached."""
        key = ("fused", a, b)
        if key not in self._moves:
            lay = self.layout_id.layouts
            self._moves[key] = fused_axis(lay[a], lay[b])
        return self._moves[key]

    def index(self) -> dict:
        return {n: i for i, n in enumerate(self.nodes)}

    def expand(self, choice: dict) -> dict:
        """A choice over the problem's nodes extended to the nodes folded away."""
        out = dict(choice)
        for n, r in self.rep.items():
            out[n] = choice[r]
        return out

    def strategy(self, choice: dict, n: Node):
        """The strategy ``choice`` gives node ``n``, folded away or not."""
        r = self.rep.get(n, n)
        return self.options[r][choice[r]]

    # -- pricing an assignment -------------------------------------------------------------

    def evaluate(self, choice: dict) -> Cost:
        """The cost of ``choice`` (node -> strategy index): seconds and peak memory."""
        compute = sum(self.weight.get(n, 1) * self.node_s[n][choice[n]] for n in self.nodes)
        comm = sum(e.seconds(choice[e.src], choice.get(e.dst, 0)) for e in self.edges)
        return Cost(compute + comm, compute, comm, self.peak_memory(choice))

    def peak_memory(self, choice: dict) -> float:
        """The largest of :meth:`memory_at` over the forward pass, in one sweep."""
        n = len(self.nodes)
        delta = [0.0] * (n + 1)
        for h in self.held:
            v = h.mult * getattr(self, h.table)[h.node][choice[h.node]]
            delta[h.start] += v
            delta[min(h.end, n)] -= v
        held, peak = 0.0, 0.0
        for t in range(n):
            held += delta[t]
            peak = max(peak, held)
        return peak

    def memory_at(self, choice: dict, t: int) -> float:
        """Bytes held by one device just after node ``t`` runs in the forward pass."""
        return sum(h.mult * getattr(self, h.table)[h.node][choice[h.node]]
                   for h in self.held if h.start <= t < h.end)

    def pair_count(self) -> int:
        """How many (producer layout, consumer need) pairs the exact program would carry."""
        return sum(len(set(e.src_keys)) * len(set(e.dst_keys)) for e in self.edges
                   if len(e.src_keys) > 1 and len(e.dst_keys) > 1)

    def restrict(self, kept: dict) -> tuple:
        """A copy keeping only strategies ``kept[node]`` (indices), and per node the map from
        new indices back to the old."""
        new = Problem(self.mesh, self.model, self.nodes, outputs=self.outputs, held=self.held,
                      weight=self.weight, rep=self.rep, layout_id=self.layout_id,
                      _moves=self._moves)
        for n in self.nodes:
            idx = kept[n]
            new.options[n] = [self.options[n][i] for i in idx]
            for table in ("node_s", "static_bytes", "saved_bytes", "out_bytes"):
                getattr(new, table)[n] = [getattr(self, table)[n][i] for i in idx]
        for e in self.edges:
            src_keys = [e.src_keys[i] for i in kept[e.src]]
            dst_keys = e.dst_keys if e.dst not in kept else [e.dst_keys[i] for i in kept[e.dst]]
            new.edges.append(Edge(e.src, e.dst, e.slot, src_keys, dst_keys, e.cost, e.weight))
        return new, kept

    def scores_near(self, seed: dict) -> dict:
        """Per node and strategy: its own seconds plus its edges' seconds when every
        neighbour keeps its ``seed`` choice; ranks the strategies worth keeping."""
        score = {n: [self.weight.get(n, 1) * t for t in v] for n, v in self.node_s.items()}
        for e in self.edges:
            if e.dst in score:
                for s in range(len(e.dst_keys)):
                    score[e.dst][s] += e.seconds(seed[e.src], s)
            for s in range(len(e.src_keys)):
                score[e.src][s] += e.seconds(s, seed.get(e.dst, 0))
        return score

    def checkpoints(self) -> list:
        calls = [i for i, n in enumerate(self.nodes) if n.op in ("call_function", "call_method")]
        if len(calls) <= MAX_MEMORY_CHECKPOINTS:
            return calls
        step = len(calls) / MAX_MEMORY_CHECKPOINTS
        picked = {calls[int(k * step)] for k in range(MAX_MEMORY_CHECKPOINTS)} | {calls[-1]}
        return sorted(picked)


_PLANNED = ("placeholder", "get_attr", "call_function", "call_method")
_ALWAYS = 1 << 62   # the end of a held interval that lasts to the end of the forward pass


def build_problem(gm, mesh, model: CostModel, pinned: dict, blocks=(),
                  folding="ends", known: dict | None = None) -> Problem:
    """Enumerate strategies for the nodes of ``gm`` on ``mesh`` and price them.

    ``pinned`` maps parameter and input nodes to the only layout they may take. Given
    ``blocks`` (classes of structurally identical instances), the problem is folded as
    ``folding`` says (see :func:`fold_groups` and :class:`Problem`). ``known`` keeps the
    strategies enumerated for a node and mesh shape, for problems built again on one mesh.
    """
    rep, weight = _fold_map(blocks, pinned, folding)
    every = [n for n in gm.graph.nodes if n.op in _PLANNED]
    nodes = [n for n in every if n not in rep]
    prob = Problem(mesh, model, nodes, weight=weight, rep=rep)
    pos = prob.index()
    for n in nodes:
        if n.op in ("placeholder", "get_attr"):
            prob.options[n] = _source_options(n, mesh, pinned)
        else:
            key = (n, tuple(mesh.shape))
            if known is not None and key in known:
                prob.options[n] = known[key]
            else:
                prob.options[n] = strategies(n, mesh.shape)
                if known is not None:
                    known[key] = prob.options[n]
    for n in nodes:
        _price_node(prob, n)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    returned = [rep.get(a, a) for a in output.all_input_nodes if a.op in _PLANNED]
    prob.outputs = list(dict.fromkeys(returned))
    uses = _fold_edges(prob, every, pos)
    _hold_memory(prob, blocks, pos, uses)
    _price_outputs(prob, output, returned)
    return prob


def fold_groups(instances: list, folding) -> list:
    """Runs of consecutive instances of one class; the first of each run is planned and
    stands for the rest of it.

    ``"tied"``: one run, every instance alike. ``"ends"``: the first and last instance apart
    (where the layers before and after meet the chain), one run between them.
    ``("mixed", f)``: as ``"ends"`` with the middle cut in two runs after a share ``f`` of
    it, so that some instances may take one set of strategies and the rest another (as OSDP
    shards parameters in some layers only, to fit a memory budget).
    """
    if folding == "tied":
        return [instances]
    if len(instances) < 3:
        return [[i] for i in instances]
    first, middle, last = [instances[0]], instances[1:-1], [instances[-1]]
    if folding == "ends" or len(middle) < 2:
        return [first, middle, last]
    k = min(max(1, round(folding[1] * len(middle))), len(middle) - 1)
    return [first, middle[:k], middle[k:], last]


def _fold_map(blocks, pinned, folding) -> tuple:
    """(node of a left-out instance -> its counterpart in the instance standing for it,
    node -> how many instances it stands for), by :func:`fold_groups`."""
    rep, weight = {}, {}
    for cls in blocks:
        for run in fold_groups(cls.instances, folding):
            stand, others = run[0], run[1:]
            for a in stand.nodes:
                weight[a] = len(run)
            for inst in others:
                for a, b in zip(stand.nodes, inst.nodes):
                    if pinned.get(a) != pinned.get(b):
                        raise ValueError(f"{b.name} is pinned unlike {a.name}: the blocks "
                                         "holding them were folded together")
                    rep[b] = a
    return rep, weight


def _fold_edges(prob: Problem, every: list, pos: dict) -> dict:
    """The program's edges, one per (producer, consumer, slot) of the problem's nodes with
    the count of program edges it stands for. Returns, per producer, the positions of its
    readers, each with whether the read comes from a later instance of the producer's block
    (the value made by the instance before)."""
    found, uses = {}, {}
    for n in every:
        if n.op not in ("call_function", "call_method"):
            continue
        dst = prob.rep.get(n, n)
        for slot, src in enumerate(tensor_inputs(n)):
            key = (prob.rep.get(src, src), dst, slot)
            if key in found:
                found[key].weight += 1
            else:
                found[key] = _edge(prob, key[0], dst, slot)
            back = pos[key[0]] >= pos[dst]
            uses.setdefault(key[0], set()).add((pos[dst], back))
    prob.edges.extend(found.values())
    return uses


def _hold_memory(prob: Problem, blocks, pos: dict, uses: dict):
    """When each node's parameters, saved activations and output count toward memory.

    Seen from the last instance of each block, where memory peaks: the activations saved by
    all earlier instances are held from the first block's start, and a value read by the
    next instance (the block's output) is live from that start until its last reader.
    """
    starts = [pos[cls.instances[0].nodes[0]] for cls in blocks
              if cls.instances[0].nodes[0] in pos]
    block_start = min(starts, default=0)
    end_of_forward = len(prob.nodes)
    for n in prob.nodes:
        w, p = prob.weight.get(n, 1), pos[n]
        prob.held.append(Held(n, "static_bytes", 0, _ALWAYS, w))
        prob.held.append(Held(n, "saved_bytes", p, _ALWAYS, 1))
        if w > 1:
            prob.held.append(Held(n, "saved_bytes", block_start, _ALWAYS, w - 1))
        readers = uses.get(n, ())
        later = max((t for t, back in readers if not back), default=-1)
        if n in prob.outputs:
            later = end_of_forward
        if later > p:
            prob.held.append(Held(n, "out_bytes", p, later, 1))
        earlier = max((t for t, back in readers if back), default=-1)
        if earlier >= 0:
            prob.held.append(Held(n, "out_bytes", block_start, earlier, 1))


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
                src_options = prob.options[prob.rep.get(src, src)]
                if src.op == "get_attr" and len(src_options) == 1 and \
                        src_options[0].output == need:
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
                 if is_replicate(p) and not is_replicate(q))


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
    param = src.op == "get_attr"

    def price(key):
        a, (need, axes) = key
        if is_tuple and a != need:
            return float("inf")  # a tuple is consumed in its own layout
        t = prob.move_s(num_bytes, a, need, grad)
        if axes:
            fused = prob.fused_axis(a, need)
            for axis in axes:
                # a parameter's gradient is summed in buckets after backward where it is
                # stored replicated on the axis; stored split, each use sums its own
                bucketed = param and is_replicate(lay[a][axis])
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


def _price_outputs(prob: Problem, output: Node, returned: list):
    """Outputs come back replicated: an edge from each output to the graph's output node,
    which takes one fixed strategy (replicated inputs). ``returned`` lists the problem node
    standing for each value returned, so a folded output counts once per instance."""
    r = tuple(Replicate() for _ in range(prob.mesh.ndim))
    for n in prob.outputs:
        num_bytes = _value_bytes(n)
        keys = [prob.layout_id(s.output) for s in prob.options[n]]
        rid = prob.layout_id(r)
        cost = {(a, (rid, ())): prob.move_s(num_bytes, a, rid, needs_grad(n)) for a in set(keys)}
        prob.edges.append(Edge(n, output, 0, keys, [(rid, ())], cost,  # few keys: priced now
                               weight=returned.count(n)))
