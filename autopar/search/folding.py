"""How a folded program stands for the whole one: of each class of repeated blocks, which
instances are planned and which node of theirs each left-out node is, and the program's
edges counted through that map."""

from __future__ import annotations

from torch.fx import Node

from ..program.graph import loss_index
from .pins import Pins
from .pricing import Facts

# the nodes a plan gives a strategy
PLANNED = ("placeholder", "get_attr", "call_function", "call_method")


class Folded:
    """What folding ``gm``'s ``blocks`` as ``folding`` says gives, whatever the mesh: the
    nodes planned (:func:`_fold_map`), their positions, the program's edges between them
    (:func:`_fold_edges`), what the graph returns."""

    def __init__(self, gm, blocks, folding, facts: Facts):
        self.rep, self.weight = _fold_map(blocks, Pins(), folding)
        every = [n for n in gm.graph.nodes if n.op in PLANNED]
        self.nodes = [n for n in every if n not in self.rep]
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.edges, self.uses = _fold_edges(self.rep, every, self.pos, facts)
        self.output = next(n for n in gm.graph.nodes if n.op == "output")
        # what a training step gives back: its loss where it has one (loss_index), else
        # every output
        outs = list(self.output.args[0])
        loss = loss_index(outs)
        self.returned = [self.rep.get(a, a) for a in (outs if loss is None else [outs[loss]])
                         if isinstance(a, Node) and a.op in PLANNED]


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
                    if pinned.of(a) != pinned.of(b):
                        raise ValueError(f"{b.name} is pinned unlike {a.name}: the blocks "
                                         "holding them were folded together")
                    rep[b] = a
    return rep, weight


def _fold_edges(rep: dict, every: list, pos: dict, facts: Facts) -> tuple:
    """The program's edges, one per (producer, consumer, slot) of the problem's nodes, with
    the count of program edges it stands for; and per producer the positions of its
    readers, each with whether the read comes from a later instance of the producer's block
    (the value made by the instance before)."""
    found, uses = {}, {}
    for n in every:
        if n.op not in ("call_function", "call_method"):
            continue
        dst = rep.get(n, n)
        for slot, src in enumerate(facts.of(n)[0]):
            key = (rep.get(src, src), dst, slot)
            found[key] = found.get(key, 0) + 1
            uses.setdefault(key[0], set()).add((pos[dst], pos[key[0]] >= pos[dst]))
    return found, uses


def check_pinned(blocks, pinned: Pins, folding):
    """Nodes folded together must be pinned alike."""
    _fold_map(blocks, pinned, folding)
