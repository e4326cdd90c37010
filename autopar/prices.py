"""What pricing learns once and every planning problem reads again: layouts as small ints,
per node of a program the facts its prices need, and per mesh the tables of redistribution
costs (:class:`Prices`), filled on first use."""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch.fx import Node

from .cost import CostModel, fraction, move_path
from .placement import is_replicate
from .redistribute import plan_steps
from .rules import out_vals, tensor_inputs


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


class Prices:
    """What pricing on one mesh learns, shared by every problem built on it: layout ids,
    redistribution lines per pair of layouts, and one table of edge costs per kind of value
    moved (its bytes, whether a gradient flows back, whether it is a parameter or a tuple):
    edges moving alike values cost alike, so each pair of layouts is priced once."""

    def __init__(self, model: CostModel, shared: "Facts | None" = None):
        self.model = model
        shared = shared if shared is not None else Facts()
        # by layout ids, whatever the mesh: move_path, fused_axis, grad_sum_axes
        self.layout_id, self.paths, self.fused = shared.layout_id, shared.paths, shared.fused
        self.sum_axes = shared.sum_axes
        self.moves, self.tables, self.fractions, self.splits = {}, {}, {}, {}
        self.ids, self.outputs, self.distincts = {}, {}, {}   # by id() of a list kept here
        self.strategies, self.needs, self.node_prices = {}, {}, {}

    def move_s(self, num_bytes: float, a: int, b: int, grad: bool) -> float:
        """Seconds to move a value between the layouts with ids ``a`` and ``b``: a line in
        bytes, cached per pair of layouts."""
        line = self.moves.get((a, b, grad))
        if line is None:
            path = self.paths.get((a, b))
            if path is None:
                lay = self.layout_id.layouts
                path = self.paths[(a, b)] = move_path(lay[a], lay[b])
            line = self.moves[(a, b, grad)] = self.model.line_of(path, grad)
        return line[0] + line[1] * num_bytes

    def fused_axis(self, a: int, b: int):
        """:func:`fused_axis` of the layouts with ids ``a`` and ``b``, cached."""
        f = self.fused.get((a, b), -1)
        if f == -1:
            lay = self.layout_id.layouts
            f = self.fused[(a, b)] = fused_axis(lay[a], lay[b])
        return f

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

    def layout_ids(self, options: list) -> list:
        """Per strategy (output layout id, input layout ids); ``options`` is one of the lists
        kept in :attr:`strategies`."""
        lid = self.layout_id
        return self._per_list(self.ids, options, lambda: [
            (lid(s.output), tuple(lid(i) for i in s.inputs)) for s in options])

    def output_keys(self, options: list) -> list:
        """Per strategy its output layout id (one list per ``options``, which edges share)."""
        return self._per_list(self.outputs, options,
                              lambda: [o for o, _ in self.layout_ids(options)])

    def distinct(self, keys: list) -> tuple:
        """:func:`distinct_keys` of one of the key lists edges share."""
        return self._per_list(self.distincts, keys, lambda: distinct_keys(keys))

    @staticmethod
    def _per_list(cache: dict, options: list, make):
        """``make()``, once per ``options`` list (by identity; the list is kept alive)."""
        found = cache.get(id(options))
        if found is None:
            found = cache[id(options)] = (make(), options)
        return found[0]

    def fraction(self, i: int) -> float:
        """:func:`fraction` of the layout with id ``i`` on this mesh."""
        f = self.fractions.get(i)
        if f is None:
            f = self.fractions[i] = fraction(self.layout_id.layouts[i], self.model.mesh)
        return f

    def work_split(self, ins: tuple, out: int) -> int:
        """:meth:`CostModel.work_split` of input and output layout ids."""
        split = self.splits.get((ins, out))
        if split is None:
            lay = self.layout_id.layouts
            split = self.splits[(ins, out)] = self.model.work_split([lay[i] for i in ins],
                                                                    lay[out])
        return split

    def table(self, num_bytes: float, grad: bool, param: bool, is_tuple: bool) -> dict:
        """Edge costs by (producer layout id, (need id, gradient-sum axes)) of one kind of
        value, priced on first use."""
        kind = (num_bytes, grad, param, is_tuple)
        found = self.tables.get(kind)
        if found is None:
            found = self.tables[kind] = Priced(self._pricer(*kind), forbids=is_tuple)
        return found

    def _pricer(self, num_bytes, grad, param, is_tuple):
        # a weak reference: the tables are kept here, and a cycle through them would leave
        # all of this mesh's prices to the cyclic collector
        m, lay, prices = self.model, self.layout_id.layouts, weakref.proxy(self)

        def price(key):
            a, (need, axes) = key
            if is_tuple and a != need:
                return float("inf")  # a tuple is consumed in its own layout
            t = prices.move_s(num_bytes, a, need, grad)
            if axes:
                fused = prices.fused_axis(a, need)
                for axis in axes:
                    # a parameter's gradient is summed in buckets after backward where it is
                    # stored replicated on the axis; stored split, each use sums its own
                    bucketed = param and is_replicate(lay[a][axis])
                    t += m.grad_sum_s(num_bytes, lay[need], axis, fused=axis == fused,
                                      bucketed=bucketed)
            return t

        return price


class Facts:
    """Per node of one program, what every problem built on it reads again: its tensor
    inputs, the bytes of its value, whether a gradient flows into it, whether it is
    floating point or a tuple. Also the :class:`Prices` of each mesh planned on."""

    def __init__(self):
        self.nodes, self.meshes = {}, {}
        self.layout_id = LayoutIds()
        self.paths, self.fused, self.sum_axes = {}, {}, {}

    def of(self, n: Node) -> tuple:
        """(tensor inputs, bytes, needs gradient, floating, is a tuple) of ``n``."""
        f = self.nodes.get(n)
        if f is None:
            ins = tensor_inputs(n) if n.op in ("call_function", "call_method") else []
            f = self.nodes[n] = (ins, _value_bytes(n), needs_grad(n), _floating(n),
                                 isinstance(n.meta.get("val"), (tuple, list)))
        return f

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
    steps = plan_steps(tuple(src_layout), tuple(need))
    return steps[-1].axis if steps and steps[-1].kind == "all_gather" else None


class Priced(dict):
    """Edge costs computed on first use: planners read only a fraction of all pairs.
    ``forbids``: some pairs cost infinity (may not be used at all)."""

    def __init__(self, price, forbids: bool = False):
        super().__init__()
        self.price, self.forbids = price, forbids
        self.matrices = {}

    def __missing__(self, key):
        value = self[key] = self.price(key)
        return value

    def matrix(self, src_keys: list, dst_keys: list) -> np.ndarray:
        """Seconds per (src key, dst key), for edges with these distinct keys."""
        key = (tuple(src_keys), tuple(dst_keys))
        found = self.matrices.get(key)
        if found is None:
            found = self.matrices[key] = np.array([[self[(a, b)] for b in dst_keys]
                                                   for a in src_keys])
        return found


def distinct_keys(keys) -> tuple:
    """(distinct keys in order of first appearance, per key its index among them)."""
    index, of = {}, []
    for k in keys:
        of.append(index.setdefault(k, len(index)))
    return list(index), np.array(of, dtype=int)
