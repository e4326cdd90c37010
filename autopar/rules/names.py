"""One op vocabulary: the canonical name of whatever a node calls.

fx and Dynamo spell one op many ways (``torch.add``, ``operator.add``, ``Tensor.add`` as a
method, ``torch._C._nn.linear`` for ``F.linear``); rules are registered under one name each.
"""

from __future__ import annotations

import builtins
import operator

import torch
import torch.nn.functional as F
from torch.fx import Node

from .._torch import NN_OPS

_OPERATORS = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", operator.imul: "mul", operator.truediv: "div", operator.itruediv: "div",
    operator.floordiv: "floordiv", operator.neg: "neg", operator.pos: "pos",
    operator.pow: "pow", operator.matmul: "matmul", operator.getitem: "getitem",
    operator.eq: "eq", operator.ne: "ne", operator.lt: "lt", operator.le: "le",
    operator.gt: "gt", operator.ge: "ge", operator.and_: "logical_and",
    operator.or_: "logical_or", operator.invert: "logical_not", operator.mod: "remainder",
    builtins.getattr: "getattr",
}

# Method and function spellings that mean the same op as another name.
_ALIASES = {
    "true_divide": "div", "divide": "div", "multiply": "mul", "subtract": "sub",
    "concat": "cat", "concatenate": "cat", "swapaxes": "transpose", "swapdims": "transpose",
    "__getitem__": "getitem", "absolute": "abs", "clip": "clamp", "negative": "neg",
    "_unsafe_view": "view", "reshape_as": "view_as", "greater": "gt", "less": "lt",
    "not_equal": "ne", "greater_equal": "ge", "less_equal": "le",
    # torch.mm compares equal to torch.dsmm and torch.spmm (one builtin), and dir() meets
    # dsmm first
    "dsmm": "mm", "spmm": "mm",
}

_FUNCTION_NAMES: dict = {}


def _scan():
    spaces = [torch, F, NN_OPS, torch.Tensor, torch.special, torch.linalg]
    for space in spaces:
        for name in dir(space):
            if name.startswith("__"):
                continue
            obj = getattr(space, name, None)
            if callable(obj):
                try:
                    _FUNCTION_NAMES.setdefault(obj, _ALIASES.get(name, name))
                except TypeError:  # unhashable
                    pass
    # Python-level F functions win over the C builtins they wrap.
    for name in dir(F):
        obj = getattr(F, name)
        if callable(obj) and not name.startswith("_"):
            try:
                _FUNCTION_NAMES[obj] = name
            except TypeError:
                pass
    _FUNCTION_NAMES.update(_OPERATORS)


_scan()


def canonical_name(node: Node) -> str:
    """``"linear"``, ``"add"``, ``"view"``, ... for a call node; the node op otherwise."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        try:
            name = _FUNCTION_NAMES.get(node.target)
        except TypeError:
            name = None
        if name is None:
            name = getattr(node.target, "__name__", str(node.target))
    else:
        return node.op
    return _ALIASES.get(name, name)


def describe_target(node: Node) -> str:
    """How the user wrote the op, for messages: ``torch.nn.functional.gelu`` or ``.view()``."""
    if node.op == "call_method":
        return f"Tensor.{node.target}()"
    target = node.target
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__name__', target)}".lstrip(".")
