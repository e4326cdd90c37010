"""What backward keeps of a program's values, as autograd keeps it.

Which inputs an op saves for its backward (a product keeps a factor only for the other's
gradient; an embedding keeps its indices, not its table), which ops keep their own output
instead (softmax, tanh), and which values share one storage (views of one value, through
``view``, ``transpose``, the pieces of a ``split``, a ``reshape`` of a contiguous value): a
storage several ops save is held once, so each of them holds its share of it.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..rules.traits import KEEPS_ONLY, SAVES_NOTHING, SAVES_OUTPUT, VIEWS, VIEWS_OF_CONTIGUOUS

_CALLS = ("call_function", "call_method")


class SavedValues:
    """For the nodes of one graph: what each op saves, and how many savers share each
    storage."""

    def __init__(self, inputs_of):
        self._inputs_of = inputs_of   # node -> its tensor inputs, in slot order
        self._root, self._savers = {}, {}
        self._counted = set()         # graphs whose savers are counted

    def saves(self, n: Node, slot: int) -> bool:
        """Whether op ``n`` keeps its input ``slot`` for backward."""
        op = n.meta.get("autopar.op")
        if op in SAVES_NOTHING or op in VIEWS or op in VIEWS_OF_CONTIGUOUS or \
                op in SAVES_OUTPUT:
            return False
        if op in KEEPS_ONLY:
            return slot in KEEPS_ONLY[op]
        ins = self._inputs_of(n)
        if op == "mul":   # x * y keeps y for x's gradient, x for y's; x * 2 keeps nothing
            if len(ins) == 1:
                return _same_tensor_twice(n, ins[0])
            return _needs_grad(ins[1 - slot])
        if op == "div":   # x / y keeps y, and x for y's gradient; x / 2 keeps nothing
            if len(ins) == 1:
                return n.args[0] is not ins[0] or _same_tensor_twice(n, ins[0])
            return slot == 1 or _needs_grad(ins[1])
        return True

    def saves_output(self, n: Node) -> bool:
        return n.op in _CALLS and n.meta.get("autopar.op") in SAVES_OUTPUT

    def root(self, n: Node) -> Node:
        """The node whose storage ``n``'s value is (``n`` itself unless it is a view)."""
        found = self._root.get(n)
        if found is None:
            found = n
            if n.op in _CALLS and self._is_view(n):
                ins = self._inputs_of(n)
                found = self.root(ins[0]) if ins else n
            self._root[n] = found
        return found

    def _is_view(self, n: Node) -> bool:
        op = n.meta.get("autopar.op")
        if op in VIEWS:
            return True
        if op == "getitem":   # a piece of a split, not an output of a tuple-valued op, or
            ins = self._inputs_of(n)   # basic indexing of a tensor (x[:, 0])
            return bool(ins) and (ins[0].meta.get("autopar.op") in VIEWS or self.indexes(n))
        if op in VIEWS_OF_CONTIGUOUS:
            ins = self._inputs_of(n)
            val = ins[0].meta.get("val") if ins else None
            return val is not None and hasattr(val, "is_contiguous") and val.is_contiguous()
        if op in ("to", "type", "float", "type_as"):   # to the dtype it has: itself
            ins = self._inputs_of(n)
            before, after = (ins[0].meta.get("val") if ins else None), n.meta.get("val")
            return isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and \
                before.dtype == after.dtype and before.device == after.device
        if op == "dropout":   # dropout that drops nothing returns its input
            p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
            training = n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True)
            return p == 0 or not training
        return False

    def indexes(self, n: Node) -> bool:
        """Whether ``n`` is basic indexing of a tensor (``x[:, 0]``), a view of it."""
        ins = self._inputs_of(n)
        return n.op in _CALLS and n.meta.get("autopar.op") == "getitem" and bool(ins) and \
            _basic_index(n, ins[0])

    def share(self, n: Node) -> float:
        """The share of ``n``'s storage (its root's value) one op saving ``n`` holds: one
        over the savers of any view of it (three pieces of one split, each saved, hold the
        whole value between them)."""
        self._count(n.graph)
        return 1.0 / max(self._savers.get(self.root(n), 0), 1)

    def _count(self, graph):
        if graph in self._counted:
            return
        self._counted.add(graph)
        for u in graph.nodes:
            if u.op not in _CALLS:
                continue
            for slot, a in enumerate(self._inputs_of(u)):
                if self.saves(u, slot):
                    r = self.root(a)
                    self._savers[r] = self._savers.get(r, 0) + 1
            if self.saves_output(u):
                r = self.root(u)
                self._savers[r] = self._savers.get(r, 0) + 1


def _basic_index(n: Node, x: Node) -> bool:
    """Whether ``n`` indexes tensor ``x`` with ints, slices, None and Ellipsis only: a view
    of its storage, as PyTorch's basic indexing is."""
    if not isinstance(x.meta.get("val"), torch.Tensor) or len(n.args) < 2 or n.args[0] is not x:
        return False
    index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in index)


def _needs_grad(n: Node) -> bool:
    val = n.meta.get("val")
    return bool(getattr(val, "requires_grad", False))


def _same_tensor_twice(n: Node, x: Node) -> bool:
    return sum(a is x for a in n.args) > 1
