"""normalize_graph: give every call node its canonical op name and make in-place ops pure."""

from __future__ import annotations

import operator

from torch.fx import Node

from autopar.errors import CaptureError
from autopar.program.graph import copy_into, write_buffer
from autopar.rules.names import canonical_name

_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub,
                      operator.imul: operator.mul, operator.itruediv: operator.truediv}


def normalize_graph(gm, ctx):
    """Name each op in one vocabulary; rewrite in-place tensor ops out of place.

    Writes ``node.meta["autopar.op"]``. An in-place op ``y = x.add_(z)`` becomes
    ``y = x.add(z)`` and later readers of ``x`` read ``y``. Where ``x`` is a buffer (or what
    an earlier in-place op on one returned), :func:`~autopar.program.graph.write_buffer`
    stores ``y`` into it right after, so that every rank's copy holds what one device's
    would. Mutating an input, a parameter or a view of a buffer is refused: each rank holds
    only its own slice of inputs and parameters, and a copy would not update a view's base.
    """
    _one_read_per_attr(gm.graph)
    params = set(ctx.param_fqns)
    buffer_of = {}     # node -> the get_attr of the buffer it holds the new value of
    last_write = {}    # buffer get_attr -> its latest write_buffer node
    for node in list(gm.graph.nodes):
        inplace = _inplace_base(node)
        if inplace is not None:
            src = node.args[0]
            buffer = _written_buffer(node, src, params, buffer_of)
            if inplace == "copy":
                node.op, node.target = "call_function", copy_into
                node.args, node.kwargs = node.args[:2], {}
            else:
                node.target = inplace
            for user in list(src.users):
                if user is not node and _after(node, user):
                    user.replace_input_with(src, node)
            if buffer is not None:
                _write(gm.graph, node, buffer, last_write)
                buffer_of[node] = buffer
        if node.op in ("call_function", "call_method"):
            node.meta["autopar.op"] = canonical_name(node)
        else:
            node.meta["autopar.op"] = node.op
    gm.graph.lint()
    gm.recompile()
    return gm


def _one_read_per_attr(graph) -> None:
    """One get_attr node per parameter or buffer: a value read twice is one value, and a
    buffer written between two reads is read after the write through the first."""
    first = {}
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        if node.target in first:
            node.replace_all_uses_with(first[node.target])
            graph.erase_node(node)
        else:
            first[node.target] = node


def _written_buffer(node, src, params: set, buffer_of: dict):
    """The buffer get_attr the in-place op ``node`` on ``src`` writes into, None for an activation;
    raises CaptureError for an input, a parameter or a view of a buffer."""
    if src in buffer_of:
        return buffer_of[src]
    op = getattr(src, "op", None)
    if op == "get_attr" and src.target not in params:
        return src
    if op in ("placeholder", "get_attr"):
        what = "an input" if op == "placeholder" else "a parameter"
        raise CaptureError(
            f"{node.name}: the in-place op {node.target} writes into {op} {src.target!r} "
            f"({what}); autopar shards inputs and "
            "parameters, so write the op out of place (e.g. x = x + y)")
    base = _viewed_buffer(src, params)
    if base is not None:
        raise CaptureError(
            f"{node.name}: the in-place op {node.target} writes into a view of buffer "
            f"{base.target!r}; "
            "autopar writes buffers whole: compute the new buffer out of place and copy it "
            f"in whole (buf.copy_(new))")
    return None


_VIEWS = {"getitem", "view", "reshape", "select", "narrow", "slice", "transpose", "permute",
          "squeeze", "unsqueeze", "flatten", "expand", "t", "as_strided", "diagonal",
          "unflatten", "view_as", "movedim", "split", "chunk", "unbind"}


def _viewed_buffer(node, params: set):
    """The buffer get_attr ``node`` is a view of, through view ops; None where it is none."""
    while isinstance(node, Node) and node.op in ("call_function", "call_method") and \
            canonical_name(node) in _VIEWS and node.args:
        node = node.args[0]
    if isinstance(node, Node) and node.op == "get_attr" and node.target not in params:
        return node
    return None


def _write(graph, node, buffer, last_write: dict) -> None:
    """Store ``node``'s value into ``buffer`` right after it, replacing an earlier write of
    the same buffer (its value is overwritten, and readers read values, not the buffer)."""
    with graph.inserting_after(node):
        write = graph.call_function(write_buffer, (buffer, node))
    write.meta.update({k: v for k, v in node.meta.items() if not k.startswith("autopar.")
                       and k not in ("val", "example_value")})
    write.meta["autopar.op"] = canonical_name(write)
    if buffer in last_write:
        graph.erase_node(last_write[buffer])
    last_write[buffer] = write


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
