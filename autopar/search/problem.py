"""The discrete planning problem on one mesh: strategies per node, their costs, the cost of
every edge for each pair of (producer layout, consumer need), and memory terms.

Both planners read it: the propagation planner (level "fast") and the integer program
(level "full", :mod:`autopar.search.solver`); :meth:`Problem.evaluate` prices any assignment the same
way both objectives do, so plans from either can be compared.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.fx import Node

from ..cost.model import BUCKET_BYTES, CostModel
from ..program.placement import Replicate
from ..rules.traits import GRADIENT_COPIES, SAVES_NOTHING, VIEWS
from .folding import Folded, check_pinned
from .pins import Pins, PinnedReads, source_options
from .pricing import Facts, LayoutIds, Priced, Prices, distinct_keys
from .result import Cost

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
    cost: Priced              # (src key, dst key) -> seconds, forward and backward, one edge
    weight: int = 1
    # Where a collective's copy on this edge stays saved for backward (a parameter gathered
    # for an op that saves it; any value moved into a selectively recomputed block): bytes
    # of the whole value the copy stands for (its share where several ops save one copy),
    # and (position, count) of when the copies count toward memory (:meth:`saved_matrix`).
    saved_bytes: float = 0.0
    spans: tuple = ()

    def seconds(self, src_choice: int, dst_choice: int) -> float:
        """Seconds of every edge this one stands for, given both ends' strategies."""
        return self.weight * self.cost[(self.src_keys[src_choice], self.dst_keys[dst_choice])]

    @functools.cached_property
    def distinct(self) -> tuple:
        """(distinct src keys, per src strategy the index of its key among them, and the
        same for dst): strategies far outnumber the layouts they produce and need."""
        return (*distinct_keys(self.src_keys), *distinct_keys(self.dst_keys))

    def key_matrix(self) -> np.ndarray:
        """Seconds of one edge per (distinct src key, distinct dst key)."""
        src, _, dst, _ = self.distinct
        return self.cost.matrix(src, dst)

    def saved_matrix(self, prices: Prices) -> np.ndarray:
        """Bytes saved for backward per (distinct src key, distinct dst key), one edge: the
        copy a collective makes in the layout the consumer needs; none where the value is
        used as it is or sliced (a view of what is held already)."""
        found = self.__dict__.get("_saved")
        if found is None:
            src, _, dst, _ = self.distinct
            need = np.array([k[0] for k in dst], dtype=np.intp)
            moved = np.array([[prices.communicated(a, b) for b in need] for a in src], dtype=bool)
            found = self.__dict__["_saved"] = \
                self.saved_bytes * prices.fractions()[need][None, :] * moved
        return found

    def saved_at(self, prices: Prices, src_choice: int, dst_choice: int) -> float:
        """One entry of :meth:`saved_matrix`, for the ends' strategies (without making the
        whole matrix: an assignment evaluated reads one entry of each edge)."""
        src, src_of, dst, dst_of = self.distinct
        found = self.__dict__.get("_saved")
        if found is not None:
            return float(found[src_of[src_choice], dst_of[dst_choice]])
        need = dst[dst_of[dst_choice]][0]
        if not prices.communicated(src[src_of[src_choice]], need):
            return 0.0
        return float(self.saved_bytes * prices.fractions()[need])

    def matrix(self) -> np.ndarray:
        """:meth:`seconds` for every (src strategy, dst strategy)."""
        _, src_of, _, dst_of = self.distinct
        return self.weight * self.key_matrix()[np.ix_(src_of, dst_of)]

    def row(self, src_choice: int) -> np.ndarray:
        """:meth:`seconds` for every dst strategy, the src taking ``src_choice``."""
        _, _, dst, dst_of = self.distinct
        return self.weight * self.cost.matrix([self.src_keys[src_choice]], dst)[0][dst_of]

    def column(self, dst_choice: int) -> np.ndarray:
        """:meth:`seconds` for every src strategy, the dst taking ``dst_choice``."""
        src, src_of, _, _ = self.distinct
        return self.weight * self.cost.matrix(src, [self.dst_keys[dst_choice]])[:, 0][src_of]


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
    for a run of instances after it (:func:`fold_groups`); the nodes of those are left out.
    ``weight[n]`` counts the instances a node stands for (its seconds count that many
    times), ``rep`` maps a left-out node to the node standing for it, and memory is
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
    transient_bytes: dict = field(default_factory=dict)  # node -> [bytes] recomputed at once
    held_grad_bytes: dict = field(default_factory=dict)  # parameter -> [bytes] of gradients
                                                         #   held between micro-batches
    loss_grad_bytes: dict = field(default_factory=dict)  # a loss's input -> [bytes] of its
                                                         #   gradient's copies (GRADIENT_COPIES)
    grad_bytes: dict = field(default_factory=dict)       # op -> [bytes] of the gradients
                                                         #   alive as backward passes it
    caller_bytes: dict = field(default_factory=dict)   # input or output -> [bytes] the
                                                       #   caller holds whole to the step's end
    held: list = field(default_factory=list)           # [Held]: when each table counts
    outputs: list = field(default_factory=list)        # nodes returned by the graph
    weight: dict = field(default_factory=dict)         # node -> instances it stands for
    rep: dict = field(default_factory=dict)            # left-out node -> node standing for it
    block_start: int = 0                                # where the first repeated block starts
    backward_peaks: list = field(default_factory=list)  # positions of GRADIENT_COPIES ops
    sync_bytes: dict = field(default_factory=dict)      # parameter -> [bytes] of its gradient
                                                        #   summed over ranks in buckets
    prices: Prices = None                               # shared by the problems on one mesh

    def __post_init__(self):
        if self.prices is None:
            self.prices = Prices(self.model)

    @property
    def layout_id(self) -> LayoutIds:
        return self.prices.layout_id

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
        """The cost of ``choice`` (node -> strategy index): seconds, peak memory and its
        parts."""
        compute = sum(self.weight.get(n, 1) * self.node_s[n][choice[n]] for n in self.nodes)
        comm = sum(e.seconds(choice[e.src], choice.get(e.dst, 0)) for e in self.edges)
        peak, at = self._peak(choice)
        parts = {"static_bytes": 0.0, "activations": 0.0, "transient_bytes": 0.0}
        params = {"parameter": 0.0, "gradient": 0.0, "optimizer": 0.0}
        for h in self.held:   # the parts at the forward pass's peak
            if not h.start <= at < h.end:
                continue
            v = h.mult * getattr(self, h.table)[h.node][choice[h.node]]
            if h.table == "static_bytes":
                for part, share in self._static_parts(h.node).items():
                    params[part] += v * share
            else:
                transient = h.table in ("transient_bytes", "held_grad_bytes",
                                        "loss_grad_bytes", "grad_bytes", "caller_bytes")
                parts["transient_bytes" if transient else "activations"] += v
        parts["activations"] += sum(v for start, v in self._edge_memory(choice) if start <= at)
        return Cost(compute + comm, compute, comm, peak, params["parameter"],
                    params["gradient"], params["optimizer"], parts["activations"],
                    parts["transient_bytes"], self._gradient_buckets(choice),
                    self.saved_at_backward(choice))

    def saved_at_backward(self, choice: dict) -> float:
        """Bytes the forward pass leaves alive when backward starts, beyond the parameters'
        storage and the gradients held between micro-batches: what is held to the end of
        the forward pass (activations saved, the values a recomputed block starts from, the
        caller's inputs and the loss returned) and the parameter copies saved on edges."""
        kept = sum(h.mult * getattr(self, h.table)[h.node][choice[h.node]] for h in self.held
                   if h.end >= _ALWAYS and h.table in ("saved_bytes", "out_bytes", "caller_bytes"))
        return kept + sum(v for _, v in self._edge_memory(choice))

    def _static_parts(self, node) -> dict:
        """How a parameter's storage splits into weights, gradients, optimizer states."""
        val = node.meta.get("val")
        trainable = isinstance(val, torch.Tensor) and val.requires_grad
        elem = val.element_size() if isinstance(val, torch.Tensor) else 4
        return self.model.training.parameter_parts(trainable, elem)

    def peak_memory(self, choice: dict) -> float:
        """The larger of the most :meth:`memory_at` holds over the forward pass and
        :meth:`memory_after_backward`."""
        return self._peak(choice)[0]

    def _gradient_buckets(self, choice: dict) -> float:
        """Bytes the gradient sums hold at the end of backward, beyond the parameters'
        storage: a bucket of every gradient summed over ranks (all-reduced while backward
        goes on, added into ``.grad`` when it ends), and the gradients of the last bucket
        not yet copied into one."""
        synced = self._synced(choice)
        return synced + min(BUCKET_BYTES, synced)

    def _peak(self, choice: dict) -> tuple:
        """(:meth:`peak_memory`, after which node position the forward pass holds its
        most), in one sweep."""
        n = len(self.nodes)
        delta = [0.0] * (n + 1)
        for h in self.held:
            v = h.mult * getattr(self, h.table)[h.node][choice[h.node]]
            delta[h.start] += v
            delta[min(h.end, n)] -= v
        for start, v in self._edge_memory(choice):
            delta[start] += v
        held, peak, at = 0.0, 0.0, 0
        for t in range(n):
            held += delta[t]
            if held > peak:
                peak, at = held, t
        return max(peak, self.memory_after_backward(choice)), at

    def memory_after_backward(self, choice: dict) -> float:
        """Bytes held by one device late in backward, the saved activations gone: the
        parameters' storage, the outputs held for the caller and the gradients summed over
        ranks, with either what the first
        block recomputed holds again (its backward runs last, the other blocks' gradients
        waiting for their buckets) or, at the very end, the last bucket's copy of them."""
        static = sum(h.mult * self.static_bytes[h.node][choice[h.node]] for h in self.held
                     if h.table == "static_bytes")
        recomputed = sum(h.mult * self.transient_bytes[h.node][choice[h.node]]
                         for h in self.held if h.table == "transient_bytes")
        returned = sum(h.mult * self.caller_bytes[h.node][choice[h.node]]
                       for h in self.held if h.table == "caller_bytes")
        synced = self._synced(choice)
        return static + returned + synced + max(recomputed, min(BUCKET_BYTES, synced))

    def _synced(self, choice: dict) -> float:
        return sum(self.weight.get(n, 1) * v[choice[n]] for n, v in self.sync_bytes.items())

    def memory_at(self, choice: dict, t: int) -> float:
        """Bytes held by one device just after node ``t`` runs in the forward pass."""
        return sum(h.mult * getattr(self, h.table)[h.node][choice[h.node]]
                   for h in self.held if h.start <= t < h.end) + \
            sum(v for start, v in self._edge_memory(choice) if start <= t)

    def _edge_memory(self, choice: dict):
        """(position from which it counts to the end of the forward pass, bytes) of every
        parameter copy saved for backward under ``choice``."""
        for e in self.edges:
            if not e.saved_bytes:
                continue
            v = e.saved_at(self.prices, choice[e.src], choice.get(e.dst, 0))
            if v:
                for start, mult in e.spans:
                    yield start, mult * v

    def pair_count(self) -> int:
        """How many (producer layout, consumer need) pairs the exact program would carry."""
        return sum(len(set(e.src_keys)) * len(set(e.dst_keys)) for e in self.edges
                   if len(e.src_keys) > 1 and len(e.dst_keys) > 1)

    def restrict(self, kept: dict) -> tuple:
        """A copy keeping only strategies ``kept[node]`` (indices), and per node the map from
        new indices back to the old."""
        new = Problem(self.mesh, self.model, self.nodes, outputs=self.outputs, held=self.held,
                      weight=self.weight, rep=self.rep, prices=self.prices,
                      block_start=self.block_start, backward_peaks=self.backward_peaks)
        for n in self.nodes:
            idx = kept[n]
            new.options[n] = [self.options[n][i] for i in idx]
            for table in ("node_s", "static_bytes", "saved_bytes", "out_bytes"):
                getattr(new, table)[n] = [getattr(self, table)[n][i] for i in idx]
            for table in ("transient_bytes", "held_grad_bytes", "sync_bytes",
                          "loss_grad_bytes", "grad_bytes", "caller_bytes"):
                if n in getattr(self, table):
                    getattr(new, table)[n] = [getattr(self, table)[n][i] for i in idx]
        for e in self.edges:
            src_keys = [e.src_keys[i] for i in kept[e.src]]
            dst_keys = e.dst_keys if e.dst not in kept else [e.dst_keys[i] for i in kept[e.dst]]
            new.edges.append(Edge(e.src, e.dst, e.slot, src_keys, dst_keys, e.cost, e.weight,
                                  e.saved_bytes, e.spans))
        return new, kept

    def scores_near(self, seed: dict) -> dict:
        """Per node and strategy: its own seconds plus its edges' seconds when every
        neighbour keeps its ``seed`` choice; ranks the strategies worth keeping."""
        score = {n: self.weight.get(n, 1) * np.asarray(v) for n, v in self.node_s.items()}
        for e in self.edges:
            if e.dst in score:
                score[e.dst] = score[e.dst] + e.row(seed[e.src])
            score[e.src] = score[e.src] + e.column(seed.get(e.dst, 0))
        return score

    def checkpoints(self) -> list:
        calls = [i for i, n in enumerate(self.nodes) if n.op in ("call_function", "call_method")]
        if len(calls) <= MAX_MEMORY_CHECKPOINTS:
            return calls
        step = len(calls) / MAX_MEMORY_CHECKPOINTS
        picked = {calls[int(k * step)] for k in range(MAX_MEMORY_CHECKPOINTS)} | {calls[-1]}
        return sorted(picked | set(self.backward_peaks))


_ALWAYS = 1 << 62   # the end of a held interval that lasts to the end of the forward pass


def build_problem(gm, mesh, model: CostModel, pinned: Pins, blocks=(),
                  folding="ends", facts: Facts | None = None) -> Problem:
    """Enumerate strategies for the nodes of ``gm`` on ``mesh`` and price them.

    ``pinned`` (:class:`Pins`) gives parameter and input nodes the only layout they may be
    stored in, and parameters the only layout their readers may take them in. Given
    ``blocks`` (classes of structurally identical instances), the problem is folded as
    ``folding`` says (see :func:`~autopar.search.folding.fold_groups` and :class:`Problem`). ``facts`` keeps what
    problems built again on the same program (and mesh, with the same ``pinned``) share.
    """
    facts = facts if facts is not None else Facts()
    key = (id(gm), tuple(id(c) for c in blocks), folding)
    folded = facts.folds.get(key)
    if folded is None:
        folded = facts.folds[key] = Folded(gm, blocks, folding, facts)
    pinned = pinned or Pins()
    if pinned:
        check_pinned(blocks, pinned, folding)
    rep, weight, nodes, pos = folded.rep, folded.weight, folded.nodes, folded.pos
    prices = facts.prices(mesh, model)
    prob = Problem(mesh, prices.model, nodes, weight=weight, rep=rep, prices=prices)
    reads = PinnedReads(pinned)
    for n in nodes:
        if n.op in ("placeholder", "get_attr"):
            key = (n, pinned.stored.get(n))
            found = prices.strategies.get(key)
            if found is None:
                found = prices.strategies[key] = source_options(n, mesh, pinned.stored)
            prob.options[n] = found
            continue
        ins = facts.of(n)[0]
        need = reads.need(ins)
        key = (n, need) if need else n
        found = prices.strategies.get(key)
        if found is None:
            found = prices.strategies[key] = reads.honoured(n, facts.strategies(n, mesh.shape),
                                                            need)
        prob.options[n] = found
        reads.carry(n, ins, found, need)
    for n in nodes:
        _price_node(prob, n, facts)
    prob.outputs = list(dict.fromkeys(folded.returned))
    for (src, dst, slot), count in folded.edges.items():
        e = _edge(prob, src, dst, slot, facts)
        e.weight = count
        prob.edges.append(e)
    _hold_memory(prob, blocks, pos, folded.uses, facts)
    _price_outputs(prob, folded.output, folded.returned, facts, pos)
    return prob


def _hold_memory(prob: Problem, blocks, pos: dict, uses: dict, facts: Facts):
    """When each node's parameters, saved activations and output count toward memory.

    Seen from the last instance of each block, where memory peaks: the activations saved by
    all earlier instances are held from the first block's start, and a value read by the
    next instance (the block's output) is live from that start until its last reader. At a
    loss (:data:`~autopar.rules.traits.GRADIENT_COPIES`), where backward enters it: what the
    forward pass holds there, and the copies of its input's gradient.
    """
    starts = [pos[cls.instances[0].nodes[0]] for cls in blocks
              if cls.instances[0].nodes[0] in pos]
    block_start = min(starts, default=0)
    for n in prob.nodes:
        w, p = prob.weight.get(n, 1), pos[n]
        prob.held.append(Held(n, "static_bytes", 0, _ALWAYS, w))
        if n in prob.held_grad_bytes:
            prob.held.append(Held(n, "held_grad_bytes", 0, _ALWAYS, w))
        prob.held.append(Held(n, "saved_bytes", p, _ALWAYS, 1))
        if w > 1:
            prob.held.append(Held(n, "saved_bytes", block_start, _ALWAYS, w - 1))
        readers = uses.get(n, ())
        later = max((t for t, back in readers if not back), default=-1)
        if n.op == "placeholder":
            # the caller's batch, whole on every rank to the step's end (every micro-batch's:
            # each reads its rows of it); a rank's share of it is a view
            whole = facts.of(n)[1] * prob.model.micro_batches
            prob.caller_bytes[n] = [whole] * len(prob.options[n])
            prob.held.append(Held(n, "caller_bytes", 0, _ALWAYS, 1))
        elif later > p and n not in prob.outputs:   # (an output: _price_outputs holds it)
            prob.held.append(Held(n, "out_bytes", p, later, 1))
        earlier = max((t for t, back in readers if back), default=-1)
        if earlier >= 0:
            prob.held.append(Held(n, "out_bytes", block_start, earlier, 1))
        copies = GRADIENT_COPIES.get(n.meta.get("autopar.op")) if n.op in (
            "call_function", "call_method") else None
        ins = facts.of(n)[0] if copies else ()
        if ins and facts.of(ins[0])[2]:
            src = prob.rep.get(ins[0], ins[0])
            prob.loss_grad_bytes[src] = (copies * np.asarray(prob.out_bytes[src])).tolist()
            prob.held.append(Held(src, "loss_grad_bytes", p, p + 1, 1))
            prob.backward_peaks.append(p)
        elif n.op in ("call_function", "call_method") and facts.of(n)[2]:
            prob.grad_bytes[n] = _gradients_in_flight(prob, n, facts)
            prob.held.append(Held(n, "grad_bytes", p, p + 1, 1))
    prob.block_start = block_start
    for e in prob.edges:
        if e.saved_bytes:
            e.spans = edge_spans(prob, e, pos)


def _gradients_in_flight(prob: Problem, n: Node, facts: Facts) -> list:
    """Per strategy of ``n``, the gradients alive while backward passes it: of its output,
    and of each input a gradient flows into (a parameter's too, until it is added into
    ``.grad``), this rank's shares. Where ``n`` saved its inputs, they are still alive
    there beside everything saved before it, as at the forward pass's position of ``n``
    (which counts them). A view passes its gradient as a view; an op that saves nothing
    (a sum, a copy) passes its output's on."""
    op = n.meta.get("autopar.op")
    opts = prob.options[n]
    if op in VIEWS or not opts:
        return [0.0] * len(opts)
    held = np.asarray(prob.out_bytes[n], dtype=float)
    if op in SAVES_NOTHING:
        return held.tolist()
    _, needs = prob.prices.id_arrays(opts)
    share = prob.prices.fractions()
    for slot, src in enumerate(facts.of(n)[0]):
        if facts.of(src)[2]:
            held = held + facts.of(src)[1] * prob.model.activation_scale * \
                share[needs[:, slot]]
    return held.tolist()


def edge_spans(prob: Problem, e: Edge, pos: dict) -> tuple:
    """When a copy saved on edge ``e`` counts, as (position, count): each instance of its
    consumer holds one, those before the last from the first block's start on."""
    return ((pos[e.dst], 1),) + (((prob.block_start, e.weight - 1),) if e.weight > 1 else ())


def _trainable(node) -> bool:
    val = node.meta["val"]
    return node.op == "get_attr" and isinstance(val, torch.Tensor) and val.requires_grad


def _price_node(prob: Problem, n: Node, facts: Facts):
    """Seconds and bytes per strategy of ``n``; the same on every problem on one mesh (with
    the same parameters pinned), so computed once per mesh."""
    ins = facts.of(n)[0]
    key = (n, tuple(len(prob.options[prob.rep.get(a, a)]) == 1 and prob.options[
        prob.rep.get(a, a)][0].output for a in ins if a.op == "get_attr"), len(prob.options[n]),
        id(prob.options[n]))
    found = prob.prices.node_prices.get(key)
    if found is None:
        found = prob.prices.node_prices[key] = _node_prices(prob, n, facts)
    prob.node_s[n], prob.static_bytes[n], prob.saved_bytes[n], prob.out_bytes[n] = found
    if n.op == "get_attr" and _trainable(n):
        prob.sync_bytes[n] = _synced_gradients(prob, n, facts)
        if prob.model.micro_batches > 1:   # held apart between micro-batches
            prob.held_grad_bytes[n] = prob.sync_bytes[n]


def _synced_gradients(prob: Problem, n: Node, facts: Facts) -> list:
    """Per strategy of parameter ``n``, the bytes of its gradient summed over ranks once a
    step (where it is replicated on a mesh axis): bucketed at the end of backward and, over
    several micro-batches, this step's local contributions held in a copy until the last
    micro-batch's backward sums them."""
    prices = prob.prices
    outs, _ = prices.id_arrays(prob.options[n])
    shard, partial = prices.layout_id.masks()
    every = (1 << prob.mesh.ndim) - 1
    replicated = (shard[outs] | partial[outs]) != every
    return (facts.of(n)[1] * prices.fractions()[outs] * replicated).tolist()


def _node_prices(prob: Problem, n: Node, facts: Facts) -> tuple:
    """Per strategy of ``n``: seconds, parameter bytes, bytes saved for backward, output
    bytes; whole arrays at a time (a node has up to thousands of strategies)."""
    m, prices = prob.model, prob.prices
    ins, num_bytes = facts.of(n)[:2]
    opts = prob.options[n]
    zeros = [0.0] * len(opts)
    if n.op == "placeholder" or not opts:
        return zeros, zeros, zeros, zeros
    outs, needs = prices.id_arrays(opts)
    share = prices.fractions()   # (of every layout id so far, those of opts among them)
    if n.op == "get_attr":
        elem = n.meta["val"].element_size()
        per = m.training.bytes_per_parameter(_trainable(n), elem) / elem
        static = num_bytes * share[outs] * per
        seconds = m.optimizer_s(num_bytes * share[outs], _trainable(n), elem)
        return _per_strategy(seconds, len(opts)), static.tolist(), zeros, zeros
    op, spec = n.meta["autopar.op"], opts[0].spec
    seconds = m.compute_s(op, spec.flops, spec.num_bytes, None, None,
                          split=prices.work_splits(opts))
    seconds = _per_strategy(seconds, len(opts))
    if spec.exchange is not None:   # values its local computation exchanges itself
        seconds = [t + spec.exchange(o.inputs, o.output, m) for t, o in zip(seconds, opts)]
    out = num_bytes * m.activation_scale * share[outs]
    saved, kept = np.zeros(len(opts)), facts.saved
    for slot, src in enumerate(ins):
        # the inputs it saves, its share of each storage (ops saving one storage hold it
        # once); a parameter's copy is its edge's (Edge.saved_matrix), a view of a
        # parameter is the parameter
        root = kept.root(src)
        if facts.of(src)[3] and root.op != "get_attr" and kept.saves(n, slot):
            part = share[needs[:, slot]]
            held = facts.of(root)[1] * part * kept.share(src)
            if kept.indexes(src) and prob.mesh.size > 1:
                # a slice read whole on every rank (x[:, 0] into a pooler) comes from a
                # collective, a copy of its own; read split, it is a view of this rank's
                # share of what it indexes, which stays alive whole
                held = np.where(part < 1.0, held, facts.of(src)[1])
            saved = saved + held * m.activation_scale
    if kept.saves_output(n):
        saved = saved + facts.of(kept.root(n))[1] / num_bytes * out * kept.share(n)
    return seconds, zeros, saved.tolist(), out.tolist()


def _per_strategy(seconds, count: int) -> list:
    """Seconds as a list, one per strategy (a cost that is the same for all comes as one)."""
    return seconds.tolist() if isinstance(seconds, np.ndarray) else [float(seconds)] * count


def _edge(prob: Problem, src: Node, dst: Node, slot: int, facts: Facts) -> Edge:
    prices = prob.prices
    _, num_bytes, grad, _, is_tuple = facts.of(src)
    src_keys = prices.output_keys(prob.options[src])
    dst_keys = prices.needs(prob.options[dst], slot, grad)
    cost = prices.table(num_bytes, grad, src.op == "get_attr", is_tuple)
    e = Edge(src, dst, slot, src_keys, dst_keys, cost)
    e.distinct = (*prices.distinct(src_keys), *prices.distinct(dst_keys))
    if src.op == "get_attr" and facts.of(src)[3] and facts.saved.saves(dst, slot):
        e.saved_bytes = num_bytes * prob.model.activation_scale * facts.saved.share(src)
    return e


def _price_outputs(prob: Problem, output: Node, returned: list, facts: Facts, pos: dict):
    """Outputs come back replicated: an edge from each output to the graph's output node,
    which takes one fixed strategy (replicated inputs). ``returned`` lists the problem node
    standing for each value returned, so a folded output counts once per instance.

    What a training step gives back is its loss (:func:`~autopar.program.graph.loss_index`;
    every output where it has none): held from where it is made until the step ends,
    backward included, each micro-batch's whole, on every rank."""
    r = tuple(Replicate() for _ in range(prob.mesh.ndim))
    rid, prices = prob.layout_id(r), prob.prices
    m = prob.model.micro_batches
    for n in prob.outputs:
        _, num_bytes, grad = facts.of(n)[:3]
        keys = prices.output_keys(prob.options[n])
        cost = prob.prices.table(num_bytes, grad, False, False)
        count = returned.count(n)
        prob.edges.append(Edge(n, output, 0, keys, [(rid, ())], cost, weight=count))
        whole = num_bytes * prob.model.activation_scale * count * m
        prob.caller_bytes[n] = [whole] * len(prob.options[n])
        prob.held.append(Held(n, "caller_bytes", pos[n], _ALWAYS, 1))
