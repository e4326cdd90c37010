"""What pricing learns once and every planning problem reads again: layouts as small ints,
per node of a program the facts its prices need, and per mesh the tables of redistribution
costs (:class:`Prices`), filled on first use."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.fx import Node

from ..cost.model import CostModel, axes_mask, coded_path, work_axes
from ..cost.saved import SavedValues
from ..program.placement import is_partial, is_replicate, is_shard
from ..program.redistribute import REPLICATED, coded_steps, layout_code, plan_steps
from ..rules import candidates, even_combos, make_strategies, out_vals, tensor_inputs


class LayoutIds:
    """Small ints standing for layouts: placements hash slowly, and edge tables hold
    hundreds of thousands of keys."""

    def __init__(self):
        self.ids, self.layouts = {}, []
        self._shard, self._partial = np.zeros(0, np.int64), np.zeros(0, np.int64)

    def masks(self) -> tuple:
        """(axes split, axes holding a partial sum) of every layout so far, as bit masks
        by layout id."""
        known = len(self._shard)
        if known < len(self.layouts):
            new = self.layouts[known:]
            self._shard = np.concatenate([self._shard, [axes_mask(lay, is_shard) for lay in new]])
            self._partial = np.concatenate([self._partial,
                                            [axes_mask(lay, is_partial) for lay in new]])
        return self._shard, self._partial

    def __call__(self, layout) -> int:
        i = self.ids.get(layout)
        if i is None:
            i = self.ids[layout] = len(self.layouts)
            self.layouts.append(layout)
        return i


# Redistribution steps that take no collective: a local slice, a partial sum's share.
LOCAL_STEPS = frozenset({"shard", "to_partial"})


class Prices:
    """What pricing on one mesh learns, shared by every problem built on it: layout ids,
    the cost line of each way of moving a value (:class:`Moves`), and one table of edge costs
    per kind of value moved (its bytes, whether a gradient flows back, whether it is a
    parameter or a tuple): edges moving alike values cost alike, so each pair of layouts is
    priced once per kind."""

    def __init__(self, model: CostModel, shared: "Facts | None" = None):
        self.model = model
        shared = shared if shared is not None else Facts()
        # whatever the mesh's sizes (by its number of axes)
        self.layout_id, self.moves = shared.layout_id, shared.moves_of(model.mesh.ndim)
        self.sum_axes = shared.sum_axes
        self.lines = {True: _Lines(), False: _Lines()}   # per path id, on this mesh
        self.tables, self._fractions, self._size_of = {}, np.zeros(0), None
        self.lists = shared.lists   # what is read off a list of strategies or of keys
        self.strategies, self.node_prices = {}, {}
        self._communicated = {}

    def path_lines(self, grad: bool) -> tuple:
        """(seconds at zero bytes, seconds per byte) arrays by path id (:class:`Moves`), for
        every path known so far: collectives are alpha-beta, so moving a value costs a fixed
        latency plus a time proportional to its bytes."""
        lines, paths = self.lines[grad], self.moves.paths
        if len(lines.fixed) < len(paths):
            new = [self.model.line_of(p, grad) for p in paths[len(lines.fixed):]]
            lines.fixed = np.concatenate([lines.fixed, [f for f, _ in new]])
            lines.per_byte = np.concatenate([lines.per_byte, [b for _, b in new]])
        return lines.fixed, lines.per_byte

    def grad_sum_axes(self, grad: bool, need: int, out: int) -> tuple:
        """:func:`grad_sum_axes` of an input needed in the layout with id ``need`` by work
        laid out as ``out``, given whether a gradient flows into it."""
        if not grad:
            return ()
        axes = self.sum_axes.get((need, out))
        if axes is None:
            lay = self.layout_id.layouts
            axes = self.sum_axes[(need, out)] = _sum_axes(lay[need], lay[out])
        return axes

    def communicated(self, src: int, need: int) -> bool:
        """Whether moving a value from layout id ``src`` to ``need`` makes a new copy by a
        collective (a gather, a reduction, an all-to-all), rather than keeping it or taking
        a local slice of it (a view)."""
        found = self._communicated.get((src, need))
        if found is None:
            lay = self.layout_id.layouts
            found = self._communicated[(src, need)] = any(
                step.kind not in LOCAL_STEPS for step in plan_steps(lay[src], lay[need]))
        return found

    def layout_ids(self, options: list) -> list:
        """Per strategy (output layout id, input layout ids); ``options`` is one of the lists
        :meth:`Facts.strategies` keeps."""
        lid = self.layout_id
        return self._per_list("ids", options, lambda: [
            (lid(s.output), tuple(lid(i) for i in s.inputs)) for s in options])

    def output_keys(self, options: list) -> list:
        """Per strategy its output layout id (one list per ``options``, which edges share)."""
        return self._per_list("outputs", options,
                              lambda: [o for o, _ in self.layout_ids(options)])

    def needs(self, options: list, slot: int, grad: bool) -> list:
        """Per strategy of a consumer, the layout id it needs input ``slot`` in and the axes
        its gradient is summed over (one list per ``options``, which edges share)."""
        return self._per_list(("needs", slot, grad), options, lambda: [
            (i[slot], self.grad_sum_axes(grad, i[slot], o))
            for o, i in self.layout_ids(options)])

    def distinct(self, keys: list) -> tuple:
        """:func:`distinct_keys` of one of the key lists edges share."""
        return self._per_list("distinct", keys, lambda: distinct_keys(keys))

    def _per_list(self, what, options: list, make):
        """``make()``, once per ``options`` list (by identity; the list is kept alive) and
        ``what`` is made of it, whatever the mesh."""
        found = self.lists.get((what, id(options)))
        if found is None:
            found = self.lists[(what, id(options))] = (make(), options)
        return found[0]

    def id_arrays(self, options: list) -> tuple:
        """:meth:`layout_ids` as int arrays: per strategy its output's, and per strategy
        and input slot the input's."""
        def make():
            ids = self.layout_ids(options)
            width = len(ids[0][1]) if ids else 0
            return (np.array([o for o, _ in ids], dtype=np.intp),
                    np.array([i for _, i in ids], dtype=np.intp).reshape(len(ids), width))
        return self._per_list("arrays", options, make)

    def fractions(self) -> np.ndarray:
        """:func:`~autopar.program.placement.shard_fraction` of every layout so far on this mesh,
        by layout id (of layouts over as many axes as the mesh has; any number for the
        others)."""
        shard, _ = self.layout_id.masks()
        if len(self._fractions) < len(shard):
            sizes = self._sizes()
            self._fractions = 1.0 / sizes[shard & (len(sizes) - 1)]
        return self._fractions

    def work_splits(self, options: list) -> np.ndarray:
        """:meth:`CostModel.work_split` of every strategy in ``options``: the product of
        the axes its output is split on, or holds a partial sum on where an input is split
        (a contracted dim)."""
        def make():
            outs, ins = self.id_arrays(options)
            shard, partial = self.layout_id.masks()
            split_in = np.bitwise_or.reduce(shard[ins], axis=1) if ins.shape[1] else 0
            return work_axes(shard[outs], partial[outs], split_in)
        return self._sizes()[self._per_list("work", options, make)]

    def _sizes(self) -> np.ndarray:
        """Ranks per set of mesh axes (a bit mask), on this mesh."""
        if self._size_of is None:
            shape = self.model.mesh.shape
            self._size_of = np.array([math.prod(n for a, n in enumerate(shape) if m >> a & 1)
                                      for m in range(1 << len(shape))], dtype=np.int64)
        return self._size_of

    def table(self, num_bytes: float, grad: bool, param: bool, is_tuple: bool) -> "Priced":
        """Edge costs by (producer layout id, (need id, gradient-sum axes)) of one kind of
        value, priced on first use."""
        kind = (num_bytes, grad, param, is_tuple)
        found = self.tables.get(kind)
        if found is None:
            found = self.tables[kind] = Priced(self, *kind)
        return found


@dataclass
class _Lines:
    fixed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    per_byte: np.ndarray = field(default_factory=lambda: np.zeros(0))


class Moves:
    """Per pair of (producer layout, consumer need) ids, whatever the mesh: the collectives
    that move one to the other (:func:`move_path`, as a path id) and the gradient sums the
    need implies (a sum id: per axis summed over, whether the sum fuses with the move's
    last gather, and whether the producer is replicated there). A mesh prices each path
    and sum once (:class:`Priced`); a block of pairs is coded once for every mesh."""

    def __init__(self, layout_id: LayoutIds):
        self.layout_id = layout_id
        self.paths, self._path_ids = [], {}           # path id -> move_path(...)
        self.sums, self._sum_ids = [None], {None: 0}  # sum id -> (need, terms); 0: none
        self._pair_paths, self._pair_sums, self._blocks = {}, {}, {}
        self._codes = []

    def code(self, i: int) -> tuple:
        """:func:`~autopar.program.redistribute.layout_code` of the layout with id ``i``."""
        codes = self._codes
        while len(codes) <= i:
            codes.append(None)
        if codes[i] is None:
            codes[i] = layout_code(self.layout_id.layouts[i])
        return codes[i]

    def path(self, a: int, b: int) -> int:
        found = self._pair_paths.get((a, b))
        if found is None:
            found = self._pair_paths[(a, b)] = _intern(
                self._path_ids, self.paths, coded_path(self.code(a), self.code(b)))
        return found

    def sum(self, a: int, need: int, axes: tuple) -> int:
        if not axes:
            return 0
        found = self._pair_sums.get((a, need, axes))
        if found is None:
            src = self.code(a)
            fused = _gathered_last(coded_steps(src, self.code(need)))
            terms = tuple((axis, axis == fused, src[axis] == REPLICATED) for axis in axes)
            found = self._pair_sums[(a, need, axes)] = _intern(self._sum_ids, self.sums,
                                                               (need, terms))
        return found

    def block(self, srcs: tuple, dsts: tuple) -> tuple:
        """(path ids, sum ids), int arrays by (src key, dst key)."""
        found = self._blocks.get((srcs, dsts))
        if found is None:
            shape = (len(srcs), len(dsts))
            known = self._pair_paths.get   # (most pairs are known: looked up in one go)
            pairs = [(a, need) for a in srcs for need, _ in dsts]
            paths = [known(pair) for pair in pairs]
            if None in paths:
                paths = [self.path(*pair) if p is None else p for p, pair in zip(paths, pairs)]
            sums = np.zeros(shape, dtype=np.intp)
            if any(axes for _, axes in dsts):
                sums = np.array([[self.sum(a, need, axes) for need, axes in dsts]
                                 for a in srcs], dtype=np.intp).reshape(shape)
            found = self._blocks[(srcs, dsts)] = (
                np.array(paths, dtype=np.intp).reshape(shape), sums)
        return found


def _intern(ids: dict, values: list, value) -> int:
    i = ids.get(value)
    if i is None:
        i = ids[value] = len(values)
        values.append(value)
    return i


class Facts:
    """Per node of one program, what every problem built on it reads again: its tensor
    inputs, the bytes of its value, whether a gradient flows into it, whether it is
    floating point or a tuple. Also the :class:`Prices` of each mesh planned on."""

    def __init__(self):
        self.nodes, self.meshes, self.folds, self._candidates = {}, {}, {}, {}
        self._saved = SavedValues(lambda n: self.of(n)[0])
        self.layout_id = LayoutIds()
        self.moves, self.sum_axes, self.lists, self._strategies = {}, {}, {}, {}

    def of(self, n: Node) -> tuple:
        """(tensor inputs, bytes, needs gradient, floating, is a tuple) of ``n``."""
        f = self.nodes.get(n)
        if f is None:
            ins = tensor_inputs(n) if n.op in ("call_function", "call_method") else []
            f = self.nodes[n] = (ins, _value_bytes(n), needs_grad(n), _floating(n),
                                 isinstance(n.meta.get("val"), (tuple, list)))
        return f

    @property
    def saved(self) -> SavedValues:
        """What backward keeps of the program's values (:mod:`autopar.cost.saved`)."""
        return self._saved

    def candidates(self, n: Node) -> tuple:
        """:func:`~autopar.rules.candidates` of ``n``, whatever the mesh."""
        found = self._candidates.get(n)
        if found is None:
            found = self._candidates[n] = candidates(n)
        return found

    def strategies(self, n: Node, mesh_shape) -> list:
        """:func:`~autopar.rules.strategies` of ``n`` on a mesh of this shape: one list for
        every mesh on which the same options split evenly, so that what is read off it
        (layout ids, keys) is read once."""
        found = self.candidates(n)
        combos = even_combos(found, mesh_shape)
        options = self._strategies.get((n, combos))
        if options is None:
            options = self._strategies[(n, combos)] = make_strategies(found, combos)
        return options

    def moves_of(self, ndim: int) -> "Moves":
        """The :class:`Moves` between layouts over ``ndim`` mesh axes."""
        found = self.moves.get(ndim)
        if found is None:
            found = self.moves[ndim] = Moves(self.layout_id)
        return found

    def prices(self, mesh, model: CostModel) -> Prices:
        found = self.meshes.get(mesh)
        if found is None:
            found = self.meshes[mesh] = Prices(model, self)
        return found


def _value_bytes(node) -> float:
    return float(sum(v.numel() * v.element_size() for v in out_vals(node)
                     if isinstance(v, torch.Tensor)))


def _floating(node) -> bool:
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in out_vals(node))


def needs_grad(node: Node) -> bool:
    """Whether a gradient flows into this value (FakeTensor propagation tracks it)."""
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in out_vals(node))


def grad_sum_axes(src: Node, need, out_layout) -> tuple:
    """Axes on which a replicated input of split work needs its gradient summed."""
    return _sum_axes(need, out_layout) if needs_grad(src) else ()


def _sum_axes(need, out_layout) -> tuple:
    return tuple(a for a, (p, q) in enumerate(zip(need, out_layout))
                 if is_replicate(p) and not is_replicate(q))


def fused_axis(src_layout, need) -> int | None:
    """The axis whose gather ends the redistribution (its gradient sum becomes a
    reduce-scatter), if any."""
    return _gathered_last(plan_steps(tuple(src_layout), tuple(need)))


def _gathered_last(steps) -> int | None:
    """(A strided gather reorders after gathering: its backward is no reduce-scatter.)"""
    return steps[-1].axis if steps and steps[-1].kind == "all_gather" \
        and not steps[-1].segments else None


class Priced:
    """The costs of moving one kind of value on one mesh (:meth:`Prices.table`), by (src
    key, dst key): a producer's layout id, and a consumer's (need id, gradient-sum axes).
    ``forbids``: some pairs cost infinity (a tuple is consumed in its own layout)."""

    def __init__(self, prices: Prices, num_bytes: float, grad: bool, param: bool,
                 is_tuple: bool):
        # a weak reference: the tables are kept in ``prices``, and a cycle through them
        # would leave all of this mesh's prices to the cyclic collector
        self.prices = weakref.proxy(prices)
        self.num_bytes, self.grad, self.param, self.forbids = num_bytes, grad, param, is_tuple
        self.matrices, self.scalars, self._sum_terms = {}, {}, {}
        self._table, self._in_table = None, {0}

    def __getitem__(self, key) -> float:
        found = self.scalars.get(key)
        if found is None:
            a, (need, axes) = key
            if self.forbids and a != need:
                found = np.inf
            else:
                moves = self.prices.moves
                path = moves.path(a, need)
                fixed, per_byte = self.prices.path_lines(self.grad)
                found = fixed[path] + per_byte[path] * self.num_bytes
                for seconds in self._sum(moves.sum(a, need, axes)):
                    found = found + seconds
            found = self.scalars[key] = float(found)
        return found

    def matrix(self, src_keys: list, dst_keys: list) -> np.ndarray:
        """Seconds per (src key, dst key), for edges with these distinct keys."""
        key = (tuple(src_keys), tuple(dst_keys))
        found = self.matrices.get(key)
        if found is None:
            found = self.matrices[key] = self.block(*key)
        return found

    def block(self, srcs: tuple, dsts: tuple) -> np.ndarray:
        """Seconds per (src key, dst key): each path's line at these bytes, plus each
        gradient sum the pair implies."""
        prices = self.prices
        paths, sums = prices.moves.block(srcs, dsts)
        fixed, per_byte = prices.path_lines(self.grad)
        out = fixed[paths] + per_byte[paths] * self.num_bytes
        if sums.any():
            for term in self._terms(sums):
                out = out + term[sums]
        if self.forbids:
            out[np.not_equal.outer(np.asarray(srcs), [need for need, _ in dsts])] = np.inf
        return out

    def _terms(self, sums: np.ndarray) -> np.ndarray:
        """Per position k in a sum's axes, seconds of its k-th gradient sum by sum id (0
        where it has fewer): added one at a time, in the order of its axes."""
        fresh = [i for i in np.unique(sums).tolist() if i not in self._in_table]
        if fresh or self._table is None:
            terms = [self._sum(i) for i in fresh]
            table = self._table if self._table is not None else np.zeros((1, 1))
            width = max([len(t) for t in terms] + [table.shape[0]])
            size = max(fresh + [table.shape[1] - 1]) + 1
            if width > table.shape[0] or size > table.shape[1]:   # room for twice the ids
                grown = np.zeros((width, max(size, 2 * table.shape[1])))
                grown[:table.shape[0], :table.shape[1]] = table
                table = grown
            for i, seconds in zip(fresh, terms):
                table[:len(seconds), i] = seconds
            self._table = table
            self._in_table.update(fresh)   # (a sum priced alone is not in it yet)
        return self._table

    def _sum(self, i: int) -> list:
        found = self._sum_terms.get(i)
        if found is None:
            found = self._sum_terms[i] = self._sum_seconds(i)
        return found

    def _sum_seconds(self, i: int) -> list:
        if i == 0:
            return []
        prices = self.prices
        m, lay = prices.model, prices.layout_id.layouts
        need, terms = prices.moves.sums[i]
        # a parameter's gradient is summed in buckets after backward where it is stored
        # replicated on the axis; stored split, each use sums its own
        return [m.grad_sum_s(self.num_bytes, lay[need], axis, fused=fused,
                             bucketed=self.param and replicated)
                for axis, fused, replicated in terms]


def distinct_keys(keys) -> tuple:
    """(distinct keys in order of first appearance, per key its index among them)."""
    index, of = {}, []
    for k in keys:
        of.append(index.setdefault(k, len(index)))
    return list(index), np.array(of, dtype=int)
