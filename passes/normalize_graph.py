"""normalize_graph: give every call node its canonical op name and make in-place ops pure."""

from __future__ import annotations

import operator

from torch.fx import Node

from autopar.errors import CaptureError
from autopar.rules.names import canonical_name

_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub,
                      operator.imul: operator.mul, operator.itruediv: operator.truediv}


def normalize_graph(gm, ctx):
    """Name each op in one vocabulary; rewrite in-place tensor ops out of place.

    Writes ``node.meta["autopar.op"]``. An in-place op ``y = x.add_(z)`` becomes
    ``y = x.add(z)`` and later readers of ``x`` read ``y``; mutating an input, a parameter or
    a buffer is refused, since each rank holds only its own slice of those.
    """
    for node in list(gm.graph.nodes):
        inplace = _inplace_base(node)
        if inplace is not None:
            src = node.args[0]
            if getattr(src, "op", None) in ("placeholder", "get_attr"):
                raise CaptureError(
                    f"{node.name}: the in-place op {node.target} writes into "
                    f"{src.op} {src.target!r}; autopar shards inputs and parameters, so "
                    "write the op out of place (e.g. x = x + y)")
            node.target = inplace
            for user in list(src.users):
                if user is not node and _after(node, user):
                    user.replace_input_with(src, node)
        if node.op in ("call_function", "call_method"):
            node.meta["autopar.op"] = canonical_name(node)
        else:
            node.meta["autopar.op"] = node.op
    gm.graph.lint()
    gm.recompile()
    return gm


def _inplace_base(node):
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        if isinstance(node.args[0], Node):
            return _INPLACE_OPERATORS[node.target]
    if node.op == "call_method":
        t = str(node.target)
        if t.endswith("_") and not t.startswith("_") and t not in ("requires_grad_",):
            return t[:-1]
    return None


def _after(a, b) -> bool:
    """True when node ``b`` comes after node ``a`` in graph order."""
    n = a.next
    while n.op != "root":
        if n is b:
            return True
        n = n.next
    return False
