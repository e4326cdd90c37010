"""What the user pinned, on one mesh: the layouts parameters and inputs are stored in and used
in (``constraints=`` and ``storage=``, resolved per name), and the strategies of their
readers that honour them."""

from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass, field

from torch.fx import Node

from ..errors import PlanError, closest
from ..program.graph import module_path, write_buffer
from ..program.mesh import Mesh
from ..program.placement import (Partial, Replicate, Shard, StridedShard, divides, format_layout,
                                 parse_layout, replicated)
from ..rules import Strategy, shape_of
from ..rules.core import SEGMENTS
from ..rules.traits import CARRY_LAYOUT


@dataclass(frozen=True)
class Pins:
    """What the user pinned, per source node. ``stored``: the layout a parameter is held in,
    or an input arrives in (the node takes only that layout). ``used``: the layout a
    parameter or an input is read in (its readers take it so, with no collective between,
    through views and casts to the op that computes with it)."""

    stored: dict = field(default_factory=dict)
    used: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.stored or self.used)

    def of(self, node) -> tuple:
        return self.stored.get(node), self.used.get(node)


def resolve_constraints(constraints, fqns, shapes: dict, mesh: Mesh,
                        kind: str = "constraint") -> dict:
    """Glob over parameter FQNs and input names -> layout, checked and expanded per name;
    ``kind`` names the option in messages ("constraint" or "storage")."""
    out = {}
    for pattern, layout in (constraints or {}).items():
        matched = [f for f in fqns if fnmatch.fnmatchcase(f, pattern)]
        if not matched:
            what = "parameter" if kind == "storage" else "parameter or input"
            raise PlanError(f"{kind} {pattern!r} matches no {what}; closest: "
                            f"{closest(pattern.replace('*', ''), fqns)}")
        if isinstance(layout, str):
            layout = parse_layout(layout)
        if not isinstance(layout, (tuple, list)) or not all(
                isinstance(p, (Shard, StridedShard, Replicate, Partial)) for p in layout):
            raise PlanError(f"{kind} {pattern!r}: {layout!r} is not a tuple of placements; "
                            "write e.g. (Replicate(), Shard(0)) or 'RS(0)'")
        layout = tuple(layout)
        if layout and all(isinstance(p, Replicate) for p in layout):
            layout = (Replicate(),) * mesh.ndim   # replicated, whatever the mesh
        if len(layout) != mesh.ndim:
            raise PlanError(f"{kind} {pattern!r}: layout {format_layout(layout)} has "
                            f"{len(layout)} placements but mesh {mesh} has {mesh.ndim} axes; "
                            "give one placement per mesh axis")
        if any(isinstance(p, Partial) for p in layout):
            raise PlanError(f"{kind} {pattern!r}: a parameter or input cannot be Partial; "
                            "use Shard(dim) or Replicate()")
        for f in matched:
            shape = shapes[f]
            norm = tuple(_nonnegative(p, len(shape)) for p in layout)
            if not divides(shape, norm, mesh.shape):
                raise PlanError(f"{kind} {pattern!r}: layout {format_layout(layout)} does "
                                f"not split {f} of shape {tuple(shape)} evenly over mesh "
                                f"{mesh}; pick a dim whose size divides")
            out[f] = norm
    return out


def _nonnegative(p, ndim: int):
    if isinstance(p, Shard) and p.dim < 0:
        return Shard(p.dim + ndim)
    if isinstance(p, StridedShard) and p.dim < 0:
        return StridedShard(p.dim + ndim, p.segments)
    return p


def resolve_pins(constraints, storage, sources: dict, mesh: Mesh) -> Pins:
    """The user's pins on ``mesh`` as :class:`~autopar.search.problem.Pins` of ``sources`` (name ->
    node). ``constraints`` pin the layout a parameter or an input is used in (and a
    parameter is stored in, unless ``storage`` pins that apart; an input arrives in it);
    ``storage`` pins only how parameters are held."""
    shapes = {name: tuple(n.meta["val"].shape) for name, n in sources.items()}
    params = [name for name, n in sources.items() if n.op == "get_attr"]
    used = resolve_constraints(constraints, list(shapes), shapes, mesh)
    held = resolve_constraints(storage, params, shapes, mesh, kind="storage")
    for name in params:   # a buffer the program writes is used as held (whole by default)
        if name not in used and _written(sources[name]):
            used[name] = held.get(name, replicated(mesh.ndim))
    stored = {sources[name]: layout for name, layout in {**used, **held}.items()}
    return Pins(stored, {sources[name]: layout for name, layout in used.items()})


def _written(node) -> bool:
    """Whether the program writes into buffer ``node`` (a :func:`write_buffer` reads it): each
    rank writes its copy whole, where it reads it, so that no collective stands between."""
    return any(user.target is write_buffer and user.args[0] is node for user in node.users)


def source_options(node, mesh, pinned) -> list:
    """Layouts an input or a parameter may take (never Partial); pinned ones take one."""
    if node in pinned:
        return [Strategy((), pinned[node])]
    shape = shape_of(node)
    per_axis = [Replicate()] + [Shard(d) for d in range(len(shape))] + [
        StridedShard(d, r) for d, r in (node.meta.get(SEGMENTS) or {}).items()]
    out = []
    for layout in itertools.product(per_axis, repeat=mesh.ndim):
        if divides(shape, layout, mesh.shape):
            out.append(Strategy((), tuple(layout)))
    return out


class PinnedReads:
    """Which pinned value each node reads, as it goes through the nodes of a program in
    order: a parameter or input pinned to the layout it is used in, or a view or cast of one
    (which carries the pin on to the op computing with it)."""

    def __init__(self, pinned: Pins):
        self.carried = {n: (layout, n.target) for n, layout in pinned.used.items()}

    def need(self, ins: list) -> tuple:
        """(slot, layout, the parameter's FQN) of each pinned value among ``ins``."""
        return tuple((slot, *self.carried[src]) for slot, src in enumerate(ins)
                     if src in self.carried)

    def honoured(self, n: Node, options: list, need: tuple) -> list:
        """``options`` of ``n`` that read what it reads pinned as pinned."""
        return _reading_as_pinned(n, options, need) if need else options

    def carry(self, n: Node, ins: list, options: list, need: tuple) -> None:
        """A view or cast of one pinned value, with one output layout left: its readers
        read that as pinned too."""
        outs = {s.output for s in options}
        if need and len(outs) == 1 and len(ins) == 1 and \
                n.meta.get("autopar.op") in CARRY_LAYOUT:
            self.carried[n] = (outs.pop(), need[0][2])


def reads_as(read: tuple, pinned: tuple) -> bool:
    """Whether reading a value pinned to ``pinned`` in layout ``read`` honours the pin: the
    same placement on every axis, except that a replicated value may be read as a partial
    sum (its term added on one rank of the axis, as a row-parallel linear adds its bias):
    no collective either way."""
    return all(r == p or isinstance(p, Replicate) and isinstance(r, Partial)
               for r, p in zip(read, pinned))


def _reading_as_pinned(n: Node, options: list, need: tuple) -> list:
    """The strategies of ``n`` that read each pinned input (``need``: slot, layout, the
    parameter's FQN) in its pinned layout (:func:`reads_as`); none is an error naming what
    ``n`` allows."""
    kept = [s for s in options if all(reads_as(s.inputs[slot], layout)
                                      for slot, layout, _ in need)]
    if kept:
        return kept
    for slot, layout, fqn in need:
        allowed = sorted({format_layout(s.inputs[slot]) for s in options})
        if format_layout(layout) not in allowed:
            where = module_path(n)
            op = n.meta.get("autopar.op", n.name)
            raise PlanError(
                f"{fqn} is pinned to be used as {format_layout(layout)}, but {op} "
                f"(node {n.name}{f', in {where}' if where else ''}) can read it only as "
                f"{', '.join(allowed) or 'nothing on this mesh'}; pin one of those in "
                "constraints=, or pin only how it is stored with storage= and let the "
                "planner choose how it is used")
    raise PlanError(f"{n.meta.get('autopar.op', n.name)} (node {n.name}) has no strategy "
                    "reading " + " and ".join(f"{fqn} as {format_layout(lay)}"
                                              for _, lay, fqn in need) +
                    " together; pin those parameters to layouts it can read together")
